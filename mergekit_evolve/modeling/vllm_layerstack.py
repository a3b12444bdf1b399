"""The layer stack as a vLLM architecture: the pool's decoder layers held once, a path of hops set per candidate.

The hf layer stack (modeling_layerstack.py) runs hop ``k`` as ``layers[flat_k]`` on ``hidden * scale_k``, and
gives every hop its own cache slot. Here the same model is built from vLLM's own classes:

* the base model's vLLM class (``LlamaForCausalLM`` for a Llama pool, ...) is built with as many decoder
  layers as the pool holds (``model.layers.{flat}``, collection order, the names the hf stack stores), so
  embeddings, final norm, LM head, logits and weight loading are vLLM's own code;
* each of the ``slots`` hops the engine was sized for gets its own ``Attention`` (``slots.{t}.attn``): vLLM
  gives every Attention module its own KV cache, which is what a path that repeats a layer needs;
* each pool layer's own Attention is replaced by a router without weights that runs the current hop's slot
  (and is dropped from vLLM's list of layers needing a KV cache), so a layer's projections, norms and MLP
  run unchanged and only its keys and values go to the hop's cache.

A candidate's path is a list of ``(flat, scale)`` hops set between generations with :func:`set_path`: no weight
moves. The hidden state between vLLM's decoder layers is split into ``(hidden, residual)`` (the residual add is
fused into the next norm); a hop with a scale other than 1 first adds them, as the hf stack's residual stream
holds the sum.

vLLM needs one decoder-layer config for the whole pool (its layers are built from one config): sources may
differ in depth, not in layer shape. :func:`engine_config` checks that and writes the config the engine starts
from. vLLM is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn
from transformers import PretrainedConfig

STACK_KEY = "mergekit_evo_stack"  # the engine config's entry describing the pool and the slots
ARCHITECTURE_PREFIX = "MergekitEvoLayerStack"

# model_type -> the vLLM class whose embeddings, layers, norm and head the stack reuses (as the hf pool's list)
VLLM_CLASSES = {
    "llama": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "mistral": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "qwen2": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
}

# Config keys that do not shape a decoder layer: the sources may differ in them. Rotary settings are the base
# model's for every layer (as on the hf stack), so they may differ too.
_NOT_LAYER_SHAPE = {
    "_name_or_path",
    "architectures",
    "num_hidden_layers",
    "layer_types",
    "max_window_layers",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "max_position_embeddings",
    "initializer_range",
    "use_cache",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_attn_implementation_autoset",
    "id2label",
    "label2id",
    "tokenizer_class",
    "chunk_size_feed_forward",
}


def architecture_name(model_type: str) -> str:
    return ARCHITECTURE_PREFIX + VLLM_CLASSES[model_type][1]


def attention_kinds(config: PretrainedConfig) -> set[str]:
    """The attention kinds of a source's layers (``full_attention`` / ``sliding_attention``)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return set(layer_types)
    return {"sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"}


def layer_shape_difference(configs: Sequence[PretrainedConfig], base_index: int) -> str | None:
    """Why the pool's layers cannot be built from the base model's config, or None when they can."""
    base = configs[base_index].to_dict()
    for i, config in enumerate(configs):
        if config.model_type not in VLLM_CLASSES:
            supported = ", ".join(VLLM_CLASSES)
            return f"model {i} is a {config.model_type!r} model; the vLLM layer stack supports {supported}"
        values = config.to_dict()
        for key in sorted((set(base) | set(values)) - _NOT_LAYER_SHAPE):
            if base.get(key) != values.get(key):
                return f"model {i} has {key} = {values.get(key)!r} where model A has {base.get(key)!r}"
    kinds = set().union(*(attention_kinds(c) for c in configs))
    if len(kinds) > 1:
        return f"the pool mixes attention kinds ({', '.join(sorted(kinds))})"
    return None


def engine_config(configs: Sequence[PretrainedConfig], base_index: int, slots: int) -> PretrainedConfig:
    """The config a layer-stack engine starts from: model A's, renamed to the stack architecture, with one
    layer (one KV cache) per slot, and the pool described under ``STACK_KEY``."""
    problem = layer_shape_difference(configs, base_index)
    if problem:
        raise ValueError(problem)
    if slots < 1:
        raise ValueError(f"a layer-stack engine needs at least one slot, not {slots}")
    config = copy.deepcopy(configs[base_index])
    counts = [int(c.num_hidden_layers) for c in configs]
    (kind,) = attention_kinds(configs[base_index])
    config.architectures = [architecture_name(config.model_type)]
    config.num_hidden_layers = slots
    if getattr(config, "layer_types", None):
        config.layer_types = [kind] * slots
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = slots
    setattr(config, STACK_KEY, {"layer_counts": counts, "slots": slots})
    return config


