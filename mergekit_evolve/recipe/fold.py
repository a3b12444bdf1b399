"""Fold a DFS path's scales into a standard checkpoint (a plain mergekit ``passthrough`` recipe).

Why it is exact. In a pre-norm decoder layer both residual branches start with a norm, and RMSNorm is
scale-invariant for positive c (``norm(c*h) = norm(h)``, exactly when eps = 0). Hence
``layer(c*h) = c * layer'(h)``, where ``layer'`` is the same layer with its residual-branch outputs (o_proj and
down_proj, weights and biases) divided by c. Along a path with input scales s_1..s_T, let C_t = s_1*...*s_t;
the scaled path equals a plain stack of the same layers in which hop t's o_proj and down_proj are multiplied by
1/C_t, and the final norm removes C_T. With eps > 0 the match is close, not exact (eps is tiny next to the
mean square of real hidden states).

Recipe shape (mergekit 0.1.5): embeddings come from ``slices[0]``, the final norm and LM head from
``slices[-1]``, and a slice's unfiltered ``scale`` would apply to them too. So the recipe pins
``base_model`` to model A, scales only tensors whose name contains ``o_proj`` / ``down_proj`` (mergekit filters
match substrings, so ``.bias`` tensors of those projections are scaled as well) with a catch-all
``{value: 1.0}``, and when the path starts or ends on another model it adds a zero-width slice of model A
(``layer_range: [0, 0]``) at that end, so embeddings, final norm and head are model A's exactly.

Known limit: mergekit 0.1.5 sets ``num_hidden_layers`` of the output but not ``layer_types``; transformers 5
refuses to save a Qwen2 config whose ``layer_types`` length differs, so ``mergekit-yaml`` fails on Qwen2
recipes that change depth. And mergekit writes only tensors its architecture definition lists (its ``llama``
definition has no biases), so :func:`fold_recipe` refuses sources with tensors mergekit would drop.
:func:`fold_model` builds the same checkpoint in memory, with a correct config and every tensor, in both cases.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mergekit.architecture import arch_info_for_config
from pydantic import BaseModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from mergekit_evolve.errors import InputError
from mergekit_evolve.modeling.modeling_layerstack import attention_kind
from mergekit_evolve.space.dfs import DFSPath

FOLDABLE_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Substrings naming the last projection of each residual branch (attention, MLP) in those architectures.
BRANCH_OUTPUT_FILTERS = ("o_proj", "down_proj")

_POST_NORM = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "deberta", "deberta-v2"}
_BRANCH_ENDS_IN_NORM = {"gemma2", "gemma3", "gemma3_text", "olmo2", "cohere2"}
# Config fields that must agree for layers of two models to live in one standard checkpoint of A's config.
_LAYER_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "rms_norm_eps",
    "sliding_window",
)


def check_foldable(config: PretrainedConfig | dict[str, Any]) -> None:
    """Raise ``InputError`` unless DFS scales fold exactly into this architecture's weights."""
    reason = architecture_blocker(config)
    if reason:
        raise InputError(reason)


def architecture_blocker(config: PretrainedConfig | dict[str, Any]) -> str | None:
    """Why DFS scales do not fold exactly into this architecture's weights; None when they do."""
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    if model_type in FOLDABLE_ARCHITECTURES:
        return None
    if model_type in _POST_NORM:
        why = "is post-norm (the norm follows the residual add), so input scales cannot move into weights"
    elif model_type in _BRANCH_ENDS_IN_NORM:
        why = "has residual branches that end in a norm, which cancels a scaled o_proj/down_proj"
    else:
        why = f"has no verified fold of DFS scales (verified: {', '.join(FOLDABLE_ARCHITECTURES)})"
    return f"model_type: {model_type!r} {why}; export the layer stack with --format custom instead"


def fold_factors(scales: Sequence[float]) -> list[float]:
    """Per-hop factor 1 / C_t, C_t = s_1 * ... * s_t, applied to that hop's o_proj and down_proj."""
    factors, cumulative = [], 1.0
    for scale in scales:
        cumulative *= float(scale)
        factors.append(1.0 / cumulative)
    return factors


