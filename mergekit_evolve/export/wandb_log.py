"""Optional Weights & Biases logging of a search (extra ``wandb``; off unless asked for).

The search loop can call ``WandbLogger.log_evaluation(record)`` with each ``evaluations.jsonl`` record
(step = evaluation index): fitness, best so far, per-task scores, seconds, failed flag. wandb is
imported only when a logger is created.
"""

from __future__ import annotations

from typing import Any

from mergekit_evolve.errors import InputError
from mergekit_evolve.search.records import Evaluation, Summary


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise InputError(
            "wandb: logging to Weights & Biases needs the wandb extra; run pip install 'mergekit-evolve[wandb]' "
            "or turn wandb logging off"
        ) from None
    return wandb


class WandbLogger:
    """One wandb run per search. ``mode="offline"`` writes locally (wandb's own option)."""

    def __init__(
        self,
        project: str,
        *,
        name: str | None = None,
        entity: str | None = None,
        config: dict[str, Any] | None = None,
        mode: str | None = None,
    ):
        wandb = require_wandb()
        self.run = wandb.init(project=project, name=name, entity=entity, config=config or {}, mode=mode)
        self.best: float | None = None

    def log_evaluation(self, record: Evaluation) -> None:
        fitness = record.fitness
        if fitness is not None and (self.best is None or fitness > self.best):
            self.best = fitness
        data: dict[str, Any] = {
            "generation": record.generation,
            "failed": fitness is None,
            "cached": record.cached,
            "seconds": record.seconds,
            "merge_seconds": record.merge_seconds,
            "fitness": fitness,
            "best_fitness": self.best,
        }
        data.update({f"score/{task}": value for task, value in record.scores.items()})
        self.run.log({k: v for k, v in data.items() if v is not None}, step=record.index)

    def log_summary(self, summary: Summary) -> None:
        best = summary.best
        self.run.summary.update(
            {
                "best_fitness": best.fitness,
                "heldout_total": best.heldout_total,
                **{f"heldout/{k}": v for k, v in (best.heldout or {}).items()},
                "evaluations": summary.evaluations,
                "failures": summary.failures,
                "wall_seconds": summary.wall_seconds,
            }
        )

    def finish(self) -> None:
        self.run.finish()
