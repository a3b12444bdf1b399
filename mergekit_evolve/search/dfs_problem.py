"""The data-flow-space problem: genome -> layer path -> layer-stack model over a shared pool.

The pool is loaded once; a candidate only re-points the stack at other layers with other scales.
``best.yaml`` is the folded ``passthrough`` recipe (an ordinary checkpoint, no custom code) when
the architecture folds exactly; ``best.json`` always holds the path itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_evolve.config import EvolveConfig
from mergekit_evolve.errors import InputError
from mergekit_evolve.recipe.ps import recipe_yaml
from mergekit_evolve.search.problems import default_dtype, load_tokenizer
from mergekit_evolve.search.rundir import RunDir, atomic_write
from mergekit_evolve.space.models import inspect_models


@dataclass
class DFSCandidate:
    path: Any  # mergekit_evolve.space.dfs.DFSPath
    key: str


def dfs_models(config: EvolveConfig) -> list[str]:
    from mergekit_evolve.config import source_models

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
        self._pool = None

    @property
    def pool(self):
        if self._pool is None:
            from mergekit_evolve.merge.layer_pool import LayerPool

            self._pool = LayerPool.from_pretrained(
                self.models, device=self.device, dtype=self.dtype, base_index=self.base_index
            )
        return self._pool

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
        from mergekit_evolve.search.dfs_search import DFSStrategy, block_paths, indicator_stds
        from mergekit_evolve.search.loop import new_es

        stds = indicator_stds(self.space, opt.sigma0, self.config.dfs.indicator_flips)
        make_cma = partial(new_es, opt=opt, restart=restart, extra_options={"CMA_stds": stds} if stds else None)
        if restart or not self.config.dfs.prescan:
            return make_cma(x0)
        return DFSStrategy(make_cma, x0, self.config.dfs.prescan, partial(block_paths, self.space, seed=opt.seed))

    def decode(self, genome: np.ndarray) -> DFSCandidate:
        path = self.space.decode(np.asarray(genome)[: self.dim])
        return DFSCandidate(path=path, key=path.key())

    def build(self, candidate: DFSCandidate):
        return self.pool.model(candidate.path)

    def path_dict(self, candidate: DFSCandidate) -> dict[str, Any]:
        return {
            "models": self.models,
            "base_index": self.base_index,
            "hops": [list(h) for h in candidate.path.hops],
            "scales": list(candidate.path.scales),
        }

    def recipe_dict(self, candidate: DFSCandidate) -> dict[str, Any]:
        """The folded passthrough recipe (raises InputError where folding is not exact)."""
        from mergekit_evolve.recipe.fold import fold_recipe

        return fold_recipe(self.models, candidate.path, base_index=self.base_index, dtype=self.dtype)

    def write_best(self, candidate: DFSCandidate, run_dir: RunDir, info: dict) -> None:
        run_dir.write_json(run_dir.best_json, {**info, "path": self.path_dict(candidate)})
        try:
            recipe = self.recipe_dict(candidate)
        except InputError:
            return  # not foldable (or empty path): best.json still has the path; export --format custom
        header = (
            f"Evolved by mergekit-evo (DFS): fitness {info['fitness']:.4f} at evaluation {info['index']}.\n"
            f"{len(candidate.path.hops)} hops; data-flow scales folded into o_proj/down_proj.\n"
            "Build the standard checkpoint: mergekit-yaml best.yaml OUT"
        )
        atomic_write(run_dir.best_yaml, recipe_yaml(recipe, header))

    def save_model(self, candidate: DFSCandidate, out_dir: Path) -> Path:
        """Standard checkpoint when the fold is exact, else the custom-code checkpoint.

        The folded checkpoint is written from the pool directly; it equals what ``mergekit-yaml
        best.yaml`` writes tensor for tensor (tested), and also works for Qwen2, whose depth-changing
        passthrough merges mergekit 0.1.5 cannot save (it leaves ``layer_types`` at the old length).
        """
        from mergekit_evolve.export.custom_code import save_custom_checkpoint, save_folded_checkpoint

        try:
            self.recipe_dict(candidate)
        except InputError:
            return save_custom_checkpoint(self.pool, candidate.path, out_dir)
        return save_folded_checkpoint(self.pool, candidate.path, out_dir)
