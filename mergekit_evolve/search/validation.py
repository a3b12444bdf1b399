"""Confirm a DFS search's result on fitness rows it never selected on (``dfs.validation``).

Why. The search's best is the maximum over hundreds of noisy scores on the same rows, so it is biased
upward: on the zoo, the DFS stage of PS+DFS returned paths 1-2 fitness items above the PS model (its
start path) that were worse on held-out. A demanding user wants the PS model replaced only on evidence.

How. A ``validation`` fraction of each fitness task's rows (a seeded draw, new per seed) is held back
from the search (``Fitness.hold_back``). After the search, its best and the start path (model A's own
layers; in PS+DFS the PS model itself) are scored on those rows, and the best replaces the start only
when the paired difference exceeds ``validation_z`` standard errors (one comparison, decided before it
is made, so the test is honest). The held-out split is never involved.

Resume: each score and the decision go to ``validation.jsonl``; a resumed run reads them back and
decides the same (the search's own best is recorded, since ``state.best`` becomes the decision).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mergekit_evolve.errors import InputError
from mergekit_evolve.search.records import Best, Contender, ValidationDecision, ValidationEntry
from mergekit_evolve.search.rundir import RunDir

DEFAULT_PS_DFS_FRACTION = 0.3


@dataclass
class ValidationGate:
    fraction: float
    z: float
    seed: int

    def search_fitness(self, fitness):
        """The fitness the search sees: every task's rows but the validation ones."""
        small = [name for name, n in fitness.num_rows("fitness").items() if n < 2]
        if small:
            raise InputError(
                f"dfs.validation: task {small[0]!r} has fewer than 2 fitness rows to split; "
                "add rows or set dfs.validation: 0"
            )
        return fitness.hold_back(self.fraction, self.seed)

    def confirm(self, problem, fitness, run_dir: RunDir, state, on_best: Callable[[Best], None]) -> ValidationDecision:
        """Keep the search's best or go back to the start path; updates ``state.best`` (and, through
        ``on_best``, best.json / best.yaml) and returns the decision for summary.json."""
        entries = run_dir.read_validation()
        decision = next((e.decision for e in entries if e.decision is not None), None)
        if decision is None:
            decision = self._decide(problem, fitness, run_dir, state, {e.role: e for e in entries if e.role})
            run_dir.append_validation(ValidationEntry(decision=decision))
        chosen = getattr(decision, decision.kept).record
        if state.best is None or (state.best.key, state.best.index) != (chosen.key, chosen.index):
            state.best = chosen
            on_best(chosen)
            run_dir.save_state(state)
        return decision

    def _decide(self, problem, fitness, run_dir: RunDir, state, done: dict) -> ValidationDecision:
        search_best, start = state.best, start_record(problem, fitness, run_dir)
        for role, record in (("start", start), ("search_best", search_best)):
            if role in done:
                continue
            if role == "search_best" and record.key == start.key:
                done[role] = done["start"].model_copy(update={"role": role, "record": record})
            else:
                results = fitness.evaluate(problem.build(problem.decode(np.asarray(record.genome))), "validation")
                correct = {t: "".join("1" if c else "0" for c in r.correct) for t, r in results.items()}
                done[role] = ValidationEntry(role=role, record=record, correct=correct)
            run_dir.append_validation(done[role])
        weights = fitness.weights()
        diff, se = paired_difference(done["search_best"].correct, done["start"].correct, weights)
        replaces = search_best.key != start.key and diff > 0 and diff > self.z * se
        return ValidationDecision(
            rows={t: len(c) for t, c in done["start"].correct.items()},
            start=Contender(record=start, validation=validation_score(done["start"].correct, weights)),
            search_best=Contender(
                record=search_best, validation=validation_score(done["search_best"].correct, weights)
            ),
            difference=diff,
            standard_error=se,
            z=self.z,
            kept="search_best" if replaces else "start",
        )


def start_record(problem, fitness, run_dir: RunDir) -> Best:
    """The start path's evaluation (the pre-scan scores it first); scored here when the search never did
    (then it has no place in the run: index -1)."""
    start_key = problem.decode(problem.x0()).key
    for record in sorted(run_dir.read_evaluations(), key=lambda r: r.index):
        if record.key == start_key and not record.failed and record.fitness is not None:
            return Best.of(record)
    scores = fitness.score(problem.build(problem.decode(problem.x0())), "fitness")
    return Best(
        index=-1,
        generation=0,
        candidate=-1,
        genome=[float(v) for v in problem.x0()],
        key=start_key,
        fitness=fitness.total(scores),
        scores=scores,
    )


def paired_difference(a: dict[str, str], b: dict[str, str], weights: dict[str, float]) -> tuple[float, float]:
    """Weighted mean over tasks of a - b (per-row 0/1 results on the same rows) and its standard error."""
    total = sum(weights[t] for t in a)
    diff, variance = 0.0, 0.0
    for task in a:
        d = np.array([int(x) - int(y) for x, y in zip(a[task], b[task])], dtype=float)
        share = weights[task] / total
        diff += share * d.mean()
        variance += share**2 * (d.var(ddof=1) / len(d) if len(d) > 1 else 0.0)
    return float(diff), math.sqrt(variance)


def validation_score(correct: dict[str, str], weights: dict[str, float]) -> float:
    total = sum(weights[t] for t in correct)
    return sum(weights[t] * c.count("1") / len(c) for t, c in correct.items()) / total


def make_validation_gate(config) -> ValidationGate | None:
    """The gate of a DFS run, or None (off, or a PS run)."""
    if config.space != "dfs" or not config.dfs.validation:
        return None
    return ValidationGate(config.dfs.validation, config.dfs.validation_z, config.optimizer.seed)


def fitness_for_search(config, fitness):
    """What the search scores on: ``fitness`` less the validation rows when the gate is on (also what
    Ray workers score on, so every executor sees the same rows)."""
    gate = make_validation_gate(config)
    return fitness if gate is None else gate.search_fitness(fitness)


def ps_dfs_validation(config, stage_config: Path | None = None) -> float:
    """``dfs.validation`` for the DFS stage of ps+dfs: as given, else the default where it applies. A
    resumed stage keeps the value it started with (``stage_config``, its config.yaml; a stage written
    before this option existed searched on every row: 0), so its records stay comparable."""
    from mergekit_evolve.config import accuracy_fitness

    if stage_config is not None and stage_config.exists():
        return (yaml.safe_load(stage_config.read_text()).get("dfs") or {}).get("validation") or 0.0
    if config.dfs.validation is not None:
        return config.dfs.validation
    return DEFAULT_PS_DFS_FRACTION if accuracy_fitness(config) else 0.0


def describe_decision(decision: ValidationDecision) -> str:
    """One line for logs and tables."""
    rows = ", ".join(f"{n} {t} rows" for t, n in decision.rows.items())
    verdict = "replaced the start path" if decision.kept == "search_best" else "kept the start path"
    return (
        f"validation on {rows}: search's best {decision.search_best.validation:.3f} vs start path "
        f"{decision.start.validation:.3f} (difference {decision.difference:+.3f}, needed > "
        f"{decision.z:g} x {decision.standard_error:.3f}): {verdict}"
    )
