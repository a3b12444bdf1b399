"""What a multi-objective search optimizes (``optimizer.objectives``) and the Pareto front of its evaluations.

An objective is a fitness task (its score: every task scores higher-is-better, perplexity included) or
``tokens``: how many tokens an answer takes (the mean per row of each generate task, averaged over those
tasks; lower is better). Strategies minimize, so ``losses`` gives each candidate's objectives in that form:
``-score`` for a task, the token count for ``tokens``.

The reference point (in loss form) bounds the hypervolume that COMO-CMA-ES grows and that the front is
measured by: ``optimizer.reference`` where given, else a score of 0 for a task and the longest answer the
tasks allow (``max_new_tokens``) for tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from mergekit_evolve.search.records import Evaluation, Outcome

TOKENS = "tokens"
FAILED = 1e9  # a failed candidate's loss in every objective (as search/loop.py's FAILED_LOSS)


@dataclass(frozen=True)
class Objectives:
    names: tuple[str, ...]
    reference: tuple[float, ...]  # loss form: worse than this in an objective adds no hypervolume

    @classmethod
    def of(cls, config) -> Objectives | None:
        """The run's objectives, or None for a single weighted fitness."""
        names = config.optimizer.objectives
        if not names:
            return None
        given = config.optimizer.reference or {}
        return cls.in_units(names, [given[n] if n in given else _default_reference(config, n) for n in names])

    @classmethod
    def in_units(cls, names, reference) -> Objectives:
        """From the reference point in the objectives' own units (as front.json keeps it)."""
        return cls(tuple(names), tuple(-r if cls.higher_is_better(n) else r for n, r in zip(names, reference)))

    @staticmethod
    def higher_is_better(name: str) -> bool:
        return name != TOKENS

    def values(self, scores: Mapping[str, float], generated: Mapping[str, float] | None) -> dict[str, float] | None:
        """Each objective's value as the user reads it (scores, tokens), or None when one is missing."""
        out = {}
        for name in self.names:
            if name == TOKENS:
                if not generated:
                    return None
                out[name] = float(np.mean(list(generated.values())))
            elif name in scores:
                out[name] = float(scores[name])
            else:
                return None
        return out

    def reference_values(self) -> list[float]:
        """The reference point in the objectives' own units (a score of 0, the longest answer)."""
        return [(-r if self.higher_is_better(n) else r) + 0.0 for n, r in zip(self.names, self.reference)]

    def to_losses(self, values: Mapping[str, float]) -> list[float]:
        return [values[n] if not self.higher_is_better(n) else -values[n] for n in self.names]

    def losses(self, record: Outcome) -> list[float]:
        """What the strategy minimizes for one scored candidate; a failed one is far worse than anything real
        in every objective (it adds nothing to the front, and ranks behind every real candidate)."""
        values = None if record.failed else self.values(record.scores, record.generated)
        if values is None:
            return [FAILED] * len(self.names)
        return self.to_losses(values)

    def hypervolume(self, points: Iterable[Mapping[str, float]]) -> float:
        """The hypervolume that ``points`` (values as the user reads them) dominate up to the reference point."""
        from pymoo.indicators.hv import HV

        losses = np.array([self.to_losses(p) for p in points], dtype=np.float64)
        if losses.size == 0:
            return 0.0
        inside = losses[np.all(losses < np.array(self.reference), axis=1)]
        return float(HV(ref_point=np.array(self.reference))(inside)) if len(inside) else 0.0


def _default_reference(config, name: str) -> float:
    """In the objective's own units: a score of 0 (accuracy), or the longest answer the tasks allow."""
    if name != TOKENS:
        return 0.0
    return float(max(t.max_new_tokens for t in config.builtin_fitness.tasks if t.kind == "generate"))


def nondominated(losses: list[list[float]]) -> list[int]:
    """Indices of the non-dominated loss vectors; of equal vectors only the first counts."""
    if not losses:
        return []
    points = np.asarray(losses, dtype=np.float64)
    keep = []
    for i, point in enumerate(points):
        no_worse = np.all(points <= point, axis=1)
        better = no_worse & np.any(points < point, axis=1)
        equal_before = np.all(points[:i] == point, axis=1)
        if not better.any() and not equal_before.any():
            keep.append(i)
    return keep


def pareto_front(records: Iterable[Evaluation], objectives: Objectives) -> list[Evaluation]:
    """The run's non-dominated candidates on the fitness split: scored on every row, one per recipe (the
    first scored), ordered by the first objective (best first)."""
    first_of_key: dict[str, Evaluation] = {}
    scored = []
    for record in sorted(records, key=lambda r: r.index):
        if record.failed or not record.complete or objectives.values(record.scores, record.generated) is None:
            continue
        if record.key:
            if record.key in first_of_key:
                continue
            first_of_key[record.key] = record
        scored.append(record)
    losses = [objectives.losses(r) for r in scored]
    front = [scored[i] for i in nondominated(losses)]
    return sorted(front, key=lambda r: (objectives.losses(r), r.index))
