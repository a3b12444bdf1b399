"""Configuration of the layer-stack model: a path through a shared pool of decoder layers.

This file is copied next to custom-code checkpoints, so it imports nothing but transformers.

A layer stack runs the decoder layers of N source models (same hidden size) along a path of
hops ``(model, layer)``; hop ``k`` runs ``layers[model][layer]`` on ``hidden_states * scales[k]``.
Embeddings, rotary embedding, final norm and LM head come from the base model ``base_index``.
Weights are stored flat, in collection order (all of model 0's layers, then model 1's, ...), as
``model.layers.{i}`` -- the same layout as Sakana's EvoMistral checkpoints, which is why those load
with :meth:`LayerStackConfig.from_evomistral`.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

# Fields a source config must not carry into the layer stack (they describe the saved file, not the layers).
_EVOMISTRAL_ONLY_KEYS = ("input_layers", "input_scales", "num_hops", "auto_map", "architectures")


class LayerStackConfig(PretrainedConfig):
    r"""Config of :class:`LayerStackForCausalLM`.

    Args:
        source_configs: the sources' config dicts (``config.to_dict()`` of each source model).
        sources: names or paths of the sources, for provenance only.
        base_index: which source donates embeddings, rotary embedding, final norm, LM head, tokenizer.
        path: one ``[model, layer]`` pair per hop (indices into ``source_configs`` and that model's layers).
        scales: one input scale per hop (hop ``k`` runs its layer on ``hidden_states * scales[k]``).
        source_layer_ids: provenance for pruned checkpoints: ``source_layer_ids[m][i]`` is the original layer
            number of stored layer ``i`` of model ``m`` (``None``: all layers stored, in order).

    ``num_hidden_layers`` is the number of hops (so a ``DynamicCache`` built from this config has one slot per
    hop); ``vocab_size``, ``hidden_size``, ``tie_word_embeddings`` and the special token ids default to the base
    model's.
    """

    model_type = "mergekit_evo_layerstack"

    source_configs: list[dict] | None = None
    sources: list[str] | None = None
    base_index: int = 0
    path: list[list[int]] | None = None
    scales: list[float] | None = None
    source_layer_ids: list[list[int]] | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int = 0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self.source_configs = [dict(c) for c in (self.source_configs or [])]
        self.path = [[int(m), int(layer)] for m, layer in (self.path or [])]
        self.scales = [float(s) for s in (self.scales or [1.0] * len(self.path))]
        self.sources = list(self.sources or [c.get("_name_or_path", "") for c in self.source_configs])
        self.num_hidden_layers = len(self.path)
        if self.source_configs:
            self._inherit_from_base(self.source_configs[self.base_index])
        super().__post_init__(**kwargs)
        self._check_path()

    def _inherit_from_base(self, base: dict[str, Any]) -> None:
        # Generation (eos stopping, padding) and the LM head read these from the top-level config.
        for key in ("vocab_size", "hidden_size", "pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, key, None) is None:
                setattr(self, key, base.get(key))
        self.tie_word_embeddings = bool(base.get("tie_word_embeddings", False))

    @property
    def layer_counts(self) -> list[int]:
        return [int(c["num_hidden_layers"]) for c in self.source_configs]

    def _check_path(self) -> None:
        counts, path = self.layer_counts, self.path
        if counts and not 0 <= self.base_index < len(counts):
            raise ValueError(f"base_index {self.base_index} is not one of the {len(counts)} sources")
        if len(self.scales) != len(path):
            raise ValueError(f"path has {len(path)} hops but scales has {len(self.scales)} values")
        for hop, (model, layer) in enumerate(path):
            if not (0 <= model < len(counts) and 0 <= layer < counts[model]):
                raise ValueError(f"path[{hop}] = [{model}, {layer}] is outside the sources' layers {counts}")

    def flat_index(self, model: int, layer: int) -> int:
        """Index of ``(model, layer)`` in the flat ``model.layers`` list (collection order)."""
        return sum(self.layer_counts[:model]) + layer

    @classmethod
    def from_evomistral(cls, config: dict[str, Any], source_name: str | None = None) -> LayerStackConfig:
        """Read a config in Sakana's EvoMistral layout.

        That layout is a Mistral config plus ``input_layers`` (a flat layer index per hop) and ``input_scales``
        (one float per hop); its weights are a plain Mistral state dict (``model.layers.{i}`` ...), which is
        exactly a one-source layer stack.
        """
        if "input_layers" not in config:
            raise ValueError("not an EvoMistral config: it has no 'input_layers'")
        layers = [int(i) for i in config["input_layers"]]
        scales = [float(s) for s in config.get("input_scales", [1.0] * len(layers))]
        source = {k: copy.deepcopy(v) for k, v in config.items() if k not in _EVOMISTRAL_ONLY_KEYS}
        source["model_type"] = "mistral"
        name = source_name or config.get("_name_or_path") or "evomistral"
        return cls(
            source_configs=[source],
            sources=[name],
            base_index=0,
            path=[[0, i] for i in layers],
            scales=scales,
        )


__all__ = ["LayerStackConfig"]
