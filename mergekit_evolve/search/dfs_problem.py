"""The data-flow-space problem: genome -> layer path -> layer-stack model over a shared pool.

The pool is loaded once; a candidate only re-points the stack at other layers with other scales.
How the genome is searched (block-path pre-scan, indicator step) is search/dfs_search.py; what the best
path becomes on disk (the folded passthrough recipe, a standard or custom-code checkpoint) is export's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import numpy as np

from mergekit_evolve.config import EvolveConfig, source_models
from mergekit_evolve.errors import InputError
from mergekit_evolve.resources import default_dtype, load_tokenizer
from mergekit_evolve.search.cmaes import new_es
from mergekit_evolve.space.models import inspect_models


@dataclass(frozen=True)
class DFSCandidate:
    """A DFS genome decoded: the layer path (hops and their input scales) and its hash."""

    path: Any  # mergekit_evolve.space.dfs.DFSPath
    key: str


def dfs_models(config: EvolveConfig) -> list[str]:
    return list(config.dfs.models or source_models(config))


def check_dfs_collection(models: list[str], base_index: int, field: str = "dfs.models", allow_pickle: bool = False):
    from mergekit_evolve.merge.layer_pool import SUPPORTED_ARCHITECTURES

    infos = inspect_models(models, field, allow_pickle=allow_pickle)
    for i, info in enumerate(infos):
        if info.model_type not in SUPPORTED_ARCHITECTURES:
            raise InputError(
                f"{field}[{i}]: {info.ref} is a {info.architecture} (model_type {info.model_type!r}); DFS layer "
                f"stacks support {', '.join(SUPPORTED_ARCHITECTURES)}; choose models of those families, or space: ps"
            )
    if base_index >= len(infos):
        raise InputError(f"dfs.base_index: {base_index} but only {len(infos)} models; use 0..{len(infos) - 1}")
    sizes = {i.hidden_size for i in infos}
    if len(sizes) > 1:
        detail = ", ".join(f"{i.ref}: {i.hidden_size}" for i in infos)
        raise InputError(
            f"{field}: hidden sizes differ ({detail}); DFS passes one hidden state through layers of every "
            "model, so all models need the same hidden size"
        )
    return infos


class DFSProblem:
    def __init__(self, config: EvolveConfig, device: str = "cpu"):
        from mergekit_evolve.space.dfs import DFSSpace

        self.config = config
        self.device = device
        self.models = dfs_models(config)
        self.base_index = config.dfs.base_index
        infos = check_dfs_collection(self.models, self.base_index, allow_pickle=config.allow_pickle_weights)
        self.dtype = default_dtype(config.dtype, infos[self.base_index].dtype, device)
        self.space = DFSSpace(
            [i.num_layers for i in infos],
            base_index=self.base_index,
            repeats=config.dfs.repeats,
            scale_param=config.dfs.scales,
            network_hidden=config.dfs.network_hidden,
            indicator_init=config.dfs.indicator_init,
        )
        self.dim = self.space.dim
        self.layer_counts = [i.num_layers for i in infos]
        self.first_source = self.models[self.base_index]  # model A: its architecture is the engine's
        self._pool = None
        self._engine = None

    @property
    def pool(self):
        if self._pool is None:
            from mergekit_evolve.merge.layer_pool import LayerPool

            self._pool = LayerPool.from_pretrained(
                self.models, device=self.device, dtype=self.dtype, base_index=self.base_index
            )
        return self._pool

    @property
    def engine(self):
        """``fitness.backend: vllm``: one engine holding the pool's layers once (sized for the space's longest
        path), loaded from the sources' files; candidates only re-point it."""
        if self._engine is None:
            from transformers import AutoConfig

            from mergekit_evolve.fitness.vllm_engine import VllmLayerStack
            from mergekit_evolve.merge.layer_pool import stack_checkpoint_tensors

            configs = [AutoConfig.from_pretrained(model) for model in self.models]
            engine = VllmLayerStack(
                configs,
                self.tokenizer,
                self.config.fitness.vllm,
                self.dtype,
                self.device,
                base_index=self.base_index,
                slots=self.space.num_slots,
            )
            engine.load_weights(stack_checkpoint_tensors(self.models, self.layer_counts, self.base_index))
            self._engine = engine
        return self._engine

    @property
    def tokenizer_ref(self) -> str:
        return self.models[self.base_index]

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_ref)

    def x0(self, random: bool = False, seed: int = 0) -> np.ndarray:
        x0 = np.asarray(self.space.x0(), dtype=np.float64)
        if random:
            return x0 + np.random.default_rng(seed).normal(0.0, 1.0, x0.shape)
        return x0

    def new_optimizer(self, x0: np.ndarray, opt, restart: int = 0):
        """The pre-scan of block paths, then CMA-ES with the indicators' own step (search/dfs_search.py);
        an IPOP restart starts CMA-ES again without a pre-scan."""
        from mergekit_evolve.search.dfs_search import DFSStrategy, block_paths

        make_cma = partial(new_es, opt=opt, restart=restart, extra_options=self.cma_options(opt) or None)
        if restart or not self.config.dfs.prescan:
            return make_cma(x0)
        return DFSStrategy(make_cma, x0, self.config.dfs.prescan, partial(block_paths, self.space, seed=opt.seed))

    def cma_options(self, opt) -> dict:
        """What every CMA-ES over this space gets (COMO-CMA-ES kernels too): the indicators' own step."""
        from mergekit_evolve.search.dfs_search import indicator_stds

        stds = indicator_stds(self.space, opt.sigma0, self.config.dfs.indicator_flips)
        return {"CMA_stds": stds} if stds else {}

    def search_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Indicators within twice their start (on when > 0); log-scales within one of their start (x0)."""
        space, x0 = self.space, self.space.x0()
        slots = np.full(space.num_slots, 2 * space.indicator_init)
        return np.concatenate([-slots, x0[space.num_slots :] - 1]), np.concatenate([slots, x0[space.num_slots :] + 1])

    def decode(self, genome: np.ndarray) -> DFSCandidate:
        path = self.space.decode(np.asarray(genome)[: self.dim])
        return DFSCandidate(path=path, key=path.key())

    def build(self, candidate: DFSCandidate):
        if self.config.backend == "vllm":
            return self.engine.set_path(candidate.path.hops, candidate.path.scales)
        return self.pool.model(candidate.path)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._pool = self._engine = None
