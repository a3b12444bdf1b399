"""``Fitness``: scores a candidate model on the configured tasks.

All data is read, checked and tokenized when a ``Fitness`` is built, so bad data fails before any
merging and each evaluation only runs the model. The held-out split is scored only when asked for
(``split="heldout"``, for reports); selection must only ever see ``split="fitness"``.

Racing (``search/racing.py``) scores a candidate on growing parts of the fitness rows: ``part=(lo, hi)``
selects the rows between those fractions of a fixed, seeded shuffle of each task's rows, so the parts
of a schedule are disjoint, together cover every row, and each is a fair sample of the whole split.

Economy (``search/economy.py``) scores a whole generation on one ``Subsample``: chosen rows of each
task's fitness split; per-row results (``TaskResult.correct``) let it compare candidates
that saw different rows.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from mergekit_evolve.errors import InputError, TokenizerRequired
from mergekit_evolve.fitness.callable_task import FitnessFunction, evaluate_callable, load_function
from mergekit_evolve.fitness.choice import evaluate_choice, prepare_choice
from mergekit_evolve.fitness.data import Row, load_task_rows, token_id_rows
from mergekit_evolve.fitness.generate import evaluate_generate, prepare_generate
from mergekit_evolve.fitness.outcome import Outcome
from mergekit_evolve.fitness.perplexity import evaluate_perplexity, prepare_perplexity
from mergekit_evolve.fitness.prompts import check_chat_template
from mergekit_evolve.fitness.runtime import ModelRunner, evaluation_mode, runner_for
from mergekit_evolve.fitness.tasks import FitnessConfig, TaskConfig, load_fitness_config

# "validation": fitness rows held back from a search to confirm its result (``Fitness.hold_back``)
Split = Literal["fitness", "heldout", "validation"]
SPLITS: tuple[Split, ...] = ("fitness", "heldout", "validation")


@dataclass(frozen=True)
class Subsample:
    """Chosen fitness rows per task (indices into the task's fitness split), as ((task, rows), ...)."""

    rows: tuple[tuple[str, tuple[int, ...]], ...]

    def of(self, task: str) -> tuple[int, ...]:
        return dict(self.rows).get(task, ())


Part = tuple[float, float] | Subsample  # (lo, hi): fractions of the fitness rows, 0 <= lo < hi <= 1
RACING_KINDS = ("generate", "choice")  # accuracy tasks: a part's score times its rows adds up exactly
PART_SHUFFLE_SEED = 20240313
VALIDATION_SHUFFLE_SEED = 20240314

PREPARE = {"generate": prepare_generate, "choice": prepare_choice, "perplexity": prepare_perplexity}
EVALUATE = {"generate": evaluate_generate, "choice": evaluate_choice, "perplexity": evaluate_perplexity}


def request_tokens(task: TaskConfig, examples: Any) -> int:
    """The longest request of a task's tokenized examples (0 for none)."""
    if hasattr(examples, "prompt_ids"):  # generate
        return max((len(p) for p in examples.prompt_ids), default=-task.max_new_tokens) + task.max_new_tokens
    return max((len(ctx) + len(cont) for ctx, cont in getattr(examples, "pairs", [])), default=0)


class TaskResult(BaseModel):
    """One task's result on one split, for logs and reports."""

    name: str
    kind: str
    split: str
    score: float  # higher is better
    metric: str  # accuracy | acc_norm | inverse_perplexity | mean_log_likelihood | callable
    rows: int
    tokens: int  # forward tokens spent
    seconds: float
    perplexity: float | None = None
    correct: list[bool] | None = None  # accuracy kinds: per row, in the order of the rows scored
    generated: int | None = None  # generate: the answers' tokens over all rows (the ``tokens`` objective)


@dataclass
class _Task:
    config: TaskConfig
    rows: dict[str, list[Row]]  # split -> rows; absent when the task has no such split
    examples: dict[str, Any] = field(default_factory=dict)  # split -> tokenized examples
    function: FitnessFunction | None = None
    fewshot: list[Row] = field(default_factory=list)
    part_rows: dict[Part, list[Row]] = field(default_factory=dict)  # racing parts of the fitness split
    part_examples: dict[Part, Any] = field(default_factory=dict)
    sample: tuple[Subsample, list[Row], Any] | None = None  # the latest economy subsample (one generation's)


class Fitness:
    """Weighted multi-task fitness of candidate models; higher is better."""

    def __init__(self, config: FitnessConfig | dict[str, Any], tokenizer: Any, base_dir: str | Path | None = None):
        self.config = load_fitness_config(config)
        self.tokenizer = tokenizer
        self.base_dir = Path(base_dir if base_dir is not None else Path.cwd()).absolute()
        self.tokens_spent = 0  # forward tokens over all evaluations (prompt + generated / scored)
        self.last_results: dict[str, TaskResult] = {}
        if not self.config.tasks:
            raise InputError("fitness.tasks: no tasks; add at least one task")
        self._tasks = [self._prepare(task) for task in self.config.tasks]

    def _prepare(self, task: TaskConfig) -> _Task:
        loaded = load_task_rows(task, self.base_dir)
        rows = {"fitness": loaded.fitness}
        if loaded.heldout is not None:
            rows["heldout"] = loaded.heldout
        prepared = _Task(config=task, rows=rows, fewshot=loaded.fewshot)
        if task.kind == "callable":
            prepared.function = load_function(task, self.base_dir)
            return prepared
        if self.tokenizer is None and not token_id_rows(task, loaded.fitness):
            raise TokenizerRequired(f"tasks.{task.name} (kind {task.kind})")
        check_chat_template(task, self.tokenizer)
        for split, split_rows in rows.items():
            prepared.examples[split] = PREPARE[task.kind](task, split_rows, loaded.fewshot, self.tokenizer)
        return prepared

    def hold_back(self, fraction: float, seed: int) -> Fitness:
        """A copy whose ``validation`` split holds ``fraction`` of each task's fitness rows (a seeded draw,
        at least one row) and whose ``fitness`` split keeps the others: rows a search never selects on,
        on which its result can be confirmed without touching the held-out split."""
        held = copy.copy(self)
        held._tasks = [self._held_back(task, fraction, seed) for task in self._tasks]
        return held

    def _held_back(self, task: _Task, fraction: float, seed: int) -> _Task:
        rows = task.rows["fitness"]
        count = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        chosen = set(random.Random(VALIDATION_SHUFFLE_SEED + seed).sample(range(len(rows)), count))
        split = {
            "fitness": [r for i, r in enumerate(rows) if i not in chosen],
            "validation": [r for i, r in enumerate(rows) if i in chosen],
        }
        held = _Task(
            config=task.config,
            rows={**task.rows, **split},
            examples=dict(task.examples),
            function=task.function,
            fewshot=task.fewshot,
        )
        if task.function is None:
            for name, part in split.items():
                held.examples[name] = PREPARE[task.config.kind](task.config, part, task.fewshot, self.tokenizer)
        return held

    def num_rows(self, split: Split = "fitness") -> dict[str, int]:
        """Rows each task scores on ``split`` (tasks without that split are absent)."""
        return {t.config.name: len(t.rows[split]) for t in self._tasks if split in t.rows}

    def weights(self) -> dict[str, float]:
        return {task.name: task.weight for task in self.config.tasks}

    def longest_request(self) -> tuple[int, str] | None:
        """The most tokens one model call needs (prompt + new tokens, or context + continuation) over every
        task and split, and which task needs it: an engine with a fixed context must hold it."""
        longest: tuple[int, str] | None = None
        for task in self._tasks:
            for split, examples in task.examples.items():
                tokens = request_tokens(task.config, examples)
                if tokens and (longest is None or tokens > longest[0]):
                    longest = (tokens, f"tasks.{task.config.name} ({split} split)")
        return longest

    def raceable(self) -> list[str]:
        """Names of the tasks racing cannot score in parts (empty when racing works)."""
        return [t.config.name for t in self._tasks if t.config.kind not in RACING_KINDS]

    def score(self, model: Any, split: Split = "fitness") -> dict[str, float]:
        """Task name -> score (higher is better). Tasks without a held-out split are skipped for "heldout"."""
        return {name: result.score for name, result in self.evaluate(model, split).items()}

    def evaluate(self, model: Any, split: Split = "fitness", part: Part | None = None) -> dict[str, TaskResult]:
        """Like ``score`` with the details (metric, raw perplexity, rows, tokens, seconds) per task.

        ``part``: score only that part of the fitness rows (racing); tasks with no row in it are absent.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if part is not None and split != "fitness":
            raise ValueError("parts exist only for the fitness split")
        results = {}
        with evaluation_mode(model):
            runner = runner_for(model)
            for task in self._tasks:
                if split not in task.rows:
                    continue
                rows, examples = self._rows_and_examples(task, split, part)
                if rows:
                    results[task.config.name] = self._evaluate_task(task, runner, split, rows, examples)
        self.last_results = results
        return results

    def _rows_and_examples(self, task: _Task, split: Split, part: Part | None) -> tuple[list[Row], Any]:
        if part is None:
            return task.rows[split], task.examples.get(split)
        if isinstance(part, Subsample):
            return self._subsample(task, part)
        if part not in task.part_rows:
            rows = task.rows["fitness"]
            order = list(range(len(rows)))
            random.Random(PART_SHUFFLE_SEED).shuffle(order)
            chosen = sorted(order[round(part[0] * len(rows)) : round(part[1] * len(rows))])
            task.part_rows[part] = [rows[i] for i in chosen]
            if task.function is None and chosen:
                task.part_examples[part] = PREPARE[task.config.kind](
                    task.config, task.part_rows[part], task.fewshot, self.tokenizer
                )
        return task.part_rows[part], task.part_examples.get(part)

    def _subsample(self, task: _Task, sample: Subsample) -> tuple[list[Row], Any]:
        # A generation scores all its candidates on one subsample: keep only the latest one prepared.
        if task.sample is None or task.sample[0] != sample:
            rows = [task.rows["fitness"][i] for i in sample.of(task.config.name)]
            examples = (
                None
                if task.function is not None or not rows
                else PREPARE[task.config.kind](task.config, rows, task.fewshot, self.tokenizer)
            )
            task.sample = (sample, rows, examples)
        return task.sample[1], task.sample[2]

    def _evaluate_task(
        self, task: _Task, runner: ModelRunner, split: Split, rows: list[Row], examples: Any
    ) -> TaskResult:
        config = task.config
        start = time.perf_counter()
        if task.function is not None:
            # a torch model, or on the vLLM backend the engine (``vllm.LLM``)
            outcome: Outcome = evaluate_callable(task.function, config, runner.model, self.tokenizer, rows, split)
        else:
            outcome = EVALUATE[config.kind](runner, config, examples, self.tokenizer, self.config.batch_size)
        self.tokens_spent += outcome.tokens
        return TaskResult(
            name=config.name,
            kind=config.kind,
            split=split,
            score=outcome.score,
            metric=outcome.metric,
            rows=len(rows),
            tokens=outcome.tokens,
            seconds=time.perf_counter() - start,
            perplexity=outcome.perplexity,
            correct=outcome.correct,
            generated=outcome.generated,
        )

    def total(self, scores: dict[str, float]) -> float:
        """Weighted mean of the scores of the tasks present in ``scores``."""
        weights = self.weights()
        unknown = set(scores) - set(weights)
        if unknown:
            raise ValueError(f"scores for unknown tasks: {sorted(unknown)}")
        if not scores:
            raise ValueError("no scores to combine")
        weight_sum = sum(weights[name] for name in scores)
        return sum(weights[name] * value for name, value in scores.items()) / weight_sum
