"""Search problems: a search space bound to the engine that turns its genomes into models.

``PSProblem``: genome -> mergekit recipe -> in-memory merge (one resident model).
``DFSProblem``: genome -> layer path -> layer-stack model over a shared pool (no weight copies).
Both write ``best.yaml`` as a plain mergekit recipe (DFS: the folded passthrough recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_evolve.config import EvolveConfig
from mergekit_evolve.errors import InputError
from mergekit_evolve.recipe.ps import ps_recipe, recipe_hash, recipe_yaml, to_merge_config
from mergekit_evolve.search.rundir import RunDir, atomic_write
from mergekit_evolve.space.models import check_causal_lm, check_same_shape, has_tokenizer_files, inspect_models
from mergekit_evolve.space.ps import PSSpace


@dataclass
class PSCandidate:
    recipe: dict[str, Any]
    key: str


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from mergekit_evolve.errors import InputError

        raise InputError(f"--device: {device} requested but no CUDA GPU is visible; use --device cpu or auto")
    return device


def default_dtype(config_dtype: str | None, source_dtype: str | None, device: str) -> str:
    """The dtype a problem merges and evaluates in: the config's if it names one; else bfloat16 on a
    CUDA device (half the memory and traffic of float32, the dtype GPU kernels are fastest in); else the
    sources' dtype (on CPU bfloat16 matmuls are slow and rounding would change the CPU results)."""
    if config_dtype:
        return config_dtype
    if str(device).split(":")[0] == "cuda":
        return "bfloat16"
    return source_dtype or "float32"


def load_tokenizer(ref: str):
    """The tokenizer of model ``ref``, or None when its folder has no tokenizer files.

    None is fine for a fitness that needs no tokenizer (callables, perplexity on token ids);
    ``runner.make_fitness`` turns it into an input error naming the folder for every other one.
    """
    import transformers

    if not has_tokenizer_files(ref):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(ref)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(
            f"tokenizer: cannot load the tokenizer of {ref} ({first[:160]}); set tokenizer_source to a model "
            "folder with a working tokenizer, or fix the tokenizer files there"
        ) from None


def tokenizer_donor(tokenizer_source: str | None, base_model: str | None, models: list[str]) -> str:
    """The model whose tokenizer the fitness uses: ``tokenizer_source`` if it names a model, else the
    base model, else the first model (mergekit's ``base``/``union`` keep the base's tokens)."""
    if tokenizer_source and tokenizer_source not in ("base", "union"):
        return tokenizer_source
    return base_model or models[0]


def io_weight_names(ref: str) -> tuple[list[str], list[str]]:
    """mergekit's names of the tensors before the layers (embeddings) and after them (final norm, lm_head)."""
    import transformers
    from mergekit.architecture import arch_info_for_config

    config = transformers.AutoConfig.from_pretrained(ref)
    module = next(iter(arch_info_for_config(config).modules.values())).architecture
    return [w.name for w in module.pre_weights(config)], [w.name for w in module.post_weights(config)]


