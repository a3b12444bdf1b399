"""Search problems: a search space bound to the engine that turns its genomes into models.

``PSProblem``: genome -> mergekit recipe -> in-memory merge (one resident model; with ``fitness.backend:
vllm`` no resident model: the merged tensors stream into one vLLM engine per problem, i.e. per worker).
``TemplateProblem``: the same, for a mergekit YAML with ``{evolve: [lo, hi]}`` markers.
``DFSProblem`` (search/dfs_problem.py): genome -> layer path -> layer-stack model over a shared pool.
``make_problem`` picks one from ``PROBLEMS`` by the config. What a best candidate becomes on disk
(best.yaml, the merged model) is export's job: ``export/artifacts.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from mergekit_evolve.config import EvolveConfig, OptimizerConfig
from mergekit_evolve.errors import InputError
from mergekit_evolve.recipe.ps import ps_recipe, recipe_hash, to_merge_config
from mergekit_evolve.resources import default_dtype, load_tokenizer, tokenizer_donor
from mergekit_evolve.search.cmaes import new_es
from mergekit_evolve.space.models import check_causal_lm, check_same_shape, inspect_models, io_weight_names
from mergekit_evolve.space.ps import PSSpace


@dataclass(frozen=True)
class PSCandidate:
    """A PS genome decoded: the mergekit recipe (a dict of mergekit's YAML) and its hash."""

    recipe: dict[str, Any]
    key: str


class Problem(Protocol):
    """A search space bound to the engine that turns its genomes into models (PS: mergekit, DFS: a
    layer stack). It only searches: what the best candidate becomes on disk is export's job."""

    dim: int
    device: str
    dtype: str
    config: EvolveConfig

    @property
    def tokenizer_ref(self) -> str: ...  # the model whose tokenizer the fitness uses
    @property
    def tokenizer(self) -> Any: ...  # that tokenizer, or None when the folder has no tokenizer files
    def x0(self, random: bool = False, seed: int = 0) -> np.ndarray: ...
    def new_optimizer(self, x0: np.ndarray, opt: OptimizerConfig, restart: int = 0) -> Any: ...  # ask/tell
    def search_box(self) -> tuple[np.ndarray, np.ndarray]: ...  # where NSGA-II samples genomes
    def decode(self, genome: np.ndarray) -> Any: ...  # a candidate with a ``key``: equal keys score equally
    def build(self, candidate: Any) -> Any: ...  # a model ready for the fitness
    def close(self) -> None: ...


class PSProblem:
    def __init__(self, config: EvolveConfig, device: str = "cpu"):
        genome = config.genome
        refs = list(dict.fromkeys([*genome.models, *([genome.base_model] if genome.base_model else [])]))
        infos = inspect_models(refs, "genome.models", allow_pickle=config.allow_pickle_weights)
        check_same_shape(infos, "genome.models")
        check_causal_lm(infos[0], "genome.models")
        self.config = config
        self.device = device
        self.first_source = infos[0].ref
        self.dtype = default_dtype(config.dtype, infos[0].dtype, device)
        io = io_weight_names(refs[0]) if genome.tune_embeddings else None
        self.space = PSSpace(genome, infos[0].num_layers, io_weights=io)
        self.dim = self.space.dim
        self._merger = None
        self._engine = None

    @property
    def merger(self):
        if self._merger is None:  # loading sources is the expensive part: only when first needed
            from mergekit_evolve.merge import InMemoryMerger

            # Any candidate names the same models; the initial one serves as the template. The
            # recipes name self.dtype; the merger's model takes the dtype mergekit writes for them.
            template = to_merge_config(self.decode(self.x0()).recipe)
            self._merger = InMemoryMerger(
                template,
                device=self.device,
                random_seed=self.config.merge_seed,
                fast_path=self.config.merge_fast_path,
                resident=self.config.backend == "hf",  # vLLM holds the weights itself
            )
        return self._merger

    @property
    def engine(self):
        """``fitness.backend: vllm``: the engine candidates are loaded into, started after the sources are
        loaded (its GPU share is counted from what they leave free)."""
        if self._engine is None:
            from mergekit_evolve.fitness.vllm_engine import VllmModel

            merger = self.merger
            self._engine = VllmModel(
                merger.model.config, self.tokenizer, self.config.fitness.vllm, merger.model.dtype, self.device
            )
        return self._engine

    @property
    def tokenizer_ref(self) -> str:
        g = self.config.genome
        return tokenizer_donor(g.tokenizer_source, g.base_model, g.models)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_ref)

    def x0(self, random: bool = False, seed: int = 0) -> np.ndarray:
        return self.space.x0(random=random, seed=seed)

    def decode(self, genome: np.ndarray) -> PSCandidate:
        recipe = ps_recipe(self.space, np.asarray(genome)[: self.dim], self.dtype)
        return PSCandidate(recipe=recipe, key=recipe_hash(recipe))

    def new_optimizer(self, x0: np.ndarray, opt: OptimizerConfig, restart: int = 0):
        return new_es(x0, opt, restart)

    def search_box(self) -> tuple[np.ndarray, np.ndarray]:
        # every gene's range is [0, 1] in genome units (space/transforms.py maps it to the parameter's bounds)
        return np.zeros(self.dim), np.ones(self.dim)

    def build(self, candidate: PSCandidate):
        config = to_merge_config(candidate.recipe)
        if self.config.backend == "vllm":
            return self.engine.load_weights(self.merger.merged_tensors(config))
        return self.merger.merge(config)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._merger = self._engine = None


