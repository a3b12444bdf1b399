"""Re-planning a recipe whose structure was planned before: only its parameter values change.

A search plans thousands of candidates of one recipe structure (same models, slices, layer
ranges, method, dtypes, tokenizer; new parameter values). mergekit's planner redoes all of it
for each: it normalises the config (reading every source's config.json), lays out each output
tensor's inputs from the architecture, builds the gather and merge tasks, and resolves the
tensor's parameters. Only that last step depends on parameter values.

``PlanSkeleton`` is the plan of one structure, made once by mergekit's planner, plus for every
output tensor *where* its parameters come from: which ``parameters`` blocks of the recipe, in
mergekit's order of precedence (``ConfigReader.parameter_sources``), and the layer position
``t`` of gradients. ``replan(config)`` resolves them again from another config of that
structure with mergekit's own ``resolve_parameters`` and swaps them into copies of the planned
tasks. tests/test_merge_engine.py checks that the result equals a fresh plan, task for task.

How the blocks are traced through mergekit's normalisation (``models:`` and ``slices:`` become
``modules.slices``, copying each block): the skeleton is planned from a copy of the config in
which every ``parameters`` block carries one extra key, its position in ``parameter_owners``.
No merge method reads that key (parameters are looked up by the names a method declares), and
every block a tensor's reader yields after normalisation names the block it was copied from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import immutables
from mergekit.common import ModelReference
from mergekit.config import ConfigReader, MergeConfiguration
from mergekit.io.tasks import ReturnTensor
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.parameter_resolver import resolve_parameters
from pydantic import BaseModel

__all__ = ["PlanSkeleton", "TensorSource", "parameter_owners", "recipe_structure"]

SLOT = "mergekit_evolve.slot"  # the marker key; never a merge method's parameter name

_NO_PARAMETERS = {"parameters": True}
_SLICES_NO_PARAMETERS = {"__all__": {"parameters": True, "sources": {"__all__": _NO_PARAMETERS}}}
_STRUCTURE_EXCLUDE = {
    "parameters": True,
    "models": {"__all__": _NO_PARAMETERS},
    "slices": _SLICES_NO_PARAMETERS,
    "modules": {
        "__all__": {"parameters": True, "models": {"__all__": _NO_PARAMETERS}, "slices": _SLICES_NO_PARAMETERS}
    },
}


def recipe_structure(config: MergeConfiguration) -> str:
    """Everything of ``config`` but its parameter values: two configs with the same structure
    plan the same tasks in the same order, apart from the tasks' parameters. (Keys keep their
    order: mergekit plans modules in the order they are written, and ``parameter_owners`` walks
    them so.)"""
    return json.dumps(config.model_dump(mode="json", exclude=_STRUCTURE_EXCLUDE))


def parameter_owners(config: MergeConfiguration) -> list[BaseModel]:
    """Every object of ``config`` with a ``parameters`` block, in a fixed order (the same for
    every config of one structure)."""
    owners: list[BaseModel] = [config, *(config.models or [])]
    for output_slice in config.slices or []:
        owners += [output_slice, *output_slice.sources]
    for module in (config.modules or {}).values():
        owners += [module, *(module.models or [])]
        for output_slice in module.slices or []:
            owners += [output_slice, *output_slice.sources]
    return owners


def marked_copy(config: MergeConfiguration) -> MergeConfiguration:
    """A deep copy of ``config`` whose every ``parameters`` block holds its owner's position."""
    marked = config.model_copy(deep=True)
    for position, owner in enumerate(parameter_owners(marked)):
        owner.parameters = {**(owner.parameters or {}), SLOT: position}
    return marked


class TensorSource:
    """Where one planned tensor's parameters come from (as its ``ConfigReader`` found them).

    ``inputs``: input model -> its tensor name (conditional parameters filter on it);
    ``slots``: per input model (and ``None`` for the shared parameters), the positions in
    ``parameter_owners`` of the blocks ``parameter_sources`` yields, ``None`` for a block
    made by normalisation (it holds no parameters).
    """

    def __init__(self, name: str, inputs: dict[ModelReference, str], reader: ConfigReader):
        self.name = name
        self.inputs = inputs
        self.t = reader.t
        self.shared_slots = _slots(reader.parameter_sources(None))
        # keyed by identity: resolve_parameters hands back the very model objects of ``inputs``
        self.input_slots = {id(model): _slots(reader.parameter_sources(model)) for model in inputs}

    def resolve(self, task: ExecuteMergeMethodTask, spec, blocks: list) -> ExecuteMergeMethodTask:
        """``task`` with its parameters resolved from ``blocks`` (a config's parameter blocks)."""

        def sources(model: ModelReference | None) -> list:
            slots = self.shared_slots if model is None else self.input_slots[id(model)]
            return [None if slot is None else blocks[slot] for slot in slots]

        shared, per_input = resolve_parameters(
            spec, tensor_name=self.name, inputs=self.inputs, sources=sources, base_model=task.base_model, t=self.t
        )
        # What ExecuteMergeMethodTask's validation makes of these dicts (ImmutableMap fields
        # validate a dict into an immutables.Map); the copy skips re-checking the structure.
        per_input = immutables.Map({model: immutables.Map(values) for model, values in per_input.items()})
        return task.model_copy(update={"parameters": immutables.Map(shared), "input_parameters": per_input})


def _slots(blocks) -> tuple[int | None, ...]:
    slots = []
    for block in blocks:
        if block is not None and SLOT not in block:
            raise _Untraceable
        slots.append(None if block is None else block[SLOT])
    return tuple(slots)


class _Untraceable(Exception):
    """A parameter block without the marker: mergekit's normalisation made it in a way this
    module does not know; that structure is planned in full every time."""


class PlanSkeleton:
    """One recipe structure's plan, re-resolvable for another config of that structure.

    ``plan_marked(config)`` must plan a config with mergekit's planner and return its targets,
    the tokenizer task and one ``(name, inputs, reader)`` per target (``TensorSource``'s
    arguments); ``build`` hands it the marked copy. ``build`` returns None when a block cannot
    be traced (that structure then plans every config in full).
    """

    def __init__(self, targets: list[ReturnTensor], tokenizer_task: Any, sources: list[TensorSource], spec):
        self.targets = targets
        self.tokenizer_task = tokenizer_task
        self.sources = sources
        self.spec = spec

    @classmethod
    def build(cls, config: MergeConfiguration, plan_marked: Callable, spec) -> PlanSkeleton | None:
        targets, tokenizer_task, found = plan_marked(marked_copy(config))
        if len(found) != len(targets) or not all(isinstance(t.tensor_task, ExecuteMergeMethodTask) for t in targets):
            return None
        try:
            sources = [TensorSource(*arguments) for arguments in found]
        except _Untraceable:
            return None
        return cls(targets, tokenizer_task, sources, spec)

    def replan(self, config: MergeConfiguration) -> list[ReturnTensor]:
        """The targets of ``config`` (a config of this skeleton's structure)."""
        blocks = [owner.parameters for owner in parameter_owners(config)]
        return [
            ReturnTensor.model_construct(
                weight_info=target.weight_info,
                tensor_task=source.resolve(target.tensor_task, self.spec, blocks),
                dtype=target.dtype,
            )
            for target, source in zip(self.targets, self.sources)
        ]