class _Run(BaseModel):
    """Consecutive hops that become one slice: same model, consecutive layers, identical factor."""

    model: int
    start: int
    end: int
    factor: float


def _runs(path: DFSPath) -> list[_Run]:
    runs: list[_Run] = []
    for (model, layer), factor in zip(path.hops, fold_factors(path.scales)):
        last = runs[-1] if runs else None
        if last and last.model == model and last.end == layer and last.factor == factor:
            last.end += 1
        else:
            runs.append(_Run(model=model, start=layer, end=layer + 1, factor=factor))
    return runs


def _path_blocker(path: DFSPath, configs: Sequence[PretrainedConfig], names: Sequence[str], base: int) -> str | None:
    if not path.hops:
        return (
            "path: uses no layer (every indicator <= 0); a zero-layer model has no standard checkpoint; "
            "export it with --format custom or pick a candidate that uses layers"
        )
    bad = [s for s in path.scales if not s > 0]
    if bad:
        return f"path.scales: {bad[0]} is not > 0; only positive scales fold into weights"
    for model in sorted({base, *(m for m, _ in path.hops)}):
        reason = architecture_blocker(configs[model])
        if reason:
            return reason
        for field in _LAYER_SHAPE_FIELDS:
            ours, theirs = getattr(configs[model], field, None), getattr(configs[base], field, None)
            if ours != theirs:
                return (
                    f"sources[{model}]: {names[model]} differs from model A in {field} ({ours!r} vs {theirs!r}); "
                    "a standard checkpoint has one config for all layers; export with --format custom"
                )
    return None


def _checkpoint_tensor_names(checkpoint: Path) -> set[str] | None:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    shards = sorted(checkpoint.glob("*.safetensors"))
    if not shards:
        return None  # .bin checkpoints: nothing cheap to read; mergekit reports problems itself
    names: set[str] = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            names.update(handle.keys())
    return names


def _dropped_tensors_blocker(index: int, checkpoint: str, config: PretrainedConfig) -> str | None:
    """mergekit writes only the tensors its architecture definition lists: refuse recipes that would drop some.

    (mergekit 0.1.5's ``llama`` definition, for one, has no bias tensors: a Llama with ``attention_bias`` or
    ``mlp_bias`` would come out without its biases.)
    """
    arch = arch_info_for_config(config)
    present = _checkpoint_tensor_names(Path(checkpoint))
    if arch is None or present is None:
        return None
    known: set[str] = set()
    for weight in arch.all_weights(config):
        known.update([weight.name, *(weight.aliases or ()), *(weight.tied_names or ())])
    dropped = sorted(present - known)
    if not dropped:
        return None
    return (
        f"sources[{index}]: {checkpoint} has tensors mergekit's {config.architectures[0]} definition does not "
        f"carry ({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}); a mergekit recipe would "
        "drop them; export with --format custom"
    )


def model_reference(path: str) -> str | dict[str, Any]:
    """How a recipe names a model folder so that mergekit reads it as that folder: the path itself, or, when
    mergekit would split it (``a+b`` is model a with LoRA b; ``a@r`` is revision r of a), its mapping form."""
    if "+" in path or "@" in path:
        return {"model": {"path": path}}
    return path


def _slice(model_path: str, start: int, end: int, factor: float | None) -> dict[str, Any]:
    source: dict[str, Any] = {"model": model_reference(model_path), "layer_range": [start, end]}
    if factor is not None and factor != 1.0:
        filters = [{"filter": name, "value": factor} for name in BRANCH_OUTPUT_FILTERS]
        source["parameters"] = {"scale": [*filters, {"value": 1.0}]}
    return {"sources": [source]}