class TemplateProblem(PSProblem):
    """A mergekit YAML with ``{evolve: [lo, hi]}`` markers; the result is that YAML filled in."""

    def __init__(self, config: EvolveConfig, device: str = "cpu"):
        from mergekit_evolve.space.template import TemplateSpace

        self.config = config
        self.device = device
        self.space = TemplateSpace(config.template)
        refs = self.space.referenced_models()
        infos = inspect_models(refs, "template models", allow_pickle=config.allow_pickle_weights)
        self.first_source = infos[0].ref
        check_same_shape(infos, "template models")
        check_causal_lm(infos[0], "template models")
        self.dtype = default_dtype(config.template.get("dtype"), infos[0].dtype, device)
        # The recipe must say the dtype it was evaluated in when that is not the sources' own
        # (bf16 by default on CUDA), so mergekit-yaml rebuilds exactly the model that was scored.
        self._fill_dtype = self.dtype if "dtype" not in config.template and self.dtype != infos[0].dtype else None
        self.dim = self.space.dim
        self._merger = None
        self._engine = None
        try:
            to_merge_config(self.space.fill(self.space.x0()))
        except Exception as err:
            raise InputError(
                f"template: not a valid mergekit recipe once filled in ({_first_error(err)}); fix the YAML"
            ) from None

    @property
    def tokenizer_ref(self) -> str:
        t = self.config.template
        source = t.get("tokenizer_source")
        return tokenizer_donor(
            source if isinstance(source, str) else None, t.get("base_model"), self.space.referenced_models()
        )

    def decode(self, genome: np.ndarray) -> PSCandidate:
        recipe = self.space.fill(np.asarray(genome)[: self.dim])
        if self._fill_dtype:
            recipe["dtype"] = self._fill_dtype
        return PSCandidate(recipe=recipe, key=recipe_hash(recipe))


def _first_error(err: Exception) -> str:
    """The first of pydantic's errors with where it is (``models.0.parameters``), else the message's first line."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and "[" in p))
        return f"{where}: {first['msg']}"
    return str(err).splitlines()[0]


def _dfs_problem(config: EvolveConfig, device: str) -> Problem:
    from mergekit_evolve.search.dfs_problem import DFSProblem  # loads the layer-stack code only for DFS

    return DFSProblem(config, device)


PROBLEMS: dict[str, Callable[[EvolveConfig, str], Problem]] = {
    "ps": PSProblem,
    "template": TemplateProblem,
    "dfs": _dfs_problem,
}


def problem_kind(config: EvolveConfig) -> str:
    """Which problem searches a config's (first) stage: ``dfs``, ``template`` or ``ps``."""
    if config.space == "dfs":
        return "dfs"
    return "template" if config.template is not None else "ps"


def make_problem(config: EvolveConfig, device: str = "cpu") -> Problem:
    """The problem for a config's (first) stage."""
    return PROBLEMS[problem_kind(config)](config, device)
