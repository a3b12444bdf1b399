"""The layer-stack model: a serial path through a shared pool of decoder layers (DFS merging).

This file is copied next to custom-code checkpoints, so it imports only torch, transformers and its sibling
configuration file (relative import, as ``trust_remote_code`` loading requires).

Hop ``k`` of the path runs the source's own decoder layer ``layers[flat(model_k, layer_k)]`` on
``hidden_states * scales[k]``. The same layer may appear at several hops, so every hop writes its keys and
values to its own cache slot: a decoder layer calls ``cache.update(k, v, self.layer_idx)`` with the index it
was built with, and :class:`_HopCache` replaces that index with the hop's.
"""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .configuration_layerstack import LayerStackConfig

# transformers 5.2x renamed ``past_key_values`` to ``cache`` (masks, decoder layers, model outputs); vLLM's CPU
# build pins transformers < 5.20. Pass the cache under the name this transformers takes.
CACHE = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

_MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


class _HopCache:
    """A view of the real cache for one hop: ``update`` writes to the hop's slot, everything else is delegated."""

    def __init__(self, cache: Cache, hop: int):
        self._cache = cache
        self._hop = hop

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self._cache.update(key_states, value_states, self._hop, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def build_source_config(config_dict: dict[str, Any]) -> PretrainedConfig:
    """A source model's config object from its ``to_dict()``."""
    values = copy.deepcopy(config_dict)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def base_model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The bare decoder class of an architecture (``LlamaModel`` for a ``LlamaConfig``)."""
    return MODEL_MAPPING[type(config)]


def decoder_layer_class(config: PretrainedConfig) -> type[nn.Module]:
    """The decoder-layer class of an architecture, found through its ``_no_split_modules`` declaration."""
    base = base_model_class(config)
    module = sys.modules[base.__module__]
    for name in base._no_split_modules or []:
        layer_cls = getattr(module, name, None)
        if layer_cls is not None:
            return layer_cls
    raise ValueError(f"cannot find the decoder layer class of {base.__name__}")


def attention_kind(config: PretrainedConfig, layer: int) -> str:
    """``full_attention`` or ``sliding_attention`` for layer ``layer`` of a source (decides its mask)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kind = layer_types[layer]
    elif getattr(config, "sliding_window", None) is not None:
        kind = "sliding_attention"
    else:
        kind = "full_attention"
    if kind not in _MASK_BUILDERS:
        raise ValueError(f"layer {layer} of a {config.model_type} model has unsupported attention type {kind!r}")
    return kind


def _shell_components(config: PretrainedConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Embedding, final norm and rotary embedding of an architecture, built from a zero-layer copy of it."""
    values = config.to_dict()
    values["num_hidden_layers"] = 0
    if "layer_types" in values:
        values["layer_types"] = []
    shell = base_model_class(config)(build_source_config(values))
    return shell.embed_tokens, shell.norm, shell.rotary_emb


class LayerStackPreTrainedModel(PreTrainedModel):
    config: LayerStackConfig
    config_class = LayerStackConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_attention_backend = True


class LayerStackModel(LayerStackPreTrainedModel):
    """Embeddings, the flat pool of decoder layers (collection order), the path, final norm."""

    def __init__(self, config: LayerStackConfig):
        super().__init__(config)
        self.source_configs = [build_source_config(c) for c in config.source_configs]
        self._sync_attention_implementation()
        base = self.source_configs[config.base_index]
        self.embed_tokens, self.norm, self.rotary_emb = _shell_components(base)
        self.layers = nn.ModuleList(
            decoder_layer_class(cfg)(cfg, layer_idx=layer)
            for cfg in self.source_configs
            for layer in range(cfg.num_hidden_layers)
        )
        self._no_split_modules = sorted({type(layer).__name__ for layer in self.layers})
        self.post_init()
        self.index_sources()
        self.refresh_path()

    def _sync_attention_implementation(self) -> None:
        # The layers' attention reads the implementation from its own source config.
        impl = self.config._attn_implementation
        if impl is not None:
            for cfg in self.source_configs:
                cfg._attn_implementation = impl

    def index_sources(self) -> None:
        """Cache per-layer facts of the sources (reading config attributes is slow in transformers 5)."""
        counts = [cfg.num_hidden_layers for cfg in self.source_configs]
        self._offsets = [sum(counts[:m]) for m in range(len(counts))]
        self._kinds = [
            [attention_kind(cfg, layer) for layer in range(n)] for cfg, n in zip(self.source_configs, counts)
        ]

    def refresh_path(self) -> None:
        """Recompute the hop plan from ``config.path`` / ``config.scales`` (no weights move)."""
        offsets, kinds = self._offsets, self._kinds
        self._hops = [
            (offsets[model] + layer, float(scale), (model, kinds[model][layer]))
            for (model, layer), scale in zip(self.config.path, self.config.scales)
        ]

    def _masks(self, inputs_embeds, attention_mask, cache, position_ids) -> dict:
        masks = {}
        for hop, (_, _, key) in enumerate(self._hops):
            if key in masks:
                continue
            model, kind = key
            masks[key] = _MASK_BUILDERS[kind](
                config=self.source_configs[model],
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                layer_idx=hop,
                **{CACHE: cache},
            )
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        masks = self._masks(inputs_embeds, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        for hop, (flat, scale, mask_key) in enumerate(self._hops):
            if scale != 1.0:
                hidden_states = hidden_states * scale
            output = self.layers[flat](
                hidden_states,
                attention_mask=masks[mask_key],
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{CACHE: _HopCache(cache, hop) if cache is not None else None},
                **kwargs,
            )
            hidden_states = output[0] if isinstance(output, tuple) else output
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE: cache if use_cache else None})


class LayerStackForCausalLM(LayerStackPreTrainedModel, GenerationMixin):
    """Causal LM over a layer stack; ``generate()`` works, with one KV-cache slot per hop."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LayerStackConfig):
        super().__init__(config)
        self.model = LayerStackModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_modules(
        cls,
        config: LayerStackConfig,
        *,
        embed_tokens: nn.Module,
        layers: nn.ModuleList,
        norm: nn.Module,
        rotary_emb: nn.Module,
        lm_head: nn.Module,
        source_configs: list[PretrainedConfig],
    ) -> LayerStackForCausalLM:
        """A stack that shares existing modules (no weight is copied or allocated).

        ``layers`` is the flat pool in collection order; ``source_configs`` are the config objects those layers
        were built with (their attention reads the attention implementation from them).
        """
        with torch.device("meta"):
            stack = cls(config)
        inner = stack.model
        inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb = embed_tokens, layers, norm, rotary_emb
        inner.source_configs = list(source_configs)
        inner._no_split_modules = sorted({type(layer).__name__ for layer in layers})
        stack.lm_head = lm_head
        inner.index_sources()
        inner.refresh_path()
        return stack.eval()

    def set_path(self, path: list[list[int]] | list[tuple[int, int]], scales: list[float]) -> None:
        """Re-point the stack to another path; only indices change, no weight moves."""
        self.config.path = [[int(m), int(layer)] for m, layer in path]
        self.config.scales = [float(s) for s in scales]
        self.config.num_hidden_layers = len(self.config.path)
        self.config._check_path()
        self.model.refresh_path()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: getattr(outputs, CACHE)})


__all__ = ["LayerStackForCausalLM", "LayerStackModel", "LayerStackPreTrainedModel"]
