"""mergekit-evolve's ``tasks:`` (lm-evaluation-harness tasks), scored on the resident model.

The candidate model that the merge engine keeps in memory is wrapped in lm-eval's ``HFLM`` as is:
no checkpoint is written per candidate. lm-eval is an optional extra, imported only here.
Task search paths (``task_search_path``) let users point at local task YAMLs over local data.
"""

from __future__ import annotations

from typing import Any

from mergekit_evolve.errors import InputError


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError:
        raise InputError(
            "tasks: lm-eval tasks need the lm-eval extra; run pip install 'mergekit-evolve[lm-eval]' "
            "or define a built-in 'fitness:' section"
        ) from None
    return lm_eval


class LmEvalFitness:
    """Weighted lm-eval metrics. Held-out scores come from ``heldout_tasks`` (if configured)."""

    def __init__(self, config, tokenizer, batch_size: int | str = 16):
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        self.config = config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.task_manager = TaskManager(verbosity="ERROR", include_path=config.task_search_path or None)
        known = set(self.task_manager.all_tasks)
        for task in [*(config.tasks or []), *(config.heldout_tasks or [])]:
            if task.name not in known:
                hint = " (add its folder to task_search_path)" if not config.task_search_path else ""
                raise InputError(f"tasks: unknown lm-eval task {task.name!r}{hint}; check the name with lm_eval --tasks list")
        self.tokens_spent = 0

    def _evaluate(self, model, tasks) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, device=str(model.device))
        out = simple_evaluate(
            model=lm,
            tasks=[t.name for t in tasks],
            num_fewshot=self.config.num_fewshot,
            limit=self.config.limit,
            task_manager=self.task_manager,
            apply_chat_template=self.config.apply_chat_template,
            fewshot_as_multiturn=False,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
        scores = {}
        for task in tasks:
            metrics: dict[str, Any] = out["results"].get(task.name, {})
            if task.metric not in metrics:
                available = sorted(k for k in metrics if k != "alias")
                raise InputError(f"tasks.{task.name}.metric: lm-eval reported no {task.metric!r}; available: {available}")
            scores[task.name] = float(metrics[task.metric])
        return scores

    def score(self, model, split: str = "fitness") -> dict[str, float]:
        tasks = self.config.tasks if split == "fitness" else (self.config.heldout_tasks or [])
        return self._evaluate(model, tasks) if tasks else {}

    def total(self, scores: dict[str, float]) -> float:
        weights = {t.name: t.weight for t in [*(self.config.tasks or []), *(self.config.heldout_tasks or [])]}
        present = [name for name in scores if name in weights]
        if not present:
            return float("nan")
        return sum(weights[n] * scores[n] for n in present) / sum(weights[n] for n in present)
