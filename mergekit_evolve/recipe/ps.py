"""Genome -> plain mergekit recipe (the YAML ``mergekit-yaml`` runs).

One layer group:  ``models:`` format, per-model parameters on each model, shared ones at top level.
Several groups:   ``slices:`` format, one slice per group (as mergekit-evolve writes them).
``smooth: true``: ``models:`` format with one value per group as a gradient list (mergekit
interpolates it over the layers).
Filters become ``[{filter: self_attn, value: ...}, ..., {value: <rest>}]`` (first match wins).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import yaml
from mergekit.config import MergeConfiguration

from mergekit_evolve.config import ParameterSearch
from mergekit_evolve.space.ps import PSSpace
from mergekit_evolve.space.transforms import decimal

Table = dict[tuple, float]  # (param, group, model|None, filter_set) -> value


def ps_recipe(space: PSSpace, genome: np.ndarray, dtype: str | None = None) -> dict[str, Any]:
    """The mergekit recipe (a YAML-ready dict) for a genome of ``space``."""
    table = {(g.param, g.group, g.model, g.filter_set): v for g, v in zip(space.genes, space.values(genome))}
    if space.genome.merge_method in ("della", "della_linear"):
        _keep_della_feasible(space, table)
    g = space.genome
    recipe: dict[str, Any] = {"merge_method": g.merge_method}
    if g.base_model:
        recipe["base_model"] = g.base_model
    if space.n_groups == 1 or g.smooth:
        io = _io_names(space, first=True, last=True)
        recipe["models"] = [
            {
                "model": m,
                "parameters": _with_io(
                    space, table, _model_parameters(space, table, i, groups=range(space.n_groups)), i, io
                ),
            }
            for i, m in enumerate(g.models)
        ]
        shared = _with_io(space, table, _shared_parameters(space, table, groups=range(space.n_groups)), None, io)
    else:
        recipe["slices"] = [_slice(space, table, group) for group in range(space.n_groups)]
        shared = {}
    parameters = {**_fixed_parameters(space), **shared}
    if parameters:
        recipe["parameters"] = parameters
    if dtype:
        recipe["dtype"] = dtype
    if g.tokenizer_source:
        recipe["tokenizer_source"] = g.tokenizer_source
    return _drop_empty_parameters(recipe)


def to_merge_config(recipe: dict[str, Any]) -> MergeConfiguration:
    return MergeConfiguration.model_validate(recipe)


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


class _PlainDumper(yaml.SafeDumper):
    """No &anchors/*aliases: recipes must read like hand-written mergekit YAML."""

    def ignore_aliases(self, data):
        return True


def recipe_yaml(recipe: dict[str, Any], header: str = "") -> str:
    body = yaml.dump(recipe, Dumper=_PlainDumper, sort_keys=False)
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + body


# -- building blocks -------------------------------------------------------------------------------
def _setting(space: PSSpace, values_per_set: list[Any]) -> Any:
    """One value, or a filter list when the genome has filters."""
    if not space.filters:
        return values_per_set[0]
    entries = [{"filter": f, "value": v} for f, v in zip(space.filters, values_per_set)]
    return entries + [{"value": values_per_set[-1]}]


def _per_group(values: list[float]) -> Any:
    return values[0] if len(values) == 1 else values


def _model_parameters(space: PSSpace, table: Table, model: int, groups) -> dict[str, Any]:
    out = {}
    for param in space.search:
        if (param, 0, model, 0) not in table:
            continue  # shared parameter, or non_base parameter of the base model
        per_set = [_per_group([table[(param, grp, model, s)] for grp in groups]) for s in range(len(space.filters) + 1)]
        out[param] = _setting(space, per_set)
    return out


def _shared_parameters(space: PSSpace, table: Table, groups) -> dict[str, Any]:
    out = {}
    for param in space.search:
        if (param, 0, None, 0) not in table:
            continue
        per_set = [_per_group([table[(param, grp, None, s)] for grp in groups]) for s in range(len(space.filters) + 1)]
        out[param] = _setting(space, per_set)
    return out


def _io_names(space: PSSpace, first: bool, last: bool) -> list[str]:
    """Tensors that take the embedding group's values: mergekit plans the embeddings with the first
    slice's parameters and the final norm / lm_head with the last slice's."""
    if space.io_group is None:
        return []
    if space.io_weights is None:
        raise ValueError("internal: genome.tune_embeddings needs the architecture's io_weights in PSSpace")
    pre, post = space.io_weights
    return [*(pre if first else []), *(post if last else [])]


def _with_io(space: PSSpace, table: Table, parameters: dict[str, Any], model, names: list[str]) -> dict[str, Any]:
    """Give the embedding/norm/lm_head tensors their own values: filter entries placed before the rest."""
    for param in space.search:
        key = (param, space.io_group, model, 0)
        if not names or key not in table:
            continue
        current = parameters[param]
        rest = (
            current if isinstance(current, list) and current and isinstance(current[0], dict) else [{"value": current}]
        )
        parameters[param] = [{"filter": name, "value": table[key]} for name in names] + rest
    return parameters


def _slice(space: PSSpace, table: Table, group: int) -> dict[str, Any]:
    g = space.genome
    layer_range = [group * space.group_size, (group + 1) * space.group_size]
    io = _io_names(space, first=group == 0, last=group == space.n_groups - 1)
    sources = [
        {
            "model": m,
            "layer_range": layer_range,
            "parameters": _with_io(space, table, _model_parameters(space, table, i, groups=[group]), i, io),
        }
        for i, m in enumerate(g.models)
    ]
    if g.base_model and g.base_model not in g.models:
        sources.append({"model": g.base_model, "layer_range": layer_range})
    out: dict[str, Any] = {"sources": sources}
    shared = _with_io(space, table, _shared_parameters(space, table, groups=[group]), None, io)
    if shared:
        out["parameters"] = shared
    return out


def _fixed_parameters(space: PSSpace) -> dict[str, Any]:
    """Non-evolved settings: the user's fixed values, then mergekit-evolve's defaults."""
    names = {p.name for p in space.method.spec.parameters}
    fixed = {k: v for k, v in space.genome.parameters.items() if not isinstance(v, ParameterSearch)}
    if "normalize" in names and "normalize" not in fixed:
        normalize = space.genome.normalize
        if normalize is None:  # mergekit-evolve's default
            normalize = space.genome.merge_method in ("ties", "dare_ties", "linear")
        fixed["normalize"] = normalize
    if "int8_mask" in names and "int8_mask" not in fixed:
        fixed["int8_mask"] = True  # as mergekit-evolve: halves mask memory, same result
    return fixed


def _keep_della_feasible(space: PSSpace, table: Table) -> None:
    """DELLA needs density +- epsilon strictly inside (0, 1): epsilon is capped at 99% of the room."""
    fixed_density = space.genome.parameters.get("density", 1.0)
    for key in list(table):
        param, group, model, fset = key
        if param != "epsilon":
            continue
        density = table.get(("density", group, model, fset), fixed_density)
        table[key] = decimal(min(table[key], 0.99 * min(density, 1.0 - density)))


def _drop_empty_parameters(recipe: dict[str, Any]) -> dict[str, Any]:
    for entry in recipe.get("models", []):
        if not entry["parameters"]:
            del entry["parameters"]
    for sl in recipe.get("slices", []):
        for src in sl["sources"]:
            if "parameters" in src and not src["parameters"]:
                del src["parameters"]
    return recipe
