"""Kind ``choice``: log-likelihood multiple choice.

Each choice is scored by the summed log-probability of its tokens after the prompt; the prediction is
the argmax. With ``choice_norm`` the sum is divided by the choice's length in characters first
(lm-eval's ``acc_norm``), which stops short choices from winning just for being short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mergekit_evolve.fitness.data import Row, choice_list, label_index
from mergekit_evolve.fitness.loglik import continuation_logprobs
from mergekit_evolve.fitness.outcome import Outcome, pad_token_id
from mergekit_evolve.fitness.prompts import context_texts, encode_continuations
from mergekit_evolve.fitness.runtime import ModelRunner
from mergekit_evolve.fitness.tasks import TaskConfig


@dataclass
class ChoiceExamples:
    pairs: list[tuple[list[int], list[int]]]  # one (context, choice) pair per choice, rows in order
    num_choices: list[int]
    choice_chars: list[int]  # per pair
    labels: list[int]


def prepare_choice(task: TaskConfig, rows: list[Row], fewshot: list[Row], tokenizer: Any) -> ChoiceExamples:
    contexts = context_texts(task, rows, fewshot, tokenizer)
    flat_contexts, flat_choices, num_choices = [], [], []
    for context, row in zip(contexts, rows):
        choices = choice_list(task, row.values)
        flat_contexts += [context] * len(choices)
        flat_choices += choices
        num_choices.append(len(choices))
    return ChoiceExamples(
        pairs=encode_continuations(task, tokenizer, flat_contexts, flat_choices),
        num_choices=num_choices,
        choice_chars=[len(c) for c in flat_choices],
        labels=[label_index(task, row.values) for row in rows],
    )


def evaluate_choice(
    runner: ModelRunner, task: TaskConfig, examples: ChoiceExamples, tokenizer: Any, batch_size: int
) -> Outcome:
    logprobs, tokens = continuation_logprobs(runner, examples.pairs, pad_token_id(tokenizer), batch_size)
    scores = [float(lp.double().sum()) for lp in logprobs]
    if task.choice_norm:
        scores = [s / n for s, n in zip(scores, examples.choice_chars)]
    predictions, start = [], 0
    for n in examples.num_choices:
        row_scores = scores[start : start + n]
        predictions.append(max(range(n), key=row_scores.__getitem__))  # first of equal maxima
        start += n
    correct = [p == label for p, label in zip(predictions, examples.labels)]
    metric = "acc_norm" if task.choice_norm else "accuracy"
    return Outcome(score=sum(correct) / len(predictions), metric=metric, tokens=tokens, correct=correct)
