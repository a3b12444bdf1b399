"""Calling any causal LM the same way: transformers models and our layer-stack model.

(A vLLM engine, ``fitness/vllm_engine.VllmModel``, is not wrapped: it runs whole requests itself, and
``runner_for`` hands it to generate.py and loglik.py as it is.)

The contract with a model is small: ``forward(input_ids, attention_mask, past_key_values, use_cache)``
returning an object with ``.logits`` (and ``.past_key_values`` when ``use_cache``). transformers 5.2x
renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40): the cache goes in and comes out
under whichever name ``forward`` and its output use. Optional keyword arguments are passed only
when ``forward`` names them: ``position_ids`` (positions that skip the left padding, as ``generate``
does; needed by models with absolute position embeddings, while for rotary models a constant shift
cancels out in attention up to rounding) and ``logits_to_keep`` (saves computing prompt logits nobody reads).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ModelRunner:
    model: Any
    device: torch.device
    takes_position_ids: bool
    takes_logits_to_keep: bool
    cache_argument: str  # "cache" (transformers >= 5.2x) or "past_key_values"

    @classmethod
    def wrap(cls, model: Any) -> ModelRunner:
        names = set(inspect.signature(model.forward).parameters)
        return cls(
            model=model,
            device=model_device(model),
            takes_position_ids="position_ids" in names,
            takes_logits_to_keep="logits_to_keep" in names,
            cache_argument="cache" if "cache" in names else "past_key_values",
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {self.cache_argument: past_key_values}
        if position_ids is not None and self.takes_position_ids:
            kwargs["position_ids"] = position_ids
        if last_logits_only and self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )
        logits = out.logits if hasattr(out, "logits") else out[0]
        if last_logits_only:
            logits = logits[:, -1:]
        return logits, _returned_cache(out)


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def runner_for(model: Any) -> Any:
    """What the evaluators call: a ``ModelRunner`` around a torch model, or an engine that runs whole
    requests itself (``greedy_token_ids`` and ``continuation_logprobs``: the vLLM backend) as it is."""
    if hasattr(model, "greedy_token_ids") and hasattr(model, "continuation_logprobs"):
        return model
    return ModelRunner.wrap(model)


def model_device(model: Any) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@contextlib.contextmanager
def evaluation_mode(model: Any) -> Iterator[None]:
    """``eval()`` + ``inference_mode`` for the duration; the model's training flag is restored after.
    Anything that is not a torch module (a vLLM engine) runs as it is."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]
