"""Batched log-likelihood of continuations given contexts (kinds ``choice`` and ``perplexity``).

Each sequence is ``context + continuation`` minus its last token (nothing reads the logits after it),
right-padded: with right padding the real tokens keep positions 0..n-1, so no position ids are needed.
Longest sequences go first, so an out-of-memory batch size shows up in the first batch.
Log-softmax runs on the continuation positions only, not on the whole (batch, length, vocab) block: in
float32 for the built-in evaluators; in the logits' own dtype for lm-eval requests, as lm-eval's HFLM does.
A vLLM engine scores the pairs itself (``VllmModel.continuation_logprobs``; float32 log-softmax always).
"""

from __future__ import annotations

import torch

from mergekit_evolve.errors import CandidateError
from mergekit_evolve.fitness.runtime import ModelRunner, batches


def continuation_logprobs(
    runner: ModelRunner,
    pairs: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
) -> tuple[list[torch.Tensor], int]:
    """Per pair, the log-probability of each continuation token; and the tokens fed to the model."""
    logprobs, _, tokens = _all_logprobs(runner, pairs, pad_id, batch_size, torch.float32)
    return logprobs, tokens


def continuation_loglikelihoods(
    runner: ModelRunner,
    pairs: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
) -> tuple[list[tuple[float, bool]], int]:
    """lm-eval's loglikelihood answers: per pair (summed log-probability of the continuation, whether
    greedy decoding would produce it), log-softmax in the logits' dtype; and the tokens fed."""
    logprobs, greedy, tokens = _all_logprobs(runner, pairs, pad_id, batch_size, None)
    return [(float(lp.sum()), g) for lp, g in zip(logprobs, greedy)], tokens


def _all_logprobs(runner, pairs, pad_id, batch_size, softmax_dtype) -> tuple[list[torch.Tensor], list[bool], int]:
    inputs = [ctx + cont[:-1] for ctx, cont in pairs]
    if not isinstance(runner, ModelRunner):  # an engine that batches whole requests itself (vLLM, float32)
        logprobs, greedy = runner.continuation_logprobs(pairs)
        return logprobs, greedy, sum(len(x) for x in inputs)
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    logprobs: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    greedy = [False] * len(pairs)
    for batch in batches(order, batch_size):
        out = _batch_logprobs(runner, [pairs[i] for i in batch], [inputs[i] for i in batch], pad_id, softmax_dtype)
        for i, (lp, g) in zip(batch, zip(*out)):
            logprobs[i], greedy[i] = lp, g
    return logprobs, greedy, sum(len(x) for x in inputs)


def _batch_logprobs(
    runner: ModelRunner,
    pairs: list[tuple[list[int], list[int]]],
    inputs: list[list[int]],
    pad_id: int,
    softmax_dtype: torch.dtype | None,
) -> tuple[list[torch.Tensor], list[bool]]:
    width = max(len(x) for x in inputs)
    input_ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(inputs), width), dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, (x, (ctx, cont)) in enumerate(zip(inputs, pairs)):
        input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        attention_mask[row, : len(x)] = 1
        # The logits at position p predict token p + 1: the continuation starts at len(ctx).
        rows += [row] * len(cont)
        positions += range(len(ctx) - 1, len(ctx) - 1 + len(cont))
        targets += cont
    device = runner.device
    logits, _ = runner.forward(input_ids.to(device), attention_mask.to(device))
    picked = logits[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
    target_ids = torch.tensor(targets, device=device)
    logprobs = picked.log_softmax(-1, dtype=softmax_dtype).gather(1, target_ids[:, None]).squeeze(1)
    if not torch.isfinite(logprobs).all():
        raise CandidateError("the model produced non-finite log-probabilities")
    sizes = [len(cont) for _, cont in pairs]
    is_greedy = (picked.argmax(-1) == target_ids).cpu().split(sizes)
    return list(logprobs.cpu().split(sizes)), [bool(g.all()) for g in is_greedy]
