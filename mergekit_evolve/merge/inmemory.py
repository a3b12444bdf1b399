"""In-memory merging: one resident model, thousands of candidates.

``InMemoryMerger`` is the fast path for evaluating parameter-space candidates. It plans every
candidate with mergekit's ``MergePlanner`` and executes it with mergekit's ``Executor`` and merge
methods, so the tensors are exactly those ``mergekit-yaml`` would write; what it avoids is
everything around the merge:

* source tensors are read from disk once (at construction) and stay resident on ``device``;
  every candidate's task graph gets them as pre-computed values of its input tasks, so no
  candidate touches the disk or mergekit's process-wide ``LoaderCache``;
* a recipe structure is planned by mergekit once; later candidates of it only re-resolve
  their parameter values into that plan (``mergekit_evolve/merge/replan.py``);
* one transformers model is built once; each candidate's output tensors are copied into it by
  name, or adopted as its parameters' data when they are fresh tensors (no model objects, no
  files per candidate);
* random methods (DARE, DELLA) are re-seeded per candidate, the way ``mergekit-yaml
  --random-seed S`` seeds a whole merge, so every candidate is reproducible on its own;
* sparsifying methods (TIES, DARE, breadcrumbs, DELLA, SCE) run mergekit's own merge code with
  their masks from ``SparsifyingFastPath`` (``mergekit_evolve/merge/fastpath.py``): what does not
  change between candidates (magnitude order of each task vector, the seeded random draws) is
  computed once, so a candidate sorts and draws nothing.

About mergekit's ``LoaderCache``: it is process-wide, keyed by model reference, and its loaders
keep the last opened shard mapped, so a model rewritten in place in the same process could be
served stale. This module loads the source tensors itself, once, through mergekit's own
``LoadTensor`` tasks, and drops the cache entries of its source models right before and right
after that load (``fresh_loader_cache``): the load always reads the files as they are, and no
mapped shard is left behind for a later merge in the process to trip over. Candidates only ask the
cache for tensor *names* (mergekit's scheduler uses them to order tasks), never for data.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from mergekit import merge_methods
from mergekit.architecture import get_architecture_info
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor, Task, TaskHandle, TaskUniverse
from mergekit.io.tasks import LoaderCache, LoadTensor, ReturnTensor
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from pydantic import BaseModel

from mergekit_evolve.errors import CandidateError, InputError
from mergekit_evolve.merge.fastpath import FastMergeTask, SparsifyingFastPath
from mergekit_evolve.merge.quiet import mergekit_torch_dtype_quiet
from mergekit_evolve.merge.replan import PlanSkeleton, recipe_structure

__all__ = ["InMemoryMerger", "MergeTimings"]


class MergeTimings(BaseModel):
    """Where the time of one ``InMemoryMerger.merge`` call went, in seconds."""

    plan_s: float = 0.0  # mergekit's planner (a new recipe structure) or re-resolved parameters
    schedule_s: float = 0.0  # task graph + execution order (mergekit Executor set-up)
    execute_s: float = 0.0  # mergekit merge-method code
    copy_s: float = 0.0  # finiteness check + copy into the resident model

    @property
    def total_s(self) -> float:
        return self.plan_s + self.schedule_s + self.execute_s + self.copy_s


class PlannerRoute:
    """The one place that touches mergekit's private planning API (mergekit 0.1.5).

    ``MergePlanner.plan_in_memory()`` is broken in 0.1.5: it builds ``ReturnTensor`` tasks whose
    ``tensor_task`` field is annotated ``Task[torch.Tensor]``, and pydantic's validation of that
    field tries to instantiate the abstract ``Task`` ("Can't instantiate abstract class
    Task[Tensor]"). This route does what ``plan_in_memory`` means to do, and relies on exactly:

    * ``MergePlanner._plan()`` filling ``MergePlanner._tensors`` with ``(WeightInfo, Task)`` pairs,
      one per output tensor, each task an ``ExecuteMergeMethodTask``;
    * ``MergePlanner._tokenizer_task``: the ``BuildTokenizer`` task or ``None``;
    * ``ReturnTensor.model_construct(weight_info=, tensor_task=, dtype=)`` skipping that broken
      validation (the fields are used as ``plan_in_memory`` would set them);
    * ``mergekit.merge._model_out_config`` (the output model's transformers config, as
      ``run_merge`` builds it) and ``mergekit.merge._update_config_vocab`` (vocabulary size
      after a tokenizer merge).

    It also builds the per-candidate ``Executor`` (public API: a ``TaskUniverse`` with the
    resident inputs as ``cached_values``) and relies on one more detail there: ``Executor._run``
    uses ``Executor.targets`` only for ``task_handle in self.targets``; with 100+ targets that
    list scan is quadratic (~0.1 s per candidate for a 12-layer model), so the route swaps the
    list for a set after construction.

    Planning is most of a linear candidate's Python time, so a config whose recipe structure
    was planned before (same everything but parameter values) is not planned again: its
    parameters are re-resolved into the earlier plan's tasks (``replan.PlanSkeleton``, kept for
    the last ``MAX_STRUCTURES`` structures). For that it relies on ``MergePlanner.plan_tensor``
    taking ``(weight, weights_in, models, cfg_reader)`` and on ``ConfigReader.parameter_sources``
    (public in mergekit 0.1.5); ``tests/test_merge_engine.py`` checks re-planned tasks equal
    freshly planned ones for every method and recipe form.

    ``PRIVATE_NAMES`` lists them; ``tests/test_merge_engine.py`` checks that they exist and that
    this route still produces what ``merge_state_dicts`` and ``mergekit-yaml`` produce.
    """

    MAX_STRUCTURES = 8  # skeletons kept (a search has one or a few recipe structures)

    PRIVATE_NAMES = (
        ("mergekit.plan.MergePlanner", "_plan"),
        ("mergekit.plan.MergePlanner", "_tensors"),
        ("mergekit.plan.MergePlanner", "_tokenizer_task"),
        ("mergekit.plan.MergePlanner", "_model_arch"),
        ("mergekit.plan.MergePlanner", "plan_tensor"),
        ("mergekit.merge", "_model_out_config"),
        ("mergekit.merge", "_update_config_vocab"),
        ("mergekit.merge_methods.base.MergeMethod", "_execute_resolved"),  # fastpath's kernels, as the adapter
    )

    def __init__(self, template: MergeConfiguration, options: MergeOptions):
        import mergekit.merge

        self.options = options
        self.arch_info = get_architecture_info(template, options)
        self._model_archs: dict[ModelReference, Any] = {}  # see _Planner
        self._skeletons: dict[str, PlanSkeleton | None] = {}  # recipe structure -> its plan
        with mergekit_torch_dtype_quiet():
            self._out_config = mergekit.merge._model_out_config(
                template, self.arch_info, trust_remote_code=options.trust_remote_code
            )

    def plan(self, config: MergeConfiguration) -> tuple[list[ReturnTensor], Task | None]:
        """Return one ``ReturnTensor`` per output tensor, and the tokenizer task (or None).

        The first config of a recipe structure is planned by mergekit's planner; later ones
        of that structure re-resolve only their parameters (``replan.PlanSkeleton``)."""
        structure = recipe_structure(config)
        first = structure not in self._skeletons
        if first:
            spec = merge_methods.get(config.merge_method).spec
            skeleton = PlanSkeleton.build(config, self._plan_in_full, spec)
            while len(self._skeletons) >= self.MAX_STRUCTURES:
                del self._skeletons[next(iter(self._skeletons))]
        else:
            skeleton = self._skeletons.pop(structure)
        self._skeletons[structure] = skeleton  # most recently used last
        if skeleton is None:  # a structure replan.py cannot trace
            return self._plan_in_full(config)[:2]
        return (skeleton.targets if first else skeleton.replan(config)), skeleton.tokenizer_task

    def _plan_in_full(self, config: MergeConfiguration) -> tuple[list[ReturnTensor], Task | None, list]:
        """mergekit's planner on a copy of ``config`` (it rewrites models -> modules.slices);
        also each target's ``(name, inputs, ConfigReader)``, for ``PlanSkeleton``."""
        planner = _Planner(copy.deepcopy(config), self.arch_info, self.options, self._out_config)
        planner.model_archs = self._model_archs
        planner._plan()
        targets = [
            ReturnTensor.model_construct(
                weight_info=weight,
                tensor_task=task,
                dtype=weight.force_dtype or config.out_dtype,
            )
            for weight, task in planner._tensors
        ]
        return targets, planner._tokenizer_task, planner.tensor_sources

    @staticmethod
    def executor(targets: list[ReturnTensor], inputs: dict, device: torch.device) -> Executor:
        """An Executor for ``targets`` whose input tasks found in ``inputs`` are pre-computed."""
        universe = TaskUniverse(targets)
        handles = [universe.add_task(task) for task in targets]
        cached = {
            TaskHandle(universe, index): inputs[task]
            for index, task in enumerate(universe.tasks)
            if not isinstance(task, ReturnTensor) and task in inputs
        }
        executor = Executor(handles, math_device=device, storage_device=device, cached_values=cached)
        executor.targets = set(handles)  # only used for membership tests in Executor._run
        return executor

    def output_config(self, tokenizer_info: Any, config: MergeConfiguration):
        """The transformers config of the merged model (a copy; vocab updated like run_merge)."""
        import mergekit.merge

        out = copy.deepcopy(self._out_config)
        if tokenizer_info is not None:
            pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
            mergekit.merge._update_config_vocab(out, self.arch_info, tokenizer_info.tokenizer, pad_to_multiple_of=pad)
        return out


