"""The embedded zoo: a seeded, cached family of tiny Llama models with real, different skills.

``build_zoo()`` builds it offline on first use and caches it (``$MERGEKIT_EVOLVE_CACHE`` or
``~/.cache/mergekit_evolve``); ``mergekit-evo zoo build`` does the same from the command line.
"""

from mergekit_evolve.zoo.build import ZOO_VERSION, Zoo, ZooTask, build_zoo, default_zoo_dir

__all__ = ["ZOO_VERSION", "Zoo", "ZooTask", "build_zoo", "default_zoo_dir"]