def register_architecture(model_type: str) -> str:
    """Register the stack class for ``model_type``'s vLLM class with vLLM (in this process; once)."""
    from vllm import ModelRegistry

    name = architecture_name(model_type)
    if name not in ModelRegistry.get_supported_archs():
        module, class_name = VLLM_CLASSES[model_type]
        base = getattr(importlib.import_module(module), class_name)
        ModelRegistry.register_model(name, type(name, (_LayerStackMixin, base), {}))
    return name


class _CurrentSlot:
    """Which slot's Attention the pool layers' routers call (set per hop by the stack's forward)."""

    attention: nn.Module | None = None


class _SlotRouter(nn.Module):
    """Stands in for a pool layer's own Attention: runs the current hop's slot Attention (and its KV cache)."""

    def __init__(self, current: _CurrentSlot):
        super().__init__()
        self._current = current  # a plain object: not registered as a submodule

    def forward(self, *args, **kwargs):
        return self._current.attention(*args, **kwargs)


class _LayerStackMixin:
    """Mixed in front of a vLLM ``*ForCausalLM`` class (see :func:`register_architecture`)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        hf_config = vllm_config.model_config.hf_config
        spec = getattr(hf_config, STACK_KEY)
        pool_size = sum(spec["layer_counts"])
        with _config_sized(hf_config, pool_size):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._current = _CurrentSlot()
        template = self._detach_pool_attention(vllm_config)
        self.slots = nn.ModuleList(
            _slot_attention(template, vllm_config, f"{prefix}slots.{t}.attn") for t in range(spec["slots"])
        )
        self.set_path([(i, 1.0) for i in range(min(pool_size, spec["slots"]))])

    def _detach_pool_attention(self, vllm_config) -> nn.Module:
        """Replace every pool layer's Attention with a router; vLLM then allocates no KV cache for them."""
        from vllm.model_executor.layers.attention import Attention

        registered = vllm_config.compilation_config.static_forward_context
        router = _SlotRouter(self._current)
        detached = []
        for layer in self.model.layers:
            for name, module in list(layer.named_modules()):
                if isinstance(module, Attention):
                    parent_name, _, child = name.rpartition(".")
                    setattr(layer.get_submodule(parent_name), child, router)
                    registered.pop(module.layer_name, None)
                    detached.append(module)
        signatures = {_attention_signature(a) for a in detached}
        if len(signatures) != 1:
            raise ValueError(f"the pool's layers have different attention shapes: {sorted(signatures)}")
        return detached[0]

    def set_path(self, hops: Sequence[tuple[int, float]]) -> None:
        hops = [(int(flat), float(scale)) for flat, scale in hops]
        if len(hops) > len(self.slots):
            raise ValueError(f"a path of {len(hops)} hops is longer than the engine's {len(self.slots)} slots")
        for flat, _ in hops:
            if not 0 <= flat < len(self.model.layers):
                raise ValueError(f"layer {flat} is not in the pool of {len(self.model.layers)} layers")
        self._hops = hops

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        inner = self.model
        hidden = inner.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for slot, (flat, scale) in zip(self.slots, self._hops):
            if scale != 1.0:
                if residual is not None:  # vLLM carries the residual stream as hidden + residual
                    hidden, residual = hidden + residual, None
                hidden = hidden * scale
            self._current.attention = slot
            hidden, residual = inner.layers[flat](positions, hidden, residual)
        if residual is None:
            return inner.norm(hidden)
        hidden, _ = inner.norm(hidden, residual)
        return hidden


@contextlib.contextmanager
def _config_sized(config: PretrainedConfig, layers: int) -> Iterator[None]:
    """Give the hf config the pool's depth while the base class builds its layers (one per pool layer)."""
    keys = ("num_hidden_layers", "layer_types", "max_window_layers")
    saved = {key: getattr(config, key, None) for key in keys}
    config.num_hidden_layers = layers
    if saved["layer_types"]:
        config.layer_types = [saved["layer_types"][0]] * layers
    if saved["max_window_layers"] is not None:
        config.max_window_layers = layers
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is not None:
                setattr(config, key, value)


def _attention_signature(attention: nn.Module) -> tuple[Any, ...]:
    return (
        attention.num_heads,
        attention.head_size,
        attention.num_kv_heads,
        attention.sliding_window,
        float(attention.impl.scale),
        attention.attn_type,
    )


def _slot_attention(template: nn.Module, vllm_config, prefix: str) -> nn.Module:
    """An Attention with the pool layers' shape and its own name (hence its own KV cache)."""
    from vllm.model_executor.layers.attention import Attention

    return Attention(
        num_heads=template.num_heads,
        head_size=template.head_size,
        scale=float(template.impl.scale),
        num_kv_heads=template.num_kv_heads,
        cache_config=vllm_config.cache_config,
        quant_config=vllm_config.quant_config,
        per_layer_sliding_window=template.sliding_window,
        prefix=prefix,
        attn_type=template.attn_type,
    )


__all__ = ["STACK_KEY", "VLLM_CLASSES", "engine_config", "layer_shape_difference", "register_architecture"]
