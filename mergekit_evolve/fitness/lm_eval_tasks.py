"""mergekit-evolve's ``tasks:`` (lm-evaluation-harness tasks and groups), scored on the resident model.

What does not depend on the candidate is done once per run, when ``LmEvalFitness`` is built: tasks
are loaded, their documents read, prompts rendered and requests built by lm-eval itself
(``Task.build_all_requests``, seeded as ``lm_eval.simple_evaluate`` seeds it), then tokenized by
lm-eval's own HF wrapper code. Per candidate only the model runs on those token ids, batched on the
resident model (``loglik``, ``generate``), and lm-eval's own filters, ``process_results`` and
aggregation turn the answers into metrics, so scores equal what the lm_eval CLI reports for the
saved model (tested for generate_until, loglikelihood and multiple_choice tasks, with few-shot).
Per-document results let racing score a part of the documents (``part``, as ``Fitness``).

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
import random
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mergekit_evolve.errors import InputError
from mergekit_evolve.fitness.evaluator import PART_SHUFFLE_SEED, Part, Split, TaskResult

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


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
    leaves = group.get_all_tasks()
    out = {}
    for agg in group.aggregate_metric_list or []:
        filters = agg.filter_list or sorted(
            {f.name for t in leaves if agg.metric in t.aggregation() for f in t._filters}
        )
        better = [t.higher_is_better().get(agg.metric, True) for t in leaves if agg.metric in t.aggregation()]
        for name in filters:
            out[f"{agg.metric},{name}"] = all(better)
    return out


def prompt_lm(tokenizer):
    """lm-eval's HF model wrapper (``HFLM``) without a model, for its tokenization and chat-template
    code: what the lm_eval CLI applies to each request, applied here once per run. Its
    ``loglikelihood`` returns each request's (context, continuation) token ids instead of scores."""
    import copy

    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import configure_pad_token

    class PromptLM(HFLM):
        def __init__(self):  # HFLM.__init__ wants a model; its tokenization reads only these
            TemplateLM.__init__(self)
            self.tokenizer = configure_pad_token(copy.deepcopy(tokenizer))
            self.backend, self.add_bos_token, self.custom_prefix_token_id = "causal", None, None
            self.chat_template_args, self.think_end_token, self.enable_thinking = {}, None, None

        def _loglikelihood_tokens(self, requests, **kwargs):
            return [(context, continuation) for _, context, continuation in requests]

    return PromptLM()


@dataclass
class Request:
    """One lm-eval request, tokenized: what the model runs on per candidate."""

    instance: Any
    pair: tuple[list[int], list[int]] | None = None  # loglikelihood: (context, continuation) ids
    prompt: list[int] | None = None  # generate_until: prompt ids (before truncation to the model length)
    until: tuple[str, ...] = ()
    max_gen_toks: int = 0
    text: list[int] | None = None  # loglikelihood_rolling: the whole text's ids


@dataclass
class PreparedTask:
    """A leaf lm-eval task with its documents (after ``limit``) and their requests, in lm-eval's order."""

    task: Any
    docs: list[tuple[int, Any]]
    requests: dict[int, list[Request]]  # doc_id -> requests
    part_docs: dict[Part, list[tuple[int, Any]]] = field(default_factory=dict)

    def docs_of(self, part: Part | None) -> list[tuple[int, Any]]:
        if part is None:
            return self.docs
        if part not in self.part_docs:  # the same seeded shuffle as Fitness, so parts are fair samples
            order = list(range(len(self.docs)))
            random.Random(PART_SHUFFLE_SEED).shuffle(order)
            chosen = sorted(order[round(part[0] * len(order)) : round(part[1] * len(order))])
            self.part_docs[part] = [self.docs[i] for i in chosen]
        return self.part_docs[part]


def template_fields(template: str) -> set[str]:
    """The document fields a ``doc_to_*`` setting reads: a Jinja template's variables, or a bare name (lm-eval
    reads a bare name as a field when the documents have it, and as literal text when they do not)."""
    if "{{" not in template and "{%" not in template:
        return {template} if re.fullmatch(r"[A-Za-z_]\w*", template) else set()
    import jinja2
    import jinja2.meta

    return set(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))


def check_document_fields(task, docs: list[tuple[int, Any]]) -> None:
    """Every field a task's templates read must be in its documents: Jinja renders a missing one as an empty
    string, so a task over data without its ``answer`` would score every candidate 0 without a word."""
    fields = set().union(*(doc.keys() for _, doc in docs if isinstance(doc, dict)))
    if not fields:
        return
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        template = getattr(task.config, key, None)
        missing = sorted(template_fields(template) - fields) if isinstance(template, str) else []
        if missing:
            raise InputError(
                f"tasks.{task.task_name}: its {key} reads {missing[0]!r}, which its documents do not have (their "
                f"fields: {', '.join(sorted(fields))}); fix the task YAML or the data"
            )