class PSProblem:
    def __init__(self, config: EvolveConfig, device: str = "cpu"):
        genome = config.genome
        refs = list(dict.fromkeys([*genome.models, *([genome.base_model] if genome.base_model else [])]))
        infos = inspect_models(refs, "genome.models", allow_pickle=config.allow_pickle_weights)
        check_same_shape(infos, "genome.models")
        check_causal_lm(infos[0], "genome.models")
        self.config = config
        self.device = device
        self.dtype = default_dtype(config.dtype, infos[0].dtype, device)
        io = io_weight_names(refs[0]) if genome.tune_embeddings else None
        self.space = PSSpace(genome, infos[0].num_layers, io_weights=io)
        self.dim = self.space.dim
        self._merger = None

    @property
    def merger(self):
        if self._merger is None:  # loading sources is the expensive part: only when first needed
            from mergekit_evolve.merge import InMemoryMerger

            # Any candidate names the same models; the initial one serves as the template. The
            # recipes name self.dtype; the merger's model takes the dtype mergekit writes for them.
            template = to_merge_config(self.decode(self.x0()).recipe)
            self._merger = InMemoryMerger(
                template, device=self.device, random_seed=self.config.merge_seed, fast_path=self.config.merge_fast_path
            )
        return self._merger

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

    def recipe_dict(self, candidate: PSCandidate) -> dict[str, Any]:
        return candidate.recipe

    def build(self, candidate: PSCandidate):
        return self.merger.merge(to_merge_config(candidate.recipe))

    def recipe_header(self, info: dict) -> str:
        return (
            f"Evolved by mergekit-evo (PS, {self.space.genome.merge_method}): fitness {info['fitness']:.4f} "
            f"at evaluation {info['index']} (generation {info['generation']}).\n"
            f"Reproduce the weights: mergekit-yaml best.yaml OUT --random-seed {self.config.merge_seed}"
        )

    def write_best(self, candidate: PSCandidate, run_dir: RunDir, info: dict) -> None:
        atomic_write(run_dir.best_yaml, recipe_yaml(candidate.recipe, self.recipe_header(info)))
        run_dir.write_json(run_dir.best_json, {**info, "recipe": candidate.recipe})

    def save_model(self, candidate: PSCandidate, out_dir: Path) -> Path:
        from mergekit_evolve.merge import merge_to_disk

        return merge_to_disk(
            to_merge_config(candidate.recipe), out_dir, device=self.device, random_seed=self.config.merge_seed
        )

    def close(self) -> None:
        self._merger = None


class TemplateProblem(PSProblem):
    """A mergekit YAML with ``{evolve: [lo, hi]}`` markers; the result is that YAML filled in."""

    def __init__(self, config: EvolveConfig, device: str = "cpu"):
        from mergekit_evolve.space.template import TemplateSpace

        self.config = config
        self.device = device
        self.space = TemplateSpace(config.template)
        refs = self.space.referenced_models()
        infos = inspect_models(refs, "template models", allow_pickle=config.allow_pickle_weights)
        check_same_shape(infos, "template models")
        check_causal_lm(infos[0], "template models")
        self.dtype = default_dtype(config.template.get("dtype"), infos[0].dtype, device)
        # The recipe must say the dtype it was evaluated in when that is not the sources' own
        # (bf16 by default on CUDA), so mergekit-yaml rebuilds exactly the model that was scored.
        self._fill_dtype = self.dtype if "dtype" not in config.template and self.dtype != infos[0].dtype else None
        self.dim = self.space.dim
        self._merger = None
        try:
            to_merge_config(self.space.fill(self.space.x0()))
        except Exception as err:
            first = str(err).splitlines()[0]
            raise InputError(f"template: not a valid mergekit recipe once filled in ({first}); fix the YAML") from None

    @property
    def tokenizer_ref(self) -> str:
        t = self.config.template
        source = t.get("tokenizer_source")
        return tokenizer_donor(source if isinstance(source, str) else None, t.get("base_model"), self.space.referenced_models())

    def decode(self, genome: np.ndarray) -> PSCandidate:
        recipe = self.space.fill(np.asarray(genome)[: self.dim])
        if self._fill_dtype:
            recipe["dtype"] = self._fill_dtype
        return PSCandidate(recipe=recipe, key=recipe_hash(recipe))

    def recipe_header(self, info: dict) -> str:
        return (
            f"Evolved by mergekit-evo from a template: fitness {info['fitness']:.4f} at evaluation {info['index']}.\n"
            f"Reproduce the weights: mergekit-yaml best.yaml OUT --random-seed {self.config.merge_seed}"
        )


def make_problem(config: EvolveConfig, device: str = "cpu"):
    """The problem for a config's (first) stage."""
    if config.space == "dfs":
        from mergekit_evolve.search.dfs_problem import DFSProblem

        return DFSProblem(config, device)
    if config.template is not None:
        return TemplateProblem(config, device)
    return PSProblem(config, device)
