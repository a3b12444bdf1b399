"""Template recipes: any mergekit YAML becomes a search space by marking the numbers to evolve.

    models:
      - model: org/a
        parameters:
          weight: {evolve: [0.0, 1.0]}
          density: {evolve: [0.1, 1.0], init: 0.5}
      - model: org/b
        parameters:
          weight: [{evolve: [0, 1]}, 0.3, {evolve: [0, 1]}]     # a gradient with two evolved points
          density:
            - {filter: self_attn, value: {evolve: [0.2, 0.9]}}
            - {value: 0.7}

A marker is a mapping with ``evolve: [lo, hi]`` and optionally ``init`` (default: the middle).
Markers may stand wherever mergekit takes a parameter value: a scalar, an element of a gradient
list, or the ``value`` of a ``{filter, value}`` entry, under any ``parameters:`` section (global,
per model, per slice, per slice source). Each marker is one gene, in document order, mapped to its
range by ``mergekit_evolve.space.transforms`` (the same transform as the PS space).
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from mergekit_evolve.errors import InputError
from mergekit_evolve.space.ranges import check_bounds, check_value
from mergekit_evolve.space.transforms import BoundedGene, gene_values, initial_genome

MARKER_KEYS = {"evolve", "init"}


@dataclass(frozen=True, kw_only=True)
class Marker(BoundedGene):
    """One marked number of a template: where it stands in the YAML tree and its range."""

    path: tuple  # keys/indices from the template root to the marker

    @property
    def where(self) -> str:
        return format_path(self.path)


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def is_marker(node: Any) -> bool:
    return isinstance(node, dict) and "evolve" in node


def parse_marker(node: dict, path: tuple) -> Marker:
    where = format_path(path)
    unknown = set(node) - MARKER_KEYS
    if unknown:
        raise InputError(f"{where}: unknown marker key(s) {sorted(unknown)}; a marker is {{evolve: [lo, hi], init: x}}")
    bounds = node["evolve"]
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
    ):
        raise InputError(f"{where}: evolve must be a list [lo, hi] of two numbers, got {bounds!r}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo < hi:
        raise InputError(f"{where}: evolve [{bounds[0]}, {bounds[1]}] needs lo < hi; swap or widen the range")
    init = node.get("init", (lo + hi) / 2)
    if not isinstance(init, (int, float)) or isinstance(init, bool) or not lo <= init <= hi:
        raise InputError(f"{where}: init {init!r} must be a number within evolve [{bounds[0]}, {bounds[1]}]")
    return Marker(lo, hi, float(init), path=path)


VALUE_ENTRY_KEYS = {"filter", "value"}  # mergekit's per-filter value: {filter: self_attn, value: 0.5}


def check_value_entry(node: dict, path: tuple) -> None:
    """A mapping among parameter values is a marker or mergekit's ``{filter, value}``; anything else is a typo
    that would otherwise surface as mergekit's validation errors without a name."""
    unknown = sorted(set(node) - VALUE_ENTRY_KEYS)
    if not unknown:
        return
    close = difflib.get_close_matches(str(unknown[0]), [*MARKER_KEYS, *VALUE_ENTRY_KEYS], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InputError(
        f"{format_path(path)}: unknown key {unknown[0]!r}{hint}; a parameter value is a number, a list, "
        "{filter: ..., value: ...}, or a marker {evolve: [lo, hi], init: x}"
    )


def find_markers(node: Any, path: tuple = (), in_parameters: bool = False) -> list[Marker]:
    if is_marker(node):
        if not in_parameters:
            raise InputError(
                f"{format_path(path)}: markers can only stand in a 'parameters:' section "
                "(merge parameter values); this value cannot be evolved"
            )
        return [parse_marker(node, path)]
    found: list[Marker] = []
    if isinstance(node, dict) and in_parameters and path[-1] != "parameters":
        check_value_entry(node, path)
    if isinstance(node, dict):
        for key, value in node.items():
            found += find_markers(value, (*path, key), in_parameters or key == "parameters")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += find_markers(value, (*path, i), in_parameters)
    return found


def marked_parameter(marker: Marker) -> str:
    """The merge parameter a marker stands for: the key right after its last ``parameters``."""
    path = marker.path
    last = max(i for i, part in enumerate(path) if part == "parameters")
    return str(path[last + 1])


def marked_model(template: dict[str, Any], marker: Marker) -> Any:
    """The model entry a marker belongs to (``models[i]`` or a slice source), or None if global."""
    node, owner = template, None
    for part in marker.path:
        if part == "parameters":
            break
        node = node[part]
        if isinstance(node, dict) and "model" in node:
            owner = node["model"]
    return owner


def check_marked_parameters(template: dict[str, Any], markers: list[Marker]) -> None:
    """Every marker must stand for a float parameter the method reads, as genome configs must
    (``space/ps.py``): a marker mergekit ignores would evolve a number that changes nothing."""
    from mergekit.merge_methods import get as get_merge_method
    from mergekit.merge_methods.base import ParameterScope

    name = template.get("merge_method")
    try:
        method = get_merge_method(name)
    except Exception:
        return  # an unknown method is reported when the filled recipe is validated
    specs = {p.name: p for p in method.spec.parameters}
    floats = sorted(n for n, p in specs.items() if p.value_type in (float, Optional[float]))  # noqa: UP045
    for marker in markers:
        param = marked_parameter(marker)
        if param not in specs:
            detail = f"its float parameters are {floats}" if floats else "it has no parameter to evolve"
            raise InputError(f"{marker.where}: {name} has no parameter {param!r}; {detail}; remove the marker")
        if param not in floats:
            raise InputError(
                f"{marker.where}: {name}.{param} is not a number and cannot be evolved; give it a fixed value"
            )
        check_bounds(name, param, marker.lo, marker.hi, f"{marker.where}.evolve")
        base = template.get("base_model")
        if (
            specs[param].scope == ParameterScope.NON_BASE
            and base is not None
            and marked_model(template, marker) == base
        ):
            raise InputError(
                f"{marker.where}: {name} ignores {param} of the base model; mark it on the other models only"
            )


def fixed_numbers(node: Any, path: tuple = ()) -> list[tuple[tuple, str, float]]:
    """``(path, parameter, number)`` for every number a template fixes under a ``parameters:`` section
    (plain values, gradient lists, ``{filter, value}`` entries); markers are not fixed numbers."""
    found: list[tuple[tuple, str, float]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "parameters" and isinstance(value, dict):
                for param, setting in value.items():
                    found += _numbers_of(setting, (*path, key, param), str(param))
            else:
                found += fixed_numbers(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += fixed_numbers(value, (*path, i))
    return found


def _numbers_of(node: Any, path: tuple, param: str) -> list[tuple[tuple, str, float]]:
    if is_marker(node):
        return []
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [(path, param, node)]
    if isinstance(node, list):
        return [found for i, item in enumerate(node) for found in _numbers_of(item, (*path, i), param)]
    if isinstance(node, dict) and "value" in node:
        return _numbers_of(node["value"], (*path, "value"), param)
    return []


def check_fixed_numbers(template: dict[str, Any]) -> None:
    """The numbers a template fixes must be values their parameters take, as the evolved ones."""
    name = template.get("merge_method")
    if isinstance(name, str):
        for path, param, number in fixed_numbers(template):
            check_value(name, param, number, format_path(path))


class TemplateSpace:
    """A mergekit YAML with markers; genomes fill the markers in."""

    def __init__(self, template: dict[str, Any]):
        self.template = template
        self.markers = find_markers(template)
        if not self.markers:
            raise InputError(
                "template: no numbers are marked to evolve; mark at least one parameter, "
                "e.g. weight: {evolve: [0.0, 1.0]}"
            )
        check_marked_parameters(template, self.markers)
        check_fixed_numbers(template)
        self.dim = len(self.markers)

    def x0(self, random: bool = False, seed: int = 0) -> np.ndarray:
        return initial_genome(self.markers, random, seed)

    def values(self, genome: np.ndarray) -> list[float]:
        return gene_values(self.markers, genome, "this template")

    def fill(self, genome: np.ndarray) -> dict[str, Any]:
        """The template with every marker replaced by its value: a plain mergekit recipe."""
        recipe = copy.deepcopy(self.template)
        for marker, value in zip(self.markers, self.values(genome)):
            parent = recipe
            for key in marker.path[:-1]:
                parent = parent[key]
            parent[marker.path[-1]] = value
        return recipe

    def referenced_models(self) -> list[str]:
        found: list[str] = []

        def walk(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    if key in ("model", "base_model") and isinstance(value, str):
                        found.append(value)
                    else:
                        walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(self.template)
        return list(dict.fromkeys(found))

    def describe(self) -> str:
        return f"template space: {self.dim} marked number(s): " + ", ".join(m.where for m in self.markers)
