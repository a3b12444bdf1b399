"""A shared pool of decoder layers from N source models, and the layer-stack model that walks it.

Every source is loaded once. The pool keeps model A's embeddings, rotary embedding, final norm and LM head
and every source's decoder layers (other sources' embeddings and heads are dropped). ``pool.model(path)``
returns one resident :class:`LayerStackForCausalLM` that shares those modules; switching to another path
only changes indices and scales, so a 3M-hop stack costs no more memory than the pool itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from mergekit_evolve.errors import InputError
from mergekit_evolve.modeling import LayerStackConfig, LayerStackForCausalLM
from mergekit_evolve.space.dfs import DFSPath

LOG = logging.getLogger(__name__)

# Architectures whose decoder layers share the call convention the layer stack uses, checked by tests.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_compatible(configs: Sequence[PretrainedConfig], sources: Sequence[str], base_index: int) -> None:
    """Raise ``InputError`` unless every source can share model A's residual stream and rotary embedding."""
    base, base_name = configs[base_index], sources[base_index]
    for i, (config, name) in enumerate(zip(configs, sources)):
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise InputError(
                f"sources[{i}]: {name} is a {config.model_type!r} model; DFS layer stacks support "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}; choose models of those families"
            )
        if config.hidden_size != base.hidden_size:
            raise InputError(
                f"sources[{i}]: {name} has hidden_size {config.hidden_size} but model A ({base_name}) has "
                f"{base.hidden_size}; DFS needs models with the same hidden size (same family and size)"
            )
        if _head_dim(config) != _head_dim(base):
            raise InputError(
                f"sources[{i}]: {name} has head_dim {_head_dim(config)} but model A ({base_name}) has "
                f"{_head_dim(base)}; every layer uses model A's rotary embedding, so head sizes must match"
            )


def _resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype or "auto"
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise InputError(f"dtype: {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return resolved


def _read_configs(paths: Sequence[str]) -> list[PretrainedConfig]:
    configs = []
    for i, path in enumerate(paths):
        if not (Path(path) / "config.json").is_file():
            raise InputError(
                f"sources[{i}]: {path} is not a local Hugging Face checkpoint (no config.json); "
                "give the directory of a saved model"
            )
        configs.append(AutoConfig.from_pretrained(path))
    return configs


class LayerPool:
    """Decoder layers of N sources, loaded once, and the resident layer-stack model over them."""

    def __init__(
        self,
        models: Sequence[PreTrainedModel],
        sources: Sequence[str],
        *,
        tokenizer=None,
        base_index: int = 0,
    ):
        if not models or len(models) != len(sources):
            raise InputError("sources: need one name per model and at least one model")
        if not 0 <= base_index < len(models):
            raise InputError(f"base_index: {base_index} is not a source index; use 0..{len(models) - 1}")
        self.sources = [str(s) for s in sources]
        self.base_index = base_index
        self.tokenizer = tokenizer
        self.configs = [model.config for model in models]
        check_compatible(self.configs, self.sources, base_index)
        base = models[base_index]
        self.embed_tokens = base.model.embed_tokens
        self.norm = base.model.norm
        self.rotary_emb = base.model.rotary_emb
        self.lm_head = base.lm_head
        # Keep only decoder layers of the other sources: their embeddings and heads are freed with the models.
        self.layers = nn.ModuleList(layer for model in models for layer in model.model.layers)
        self.layer_counts = [len(model.model.layers) for model in models]
        self._stack: LayerStackForCausalLM | None = None

    @classmethod
    def from_pretrained(
        cls,
        paths: Sequence[str | Path],
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        base_index: int = 0,
    ) -> LayerPool:
        """Load every source once (validated before any weight is read); model A is ``paths[base_index]``."""
        paths = [str(Path(p).absolute()) for p in paths]
        if not paths:
            raise InputError("sources: no model given; list at least one model directory")
        if not 0 <= base_index < len(paths):
            raise InputError(f"base_index: {base_index} is not a source index; use 0..{len(paths) - 1}")
        check_compatible(_read_configs(paths), paths, base_index)
        torch_dtype = _resolve_dtype(dtype)
        models = []
        for path in paths:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            models.append(model.to(device).eval().requires_grad_(False))
        return cls(models, paths, tokenizer=_load_tokenizer(paths[base_index]), base_index=base_index)

    # --- the layer stack ---------------------------------------------------------------------------------
    def stack_config(self, path: DFSPath) -> LayerStackConfig:
        """A standalone config describing ``path`` over this pool (all layers)."""
        return LayerStackConfig(
            source_configs=[config.to_dict() for config in self.configs],
            sources=self.sources,
            base_index=self.base_index,
            path=[list(hop) for hop in path.hops],
            scales=list(path.scales),
        )

    def model(self, path: DFSPath) -> LayerStackForCausalLM:
        """The resident layer stack, pointed at ``path``.

        The same object is returned on every call and re-pointed: a model obtained earlier follows the latest
        path. No weight is copied.
        """
        self.check_path(path)
        if self._stack is None:
            self._stack = LayerStackForCausalLM.from_modules(
                self.stack_config(path),
                embed_tokens=self.embed_tokens,
                layers=self.layers,
                norm=self.norm,
                rotary_emb=self.rotary_emb,
                lm_head=self.lm_head,
                source_configs=self.configs,
            )
        else:
            self._stack.set_path(path.hops, path.scales)
        return self._stack

    def check_path(self, path: DFSPath) -> None:
        for hop, (model, layer) in enumerate(path.hops):
            if not (0 <= model < len(self.layer_counts) and 0 <= layer < self.layer_counts[model]):
                raise InputError(
                    f"path.hops[{hop}]: ({model}, {layer}) is not a layer of this pool "
                    f"(layer counts {self.layer_counts}); use a path decoded from this pool's DFS space"
                )

    def layer(self, model: int, layer: int) -> nn.Module:
        return self.layers[sum(self.layer_counts[:model]) + layer]

    def base_model_config(self) -> PretrainedConfig:
        return self.configs[self.base_index]

    def parameters(self):
        """Every tensor the pool keeps alive (model A's embedding/norm/head and all decoder layers)."""
        seen = set()
        for module in (self.embed_tokens, self.norm, self.rotary_emb, self.lm_head, self.layers):
            for tensor in list(module.parameters()) + list(module.buffers()):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield tensor


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def stack_checkpoint_tensors(
    paths: Sequence[str], layer_counts: Sequence[int], base_index: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """The pool's tensors under the layer stack's names, read one at a time from the sources' files (what a
    vLLM layer-stack engine loads): every source's decoder layers as ``model.layers.{flat}`` in collection
    order, model A's other tensors (embeddings, final norm, head) as they are; the other sources' embeddings
    and heads are never read."""
    from mergekit.io import LazyTensorLoader

    offset = 0
    for index, (path, count) in enumerate(zip(paths, layer_counts)):
        loader = LazyTensorLoader.from_disk(str(path))
        for name in loader.index.tensor_paths:
            layer = _LAYER_NAME.match(name)
            if layer:
                yield f"model.layers.{offset + int(layer[1])}.{layer[2]}", loader.get_tensor(name)
            elif index == base_index:
                yield name, loader.get_tensor(name)
        offset += count


def _load_tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # a checkpoint without tokenizer files is still a valid source
        LOG.warning("no tokenizer loaded from %s: %s", path, err)
        return None


__all__ = ["LayerPool", "SUPPORTED_ARCHITECTURES", "check_compatible", "stack_checkpoint_tensors"]
