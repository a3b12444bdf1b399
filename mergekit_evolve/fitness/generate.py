"""Kind ``generate``: batched greedy decoding with a KV cache, then exact-match accuracy.

A hand-written loop rather than ``model.generate``: it works for any model with the small forward
contract of ``runtime.ModelRunner`` (our layer-stack model included), checks stop strings once per step
for the whole batch, and avoids ``generate``'s per-call set-up, which dominates on small models.
Rows are sorted by prompt length so each batch pads little; padding is on the left so every row's next
token sits in the last column, and position ids follow the attention mask (as ``generate`` does), so a
row decodes the same tokens whatever batch it lands in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_evolve.fitness.data import Row, answer_text
from mergekit_evolve.fitness.extract import extract, reference
from mergekit_evolve.fitness.outcome import Outcome, pad_token_id
from mergekit_evolve.fitness.prompts import context_texts, encode
from mergekit_evolve.fitness.runtime import ModelRunner, batches
from mergekit_evolve.fitness.tasks import TaskConfig


@dataclass
class GenerateExamples:
    prompt_ids: list[list[int]]
    references: list[str | None]


def prepare_generate(task: TaskConfig, rows: list[Row], fewshot: list[Row], tokenizer: Any) -> GenerateExamples:
    texts = context_texts(task, rows, fewshot, tokenizer)
    prompt_ids = encode(task, tokenizer, texts)
    for ids, text, row in zip(prompt_ids, texts, rows):
        if not ids:
            raise task.field_error(
                "data",
                _no_prompt_tokens(text, row),
                "give every row a prompt the tokenizer encodes (or use a tokenizer that knows its characters)",
            )
    references = [reference(answer_text(task, row.values), task.extract) for row in rows]
    return GenerateExamples(prompt_ids=prompt_ids, references=references)


def _no_prompt_tokens(text: str, row: Row) -> str:
    if not text:
        return f"{row.where}: the prompt is empty and the tokenizer adds no BOS token"
    return f"{row.where}: the tokenizer produced no tokens for the prompt {text[:40]!r} (and adds no BOS token)"


def evaluate_generate(
    runner: ModelRunner, task: TaskConfig, examples: GenerateExamples, tokenizer: Any, batch_size: int
) -> Outcome:
    texts, tokens = greedy_generate(
        runner,
        examples.prompt_ids,
        tokenizer,
        max_new_tokens=task.max_new_tokens,
        stop=task.stop,
        batch_size=batch_size,
    )
    pattern = re.compile(task.pattern) if task.pattern else None
    predictions = [extract(text, task.extract, pattern) for text in texts]
    correct = [p is not None and p == ref for p, ref in zip(predictions, examples.references)]
    generated = tokens - sum(len(p) for p in examples.prompt_ids)
    return Outcome(
        score=sum(correct) / len(texts), metric="accuracy", tokens=tokens, correct=correct, generated=generated
    )


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids of the tokenizer and of the model's generation config (which may list several)."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, list | tuple) else [config_eos]))
    return ids


def greedy_generate(
    runner: ModelRunner,
    prompts: list[list[int]],
    tokenizer: Any,
    max_new_tokens: int,
    stop: list[str],
    batch_size: int,
) -> tuple[list[str], int]:
    """Greedy continuations (decoded, special tokens skipped, cut at the first stop string).

    Returns the texts in the order of ``prompts`` and the tokens spent (prompt tokens plus generated
    tokens, EOS included, of every row).
    """
    generated = greedy_token_ids(runner, prompts, tokenizer, max_new_tokens, stop, batch_size)
    texts = [cut_at_stop(text, stop) for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return texts, sum(len(p) + len(g) for p, g in zip(prompts, generated))


def greedy_token_ids(
    runner: ModelRunner,
    prompts: list[list[int]],
    tokenizer: Any,
    max_new_tokens: int,
    stop: list[str],
    batch_size: int,
) -> list[list[int]]:
    """Generated ids per prompt (in the order of ``prompts``): EOS included when produced; a row ends
    at EOS, at the token that completes a stop string, or after ``max_new_tokens``."""
    if not isinstance(runner, ModelRunner):  # an engine that batches whole requests itself (vLLM)
        return runner.greedy_token_ids(prompts, max_new_tokens, stop, eos_token_ids(runner, tokenizer))
    eos_ids = eos_token_ids(runner.model, tokenizer)
    generated: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for batch in batches(order, batch_size):
        batch_ids = _decode_batch(runner, [prompts[i] for i in batch], tokenizer, max_new_tokens, stop, eos_ids)
        for i, ids in zip(batch, batch_ids):
            generated[i] = ids
    return generated


def cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _decode_batch(
    runner: ModelRunner,
    prompts: list[list[int]],
    tokenizer: Any,
    max_new_tokens: int,
    stop: list[str],
    eos_ids: set[int],
) -> list[list[int]]:
    """Generated ids per row: EOS included when produced, nothing after a row has stopped.

    Rows that stop leave the batch (their KV cache rows are dropped) when the cache supports it,
    so a batch costs what its still-running rows cost.
    """
    input_ids, attention_mask = _left_pad(prompts, pad_token_id(tokenizer), runner.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits, cache = runner.forward(input_ids, attention_mask, position_ids, use_cache=True, last_logits_only=True)
    generated: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # the prompt behind each row of the tensors
    running = set(live)
    for step in range(max_new_tokens):
        next_tokens = logits[:, -1].argmax(-1)
        for row, token in zip(live, next_tokens.tolist()):
            if row in running:
                generated[row].append(token)
        running = {row for row in running if generated[row][-1] not in eos_ids}
        if stop and running:
            running = _without_stopped(running, generated, tokenizer, stop)
        if not running or step == max_new_tokens - 1:
            break
        # Dropping rows copies the cache once, so do it when a quarter of the rows have stopped.
        if len(running) <= 0.75 * len(live) and hasattr(cache, "batch_select_indices"):
            keep = [k for k, row in enumerate(live) if row in running]
            keep_index = torch.tensor(keep, device=runner.device)
            cache.batch_select_indices(keep_index)
            next_tokens, attention_mask, position_ids = (
                next_tokens[keep_index],
                attention_mask[keep_index],
                position_ids[keep_index],
            )
            live = [live[k] for k in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
        logits, cache = runner.forward(
            next_tokens[:, None], attention_mask, position_ids, cache, use_cache=True, last_logits_only=True
        )
    return generated


def _without_stopped(running: set[int], generated: list[list[int]], tokenizer: Any, stop: list[str]) -> set[int]:
    rows = sorted(running)
    texts = tokenizer.batch_decode([generated[row] for row in rows], skip_special_tokens=True)
    return {row for row, text in zip(rows, texts) if not any(s in text for s in stop)}