def memoize_per_document(task, docs: list[tuple[int, Any]]) -> None:
    """``process_results`` renders a document's target and choices (Jinja templates) again on every
    call; they do not change between candidates, so each is rendered once per run. Only the docs this
    run scores are cached, on this task object only."""
    ours = {id(doc) for _, doc in docs}
    for name in ("doc_to_target", "doc_to_choice", "doc_to_text"):
        original, memo = getattr(task, name), {}

        def cached(doc, *args, _original=original, _memo=memo, **kwargs):
            if args or kwargs or id(doc) not in ours:
                return _original(doc, *args, **kwargs)
            if id(doc) not in _memo:
                _memo[id(doc)] = _original(doc)
            return _memo[id(doc)]

        setattr(task, name, cached)


@contextlib.contextmanager
def seeded_like_simple_evaluate() -> Iterator[None]:
    """The global seeds ``lm_eval.simple_evaluate`` sets before it loads tasks and builds requests
    (some tasks draw from them); the caller's random states are restored after."""
    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class LmEvalFitness:
    """Weighted lm-eval metrics, the ``Fitness`` interface. Held-out scores come from ``heldout_tasks``."""

    def __init__(self, config, tokenizer, batch_size: int = 32, progress: bool = False):
        require_lm_eval()
        self.config = config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.tokens_spent = 0
        self.last_results: dict[str, Any] = {}
        self._max_length: int | None = None  # the model's context length, read from the first candidate
        entries = {"fitness": list(config.tasks or []), "heldout": list(config.heldout_tasks or [])}
        names = [t.name for ts in entries.values() for t in ts]
        with quiet_lm_eval(), seeded_like_simple_evaluate():
            manager = task_manager(config.task_search_path, names)
            self._check_known(manager, names)
            with shuffled_downloads(config.shuffle):
                self._loaded = {split: [self._load(manager, t) for t in ts] for split, ts in entries.items()}
            for loaded in self._loaded.values():
                for entry in loaded:
                    self._check_metric(entry)
            self._prepared = self._prepare_requests() if tokenizer is not None else {}
        if progress:
            for split, loaded in self._loaded.items():
                for entry in loaded:
                    print(f"[mergekit-evo] {self._describe(entry, split)}", file=sys.stderr, flush=True)

    # -- loading and checks (before the first candidate) -------------------------------------------
    def _check_known(self, manager, names: list[str]) -> None:
        for name in names:
            if name not in manager.all_tasks:
                hint = " (add its folder to task_search_path)" if not self.config.task_search_path else ""
                raise InputError(
                    f"tasks: unknown lm-eval task {name!r}{hint}; check the name with lm_eval --tasks list"
                )

    def _load(self, manager, entry) -> LoadedTask:
        try:
            out = manager.load([entry.name])
        except Exception as err:  # lm-eval raises whatever its loaders raise: report it in one line
            raise InputError(
                f"tasks.{entry.name}: lm-eval could not load it ({_first_line(err)}); check the task's YAML and data "
                "files"
            ) from None
        loaded = LoadedTask(config=entry, tasks=out["tasks"], groups=out.get("groups", {}))
        for task in loaded.tasks.values():
            configure_task(task, self.config.num_fewshot)
        if entry.name not in loaded.tasks and not loaded.is_group:
            raise InputError(
                f"tasks.{entry.name}: is a tag of {len(loaded.tasks)} tasks, which lm-eval reports no score for; "
                "list its tasks (or a group) instead"
            )
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
        return (
            f"lm-eval {what} {loaded.config.name} ({split}): {docs} documents{limit}, "
            f"{'/'.join(kinds)}, metric {loaded.config.metric}"
        )

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

    # -- requests, built and tokenized once per run --------------------------------------------------
    def _prepare_requests(self) -> dict[str, PreparedTask]:
        from lm_eval.evaluator_utils import get_sample_size

        lm = prompt_lm(self.tokenizer)
        self._prefix_token = lm.prefix_token_id  # what a rolling window's first token is predicted from
        apply, multiturn = self.chat_template_flags()
        prepared = {}
        for loaded in self._loaded.values():
            for entry in loaded:
                for name, task in entry.tasks.items():
                    if name in prepared:
                        continue
                    limit = get_sample_size(task, self.config.limit)
                    try:
                        task.build_all_requests(
                            limit=limit,
                            rank=0,
                            world_size=1,
                            apply_chat_template=apply,
                            fewshot_as_multiturn=multiturn,
                            chat_template=lm.apply_chat_template if apply else None,
                            tokenizer_name=lm.tokenizer_name if apply else "",
                        )
                    except Exception as err:  # e.g. a prompt template that fails on some document
                        raise InputError(
                            f"tasks.{name}: lm-eval could not build its prompts ({_first_line(err)}); check the "
                            "task's doc_to_* templates"
                        ) from None
                    prepared[name] = self._tokenized(task, limit, lm)
        return prepared

    def _tokenized(self, task, limit: int | None, lm) -> PreparedTask:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        instances = sorted(task.instances, key=lambda inst: (inst.doc_id, inst.idx))
        requests = [Request(instance=inst) for inst in instances]
        loglik = [r for r in requests if r.instance.request_type == "loglikelihood"]
        for request, pair in zip(loglik, lm.loglikelihood([r.instance for r in loglik], disable_tqdm=True)):
            request.pair = pair
        eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
        for request in requests:
            kind, args = request.instance.request_type, request.instance.args
            if kind == "generate_until":
                kwargs = normalize_gen_kwargs(args[1], lm.max_gen_toks)
                if kwargs.get("do_sample"):
                    raise InputError(
                        f"tasks.{task.task_name}: its generation_kwargs sample (do_sample); a fitness must be "
                        "deterministic, so set do_sample: false in the task"
                    )
                request.prompt = lm.tok_batch_encode([args[0]])[0][0].tolist()
                request.until = tuple(handle_stop_sequences(kwargs.pop("until", None), eos=eos))
                request.max_gen_toks = int(kwargs["max_gen_toks"])
            elif kind == "loglikelihood_rolling":
                request.text = lm.tok_encode(args[0])
            elif kind != "loglikelihood":
                raise InputError(
                    f"tasks.{task.task_name}: lm-eval request type {kind!r} is not supported; use a text task"
                )
        by_doc: dict[int, list[Request]] = {}
        for request in requests:
            by_doc.setdefault(request.instance.doc_id, []).append(request)
        docs = list(task.doc_iterator(rank=0, limit=limit, world_size=1))
        check_document_fields(task, docs)
        memoize_per_document(task, docs)
        return PreparedTask(task=task, docs=docs, requests=by_doc)

    # -- scoring ------------------------------------------------------------------------------------
    def num_rows(self, split: Split = "fitness") -> dict[str, int]:
        return {e.config.name: sum(len(self._prepared[t].docs) for t in e.tasks) for e in self._loaded[split]}

    def weights(self) -> dict[str, float]:
        return {e.config.name: e.config.weight for e in self._loaded["fitness"]}

    def raceable(self) -> list[str]:
        """Entries racing cannot score in parts: groups, and metrics not aggregated by a plain mean."""
        from lm_eval.api.metrics import mean

        bad = []
        for entry in self._loaded["fitness"]:
            metric = entry.config.metric.split(",")[0]
            if entry.is_group or entry.tasks[entry.config.name].aggregation().get(metric) is not mean:
                bad.append(entry.config.name)
        return bad

    def score(self, model, split: Split = "fitness") -> dict[str, float]:
        return {name: result.score for name, result in self.evaluate(model, split).items()}

    def evaluate(self, model, split: Split = "fitness", part: Part | None = None) -> dict[str, Any]:
        """Task name -> ``TaskResult``; ``part``: only that part of each task's documents (racing)."""
        from mergekit_evolve.fitness.runtime import evaluation_mode, runner_for

        results = {}
        with evaluation_mode(model), quiet_lm_eval():
            runner = runner_for(model)
            if self._max_length is None:
                self._max_length = self.max_length(model)
            for entry in self._loaded[split]:
                start = time.perf_counter()
                docs = {name: self._prepared[name].docs_of(part) for name in entry.tasks}
                tokens = self._answer(
                    runner, [r for name, ds in docs.items() for d, _ in ds for r in self._prepared[name].requests[d]]
                )
                metrics = {name: self._metrics(self._prepared[name], ds) for name, ds in docs.items() if ds}
                if entry.is_group:
                    metrics[entry.config.name] = entry.groups[entry.config.name].aggregate(metrics)
                rows = sum(len(ds) for ds in docs.values())
                if not rows:
                    continue
                results[entry.config.name] = TaskResult(
                    name=entry.config.name,
                    kind="lm-eval",
                    split=split,
                    score=float(metrics[entry.config.name][entry.config.metric]),
                    metric=entry.config.metric,
                    rows=rows,
                    tokens=tokens,
                    seconds=time.perf_counter() - start,
                )
        self.tokens_spent += sum(r.tokens for r in results.values())
        self.last_results = results
        return results

    def longest_request(self) -> None:
        """None: requests are cut to the model's (or engine's) context as lm-eval cuts them (``_fit``)."""
        return None

    def max_length(self, model) -> int:
        """The context lm-eval truncates requests to: the model's (lm-eval's rule), or a vLLM engine's."""
        from lm_eval.models.utils import resolve_max_length

        engine_limit = getattr(model, "max_model_len", None)
        own = resolve_max_length(getattr(model, "config", None), self.tokenizer)
        return min(own, engine_limit) if engine_limit else own

    def _answer(self, runner, requests: list[Request]) -> int:
        """Run the model on the requests; each instance gets its answer in ``resps``. Returns tokens."""
        from lm_eval.models.utils import postprocess_generated_text

        from mergekit_evolve.fitness.generate import greedy_token_ids
        from mergekit_evolve.fitness.loglik import continuation_loglikelihoods
        from mergekit_evolve.fitness.outcome import pad_token_id

        pad = pad_token_id(self.tokenizer)
        answers: dict[int, Any] = {}
        pairs, owners = [], []  # every (context, continuation) to score, and (request, window or None)
        for request in requests:
            if request.pair is not None:
                pairs.append(self._fit(request.pair))
                owners.append(id(request))
            elif request.text is not None:
                for window in self._windows(request):
                    pairs.append(window)
                    owners.append(id(request))
        scored, tokens = continuation_loglikelihoods(runner, pairs, pad, self.batch_size) if pairs else ([], 0)
        rolling = {id(r) for r in requests if r.text is not None}
        for owner, (logprob, greedy) in zip(owners, scored):
            if owner in rolling:
                answers[owner] = answers.get(owner, 0.0) + logprob
            else:
                answers[owner] = (logprob, greedy)
        groups: dict[tuple, list[Request]] = {}
        for request in requests:
            if request.prompt is not None:
                groups.setdefault((request.until, request.max_gen_toks), []).append(request)
        for (until, max_gen_toks), group in groups.items():
            keep = self._max_length - max_gen_toks
            if keep <= 0:
                raise InputError(
                    f"tasks: max_gen_toks {max_gen_toks} does not fit the model's context length {self._max_length}; "
                    "lower it in the task"
                )
            prompts = [r.prompt[-keep:] for r in group]
            generated = greedy_token_ids(runner, prompts, self.tokenizer, max_gen_toks, list(until), self.batch_size)
            tokens += sum(len(p) + len(g) for p, g in zip(prompts, generated))
            for request, ids in zip(group, generated):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                answers[id(request)] = postprocess_generated_text(text, list(until), None)
        for request in requests:
            request.instance.resps = [answers[id(request)]] * (request.instance.repeats or 1)
            request.instance.filtered_resps = {}
        return tokens

    def _fit(self, pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
        """lm-eval's left truncation: keep the last max_length + 1 tokens of context + continuation."""
        context, continuation = pair
        overflow = len(context) + len(continuation) - (self._max_length + 1)
        return (context[overflow:], continuation) if overflow > 0 else pair

    def _windows(self, request: Request) -> list[tuple[list[int], list[int]]]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = get_rolling_token_windows(
            token_list=request.text, prefix_token=self._prefix_token, max_seq_len=self._max_length, context_len=1
        )
        return [make_disjoint_window(w) for w in windows]

    @staticmethod
    def _metrics(prepared: PreparedTask, docs: list[tuple[int, Any]]) -> dict[str, Any]:
        """lm-eval's filters, per-document ``process_results`` and aggregation on these documents."""
        from lm_eval.api.metrics import mean

        task = prepared.task
        instances = [r.instance for doc_id, _ in docs for r in prepared.requests[doc_id]]
        filters = getattr(task, "_filters", [])
        for ensemble in filters:
            ensemble.apply(instances)
        raw: dict[str, list] = {}
        for name in [f.name for f in filters]:
            for doc_id, doc in docs:
                answers = [r.instance.filtered_resps[name] for r in prepared.requests[doc_id]]
                for metric, value in task.process_results(doc, answers).items():
                    raw.setdefault(f"{metric},{name}", []).append(value)
        aggregation = task.aggregation()
        out: dict[str, Any] = {key: aggregation.get(key.rsplit(",", 1)[0], mean)(values) for key, values in raw.items()}
        out["sample_len"] = max((len(v) for v in raw.values()), default=0)
        return out

    def total(self, scores: dict[str, float]) -> float:
        weights = {t.name: t.weight for t in [*(self.config.tasks or []), *(self.config.heldout_tasks or [])]}
        present = [name for name in scores if name in weights]
        if not present:
            return float("nan")
        return sum(weights[n] * scores[n] for n in present) / sum(weights[n] for n in present)