class _Planner(MergePlanner):
    """mergekit's planner, with each source's architecture (its transformers config, read from
    disk) kept across candidates: a new planner per candidate would read every config again,
    about a third of planning. The configs are only read, never changed, by planning."""

    model_archs: dict

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tensor_sources: list[tuple] = []  # per planned tensor: (name, inputs, reader)

    def _model_arch(self, model: ModelReference):
        if model not in self.model_archs:
            self.model_archs[model] = super()._model_arch(model)
        return self.model_archs[model]

    def plan_tensor(self, weight, weights_in, models, cfg_reader):
        planned = len(self._tensors)
        super().plan_tensor(weight, weights_in, models, cfg_reader)
        if len(self._tensors) > planned:  # (an optional weight no input has is skipped)
            inputs = {model: weight_in.name for model, weight_in in zip(models, weights_in)}
            self.tensor_sources.append((weight.name, inputs, cfg_reader))


class InMemoryMerger:
    """Merge candidates of one recipe family into one resident transformers model.

    ``template`` fixes the source models (and so the resident model's architecture: that of
    ``base_model`` if set, else of the first model, as mergekit picks it). ``merge(config)``
    accepts any config whose inputs are among the template's (same models, any parameter
    values, even another merge method) and returns ``self.model`` holding its tensors.

    ``dtype`` is the resident model's dtype; by default the dtype mergekit writes for the
    template (asked of mergekit: see ``_model_dtype``). Tensors equal
    ``mergekit-yaml``'s bitwise when this dtype is the one mergekit writes.
    ``random_seed``: each candidate runs with torch's RNG seeded to it, as ``mergekit-yaml
    --random-seed`` does for a whole merge; the caller's RNG state is restored afterwards.
    With ``None`` random methods draw from (and advance) the global torch RNG.

    Why that reproduces mergekit-yaml bitwise: ``--random-seed S`` calls transformers'
    ``set_seed(S)`` (python, numpy, torch) before the merge, and nothing draws random numbers
    until the merge tasks run; mergekit's methods draw only from torch's global generator
    (``torch.bernoulli`` in DARE/DELLA). Its ``Executor`` orders tasks by group label (the
    source tensor name) and priority, so merge tasks run in tensor-name order. A candidate's
    graph here has the same labels, so its merge tasks run in the same order and draw the same
    numbers. (Two outputs with the same label, e.g. a slice recipe reading one layer twice,
    are ordered by graph insertion, which this path does not promise to match for random
    methods.) Only torch is seeded here, so a search loop's numpy/python RNGs are untouched.

    ``fast_path`` (default on): sparsifying methods use precomputed per-source state
    (``mergekit_evolve.merge.fastpath``; its docstring gives the bytes per method, at most about
    2x the non-base sources, held for one method at a time and built by the first candidate
    that needs it). ``fast_path=False`` runs mergekit's kernels for every candidate and holds no
    extra memory; the tensors are the same either way. ``fast_path_max_bytes`` caps that state
    (default: 80% of the device's free memory when it is built); a method whose state would
    not fit keeps mergekit's kernels.

    ``resident=False`` builds no model (only its shape, on the meta device, to check that a recipe covers
    every tensor): ``merged_tensors(config)`` then hands out each output tensor as it is merged, for an
    engine that loads weights itself (the vLLM backend), so the merged weights are never held twice.

    Not thread-safe; one merger per process or per worker.
    """

    def __init__(
        self,
        template: MergeConfiguration,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        random_seed: int | None = None,
        fast_path: bool = True,
        fast_path_max_bytes: int | None = None,
        resident: bool = True,
    ):
        self.template = template.model_copy(deep=True)
        self.resident = resident
        self.device = torch.device(device)
        self.random_seed = random_seed
        self.source_paths = _local_source_paths(self.template)
        on_accelerator = self.device.type != "cpu"
        self._options = MergeOptions(
            device=str(self.device),
            read_to_gpu=on_accelerator,  # sources resident on the accelerator
            low_cpu_memory=on_accelerator,  # results stay there too
            quiet=True,
        )
        self._route = PlannerRoute(self.template, self._options)
        targets, tokenizer_task = self._route.plan(self.template)
        self._inputs = self._load_inputs(targets, tokenizer_task)
        self._source_storages = _storage_pointers(self._inputs.values())
        tokenizer_info = self._inputs.get(tokenizer_task) if tokenizer_task else None
        self.tokenizer = _load_tokenizer(self.template, tokenizer_info, self.source_paths)
        out_config = self._route.output_config(tokenizer_info, self.template)
        model_dtype = self._model_dtype(dtype, out_config, targets)
        self.model = _build_resident_model(out_config, model_dtype, self.device if resident else torch.device("meta"))
        self._targets = self._resident_tensors(targets)
        self.fast_path = (
            SparsifyingFastPath(self._inputs, self.device, random_seed, max_state_bytes=fast_path_max_bytes)
            if fast_path
            else None
        )
        self._schedule_orders: dict[tuple, list[str] | None] = {}  # see _direct_order
        self.last_timings = MergeTimings()

    # ----------------------------------------------------------------- construction

    def _model_dtype(self, dtype: str | None, out_config, targets: list[ReturnTensor]) -> torch.dtype:
        """``dtype`` if given, else the dtype mergekit writes for the template.

        That is asked of mergekit rather than copied from its rules: the first output tensor is
        merged once (with the caller's RNG state kept) and its dtype taken, ``out_dtype`` cast
        included. Some methods compute and return float32 whatever ``dtype`` says (arcee_fusion,
        ramplus_tl with ``dtype: bfloat16``), and mergekit-yaml then writes float32.
        """
        if dtype:
            return dtype_from_name(dtype)
        probe = self._route.executor(targets[:1], self._inputs, self.device)
        with _forked_rng(self.device), torch.no_grad():
            written = [value for _, value in probe.run(quiet=True) if isinstance(value, torch.Tensor)]
        if written and written[0].is_floating_point():
            return written[0].dtype
        donor_dtype = getattr(out_config, "dtype", None) or torch.float32
        return dtype_from_name(donor_dtype) if isinstance(donor_dtype, str) else donor_dtype

    def _load_inputs(self, targets: list[ReturnTensor], tokenizer_task: Task | None) -> dict:
        """Execute, once, every task the merge tasks depend on (loads, gathers, tokenizer).

        The values are kept; candidates get them as mergekit ``Executor`` cached values.
        Loaded tensors are copied into process memory first: safetensors hands out CPU tensors
        that are views of a memory map of the file, which change if the file is rewritten in
        place (and fault if it shrinks).
        """
        roots = [dep for ret in targets for dep in ret.tensor_task.arguments().values()]
        if tokenizer_task is not None:
            roots.append(tokenizer_task)
        universe = TaskUniverse(roots)  # roots and everything below them
        handles = [TaskHandle(universe, index) for index in range(len(universe.tasks))]
        loads = [h for h in handles if isinstance(h.task(), LoadTensor)]
        others = [h for h in handles if not isinstance(h.task(), LoadTensor)]
        device = self.device
        with fresh_loader_cache(self.template.referenced_models()), torch.no_grad():
            load_run = Executor(loads, math_device=device, storage_device=device).run(quiet=True)
            values = {task: _owned(value) for task, value in load_run}
            cached = {handle: values[handle.task()] for handle in loads}
            if others:
                derived = Executor(others, math_device=device, storage_device=device, cached_values=cached)
                values.update(derived.run(quiet=True))
        return values

    def _resident_tensors(self, targets: list[ReturnTensor]) -> dict[str, torch.Tensor]:
        """Map each output tensor name to the model tensor it is copied into; check coverage."""
        state = self.model.state_dict(keep_vars=True)
        names = {ret.weight_info.name for ret in targets}
        unknown = sorted(names - state.keys())
        if unknown:
            raise InputError(
                f"template: mergekit writes tensors the {type(self.model).__name__} model does "
                f"not have ({', '.join(unknown[:3])}); merge models whose transformers class "
                "uses these names"
            )
        tied = _tied_aliases(self.model)
        uncovered = sorted(state.keys() - names - tied)
        if uncovered:
            raise InputError(
                f"template: the merge does not produce {', '.join(uncovered[:3])} of the "
                f"{type(self.model).__name__} model; a recipe must cover every tensor"
            )
        # Keep the Parameter objects, not their .data: model.to(...) swaps .data.
        return {name: state[name] for name in names}

    # ----------------------------------------------------------------- per candidate

    def merge(self, config: MergeConfiguration) -> transformers.PreTrainedModel:
        """Merge ``config`` into the resident model and return it (eval mode).

        Raises ``CandidateError`` when the merge fails or an output tensor is not finite
        (the resident model then holds a partial mix until the next successful merge), and
        ``InputError`` when ``config`` needs source tensors the template did not load.
        """
        if not self.resident:
            raise ValueError("this merger holds no model (resident=False); use merged_tensors(config)")
        for name, value in self.merged_tensors(config):
            self._copy_into_model(name, value)
        return self.model.eval()

    def merged_tensors(self, config: MergeConfiguration) -> Iterator[tuple[str, torch.Tensor]]:
        """``config``'s output tensors as ``(name, tensor)``, one at a time as mergekit's executor produces
        them, each checked finite (``CandidateError`` otherwise, as ``merge``). A tensor may be a resident
        source itself (passthrough returns its input): read it, never write into it. ``last_timings.copy_s``
        is the time the consumer spent between tensors (loading them)."""
        timings = MergeTimings()
        with torch.no_grad():
            start = time.perf_counter()
            try:
                targets, _ = self._route.plan(config)
            except Exception as error:  # bad values of one candidate: record and go on
                raise CandidateError(f"planning failed: {error}") from error
            if self.fast_path is not None:
                targets = self.fast_path.rewrite(targets)
            planned = time.perf_counter()
            results = self._results(targets)
            scheduled = time.perf_counter()
            timings.plan_s, timings.schedule_s = planned - start, scheduled - planned
            with self._seeded_rng():
                yield from self._checked(results, timings)
            timings.execute_s = time.perf_counter() - scheduled - timings.copy_s
        self.last_timings = timings  # (of the last candidate merged in full)

    def _results(self, targets: list[ReturnTensor]) -> Iterator[tuple[ReturnTensor, Any]]:
        """(target, value) pairs, lazily: straight from the fast kernels when every target has
        one, else through a mergekit Executor."""
        direct = self._direct_order(targets)
        if direct is None:
            return self._executor(targets).run(quiet=True)
        return self.fast_path.execute(direct)

    def _direct_order(self, targets: list[ReturnTensor]) -> list[ReturnTensor] | None:
        """The targets in the order mergekit's Executor runs them, when every one is a fast task
        (None otherwise), so such a candidate needs no task graph.

        The order matters: random kernels take their draws in it. It is learnt from one Executor
        per recipe structure (output names and methods) and reused: the schedule is a
        topological sort by group label and priority over a graph whose shape, labels and task
        indices depend on that structure only, never on parameter values.
        """
        if self.fast_path is None or not all(isinstance(ret.tensor_task, FastMergeTask) for ret in targets):
            return None
        key = tuple((ret.weight_info.name, ret.tensor_task.merge.method_name) for ret in targets)
        if key not in self._schedule_orders:
            schedule = self._route.executor(targets, self._inputs, self.device).schedule.tasks
            ran = [h.task().merge.output_weight.name for h in schedule if isinstance(h.task(), FastMergeTask)]
            complete = sorted(ran) == sorted(ret.weight_info.name for ret in targets)
            self._schedule_orders[key] = ran if complete else None
        order = self._schedule_orders[key]
        if order is None:
            return None
        by_name = {ret.weight_info.name: ret for ret in targets}
        return [by_name[name] for name in order]

    def _executor(self, targets: list[ReturnTensor]) -> Executor:
        executor = self._route.executor(targets, self._inputs, self.device)
        for handle in executor.schedule.tasks:
            task = handle.task()
            if isinstance(task, LoadTensor):
                raise InputError(
                    f"config: needs tensor {task.tensor} of {task.model}, which the template "
                    "did not load; build the InMemoryMerger from a template with the same models"
                )
        return executor

    def _checked(
        self, results: Iterator[tuple[ReturnTensor, Any]], timings: MergeTimings
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of each result, checked; the time spent by the consumer counts as copy time.

        Random methods draw from torch's generator, seeded per candidate, between the tensors handed out:
        the consumer (another library's loading code) runs with that generator saved and restored around
        it, so whatever it might draw cannot shift the draws away from mergekit-yaml's."""
        try:
            for task, value in results:
                name = task.weight_info.name
                started = time.perf_counter()
                checked = self._check(name, value)
                with contextlib.nullcontext() if self.resident else _forked_rng(self.device):
                    yield name, checked
                timings.copy_s += time.perf_counter() - started
        except CandidateError:
            raise
        except Exception as error:
            raise CandidateError(f"merge failed: {type(error).__name__}: {error}") from error

    def _check(self, name: str, value: torch.Tensor | None) -> torch.Tensor:
        if value is None:
            raise CandidateError(f"{name}: mergekit produced no tensor (optional weight skipped)")
        if value.is_floating_point() and not _all_finite(value):
            raise CandidateError(f"{name}: merged tensor has NaN or infinite values")
        return value

    def _copy_into_model(self, name: str, value: torch.Tensor) -> None:
        target = self._targets[name]
        if self._can_adopt(value, target):
            target.data = value  # a fresh tensor nobody else holds: take it, skip the copy
        else:
            target.copy_(value)

    def _can_adopt(self, value: torch.Tensor, target: torch.Tensor) -> bool:
        """True if ``value`` is a plain, exclusively owned tensor the parameter can just take.

        Never a resident source (a method may return its input unchanged, e.g. passthrough):
        the model must not share storage with the sources, or writing into it would corrupt them.
        """
        return (
            value.dtype == target.dtype
            and value.device == target.device
            and value.shape == target.shape
            and value.is_contiguous()
            and value.storage_offset() == 0
            and value.untyped_storage().nbytes() == value.numel() * value.element_size()
            and value.untyped_storage().data_ptr() not in self._source_storages
        )

    def _seeded_rng(self) -> contextlib.AbstractContextManager:
        """Seed torch like ``mergekit-yaml --random-seed`` (only torch's RNG is consumed by
        mergekit's methods); restore the caller's RNG state afterwards."""
        if self.random_seed is None:
            return contextlib.nullcontext()
        return _seeded_torch_rng(self.random_seed, self.device)


def _forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Save the CPU RNG (and ``device``'s, if CUDA) and restore it on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index], device_type="cuda")
    return torch.random.fork_rng(devices=[])


@contextlib.contextmanager
def _seeded_torch_rng(seed: int, device: torch.device) -> Iterator[None]:
    with _forked_rng(device):
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator, as set_seed does
        yield


@contextlib.contextmanager
def fresh_loader_cache(models: list[ModelReference]) -> Iterator[None]:
    """Make mergekit's process-wide LoaderCache read ``models`` anew, and forget them after."""
    cache = LoaderCache()

    def evict():
        for model in models:
            loader = cache.loaders.pop(model, None)
            if loader is not None:
                loader.flush()

    evict()
    try:
        yield
    finally:
        evict()


def _owned(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A copy in process memory of a (possibly file-mapped) CPU tensor."""
    if tensor is None or tensor.device.type != "cpu":
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _all_finite(tensor: torch.Tensor) -> bool:
    """NaN/inf check that reads the tensor once.

    A sum propagates NaN and inf and is ~15x faster than ``isfinite(t).all()`` on CPU; only
    when the sum is not finite (a NaN/inf, or a finite tensor whose sum overflows) is the
    exact check run.
    """
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(tensor).all())


def _storage_pointers(values) -> set[int]:
    """Storage addresses of every tensor in the cached input values (tensors or dicts of them)."""
    pointers = set()
    for value in values:
        tensors = value.values() if isinstance(value, dict) else [value]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                pointers.add(tensor.untyped_storage().data_ptr())
    return pointers


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (tied embeddings)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor) if tensor.is_meta else tensor.data_ptr()  # (meta tensors have no storage to compare)
        if key in seen and tensor.numel():
            aliases.add(name)
        seen.setdefault(key, name)
    return aliases


def _build_resident_model(config, dtype: torch.dtype, device: torch.device):
    """Build the model once, from the output config; its weights are overwritten by merge()."""
    # Random init would advance the caller's torch RNG; keep it untouched.
    with _forked_rng(device), torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def _load_tokenizer(config: MergeConfiguration, tokenizer_info, source_paths: tuple[Path, ...]):
    """The merged model's tokenizer: mergekit's built one, else the donor model's; None when the
    donor folder has no tokenizer files (mergekit merges such models, and so does this merger)."""
    from mergekit_evolve.space.models import has_tokenizer_files

    if tokenizer_info is not None:
        return tokenizer_info.tokenizer
    donor = config.base_model or config.referenced_models()[0]
    if not has_tokenizer_files(donor.model.path):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(donor.model.path)
    except Exception as error:
        raise InputError(
            f"tokenizer: cannot load a tokenizer from {donor.model.path} ({error}); "
            "add tokenizer files there or set tokenizer_source"
        ) from error


def _ordered_models(config: MergeConfiguration) -> list[ModelReference]:
    """Referenced models in config order (base first), without duplicates."""
    found: list[ModelReference] = []
    if config.base_model:
        found.append(config.base_model)
    for model_in in config.models or []:
        found.append(model_in.model)
    slice_lists = [config.slices or []]
    for module in (config.modules or {}).values():
        found.extend(m.model for m in module.models or [])
        slice_lists.append(module.slices or [])
    for slices in slice_lists:
        for output_slice in slices:
            found.extend(source.model for source in output_slice.sources)
    return list(dict.fromkeys(found))


def _local_source_paths(config: MergeConfiguration) -> tuple[Path, ...]:
    paths = []
    for model in _ordered_models(config):
        if model.lora is not None:
            raise InputError(f"models: {model} has a LoRA; merge it into the model first")
        path = Path(model.model.path)
        if not path.is_dir():
            raise InputError(
                f"models: {model.model.path} is not a local model directory; download it first and give its path"
            )
        paths.append(path.absolute())
    return tuple(paths)
