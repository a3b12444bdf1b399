"""Kind ``perplexity``: how well the model predicts the answer text (given the prompt, if any).

Perplexity is token-weighted over the whole split: ``ppl = exp(total NLL / total scored tokens)``.
Lower is better, so the score selection sees is one of (``perplexity_score``):
- ``inverse`` (default): ``1 / ppl`` = ``exp(mean log-likelihood per token)``, in (0, 1] like an accuracy,
  so it mixes with accuracy tasks in a weighted mean;
- ``log_likelihood``: ``-log(ppl)`` = mean log-likelihood per token (<= 0), linear in the loss.
The raw perplexity is reported alongside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mergekit_evolve.errors import TokenizerRequired
from mergekit_evolve.fitness.data import Row, token_id_rows
from mergekit_evolve.fitness.loglik import continuation_logprobs
from mergekit_evolve.fitness.outcome import Outcome, pad_token_id
from mergekit_evolve.fitness.prompts import context_texts, encode_continuations
from mergekit_evolve.fitness.runtime import ModelRunner
from mergekit_evolve.fitness.tasks import TaskConfig


@dataclass
class PerplexityExamples:
    pairs: list[tuple[list[int], list[int]]]


def prepare_perplexity(task: TaskConfig, rows: list[Row], fewshot: list[Row], tokenizer: Any) -> PerplexityExamples:
    if token_id_rows(task, rows):
        return PerplexityExamples(pairs=[_token_id_pair(task, row) for row in rows])
    if any(isinstance(row.values.get(task.answer_field), list) for row in rows):
        raise task.field_error("data", "mixes token-id rows and text rows", "use one form for every row of a task")
    if tokenizer is None:
        raise TokenizerRequired(f"tasks.{task.name} (text rows)")
    contexts = context_texts(task, rows, fewshot, tokenizer)
    texts = [row.values[task.answer_field] for row in rows]
    pairs = encode_continuations(task, tokenizer, contexts, texts)
    for (_, cont), row in zip(pairs, rows):
        if not cont:
            raise task.field_error(
                "data",
                f"{row.where}: {task.answer_field!r} is a single token with nothing before it to predict it from",
                "use longer texts or a prompt",
            )
    return PerplexityExamples(pairs=pairs)


def _token_id_pair(task: TaskConfig, row: Row) -> tuple[list[int], list[int]]:
    """(context, continuation) of a token-id row; without a prompt the first id is the context."""
    context = list(row.values.get(task.prompt_field) or []) if task.prompt_field is not None else []
    continuation = list(row.values[task.answer_field])
    if not context:
        context, continuation = continuation[:1], continuation[1:]
    return context, continuation


def evaluate_perplexity(
    runner: ModelRunner, task: TaskConfig, examples: PerplexityExamples, tokenizer: Any, batch_size: int
) -> Outcome:
    logprobs, tokens = continuation_logprobs(runner, examples.pairs, pad_token_id(tokenizer), batch_size)
    total = sum(float(lp.double().sum()) for lp in logprobs)
    count = sum(len(lp) for lp in logprobs)
    mean_loglik = total / count
    perplexity = math.exp(-mean_loglik)
    if task.perplexity_score == "inverse":
        score, metric = math.exp(mean_loglik), "inverse_perplexity"
    else:
        score, metric = mean_loglik, "mean_log_likelihood"
    return Outcome(score=score, metric=metric, tokens=tokens, perplexity=perplexity)
