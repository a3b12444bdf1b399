"""Parameter space (PS): which numbers of a mergekit recipe CMA-ES evolves.

The space is derived from mergekit itself: every float parameter in a merge method's
``spec`` (``mergekit.merge_methods.get(name).spec``) can be searched, so methods that users register
work too. A *gene* is one searched number: (parameter, layer group, source model, filter set).
The genome layout follows mergekit-evolve's genotype ``(layer groups, models, filters + 1, params)``
for per-model parameters, then shared (per-merge) parameters as ``(layer groups, filters + 1, params)``.

Per-model parameters are searched for every model in ``genome.models``, except ``non_base`` ones
(weight, density, ... of the ties family), which mergekit ignores for the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np
from mergekit.merge_methods import get as get_merge_method
from mergekit.merge_methods.base import BasePolicy, ParameterScope

from mergekit_evolve.config import GenomeConfig, ParameterSearch
from mergekit_evolve.errors import InputError
from mergekit_evolve.space.ranges import check_bounds, check_value
from mergekit_evolve.space.transforms import BoundedGene, gene_values, initial_genome

# Parameters evolved when ``genome.search`` is not given. Others can be added to ``search`` with bounds.
DEFAULT_SEARCH: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "dare_linear": ("weight", "density"),
    "breadcrumbs": ("weight", "density", "gamma"),
    "breadcrumbs_ties": ("weight", "density", "gamma"),
    "della": ("weight", "density", "epsilon"),
    "della_linear": ("weight", "density", "epsilon"),
    "slerp": ("t",),
    "nuslerp": ("weight",),
    "multislerp": ("weight",),
    "sce": ("select_topk",),
    "nearswap": ("t",),
}

# Methods with nothing to evolve, and why (also in the README).
NOT_SEARCHABLE: dict[str, str] = {
    "passthrough": "copies one input per tensor; its only number, scale, is what DFS evolves",
    "model_stock": "computes its weights from the models' geometry; only boolean options",
    "karcher": "only iteration count and tolerance of a numerical solver",
    "arcee_fusion": "has no parameters",
}

# Default ranges in parameter units. ``weight`` becomes [-1, 1] with allow_negative_weights.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.0, 1.0),
    "t": (0.0, 1.0),
    "lambda": (0.0, 2.0),
    "gamma": (0.0, 0.2),
    "epsilon": (0.0, 0.5),
    "select_topk": (0.0, 1.0),
    "r": (0.0, 1.0),
    "alpha": (0.0, 1.0),
}


@dataclass(frozen=True, kw_only=True)
class Gene(BoundedGene):
    """One evolved number. ``model`` is an index into genome.models, None for shared parameters."""

    param: str
    group: int
    model: int | None
    filter_set: int  # index into filters; len(filters) means "everything else"


class PSSpace:
    """Maps a flat genome to per-gene parameter values (and, via ``recipe.ps``, to a mergekit recipe)."""

    def __init__(self, genome: GenomeConfig, num_layers: int, io_weights: tuple[list[str], list[str]] | None = None):
        """``io_weights``: mergekit's names of the tensors before and after the layers (embeddings; final
        norm, lm_head); the recipe needs them when ``genome.tune_embeddings`` is on."""
        self.genome = genome
        self.num_layers = num_layers
        self.io_weights = io_weights
        self.method = _merge_method(genome.merge_method)
        self._check_structure()
        self.search = self._searched_parameters()
        self._check_ranges()

    # -- structure -----------------------------------------------------------------------------
    @property
    def filters(self) -> list[str]:
        return list(self.genome.filters or [])

    @property
    def n_groups(self) -> int:
        g = self.genome.layer_granularity
        return 1 if g == 0 else self.num_layers // g

    @property
    def group_size(self) -> int:
        return self.num_layers // self.n_groups

    @property
    def base_index(self) -> int | None:
        base = self.genome.base_model
        return self.genome.models.index(base) if base in self.genome.models else None

    def _check_structure(self) -> None:
        g, name = self.genome, self.genome.merge_method
        contract = self.method.spec.contract
        if g.layer_granularity and self.num_layers % g.layer_granularity:
            divisors = [d for d in range(1, self.num_layers + 1) if self.num_layers % d == 0]
            raise InputError(
                f"genome.layer_granularity: {g.layer_granularity} does not divide the {self.num_layers} "
                f"layers of the models; use 0 or one of {divisors}"
            )
        if contract.base == BasePolicy.REQUIRED and not g.base_model:
            raise InputError(f"genome.base_model: merge method {name} needs a base model; set genome.base_model")
        n_inputs = len(set(g.models) | ({g.base_model} if g.base_model else set()))
        if n_inputs < contract.min_inputs or (contract.max_inputs and n_inputs > contract.max_inputs):
            wanted = contract.min_inputs if contract.min_inputs == contract.max_inputs else f">= {contract.min_inputs}"
            raise InputError(
                f"genome.models: {name} merges {wanted} models (base included), got {n_inputs}; "
                "change genome.models or the merge method"
            )
        names = {p.name for p in self.method.spec.parameters}
        for key in g.parameters:
            if key not in names:
                raise InputError(
                    f"genome.parameters.{key}: {name} has no such parameter; its parameters are {sorted(names)}"
                )
        if g.smooth and name in ("slerp", "nearswap"):
            raise InputError(f"genome.smooth: not supported with {name}; set smooth: false")

    def _searched_parameters(self) -> list[str]:
        specs = {p.name: p for p in self.method.spec.parameters}
        name = self.genome.merge_method
        explicit = [k for k, v in self.genome.parameters.items() if isinstance(v, ParameterSearch)]
        wanted = self.genome.search if self.genome.search is not None else list(DEFAULT_SEARCH.get(name, ()))
        if self.genome.search is None and name not in DEFAULT_SEARCH:
            wanted = [p.name for p in specs.values() if p.value_type is float and p.required]
        wanted = list(dict.fromkeys([*wanted, *explicit]))
        for param in wanted:
            if param not in specs:
                raise InputError(
                    f"genome.search: {name} has no parameter {param!r}; its parameters are {sorted(specs)}"
                )
            if specs[param].value_type not in (float, Optional[float]):  # noqa: UP045 (mergekit's own type)
                raise InputError(
                    f"genome.search: {name}.{param} is not a float and cannot be evolved; fix it in genome.parameters"
                )
            if param not in DEFAULT_BOUNDS and param not in explicit:
                raise InputError(
                    f"genome.parameters.{param}: give its range to evolve it, e.g. {param}: {{bounds: [0, 1]}}"
                )
            if param in self.genome.parameters and not isinstance(self.genome.parameters[param], ParameterSearch):
                raise InputError(
                    f"genome.parameters.{param}: fixed to {self.genome.parameters[param]!r} but also listed in "
                    "genome.search; remove one of the two"
                )
        if not wanted:
            raise InputError(
                f"genome.merge_method: {name} has nothing to evolve "
                f"({NOT_SEARCHABLE.get(name, 'no float parameters')}); "
                "choose a method such as dare_ties, ties, linear or slerp"
            )
        return wanted

    def _check_ranges(self) -> None:
        """Searched ranges and fixed values within what each parameter means (space/ranges.py)."""
        name = self.genome.merge_method
        for param in self.search:
            setting = self.genome.parameters.get(param)
            where = f"genome.parameters.{param}.bounds" if setting is not None else f"genome.search: {param}"
            check_bounds(name, param, *self.bounds(param), where)
        for param, value in self.genome.parameters.items():
            if not isinstance(value, ParameterSearch):
                check_value(name, param, value, f"genome.parameters.{param}")

    def scope(self, param: str) -> ParameterScope:
        return next(p.scope for p in self.method.spec.parameters if p.name == param)

    # -- genes ---------------------------------------------------------------------------------
    def bounds(self, param: str) -> tuple[float, float]:
        setting = self.genome.parameters.get(param)
        if isinstance(setting, ParameterSearch):
            return setting.bounds
        if param == "weight" and self.genome.allow_negative_weights:
            return (-1.0, 1.0)
        if self.genome.merge_method in ("della", "della_linear") and param == "density":
            return (0.01, 0.99)  # della needs density +- epsilon strictly inside (0, 1)
        return DEFAULT_BOUNDS[param]

    def initial_value(self, param: str) -> float:
        """mergekit-evolve's starting point: weight 1/n_models, density 1; else the spec default."""
        setting = self.genome.parameters.get(param)
        lo, hi = self.bounds(param)
        if isinstance(setting, ParameterSearch) and setting.init is not None:
            value = setting.init
        elif param == "weight":
            value = 1.0 / len(self.genome.models)
        elif param == "density":
            value = 1.0
        elif param == "t":
            value = 0.5
        else:
            default = next(p.default for p in self.method.spec.parameters if p.name == param)
            value = default if isinstance(default, (int, float)) else (lo + hi) / 2
        return float(np.clip(value, lo, hi))

    @cached_property
    def genes(self) -> list[Gene]:
        per_model = [p for p in self.search if self.scope(p) != ParameterScope.SHARED]
        shared = [p for p in self.search if self.scope(p) == ParameterScope.SHARED]
        n_sets = len(self.filters) + 1
        genes: list[Gene] = []
        for group in range(self.n_groups):
            for model in range(len(self.genome.models)):
                for fset in range(n_sets):
                    for param in per_model:
                        if self.scope(param) == ParameterScope.NON_BASE and model == self.base_index:
                            continue
                        genes.append(self._gene(param, group, model, fset))
        for group in range(self.n_groups):
            for fset in range(n_sets):
                for param in shared:
                    genes.append(self._gene(param, group, None, fset))
        if self.genome.tune_embeddings:  # group index n_groups: embeddings, final norm and lm_head
            for model in range(len(self.genome.models)):
                for param in per_model:
                    if not (self.scope(param) == ParameterScope.NON_BASE and model == self.base_index):
                        genes.append(self._gene(param, self.n_groups, model, 0))
            for param in shared:
                genes.append(self._gene(param, self.n_groups, None, 0))
        return genes

    def _gene(self, param: str, group: int, model: int | None, filter_set: int) -> Gene:
        lo, hi = self.bounds(param)
        return Gene(lo, hi, self.initial_value(param), param=param, group=group, model=model, filter_set=filter_set)

    @property
    def io_group(self) -> int | None:
        """The gene group of the embeddings, final norm and lm_head (None: they follow the layer groups)."""
        return self.n_groups if self.genome.tune_embeddings else None

    @property
    def dim(self) -> int:
        return len(self.genes)

    def x0(self, random: bool = False, seed: int = 0) -> np.ndarray:
        return initial_genome(self.genes, random, seed)

    def values(self, genome: np.ndarray) -> list[float]:
        """Parameter values of each gene for a genome (same order as ``genes``)."""
        return gene_values(self.genes, genome, "this search space")

    def describe(self) -> str:
        return (
            f"PS space: {self.genome.merge_method}, {self.dim} genes over {self.n_groups} layer group(s), "
            f"{len(self.genome.models)} model(s), {len(self.filters) + 1} filter set(s); evolving {self.search}"
        )


def _merge_method(name: str):
    try:
        return get_merge_method(name)
    except Exception:
        from mergekit.merge_methods import registered_methods

        known = sorted(m.spec.name for m in registered_methods())
        raise InputError(f"genome.merge_method: unknown merge method {name!r}; use one of {known}") from None
