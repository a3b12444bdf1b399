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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergekit_evolve.errors import InputError
from mergekit_evolve.search.rundir import RunDir, _append_jsonl, _read_jsonl

DEFAULT_PS_DFS_FRACTION = 0.3
BEST_KEYS = ("index", "generation", "candidate", "genome", "key", "fitness", "scores")


@dataclass
class ValidationGate:
    fraction: float
    z: float
    seed: int

    def search_fitness(self, fitness):
        """The fitness the search sees: every task's rows but the validation ones."""
        small = [name for name, n in fitness.num_rows("fitness").items() if n < 2]
        if small:
            raise InputError(f"dfs.validation: task {small[0]!r} has fewer than 2 fitness rows to split; add rows or set dfs.validation: 0")
        return fitness.hold_back(self.fraction, self.seed)

    def confirm(self, problem, fitness, run_dir: RunDir, state) -> dict[str, Any]:
        """Keep the search's best or go back to the start path; updates ``state.best`` (and best.json /
        best.yaml) and returns the decision for summary.json."""
        path = run_dir.path / "validation.jsonl"
        records = _read_jsonl(path)
        decision = next((r["decision"] for r in records if "decision" in r), None)
        if decision is None:
            decision = self._decide(problem, fitness, run_dir, state, path, {r["role"]: r for r in records if "role" in r})
            _append_jsonl(path, {"decision": decision})
        chosen = decision[decision["kept"]]["record"]
        if state.best is None or state.best["key"] != chosen["key"] or state.best["index"] != chosen["index"]:
            state.best = dict(chosen)
            problem.write_best(problem.decode(np.asarray(chosen["genome"])), run_dir, state.best)
            run_dir.save_state(state)
        return decision

    def _decide(self, problem, fitness, run_dir: RunDir, state, path, done: dict) -> dict[str, Any]:
        search_best = {k: state.best[k] for k in BEST_KEYS}
        start = start_record(problem, fitness, run_dir)
        scored = {}
        for role, record in (("start", start), ("search_best", search_best)):
            if role not in done:
                if role == "search_best" and record["key"] == start["key"]:
                    done[role] = {**done["start"], "role": role, "record": record}
                else:
                    results = fitness.evaluate(problem.build(problem.decode(np.asarray(record["genome"]))), "validation")
                    done[role] = {"role": role, "record": record,
                                  "correct": {t: "".join("1" if c else "0" for c in r.correct) for t, r in results.items()}}
                _append_jsonl(path, done[role])
            scored[role] = done[role]
        diff, se = paired_difference(scored["search_best"]["correct"], scored["start"]["correct"], fitness.weights())
        replaces = search_best["key"] != start["key"] and diff > 0 and diff > self.z * se
        return {
            "rows": {t: len(c) for t, c in scored["start"]["correct"].items()},
            "start": {"record": start, "validation": validation_score(scored["start"]["correct"], fitness.weights())},
            "search_best": {"record": search_best,
                            "validation": validation_score(scored["search_best"]["correct"], fitness.weights())},
            "difference": diff,
            "standard_error": se,
            "z": self.z,
            "kept": "search_best" if replaces else "start",
        }


def start_record(problem, fitness, run_dir: RunDir) -> dict[str, Any]:
    """The start path's evaluation (the pre-scan scores it first); scored here when the search never did."""
    start_key = problem.decode(problem.x0()).key
    for record in sorted(run_dir.read_evaluations(), key=lambda r: r["index"]):
        if record["key"] == start_key and record.get("error") is None and record.get("fitness") is not None:
            return {k: record[k] for k in BEST_KEYS}
    scores = fitness.score(problem.build(problem.decode(problem.x0())), "fitness")
    return {"index": None, "generation": None, "candidate": None, "genome": [float(v) for v in problem.x0()],
            "key": start_key, "fitness": fitness.total(scores), "scores": scores}


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


def describe_decision(decision: dict[str, Any]) -> str:
    """One line for logs and tables."""
    rows = ", ".join(f"{n} {t} rows" for t, n in decision["rows"].items())
    verdict = "replaced the start path" if decision["kept"] == "search_best" else "kept the start path"
    return (f"validation on {rows}: search's best {decision['search_best']['validation']:.3f} vs start path "
            f"{decision['start']['validation']:.3f} (difference {decision['difference']:+.3f}, needed > "
            f"{decision['z']:g} x {decision['standard_error']:.3f}): {verdict}")

