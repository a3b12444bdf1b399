"""Economy: the full run's result for fewer forward tokens (``optimizer.economy``).

Two independent savings, each a mode, both in ``auto``:

- ``subsample``: a generation is scored on one subsample of the fitness rows (the same rows for all
  its candidates, new rows each generation, so selection does not overfit a few rows). CMA-ES only
  needs the ranks within a generation, and rows that every candidate answers alike do not change those
  ranks. So half of the rows are the most informative ones for the current population (largest
  p(1 - p) under the item-response model below, like adaptive testing), the other half a seeded
  random draw (new rows keep the model honest); and the subsample grows as the population converges:
  when fewer than ``TARGET_SPLIT_ROWS`` of a generation's rows told its candidates apart, the next
  generation gets proportionally more rows (at most twice as many; judged from the second generation
  on, the first one's rows being a random draw). At the full split it is the
  normal search.
- ``stop``: the search ends when no better candidate has appeared for ``PATIENCE`` generations (reason
  in summary.json; otherwise the reason is ``max_evals``).

Candidates scored on different rows are compared through a Rasch (one-parameter item-response) model
fitted on the per-row results the run already has: P(candidate i answers row j) = sigmoid(theta_i -
b_j), with Gaussian priors that shrink candidates seen on few rows (so a lucky small sample does not
look best). Its prediction of a candidate's accuracy on the whole split decides "better" for
``stop`` and picks the finalists; scored in full, the best finalist becomes the run's best.

Every decision is a deterministic function of the records on disk and the seed, so a killed run
resumes to the same result: the subsample fraction and stop reason travel in ``optimizer.pkl``, the
finalists' full scores in ``rescored.jsonl``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mergekit_evolve.errors import InputError
from mergekit_evolve.fitness.evaluator import Subsample
from mergekit_evolve.search.records import Evaluation, RowResults, SubsampleResults

START_FRACTION = 0.2  # of the fitness rows, in the first generation
MIN_ROWS = 12  # per task: fewer cannot rank anything
TARGET_SPLIT_ROWS = 4  # rows per generation on which its candidates disagree
MAX_GROWTH = 2.0  # per generation
PATIENCE = 5  # generations without a better candidate before ``stop`` ends the search
FINALISTS = 3  # best estimated candidates scored in full at the end
PRIOR_SD = 0.5  # Rasch priors (logits): candidates around their mean (one run: neighbours), rows around 0
RASCH_ITERATIONS = 60


@dataclass
class EconomyState:
    """Pickled with the search state."""

    fraction: float  # of every task's fitness rows, for the next generation
    stop_reason: str | None = None
    fractions: list = field(default_factory=list)  # per generation scored so far


class Economy:
    def __init__(self, mode: str, num_rows: dict[str, int], weights: dict[str, float], seed: int):
        self.mode, self.num_rows, self.weights, self.seed = mode, num_rows, weights, seed
        self.subsample = mode in ("subsample", "auto")
        self.stops = mode in ("stop", "auto")

    def initial_state(self) -> EconomyState:
        if not self.subsample:
            return EconomyState(fraction=1.0)
        smallest = min(self.num_rows.values())
        return EconomyState(fraction=min(1.0, max(START_FRACTION, MIN_ROWS / smallest)))

    # -- during the search ------------------------------------------------------------------------
    def part(self, state: EconomyState, generation: int, records: Iterable[Evaluation]) -> Subsample | None:
        """The rows of this generation (None: all of them), from the earlier generations' records only
        (a resumed generation must choose what the interrupted one chose)."""
        if state.fraction >= 1.0:
            return None
        earlier = sorted(
            (r for r in records if r.generation < generation and r.fitness is not None), key=lambda r: r.index
        )
        last = [i for i, r in enumerate(earlier) if r.generation == generation - 1]
        rng = random.Random(self.seed * 100_003 + generation)
        chosen = []
        for task, n in self.num_rows.items():
            k = min(n, max(MIN_ROWS, round(state.fraction * n)))
            informative: list[int] = []
            if last and any(r.subsample for r in earlier):
                theta, b = fit_rasch(earlier, task, n)
                p = _sigmoid(theta[last][:, None] - b[None, :])
                information = (p * (1 - p)).mean(axis=0)
                informative = sorted(range(n), key=lambda j: (-information[j], j))[: k // 2]
            taken = set(informative)
            rest = [j for j in range(n) if j not in taken]
            chosen.append((task, tuple(sorted(informative + rng.sample(rest, k - len(informative))))))
        return Subsample(rows=tuple(chosen))

    def should_stop(self, state: EconomyState) -> bool:
        return state.stop_reason is not None

    def after_generation(
        self,
        state: EconomyState,
        generation: int,
        generation_records: list[Evaluation],
        all_records: Iterable[Evaluation],
    ) -> None:
        """Grow the subsample and check for stagnation, from the records only."""
        state.fractions.append(state.fraction)
        # The first generation's rows are a random draw, mostly rows nobody answers yet: its few split
        # rows say the rows were uninformative, not that the candidates are alike. Judge from the second on.
        if state.fraction < 1.0 and generation > 1:
            split = split_rows(generation_records)
            growth = min(MAX_GROWTH, TARGET_SPLIT_ROWS / max(split, 1))
            if growth > 1.0:
                state.fraction = min(1.0, state.fraction * growth)
        if self.stops:
            best = self.ranked(all_records)
            if best and generation - best[0].generation >= PATIENCE:
                state.stop_reason = (
                    f"no better candidate in {PATIENCE} generations (best from generation {best[0].generation})"
                )

    # -- estimates ----------------------------------------------------------------------------------
    def ranked(self, records: Iterable[Evaluation]) -> list[Evaluation]:
        """Scored records, best first by estimated full-split fitness (ties: earlier candidate), each
        with ``estimate`` and ``estimate_source`` added."""
        scored = sorted((r for r in records if r.fitness is not None), key=lambda r: r.index)
        if not scored:
            return []
        out = [
            record.model_copy(update={"estimate": value, "estimate_source": source})
            for record, (value, source) in zip(scored, self.estimates(scored))
        ]
        return sorted(out, key=lambda r: (-r.estimate, r.index))

    def estimates(self, records: list[Evaluation]) -> list[tuple[float, str]]:
        if not any(r.subsample for r in records):
            return [(r.fitness, "full") for r in records]
        per_task = {task: rasch_accuracy(records, task, n) for task, n in self.num_rows.items()}
        weight_sum = sum(self.weights[t] for t in per_task)
        out = []
        for i, record in enumerate(records):
            if not record.subsample:
                out.append((record.fitness, "full"))
                continue
            value = sum(self.weights[t] * per_task[t][i] for t in per_task) / weight_sum
            out.append((float(value), "estimate (Rasch, " + subsample_label(record) + ")"))
        return out

    def finalists(self, records: Iterable[Evaluation]) -> list[Evaluation]:
        """The ``FINALISTS`` best distinct candidates by estimate (None when nothing was subsampled)."""
        records = list(records)
        if not any(r.subsample for r in records):
            return []
        chosen, keys = [], set()
        for record in self.ranked(records):
            if not record.failed and record.key not in keys:
                chosen.append(record)
                keys.add(record.key)
            if len(chosen) == FINALISTS:
                break
        return chosen


def split_rows(records: list[Evaluation]) -> int:
    """Rows (over all tasks) on which the generation's candidates did not all answer alike."""
    answers: dict[tuple[str, int], set] = {}
    for record in records:
        for task, items in (record.subsample.items if record.subsample else {}).items():
            for row, correct in zip(items.rows, items.correct):
                answers.setdefault((task, row), set()).add(correct)
    return sum(len(seen) > 1 for seen in answers.values())


