"""Optional Weights & Biases logging of a search (extra ``wandb``; off unless asked for).

The search loop can call ``WandbLogger.log_evaluation(record)`` with each ``evaluations.jsonl`` record
(step = evaluation index): fitness, best so far, per-task scores, seconds, failed flag. wandb is
imported only when a logger is created.
"""

from __future__ import annotations

from typing import Any, Optional

from mergekit_evolve.errors import InputError


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

    def __init__(self, project: str, *, name: Optional[str] = None, entity: Optional[str] = None,
                 config: Optional[dict[str, Any]] = None, mode: Optional[str] = None):
        wandb = require_wandb()
        self.run = wandb.init(project=project, name=name, entity=entity, config=config or {}, mode=mode)
        self.best: Optional[float] = None

    def log_evaluation(self, record: dict[str, Any]) -> None:
        fitness = record.get("fitness")
        if fitness is not None and (self.best is None or fitness > self.best):
            self.best = fitness
        data: dict[str, Any] = {
            "generation": record.get("generation"),
            "failed": fitness is None,
            "cached": bool(record.get("cached")),
            "seconds": record.get("seconds"),
            "merge_seconds": record.get("merge_seconds"),
        }
        if fitness is not None:
            data["fitness"] = fitness
        if self.best is not None:
            data["best_fitness"] = self.best
        data.update({f"score/{task}": value for task, value in (record.get("scores") or {}).items()})
        self.run.log({k: v for k, v in data.items() if v is not None}, step=int(record.get("index", 0)))

    def log_summary(self, summary: dict[str, Any]) -> None:
        best = summary.get("best") or {}
        self.run.summary.update({
            "best_fitness": best.get("fitness"),
            "heldout_total": best.get("heldout_total"),
            **{f"heldout/{k}": v for k, v in (best.get("heldout") or {}).items()},
            "evaluations": summary.get("evaluations"),
            "failures": summary.get("failures"),
            "wall_seconds": summary.get("wall_seconds"),
        })

    def finish(self) -> None:
        self.run.finish()