def why_not_foldable(source_paths: Sequence[str | Path], path: DFSPath, base_index: int = 0) -> str | None:
    """Why ``path`` has no exact standard checkpoint (one line, with the way out); None when it folds."""
    paths = [str(Path(p).absolute()) for p in source_paths]
    if not 0 <= base_index < len(paths):
        return f"base_index: {base_index} is not a source index; use 0..{len(paths) - 1}"
    configs = [AutoConfig.from_pretrained(p) for p in paths]
    reasons = (
        _dropped_tensors_blocker(m, paths[m], configs[m]) for m in sorted({base_index, *(m for m, _ in path.hops)})
    )
    return _path_blocker(path, configs, paths, base_index) or next((r for r in reasons if r), None)


def fold_recipe(
    source_paths: Sequence[str | Path],
    path: DFSPath,
    base_index: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """A plain mergekit ``passthrough`` recipe (as a dict) equal to the scaled path; an ``InputError``
    saying why when there is none (:func:`why_not_foldable`)."""
    paths = [str(Path(p).absolute()) for p in source_paths]
    reason = why_not_foldable(paths, path, base_index)
    if reason:
        raise InputError(reason)
    runs = _runs(path)
    slices = [_slice(paths[r.model], r.start, r.end, r.factor) for r in runs]
    base = paths[base_index]
    if runs[0].model != base_index:
        slices.insert(0, _slice(base, 0, 0, None))  # embeddings come from slices[0]
    if runs[-1].model != base_index:
        slices.append(_slice(base, 0, 0, None))  # final norm and lm_head come from slices[-1]
    return {"merge_method": "passthrough", "base_model": model_reference(base), "slices": slices, "dtype": dtype}


# --- the same fold in memory, from a layer pool -------------------------------------------------------------
def folded_config(pool, path: DFSPath) -> PretrainedConfig:
    """Model A's config with one layer per hop (``layer_types`` follows the hops where A has it)."""
    config = copy.deepcopy(pool.base_model_config())
    config.num_hidden_layers = len(path.hops)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [attention_kind(pool.configs[m], layer) for m, layer in path.hops]
    return config


def fold_state_dict(pool, path: DFSPath, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """State dict of the folded standard model (model A's tensor names); every tensor is a fresh copy."""
    reason = _path_blocker(path, pool.configs, pool.sources, pool.base_index)
    if reason:
        raise InputError(reason)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in pool.embed_tokens.state_dict().items():
        state[f"model.embed_tokens.{name}"] = tensor.to(dtype=dtype, copy=True)
    for hop, ((model, layer), factor) in enumerate(zip(path.hops, fold_factors(path.scales))):
        for name, tensor in pool.layer(model, layer).state_dict().items():
            full_name = f"model.layers.{hop}.{name}"
            copied = tensor.to(dtype=dtype, copy=True)
            # the same op as mergekit's passthrough (tensor * scale), so results agree bit for bit
            scaled = any(f in full_name for f in BRANCH_OUTPUT_FILTERS) and factor != 1.0
            state[full_name] = copied * factor if scaled else copied
    for name, tensor in pool.norm.state_dict().items():
        state[f"model.norm.{name}"] = tensor.to(dtype=dtype, copy=True)
    for name, tensor in pool.lm_head.state_dict().items():
        state[f"lm_head.{name}"] = tensor.to(dtype=dtype, copy=True)
    return state


def fold_model(pool, path: DFSPath, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The folded standard model (model A's architecture), built in memory; ``save_pretrained`` it to export."""
    state = fold_state_dict(pool, path, dtype=dtype)
    config = folded_config(pool, path)
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    # rotary inv_freq is a non-persistent buffer (not in any state dict): take model A's
    model.model.rotary_emb = copy.deepcopy(pool.rotary_emb)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


__all__ = [
    "BRANCH_OUTPUT_FILTERS",
    "FOLDABLE_ARCHITECTURES",
    "architecture_blocker",
    "check_foldable",
    "fold_factors",
    "fold_model",
    "fold_recipe",
    "why_not_foldable",
    "fold_state_dict",
    "folded_config",
]
