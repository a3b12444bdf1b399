"""Custom-code checkpoints of a DFS layer stack, and loading Sakana's EvoMistral layout.

``save_custom_checkpoint`` writes only the layers the path uses (renumbered per model, in the original
order), a ``LayerStackConfig`` with ``auto_map``, the two modeling files and model A's tokenizer. The result
loads anywhere with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; the copied files need
only torch and transformers. This format keeps every scale exactly, for any architecture the layer stack runs;
use it when :func:`mergekit_evolve.recipe.fold.check_foldable` refuses a standard checkpoint.

``save_folded_checkpoint`` writes the standard (folded) checkpoint straight from the pool, without mergekit:
the same tensors as ``mergekit-yaml`` on the folded recipe (tested bit for bit), plus a correct config where
mergekit 0.1.5 fails (Qwen2 ``layer_types``) and every tensor where mergekit's definition would drop some.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_evolve import modeling
from mergekit_evolve.atomic import staged_folder
from mergekit_evolve.errors import InputError
from mergekit_evolve.modeling import LayerStackConfig, LayerStackForCausalLM
from mergekit_evolve.modeling.modeling_layerstack import build_source_config
from mergekit_evolve.space.dfs import DFSPath

CODE_FILES = ("configuration_layerstack.py", "modeling_layerstack.py")
AUTO_MAP = {
    "AutoConfig": "configuration_layerstack.LayerStackConfig",
    "AutoModelForCausalLM": "modeling_layerstack.LayerStackForCausalLM",
}


def is_custom_code(model_dir: str | Path) -> bool:
    """A layer-stack checkpoint (a DFS path that does not fold): it needs its modeling code to load."""
    config = Path(model_dir) / "config.json"
    return config.is_file() and "auto_map" in json.loads(config.read_text())


def _pruned_source_config(config_dict: dict[str, Any], kept_layers: list[int]) -> dict[str, Any]:
    values = dict(config_dict)
    values["num_hidden_layers"] = len(kept_layers)
    if values.get("layer_types") is not None:  # per-layer attention types follow their layers
        values["layer_types"] = [values["layer_types"][layer] for layer in kept_layers]
    return values


def custom_checkpoint_config(pool, path: DFSPath) -> tuple[LayerStackConfig, list[nn.Module]]:
    """Config of the pruned stack (unused layers and models dropped, indices renumbered) and its flat layers."""
    pool.check_path(path)
    used = {(m, layer) for m, layer in path.hops}
    kept_models = sorted({pool.base_index, *(m for m, _ in used)})
    kept_layers = {m: sorted(layer for mm, layer in used if mm == m) for m in kept_models}
    new_model = {m: i for i, m in enumerate(kept_models)}
    new_layer = {(m, layer): i for m in kept_models for i, layer in enumerate(kept_layers[m])}
    config = LayerStackConfig(
        source_configs=[_pruned_source_config(pool.configs[m].to_dict(), kept_layers[m]) for m in kept_models],
        sources=[pool.sources[m] for m in kept_models],
        base_index=new_model[pool.base_index],
        path=[[new_model[m], new_layer[(m, layer)]] for m, layer in path.hops],
        scales=list(path.scales),
        source_layer_ids=[kept_layers[m] for m in kept_models],
    )
    layers = [pool.layer(m, layer) for m in kept_models for layer in kept_layers[m]]
    return config, layers


@contextlib.contextmanager
def _staged_checkpoint(out_dir: Path, overwrite: bool, tokenizer):
    """Yield a hidden folder to write into; on success add the tokenizer and swap it in at ``out_dir``."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"out_dir: {out_dir} exists and is not empty; choose a new directory or pass overwrite")
    with staged_folder(out_dir) as staging:
        yield staging
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))


def save_custom_checkpoint(
    pool,
    path: DFSPath,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the layer-stack model for ``path`` (used layers only) + code + tokenizer; returns ``out_dir``."""
    out_dir = Path(out_dir).absolute()
    config, layers = custom_checkpoint_config(pool, path)
    config.auto_map = dict(AUTO_MAP)
    stack = LayerStackForCausalLM.from_modules(
        config,
        embed_tokens=pool.embed_tokens,
        layers=nn.ModuleList(layers),
        norm=pool.norm,
        rotary_emb=pool.rotary_emb,
        lm_head=pool.lm_head,
        source_configs=[build_source_config(c) for c in config.source_configs],
    )
    with _staged_checkpoint(out_dir, overwrite, pool.tokenizer) as staging:
        if dtype is not None and dtype != stack.dtype:
            # a converted copy, so the pool's own weights keep their dtype
            state = {k: v.to(dtype) for k, v in stack.state_dict().items()}
            stack.save_pretrained(str(staging), state_dict=state)
            _set_config_dtype(staging, dtype)
        else:
            stack.save_pretrained(str(staging))
        package_dir = Path(modeling.__file__).parent
        for name in CODE_FILES:
            shutil.copyfile(package_dir / name, staging / name)
    return out_dir


def _set_config_dtype(checkpoint: Path, dtype: torch.dtype) -> None:
    config_file = checkpoint / "config.json"
    values = json.loads(config_file.read_text())
    values["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def save_folded_checkpoint(
    pool,
    path: DFSPath,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write the folded standard checkpoint (model A's architecture, one layer per hop) + tokenizer."""
    from mergekit_evolve.recipe.fold import fold_model

    out_dir = Path(out_dir).absolute()
    model = fold_model(pool, path, dtype=dtype)
    with _staged_checkpoint(out_dir, overwrite, pool.tokenizer) as staging:
        model.save_pretrained(str(staging))
    return out_dir


def load_evomistral(checkpoint_dir: str | Path, **from_pretrained_kwargs) -> LayerStackForCausalLM:
    """Load a checkpoint in Sakana's EvoMistral layout (``input_layers`` / ``input_scales`` in config.json).

    Its weights are a plain Mistral state dict, which is the layer stack's own layout for a single source.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise InputError(f"checkpoint: {checkpoint_dir} has no config.json; give an EvoMistral checkpoint directory")
    values = json.loads(config_file.read_text())
    if "input_layers" not in values:
        raise InputError(
            f"checkpoint: {config_file} has no 'input_layers'; it is not in EvoMistral layout "
            "(load layer-stack checkpoints with AutoModelForCausalLM and trust_remote_code=True)"
        )
    config = LayerStackConfig.from_evomistral(values, source_name=str(checkpoint_dir))
    return LayerStackForCausalLM.from_pretrained(str(checkpoint_dir), config=config, **from_pretrained_kwargs)


__all__ = [
    "AUTO_MAP",
    "CODE_FILES",
    "custom_checkpoint_config",
    "load_evomistral",
    "save_custom_checkpoint",
    "save_folded_checkpoint",
]
