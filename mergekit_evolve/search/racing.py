"""Racing: score a generation on growing parts of the fitness rows; stop candidates that cannot rank.

CMA-ES only uses the ranks of a generation's best ``mu`` candidates (its positive recombination
weights), so the exact fitness of a clearly bad candidate is wasted work. Racing scores every
candidate of a generation on the first part of the fitness rows (``stages``: cumulative fractions,
default 1/8, 1/4, 1/2, all), then keeps scoring only those whose upper confidence bound still reaches
the ``keep``-th best lower bound. Survivors end with their exact full-data fitness; a stopped
candidate's fitness is its estimate from the rows it saw (recorded with ``racing.fraction`` < 1).

Confidence bounds: for an accuracy over a fixed set of N rows, of which n were scored (a random
sample: see ``Fitness`` parts), the standard error of the mean is sqrt(p(1-p)/n * (N-n)/(N-1)) --
exact at n = N, where the bound closes. p is smoothed as (correct+1)/(n+2) so that a candidate with
zero correct answers in a small part still has a nonzero margin. Several tasks combine with their
weights, as the fitness does. Decisions depend only on the stage results, never on which worker
finished first, so local and Ray runs race identically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from mergekit_evolve.config import RacingConfig
from mergekit_evolve.errors import InputError
from mergekit_evolve.search.records import Outcome, RacingProgress


def check_racing(racing: RacingConfig, fitness) -> None:
    """Racing needs accuracy tasks with at least one row in every part."""
    bad = fitness.raceable()
    if bad:
        raise InputError(
            f"optimizer.racing: task {bad[0]!r} is not an accuracy task (racing needs kind generate or choice, "
            "or an lm-eval task whose metric is a mean over documents); remove racing or the task"
        )
    for name, n in fitness.num_rows("fitness").items():
        bounds = [round(f * n) for f in [0.0, *racing.stages]]
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise InputError(
                f"optimizer.racing.stages: task {name!r} has {n} fitness rows, too few for stages {racing.stages} "
                "(a part would be empty); use fewer stages or more rows"
            )


@dataclass
class Tally:
    """One candidate's racing progress: per task, correct answers and rows scored so far."""

    correct: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    merge_seconds: float = 0.0
    stages: int = 0

    def add(self, result: Outcome) -> None:
        for task, n in (result.rows or {}).items():
            self.correct[task] = self.correct.get(task, 0.0) + result.scores[task] * n
            self.rows[task] = self.rows.get(task, 0) + n
        self.tokens += result.tokens
        self.seconds += result.seconds
        self.merge_seconds += result.merge_seconds or 0.0
        self.stages += 1

    def scores(self) -> dict[str, float]:
        return {task: self.correct[task] / n for task, n in self.rows.items()}

    def estimate(self, weights: dict[str, float]) -> float:
        scores = self.scores()
        return sum(weights[t] * s for t, s in scores.items()) / sum(weights[t] for t in scores)

    def margin(self, weights: dict[str, float], total_rows: dict[str, int], z: float) -> float:
        weight_sum = sum(weights[t] for t in self.rows)
        variance = 0.0
        for task, n in self.rows.items():
            big_n = total_rows[task]
            p = (self.correct[task] + 1) / (n + 2)
            fpc = (big_n - n) / (big_n - 1) if big_n > 1 else 0.0
            variance += (weights[task] / weight_sum) ** 2 * p * (1 - p) / n * max(fpc, 0.0)
        return z * math.sqrt(variance)


Evaluate = Callable[[list], Iterator[tuple]]  # jobs (with .part) -> (job, Outcome) as they finish


def race(
    jobs: list,
    evaluate: Evaluate,
    racing: RacingConfig,
    keep: int,
    weights: dict[str, float],
    total_rows: dict[str, int],
) -> Iterator[tuple]:
    """Yield (job, final result) for every job: failures at once, stopped ones after their last
    stage, survivors after the last stage. ``evaluate`` may replay stages from a resumed run."""
    keep = racing.keep or keep
    tallies = {job.candidate: Tally() for job in jobs}
    alive = list(jobs)
    lo = 0.0
    for stage, hi in enumerate(racing.stages):
        staged = [replace(job, part=(lo, hi), stage=stage) for job in alive]
        failed = set()
        for job, result in evaluate(staged):
            if result.failed:
                failed.add(job.candidate)
                yield job, result.model_copy(update={"racing": _progress(tallies[job.candidate], total_rows, stage)})
            else:
                tallies[job.candidate].add(result)
        alive = [job for job in alive if job.candidate not in failed]
        lo = hi
        if hi == 1.0:
            break
        stopped = _stopped(alive, tallies, keep, weights, total_rows, racing.z)
        for job in alive:
            if job.candidate in stopped:
                yield job, _final(tallies[job.candidate], weights, total_rows, stage)
        alive = [job for job in alive if job.candidate not in stopped]
    for job in alive:
        yield job, _final(tallies[job.candidate], weights, total_rows, None)


def _stopped(alive, tallies, keep, weights, total_rows, z) -> set[int]:
    if len(alive) <= keep:
        return set()
    bounds = {}
    for job in alive:
        tally = tallies[job.candidate]
        estimate, margin = tally.estimate(weights), tally.margin(weights, total_rows, z)
        bounds[job.candidate] = (estimate - margin, estimate + margin)
    threshold = sorted((lower for lower, _ in bounds.values()), reverse=True)[keep - 1]
    return {c for c, (_, upper) in bounds.items() if upper < threshold}


def _progress(tally: Tally, total_rows: dict[str, int], stopped_at: int | None) -> RacingProgress:
    fraction = sum(tally.rows.values()) / sum(total_rows.values())
    return RacingProgress(fraction=round(fraction, 6), stopped_at=stopped_at, stages=tally.stages)


def _final(tally: Tally, weights, total_rows, stopped_at: int | None) -> Outcome:
    return Outcome(
        fitness=tally.estimate(weights),
        scores=tally.scores(),
        time=time.time(),
        tokens=tally.tokens,
        seconds=round(tally.seconds, 4),
        merge_seconds=round(tally.merge_seconds, 4),
        racing=_progress(tally, total_rows, stopped_at),
    )
