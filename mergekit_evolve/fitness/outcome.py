"""What an evaluator hands back to ``Fitness``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    score: float  # higher is better; what selection sees
    metric: str  # what ``score`` is, e.g. "accuracy"
    tokens: int = 0  # forward tokens spent (prompt + generated / scored)
    perplexity: float | None = None  # raw perplexity (kind perplexity)
    correct: list[bool] | None = None  # accuracy kinds: per row, in row order (item-level results for estimators)
    generated: int | None = None  # generate: tokens the answers took (EOS included), over all rows


def pad_token_id(tokenizer: Any) -> int:
    """Any id works for padding (it is masked out); prefer the tokenizer's own."""
    if tokenizer is None:  # token-id data scored without a tokenizer
        return 0
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