def subsample_label(record: Evaluation) -> str:
    sample = record.subsample
    return "subsample " + ", ".join(f"{len(v.rows)} of {sample.of[t]}" for t, v in sample.items.items())


def item_results(sample: Subsample, num_rows: dict[str, int], correct: dict[str, list[bool]]) -> SubsampleResults:
    """What a subsampled evaluation records: which rows it saw and which it got right ("1"/"0")."""
    return SubsampleResults(
        of=dict(num_rows),
        items={
            task: RowResults(rows=list(sample.of(task)), correct="".join("1" if c else "0" for c in values))
            for task, values in correct.items()
        },
    )


def rasch_accuracy(records: list[Evaluation], task: str, n_rows: int) -> list[float]:
    """Predicted accuracy on all ``n_rows`` rows of ``task`` for every record."""
    theta, b = fit_rasch(records, task, n_rows)
    return list(_sigmoid(theta[:, None] - b[None, :]).mean(axis=1))


def fit_rasch(records: list[Evaluation], task: str, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """MAP Rasch fit: one ability per record, one difficulty per row of ``task``.

    Records scored in full enter with every row; subsampled ones with the rows they saw.
    """
    y = np.zeros((len(records), n_rows))
    seen = np.zeros((len(records), n_rows))
    for i, record in enumerate(records):
        items = record.subsample.items.get(task) if record.subsample else None
        if items is not None:
            rows = np.asarray(items.rows, dtype=int)
            y[i, rows] = [c == "1" for c in items.correct]
            seen[i, rows] = 1.0
        elif record.subsample is None and task in record.scores:
            # A full score without per-row results: spread it evenly (the rows' mean is what counts).
            y[i, :] = record.scores[task]
            seen[i, :] = 1.0
    return _fit_rasch(y, seen)


def _fit_rasch(y: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Alternating Newton steps on the penalised log-likelihood (both blocks are diagonal)."""
    theta, b = np.zeros(y.shape[0]), np.zeros(y.shape[1])
    precision = 1.0 / PRIOR_SD**2
    for _ in range(RASCH_ITERATIONS):
        p = _sigmoid(theta[:, None] - b[None, :])
        grad = ((y - p) * seen).sum(axis=1) - precision * (theta - theta.mean())
        theta = theta + grad / ((p * (1 - p) * seen).sum(axis=1) + precision)
        p = _sigmoid(theta[:, None] - b[None, :])
        grad = -((y - p) * seen).sum(axis=0) - precision * b
        b = b + grad / ((p * (1 - p) * seen).sum(axis=0) + precision)
    return theta, b


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def tokens_of(records: Iterable[Evaluation]) -> int:
    return int(sum(r.tokens for r in records))


def check_economy(mode: str, fitness) -> None:
    """Subsampling needs per-row results: built-in accuracy tasks."""
    from mergekit_evolve.fitness import Fitness

    if not isinstance(fitness, Fitness):
        raise InputError(
            f"optimizer.economy: {mode} works with built-in fitness tasks, not lm-eval tasks; use economy: stop or off"
        )
    bad = fitness.raceable()
    if bad:
        raise InputError(
            f"optimizer.economy: {mode} needs accuracy tasks (kind generate or choice), and task {bad[0]!r} is not "
            "one; "
            "use economy: stop or off"
        )
