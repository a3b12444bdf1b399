"""mergekit-evolve's ``tasks:`` (lm-evaluation-harness tasks and groups), scored on the resident model.

Everything that can be wrong with a task is found when ``LmEvalFitness`` is built, before the first
candidate: each name is resolved (``task_search_path`` first), its documents are loaded, and each
configured metric is checked against what the task reports (its metric list and filters; nothing is
scored). lm-eval is an optional extra, imported only here.

lm-eval's task index is built once per process and search path; when every task is found in the
search path, only those folders are indexed (milliseconds) instead of lm-eval's ~14,700 built-in
tasks (~20 s). lm-eval's logging, progress bars and those of ``datasets`` are silenced
(``quiet_lm_eval``); with ``progress`` we print one line per task instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mergekit_evolve.errors import InputError

SHUFFLE_SEED = 0  # mergekit-evolve's `shuffle` is unseeded; ours is reproducible


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


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's log records below ERROR, its progress bars (tqdm on stderr), ``datasets``' bars and
    Python warnings are dropped for the duration; everything is restored after."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    ds_verbosity = datasets.logging.get_verbosity()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        datasets.logging.set_verbosity(ds_verbosity)
        if bars:
            datasets.enable_progress_bars()


_TASK_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


def task_manager(search_path: list[str] | None, names: list[str]):
    """lm-eval's task index, one per process and search path: only the search path's folders when
    they hold every name, else those plus lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    paths = tuple(search_path or ())
    if paths:
        local = _TASK_MANAGERS.get((paths, False))
        if local is None:
            local = _TASK_MANAGERS[(paths, False)] = TaskManager(include_path=list(paths), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    full = _TASK_MANAGERS.get((paths, True))
    if full is None:
        full = _TASK_MANAGERS[(paths, True)] = TaskManager(include_path=list(paths) or None)
    return full


@contextlib.contextmanager
def shuffled_downloads(enabled: bool) -> Iterator[None]:
    """mergekit-evolve's ``shuffle``: each task's dataset is shuffled right after it is loaded (so
    ``limit`` takes a random subset and few-shot examples come from the shuffled splits), with a
    fixed seed here. lm-eval has no hook for this, so ``download`` is wrapped while tasks load."""
    if not enabled:
        yield
        return
    from lm_eval.api.task import ConfigurableTask

    original = ConfigurableTask.download

    def download(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.dataset = self.dataset.shuffle(seed=SHUFFLE_SEED)

    ConfigurableTask.download = download
    try:
        yield
    finally:
        ConfigurableTask.download = original


def configure_task(task, num_fewshot: int | None) -> None:
    """What ``lm_eval.simple_evaluate`` does to each task before building its requests: ``num_fewshot``
    overrides the task's own unless the task pins 0; unset means 0; few-shot sampling is seeded."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    own = task.get_config("num_fewshot")
    if num_fewshot is not None and own != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif num_fewshot is None and own is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)


@dataclass
class LoadedTask:
    """One configured ``tasks:`` entry: an lm-eval task, or a group of them (scored by its aggregate)."""

    config: Any  # the LmEvalTask entry: name, weight, metric
    tasks: dict[str, Any]  # leaf task name -> lm-eval Task
    groups: dict[str, Any]  # group name -> lm-eval Group (empty for a plain task)

    @property
    def is_group(self) -> bool:
        return self.config.name in self.groups


def reported_metrics(loaded: LoadedTask) -> dict[str, bool]:
    """The "METRIC,FILTER" keys lm-eval reports for this entry -> higher is better (from the task's
    metric list and filters, or the group's aggregate metric list)."""
    if not loaded.is_group:
        task = loaded.tasks[loaded.config.name]
        filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        better = task.higher_is_better()
        return {f"{metric},{name}": bool(better.get(metric, True)) for name in filters for metric in task.aggregation()}
    group = loaded.groups[loaded.config.name]
    leaves = [t for t in group.get_all_tasks()]
    out = {}
    for agg in group.aggregate_metric_list or []:
        filters = agg.filter_list or sorted({f.name for t in leaves if agg.metric in t.aggregation() for f in t._filters})
        better = [t.higher_is_better().get(agg.metric, True) for t in leaves if agg.metric in t.aggregation()]
        for name in filters:
            out[f"{agg.metric},{name}"] = all(better)
    return out


class LmEvalFitness:
    """Weighted lm-eval metrics. Held-out scores come from ``heldout_tasks`` (if configured)."""

    def __init__(self, config, tokenizer, batch_size: int | str = 16, progress: bool = False):
        require_lm_eval()
        self.config = config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.tokens_spent = 0
        entries = {"fitness": list(config.tasks or []), "heldout": list(config.heldout_tasks or [])}
        names = [t.name for ts in entries.values() for t in ts]
        with quiet_lm_eval():
            manager = task_manager(config.task_search_path, names)
            self._check_known(manager, names)
            with shuffled_downloads(config.shuffle):
                self._loaded = {split: [self._load(manager, t) for t in ts] for split, ts in entries.items()}
        for split, loaded in self._loaded.items():
            for entry in loaded:
                self._check_metric(entry)
                if progress:
                    print(self._describe(entry, split), file=sys.stderr)

    # -- loading and checks (before the first candidate) -------------------------------------------
    def _check_known(self, manager, names: list[str]) -> None:
        for name in names:
            if name not in manager.all_tasks:
                hint = " (add its folder to task_search_path)" if not self.config.task_search_path else ""
                raise InputError(f"tasks: unknown lm-eval task {name!r}{hint}; check the name with lm_eval --tasks list")

    def _load(self, manager, entry) -> LoadedTask:
        try:
            out = manager.load([entry.name])
        except Exception as err:  # lm-eval raises whatever its loaders raise: report it in one line
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"tasks.{entry.name}: lm-eval could not load it ({problem}); check the task's YAML and data files") from None
        loaded = LoadedTask(config=entry, tasks=out["tasks"], groups=out.get("groups", {}))
        for task in loaded.tasks.values():
            configure_task(task, self.config.num_fewshot)
        if entry.name not in loaded.tasks and not loaded.is_group:
            raise InputError(f"tasks.{entry.name}: is a tag of {len(loaded.tasks)} tasks, which lm-eval reports no score for; list its tasks (or a group) instead")
        return loaded

    def _check_metric(self, loaded: LoadedTask) -> None:
        entry = loaded.config
        metrics = reported_metrics(loaded)
        if entry.metric not in metrics:
            kind = "group" if loaded.is_group else loaded.tasks[entry.name].OUTPUT_TYPE
            raise InputError(
                f"tasks.{entry.name}.metric: {entry.metric!r} is not reported by this lm-eval {kind} task; "
                f"use one of {sorted(metrics)}"
            )
        if not metrics[entry.metric]:
            raise InputError(
                f"tasks.{entry.name}.metric: {entry.metric!r} is lower-is-better and fitness is maximised; "
                f"use a higher-is-better metric of {sorted(m for m, up in metrics.items() if up)}"
            )

    def _describe(self, loaded: LoadedTask, split: str) -> str:
        docs = sum(len(t.eval_docs) for t in loaded.tasks.values())
        kinds = sorted({t.OUTPUT_TYPE for t in loaded.tasks.values()})
        limit = f", first {self.config.limit} each" if self.config.limit else ""
        what = f"group of {len(loaded.tasks)} tasks" if loaded.is_group else "task"
        return (f"lm-eval {what} {loaded.config.name} ({split}): {docs} documents{limit}, "
                f"{'/'.join(kinds)}, metric {loaded.config.metric}")

    # -- scoring ------------------------------------------------------------------------------------
    def chat_template_flags(self) -> tuple[bool, bool]:
        """(apply_chat_template, fewshot_as_multiturn) as mergekit-evolve would pass them to lm-eval."""
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        apply = self.config.apply_chat_template
        if apply is None:
            apply = has_template
        elif apply and not has_template:
            raise InputError("apply_chat_template: the tokenizer has no chat template; set apply_chat_template: false")
        multiturn = self.config.fewshot_as_multiturn
        return apply, apply if multiturn is None else multiturn

    def _evaluate(self, model, loaded: list[LoadedTask]) -> dict[str, float]:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        apply, multiturn = self.chat_template_flags()
        tasks = {name: task for entry in loaded for name, task in entry.tasks.items()}
        groups = {name: group for entry in loaded for name, group in entry.groups.items()}
        with quiet_lm_eval():
            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, device=str(model.device))
            out = evaluate(lm=lm, task_dict={"tasks": tasks, "groups": groups}, limit=self.config.limit,
                           bootstrap_iters=0, log_samples=False, apply_chat_template=apply, fewshot_as_multiturn=multiturn)
        return {entry.config.name: float(out["results"][entry.config.name][entry.config.metric]) for entry in loaded}

    def score(self, model, split: str = "fitness") -> dict[str, float]:
        loaded = self._loaded["fitness" if split == "fitness" else "heldout"]
        return self._evaluate(model, loaded) if loaded else {}

    def total(self, scores: dict[str, float]) -> float:
        weights = {t.name: t.weight for t in [*(self.config.tasks or []), *(self.config.heldout_tasks or [])]}
        present = [name for name in scores if name in weights]
        if not present:
            return float("nan")
        return sum(weights[n] * scores[n] for n in present) / sum(weights[n] for n in present)
