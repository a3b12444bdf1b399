"""Recipe -> weights: in-memory candidates (``InMemoryMerger``) and final models on disk (``merge_to_disk``)."""

from mergekit_evolve.merge.disk import merge_to_disk
from mergekit_evolve.merge.inmemory import InMemoryMerger, MergeTimings

__all__ = ["InMemoryMerger", "MergeTimings", "merge_to_disk"]
