"""Sparsifying merges without re-sorting or re-drawing: mergekit's own code, masks from state.

mergekit's TIES, DARE, breadcrumbs, DELLA and SCE kernels spend nearly all their time on work
that is the same for every candidate of a search: sorting each task vector (model - base) by
magnitude, and drawing DARE/DELLA's random numbers (with a fixed ``--random-seed``, every
candidate draws the same stream). ``SparsifyingFastPath`` does that work once per source tensor
and keeps it (the *state*); every candidate then runs **mergekit's own merge code**, in which
only the step that picks the kept elements is answered from the state:

* ``GeneralizedTaskArithmeticMerge.merge_group`` (ties, dare_*, breadcrumbs*, della*) runs with
  its module-level ``sparsify`` bound to ``_StateKernel.sparsify``, which builds the 0/1 mask
  from the state and hands it to mergekit's ``rescaled_masked_tensor`` (masking, l1 rescale);
  the rest (task vectors, weights, sign consensus, normalisation, lambda, casts) is mergekit's
  code as is;
* ``sce_merge`` runs with its ``sce_mask`` bound to ``_StateKernel.sce_mask``.

So a candidate's tensors are mergekit's by construction, on any torch version, except for the
mask itself, which rests on three facts:

* magnitude pruning: the ranks come from mergekit's own ``argsort``/``sort`` call on the same
  task vector, so ``rank < k`` is exactly the set ``argsort(...)[:k]`` selects (breadcrumbs: a
  window of ranks, as its slice);
* random pruning: torch's CPU ``bernoulli(p)`` keeps an element iff the next uniform of the
  generator seeded with ``manual_seed(seed)`` is below p, and ``torch.rand`` on a generator
  seeded alike yields those uniforms. This is checked on the running torch, once per process,
  against ``torch.bernoulli`` itself (``bernoulli_matches_stream``); where it does not hold the
  random methods keep mergekit's kernels. A cursor walks the draws in the order mergekit's
  Executor runs the merge tasks, consuming what mergekit would (nothing for a density >= 1);
* SCE: the top-k set by |variance| is ``rank < k`` when the k-th and (k+1)-th variances
  differ; when they are equal (which of the equal ones topk keeps is its own business) mergekit's
  ``sce_mask`` runs.

On CPU, mergekit's merge code runs on pieces of ``PIECE_ELEMENTS`` elements of each tensor
(``_PiecewiseMerge``): everything it does after sparsification is elementwise (its sums run over
the entries, element by element), so each element gets the operations it gets on the whole
tensor while a piece's temporaries stay in cache. An l1 rescale sums the whole masked vector:
it is written piece by piece into a reused buffer, summed whole by torch's own ``abs().sum()`` in
the shape mergekit sums it, and scaled piece by piece (``_StateKernel._rescaled``, which spells
out ``rescaled_masked_tensor``'s lines for that). On a GPU, tensors are merged whole.

State kept, per non-base source tensor, as a multiple of its elements:

===========================================  ==============================
kind (methods)                               bytes per element
===========================================  ==============================
rank_desc / rank_asc (ties, breadcrumbs*)    4 (int32)
stream (dare_*, della*; CPU only)            4 (float32 draws)
della_rank (della*)                          work dtype (2 bf16, else 4)
sce_order (sce with select_topk < 1)         (4 + element size) / models
===========================================  ==============================

Building a kind frees the kinds the candidate does not use, so one method's state is resident
at a time. A method whose state would not fit (``max_state_bytes``, by default 80% of the
device's free memory) keeps mergekit's kernels (same tensors, slower; a warning says so once).
linear, task_arithmetic and the other methods have nothing to precompute: mergekit runs them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from mergekit.common import dtype_from_name
from mergekit.graph import Task
from mergekit.io.tasks import GatherTensors, ReturnTensor
from mergekit.merge_methods import get as get_method
from mergekit.merge_methods import sce
from mergekit.merge_methods.base import (
    FunctionalGroupMergeMethod,
    GroupMergeMethod,
    ParameterScope,
    PerInputValues,
    TensorEntry,
    TensorGroup,
    TensorMetadata,
)
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.sparsify import RescaleNorm, SparsificationMethod, rescaled_masked_tensor, sparsify

__all__ = ["SparsifyingFastPath", "FastMergeTask", "UniformStream", "bernoulli_matches_stream"]

_log = logging.getLogger(__name__)
RANDOM_SPARSIFIERS = (SparsificationMethod.random, SparsificationMethod.della_magprune)
KINDS_OF_SPARSIFIER = {
    SparsificationMethod.magnitude: ("rank_desc",),
    SparsificationMethod.magnitude_outliers: ("rank_asc",),
    SparsificationMethod.random: ("stream",),
    SparsificationMethod.della_magprune: ("della_rank", "stream"),
}
INT32_MAX = 2**31 - 1
RESCALE_EPS = inspect.signature(rescaled_masked_tensor).parameters["eps"].default  # mergekit's default
# CPU: mergekit's merge code runs on pieces of this many elements of a tensor (see _PiecewiseMerge)
PIECE_ELEMENTS = 1 << 18
# mergekit code run with one module-level name answered from the state: (function, name).
# tests/test_merge_engine.py checks each function still calls that name.
REBOUND_NAMES = (
    (GeneralizedTaskArithmeticMerge.merge_group, "sparsify"),
    (sce.sce_merge.implementation, "sce_mask"),
)


def _rebound(function: Callable, name: str, replacement: Callable) -> Callable:
    """mergekit's ``function`` itself (its code object), with the module-level ``name`` it calls
    resolved to ``replacement``: nothing of mergekit is copied or patched."""
    if name not in function.__code__.co_names:
        raise RuntimeError(f"mergekit's {function.__qualname__} no longer calls {name}: the fast path needs an update")
    namespace = {**function.__globals__, name: replacement}
    return types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )


class UniformStream:
    """The uniforms torch's CPU generator yields after ``manual_seed(seed)``, made once.

    ``begin()`` rewinds the cursor for a candidate; ``take(n)`` hands out the next n draws, as
    the next ``torch.bernoulli`` call of a mergekit merge would consume them."""

    GENERATE_ELEMENTS = 1 << 22  # draws made at a time

    def __init__(self, seed: int):
        self.seed = seed
        self.clear()

    def clear(self) -> None:
        """Forget the draws made so far (the next ``reserve`` regenerates them)."""
        self._generator = torch.Generator().manual_seed(self.seed)
        self._values = torch.empty(0)
        self._cursor = 0

    @property
    def nbytes(self) -> int:
        return self._values.numel() * self._values.element_size()

    def reserve(self, count: int) -> None:
        """At least ``count`` draws (continuing the stream where the last draw left it)."""
        missing = count - self._values.numel()
        if missing > 0:
            blocks = [self._values]
            for start in range(0, missing, self.GENERATE_ELEMENTS):
                size = min(self.GENERATE_ELEMENTS, missing - start)
                blocks.append(torch.rand(size, generator=self._generator))
            self._values = torch.cat(blocks)

    def begin(self) -> None:
        self._cursor = 0

    def take(self, count: int) -> torch.Tensor:
        self.reserve(self._cursor + count)
        draws = self._values[self._cursor : self._cursor + count]
        self._cursor += count
        return draws


@functools.cache
def bernoulli_matches_stream(elements: int = 70_001) -> bool:
    """Whether ``torch.bernoulli`` on this torch keeps exactly the elements whose draw from
    ``UniformStream`` is below p: checked once per process, for scalar-filled and per-element
    probabilities in float32 and bfloat16, on more elements than one thread's share."""
    seed = 1234
    stream = UniformStream(seed)
    probabilities = [
        lambda dtype: torch.full((elements,), 0.3, dtype=dtype),
        lambda dtype: torch.linspace(0, 1, elements, dtype=torch.float32).to(dtype),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        for make in probabilities:
            p = make(dtype)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                drawn = torch.bernoulli(p)
            stream.begin()
            if not torch.equal(drawn, (stream.take(elements) < p).to(dtype)):
                _log.warning(
                    "merge fast path: torch %s's bernoulli does not draw the uniforms of torch.rand: "
                    "DARE and DELLA run mergekit's own kernels (same results, slower)",
                    torch.__version__,
                )
                return False
    return True


class SourceState:
    """Precomputed values per (kind, source key), built on first use; bytes counted per kind."""

    def __init__(self):
        self._kinds: dict[str, dict[tuple, Any]] = {}

    def get(self, kind: str, key: tuple, build: Callable[[], Any]) -> Any:
        table = self._kinds.setdefault(kind, {})
        if key not in table:
            table[key] = build()
        return table[key]

    def built(self) -> set[str]:
        return {kind for kind, table in self._kinds.items() if table}

    def drop(self, kinds) -> None:
        for kind in kinds:
            self._kinds.pop(kind, None)

    def nbytes(self) -> dict[str, int]:
        return {kind: sum(_nbytes(v) for v in table.values()) for kind, table in self._kinds.items()}


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, else the system's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # accelerate (a mergekit dependency) brings it

    return psutil.virtual_memory().available


class FastMergeTask(Task[torch.Tensor | None]):
    """Stands in for one ``ExecuteMergeMethodTask``: same arguments, label and priority (so
    mergekit's Executor schedules it exactly where it schedules the original), state kernel."""

    merge: ExecuteMergeMethodTask
    kernel: Any  # a _StateKernel; compared and hashed by identity

    def arguments(self) -> dict[str, Task]:
        return self.merge.arguments()

    def group_label(self) -> str | None:
        return self.merge.group_label()

    def priority(self) -> int:
        return self.merge.priority()

    def uses_accelerator(self) -> bool:
        return self.merge.uses_accelerator()

    def execute(self, tensors: dict, **_kwargs) -> torch.Tensor:
        return self.kernel.run(self.merge, tensors)

    def execute_resident(self) -> torch.Tensor:
        """``execute`` on the resident tensors its gather task yields (no Executor needed)."""
        return self.kernel.run(self.merge, self.kernel.tensors)


class SparsifyingFastPath:
    """Rewrites a candidate's planned merge tasks onto state kernels where they apply.

    ``inputs``: the merger's resident input values (task -> value), ``random_seed``: the seed
    every candidate runs with (``None``: random methods keep mergekit's kernels).
    ``max_state_bytes``: the most precomputed state to hold; by default what fits in 80% of
    the device's free memory (plus the state this candidate would drop).
    """

    def __init__(self, inputs: dict, device: torch.device, random_seed: int | None, max_state_bytes: int | None = None):
        self._inputs = inputs
        self._device = device
        self.max_state_bytes = max_state_bytes
        self.refused: set[str] = set()  # kinds of state found too large (warned once each)
        self.state = SourceState()
        self.stream = UniformStream(random_seed) if random_seed is not None else None
        self.last_fast_tasks = 0  # tensors of the last rewritten candidate on state kernels
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # see buffer()
        # id(gather task) -> (gather task, merge task, kernel or None) of the last candidate
        self._kernels: dict[int, tuple] = {}
        self._next_kernels: dict[int, tuple] = {}

    def nbytes(self) -> dict[str, int]:
        """Bytes of precomputed state per kind (the uniform stream as ``stream``, reused buffers
        as ``buffers``)."""
        sizes = self.state.nbytes()
        if self.stream is not None and self.stream.nbytes:
            sizes["stream"] = self.stream.nbytes
        if self._buffers:
            sizes["buffers"] = sum(_nbytes(buffer) for buffer in self._buffers.values())
        return sizes

    def buffer(self, role: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``numel`` elements of a buffer reused by every tensor and candidate (it grows
        to the largest request), so a candidate allocates, and page-faults, nothing for it."""
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop((role, dtype), None)  # free the smaller one first
            buffer = self._buffers[(role, dtype)] = torch.empty(numel, dtype=dtype, device=self._device)
        return buffer[:numel]

    def rewrite(self, targets: list[ReturnTensor]) -> list[ReturnTensor]:
        tasks = [ret.tensor_task for ret in targets]
        kernels = [self._kernel_for(task) for task in tasks]
        self._kernels, self._next_kernels = self._next_kernels, {}  # keep this candidate's only
        kernels = self._within_budget(kernels)
        mergekit_draws = any(k is None and _draws_random(task) for k, task in zip(kernels, tasks))
        random = any(k is not None and k.draws_random for k in kernels)
        if random and (mergekit_draws or not bernoulli_matches_stream()):
            # mergekit's bernoulli would draw from torch's generator too (or the stream is not
            # what it draws on this torch): every random task keeps mergekit's kernel
            kernels = [None if k is not None and k.draws_random else k for k in kernels]
        self._make_room({kind for k in kernels if k is not None for kind in k.kinds})
        self.last_fast_tasks = sum(k is not None for k in kernels)
        draws = sum(k.max_draws for k in kernels if k is not None and k.draws_random)
        if draws:
            self.stream.reserve(draws)
            self.stream.begin()
        return [
            ret
            if kernel is None
            else ReturnTensor.model_construct(
                weight_info=ret.weight_info,
                tensor_task=FastMergeTask.model_construct(merge=ret.tensor_task, kernel=kernel),
                dtype=ret.dtype,
            )
            for ret, kernel in zip(targets, kernels)
        ]

    @staticmethod
    def execute(targets: list[ReturnTensor]) -> Iterator[tuple[ReturnTensor, Any]]:
        """``(target, value)`` for targets that all run on state kernels, in this order (the
        Executor's: random kernels take their draws in it), one at a time."""
        for ret in targets:
            yield ret, ret.execute(tensor=ret.tensor_task.execute_resident())

    def _within_budget(self, kernels: list) -> list:
        """The kernels, less those needing state that is not resident and would not fit beside
        what stays (warned once per kind)."""
        live = [k for k in kernels if k is not None]
        resident = self.state.built() | ({"stream"} if self.stream is not None and self.stream.nbytes else set())
        needed = {kind for k in live for kind in k.kinds}
        new = {kind: sum(k.state_bytes(kind) for k in live if kind in k.kinds) for kind in needed - resident}
        if not sum(new.values()):
            return kernels
        held = {kind: n for kind, n in self.nbytes().items() if kind != "buffers"}  # (buffers stay)
        kept = sum(n for kind, n in held.items() if kind in needed)
        if self.max_state_bytes is not None:
            room = self.max_state_bytes - kept
        else:
            room = 0.8 * (_free_bytes(self._device) + sum(held.values()) - kept)
        if sum(new.values()) <= room:
            return kernels
        for kind in sorted(set(new) - self.refused):
            _log.warning(
                "merge fast path: %s state for this recipe needs %.2f GB, %.2f GB available on %s: "
                "mergekit's own kernels run these tensors (same results, slower)",
                kind,
                new[kind] / 1e9,
                max(room, 0) / 1e9,
                self._device,
            )
        self.refused |= set(new)
        return [None if k is not None and set(new) & set(k.kinds) else k for k in kernels]

    def _make_room(self, needed: set[str]) -> None:
        """Building a kind not resident yet first frees the kinds this candidate does not use."""
        resident = self.state.built() | ({"stream"} if self.stream is not None and self.stream.nbytes else set())
        if not needed - resident:
            return
        unused = resident - needed
        self.state.drop(unused)
        if "stream" in unused:
            self.stream.clear()

    def _kernel_for(self, task: Task) -> _StateKernel | None:
        """The kernel for ``task``; the same object as last candidate's for a task re-planned
        from the same skeleton (same gather task object, method and inputs: see replan.py)."""
        if not isinstance(task, ExecuteMergeMethodTask):
            return None
        key = id(task.gather_tensors)
        known = self._kernels.get(key)
        if known is not None and known[0] is task.gather_tensors and _same_inputs(known[1], task):
            kernel = known[2]
        else:
            kernel = self._new_kernel(task)
        self._next_kernels[key] = (task.gather_tensors, task, kernel)
        return kernel

    def _new_kernel(self, task: ExecuteMergeMethodTask) -> _StateKernel | None:
        method = get_method(task.method_name)
        sparsifies = isinstance(method, GeneralizedTaskArithmeticMerge) and method.sparsification_method
        if task.base_model is None or not (sparsifies or method is sce.sce_merge):
            return None
        tensors = self._gathered(task.gather_tensors)
        if not _simple_inputs(task, tensors):
            return None
        kernel = _StateKernel(self, method, task, tensors)
        if kernel.draws_random and (self._device.type != "cpu" or self.stream is None):
            return None  # CUDA's Philox bernoulli is not reproduced; unseeded draws differ anyway
        return kernel

    def _gathered(self, gather: Task) -> dict | None:
        """What ``gather`` yields from the resident loads (None if any load is not resident)."""
        if not isinstance(gather, GatherTensors):
            return None
        loads = gather.arguments()
        if not all(load in self._inputs for load in loads.values()):
            return None
        return gather.execute(**{name: self._inputs[load] for name, load in loads.items()})


def _draws_random(task: Task) -> bool:
    """Whether mergekit's kernel for ``task`` draws from torch's generator."""
    if not isinstance(task, ExecuteMergeMethodTask):
        return False
    method = get_method(task.method_name)
    return getattr(method, "sparsification_method", None) in RANDOM_SPARSIFIERS


def _same_inputs(known: ExecuteMergeMethodTask, task: ExecuteMergeMethodTask) -> bool:
    """``task`` merges what ``known`` merged the same way (a copy of it with other parameters)."""
    return (
        known.method_name == task.method_name
        and known.model_order is task.model_order
        and known.base_model is task.base_model
        and known.output_weight is task.output_weight
        and known.dtype == task.dtype
        and known.out_dtype == task.out_dtype
    )


def _simple_inputs(task: ExecuteMergeMethodTask, tensors: dict | None) -> bool:
    """Every configured input present, floating point, same shape and device, and small enough
    for int32 ranks: the cases where mergekit's adapter calls the method directly."""
    if not tensors or any(model not in tensors for model in task.model_order):
        return False
    if task.base_model not in task.model_order:
        return False
    first = tensors[task.model_order[0]]
    return all(
        t.is_floating_point() and t.shape == first.shape and t.device == first.device and t.numel() <= INT32_MAX
        for t in (tensors[m] for m in task.model_order)
    )


class _StateKernel:
    """One output tensor's merge, run by mergekit's method code with its masks from the state."""

    def __init__(self, fast: SparsifyingFastPath, method, task: ExecuteMergeMethodTask, tensors: dict):
        self.fast = fast
        self.tensors = tensors  # what the gather task yields: views of the resident sources
        self.spec = method.spec
        first = tensors[task.model_order[0]]
        self.non_base = len(task.model_order) - 1
        self.numel = first.numel()
        self.element_size = first.element_size()
        self.max_draws = self.numel * self.non_base
        self._bf16 = first.dtype == torch.bfloat16
        names = {model: task.gather_tensors.weight_info[model].name for model in task.model_order}
        self._base_key = (str(task.base_model), names[task.base_model])
        self._names = names
        self._non_base = [model for model in task.model_order if model != task.base_model]
        self._plans: dict = {}  # model -> how its sparsified task vector is made (prepare)
        self._models: Iterator = iter(())  # the non-base entries, in the order mergekit sparsifies them
        self._piece: slice | None = None  # the elements mergekit's code is merging now (None: all)
        if method is sce.sce_merge:
            self.sparsifier = None
            self.kinds = ("sce_order",)
            self.method = FunctionalGroupMergeMethod(
                method.spec, _rebound(method.implementation, "sce_mask", self.sce_mask)
            )
        else:
            self.sparsifier = method.sparsification_method
            self.kinds = KINDS_OF_SPARSIFIER[self.sparsifier]
            self.method = _PiecewiseMerge(self, method, _rebound(type(method).merge_group, "sparsify", self.sparsify))
        self.draws_random = self.sparsifier in RANDOM_SPARSIFIERS

    def state_bytes(self, kind: str) -> int:
        """Bytes of ``kind`` state this tensor needs."""
        if kind == "sce_order":
            return (4 + self.element_size) * self.numel
        per_element = {"rank_desc": 4, "rank_asc": 4, "stream": 4, "della_rank": 2 if self._bf16 else 4}[kind]
        return per_element * self.numel * self.non_base

    def run(self, task: ExecuteMergeMethodTask, tensors: dict) -> torch.Tensor:
        """``ExecuteMergeMethodTask.execute`` for all-present floating inputs, this method."""
        entries = tuple(
            TensorEntry(id=model, tensor=tensors[model], is_base=model == task.base_model) for model in task.model_order
        )
        group = TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(task.output_weight))
        self.method.validate_inputs(
            [entry.id for entry in entries], task.base_model, group_name=task.output_weight.name
        )
        group.validate_tensors()
        parameters = dict(task.parameters.items())
        for parameter in self.spec.input_parameters:
            bound = entries if parameter.scope == ParameterScope.INPUT else group.non_base
            parameters[parameter.name] = PerInputValues(
                [(entry.id, task.input_parameters[entry.id][parameter.name]) for entry in bound]
            )
        (result,) = self.method._execute_resolved(
            (group,), [parameters], dtype=dtype_from_name(task.dtype), out_dtype=dtype_from_name(task.out_dtype)
        )
        return result

    def _key(self, model, tensor: torch.Tensor) -> tuple:
        """Identifies a task vector: the model's source tensor minus the base's, in that dtype."""
        return (str(model), self._names[model], *self._base_key, tensor.dtype)

    # ------------------------------------------------------------ plans, per candidate

    def prepare(self, group: TensorGroup, parameters: dict, piecewise: bool) -> None:
        """How each entry's sparsified task vector is made, in mergekit's entry order (which is
        the order the draws are taken in): a mask from the state, applied piece by piece; where
        mergekit rescales it (l1), the masked vector is made in full first (in pieces, into a
        reused buffer), since the rescale sums the whole tensor."""
        self._plans = {}
        base = group.base.tensor
        rescale_norm = RescaleNorm.l1 if parameters["rescale"] else None
        for index, entry in enumerate(group.non_base):
            model = entry.id
            values = {key: parameters[key][model] for key in ("density", "gamma", "epsilon") if key in parameters}
            density = values["density"]
            draws = None
            if self.draws_random and _draws_at(self.sparsifier, density):
                draws = self.fast.stream.take(base.numel())
            delta = functools.partial(torch.sub, entry.tensor, base)
            mask = self._mask(model, base, delta, draws, **values)
            if mask is None:  # mergekit's own sparsify: it keeps all, zeroes all or refuses the values
                self._plans[model] = functools.partial(self._own, values, rescale_norm)
            elif rescale_norm is None:
                self._plans[model] = functools.partial(self._masked, mask)
            elif piecewise:
                self._plans[model] = self._rescaled(index, model, entry.tensor, base, mask)
            else:
                self._plans[model] = functools.partial(self._whole_rescaled, mask, rescale_norm)

    def begin_piece(self, piece: slice | None) -> None:
        self._piece = piece
        self._models = iter(self._non_base)  # the group's non-base entries are in the task's order

    def sparsify(self, tensor, density, method, gamma=0, epsilon=0, rescale_norm=None) -> torch.Tensor:
        """What mergekit's ``sparsify`` returns for the next entry, on the current piece."""
        return self._plans[next(self._models)](tensor, self._piece)

    def _own(self, values: dict, rescale_norm, tensor: torch.Tensor, piece) -> torch.Tensor:
        return sparsify(tensor, method=self.sparsifier, rescale_norm=rescale_norm, **values)

    def _work_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        """The dtype mergekit's sparsifier masks in: the tensor's, or for the random ones on CPU
        float32 unless bfloat16."""
        return _cpu_work_dtype(tensor) if self.draws_random else tensor.dtype

    def _masked(self, mask: Callable, tensor: torch.Tensor, piece) -> torch.Tensor:
        """mergekit's sparsifier without a rescale (``tensor * mask`` in its work dtype)."""
        work_dtype = self._work_dtype(tensor)
        kept = mask(piece).to(work_dtype).view(tensor.shape)
        return rescaled_masked_tensor(tensor.to(work_dtype), kept, None).to(tensor.dtype)

    def _whole_rescaled(self, mask: Callable, rescale_norm, tensor: torch.Tensor, piece) -> torch.Tensor:
        """mergekit's sparsifier with its rescale, on the whole task vector (della: as a matrix)."""
        work_dtype, shape = self._work_dtype(tensor), self._mask_shape(tensor)
        kept = mask(None).to(work_dtype).view(shape)
        sparsified = rescaled_masked_tensor(tensor.to(work_dtype).view(shape), kept, rescale_norm)
        return sparsified.to(tensor.dtype).view(tensor.shape)

    def _rescaled(self, index: int, model, source: torch.Tensor, base: torch.Tensor, mask: Callable) -> Callable:
        """``rescaled_masked_tensor(delta, mask, l1)`` (in the work dtype), its operations on
        pieces where they are elementwise: the masked vector is written piece by piece into a
        reused buffer, its l1 norm is torch's ``abs().sum()`` of the whole of it (of the mask's
        shape, as mergekit sums it), the unmasked vector's l1 norm is the same for every candidate
        and summed once (per torch thread count), and the scale is applied piece by piece."""
        numel, work_dtype, shape = base.numel(), self._work_dtype(base), self._mask_shape(base)
        masked = self.fast.buffer(f"masked{index}", numel, work_dtype)
        flat_source, flat_base = source.reshape(-1), base.reshape(-1)
        for piece in _pieces(numel):
            delta = torch.sub(flat_source[piece], flat_base[piece]).to(work_dtype)
            torch.mul(delta, mask(piece).to(work_dtype), out=masked[piece])
        key = (*self._key(model, base), torch.get_num_threads())
        before = self.fast.state.get("l1", key, lambda: torch.sub(source, base).to(work_dtype).view(shape).abs().sum())
        after = torch.abs(masked.view(shape), out=self.fast.buffer("magnitudes", numel, work_dtype).view(shape)).sum()
        scale = None if before < RESCALE_EPS or after < RESCALE_EPS else before / after

        def sparsified(tensor: torch.Tensor, piece) -> torch.Tensor:
            values = masked[_whole_if_none(piece)]
            return (values if scale is None else values * scale).to(tensor.dtype).view(tensor.shape)

        return sparsified

    def _mask_shape(self, tensor: torch.Tensor) -> torch.Size:
        """The shape mergekit's sparsifier masks and sums the task vector in (della: rows)."""
        if self.sparsifier == SparsificationMethod.della_magprune and tensor.dim() < 2:
            return tensor.unsqueeze(0).shape
        return tensor.shape

    def _mask(self, model, like: torch.Tensor, delta: Callable, draws, density, gamma=0, epsilon=0) -> Callable | None:
        """``piece -> bool mask`` of the elements mergekit's sparsifier keeps, from the state
        (None where its own function returns before masking or refuses the values). ``like``:
        a tensor of the task vector's shape and dtype; ``delta()`` makes the task vector itself,
        needed only to build the state."""
        if density >= 1 or density < 0:
            return None
        numel = like.numel()
        if self.sparsifier == SparsificationMethod.magnitude:
            if density <= 0:
                return None
            rank, k = self._rank(model, like, delta, descending=True), max(1, int(density * numel))
            return lambda piece: rank[_whole_if_none(piece)] < k
        if self.sparsifier == SparsificationMethod.magnitude_outliers:
            target_n = int(density * numel)
            n_bot = max(0, numel - target_n - int(gamma * numel))
            low, high, _ = slice(n_bot, n_bot + target_n).indices(numel)  # as mergekit's slice
            rank = self._rank(model, like, delta, descending=False)
            return lambda piece: (rank[_whole_if_none(piece)] >= low) & (rank[_whole_if_none(piece)] < high)
        if self.sparsifier == SparsificationMethod.random:
            p = torch.full((), density, dtype=_cpu_work_dtype(like))  # as full_like stores it
            return lambda piece: draws[_whole_if_none(piece)] < p
        if density <= 0 or density + epsilon >= 1 or density - epsilon <= 0:  # della
            return None
        return self._della_mask(model, like, delta, draws, density, epsilon)

    def _della_mask(self, model, like: torch.Tensor, delta: Callable, draws, density, epsilon) -> Callable:
        """DELLA's keep probabilities from its per-row ranks (the state), as mergekit computes
        them, and the draws below them."""
        work_dtype = _cpu_work_dtype(like)
        rank_norm = self.fast.state.get(
            "della_rank",
            self._key(model, like),
            lambda: _della_rank_norm(delta().view(self._mask_shape(like)), work_dtype).view(-1),
        )

        def keep(piece) -> torch.Tensor:
            probs = (density - epsilon) + rank_norm[_whole_if_none(piece)] * 2 * epsilon
            if not bool(((probs >= 0) & (probs <= 1)).all()):  # what torch.bernoulli refuses
                raise RuntimeError("bernoulli: expected 0 <= p <= 1 (della keep probabilities)")
            return draws[_whole_if_none(piece)] < probs

        return keep

    def sce_mask(self, tvs: torch.Tensor, density: float, mask_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``mergekit.merge_methods.sce.sce_mask`` with the variance order from the state."""
        if 0 < density < 1:
            key = tuple(self._key(model, tvs) for model in self._non_base)
            nonzero, rank, sorted_magnitudes = self.fast.state.get("sce_order", key, lambda: _sce_order(tvs))
            k = int(nonzero * density)  # as sce_mask computes it (a 0-d tensor times a float)
            if k > 0 and (k >= rank.numel() or bool(sorted_magnitudes[k - 1] != sorted_magnitudes[k])):
                return (rank < k).to(mask_dtype or tvs.dtype).view(tvs.shape[1:])
        return sce.sce_mask(tvs, density, mask_dtype)

    # ------------------------------------------------------------ masks from the state

    def _rank(self, model, like: torch.Tensor, delta: Callable, descending: bool) -> torch.Tensor:
        """Each element's place in mergekit's own sort of ``|delta()|`` (the same call, so equal
        magnitudes are ordered as mergekit orders them)."""

        def build() -> torch.Tensor:
            w = delta().abs().reshape(-1)
            if w.device.type == "cpu":
                w = w.float()
            if descending:
                order = torch.argsort(w, descending=True)  # sparsify.magnitude
            else:
                order = torch.sort(w, descending=False).indices  # sparsify.magnitude_outliers
            rank = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
            rank[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
            return rank

        return self.fast.state.get("rank_desc" if descending else "rank_asc", self._key(model, like), build)


class _PiecewiseMerge(GroupMergeMethod):
    """A generalized task-arithmetic method whose ``merge_group`` is mergekit's ``code``, run on
    pieces of the tensor on CPU. Every step of it after sparsification is elementwise (its sums
    run over the entries, element by element), so each element gets the operations it gets on
    the whole tensor, while a piece's temporaries stay in cache (no allocation, no page faults
    of whole-tensor temporaries: several times faster on CPU)."""

    def __init__(self, kernel: _StateKernel, method: GeneralizedTaskArithmeticMerge, code: Callable):
        self.spec = method.spec
        self._kernel, self._method, self._code = kernel, method, code

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        kernel, base = self._kernel, group.base.tensor
        piecewise = base.device.type == "cpu" and base.numel() > PIECE_ELEMENTS and bool(group.non_base)
        kernel.prepare(group, parameters, piecewise)
        if not piecewise:
            kernel.begin_piece(None)
            return self._code(self._method, group, **parameters)
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
        flat = out.view(-1)
        tensors = [entry.tensor.reshape(-1) for entry in group.entries]
        for piece in _pieces(base.numel()):
            entries = tuple(
                TensorEntry(id=entry.id, tensor=tensor[piece], is_base=entry.is_base)
                for entry, tensor in zip(group.entries, tensors)
            )
            kernel.begin_piece(piece)
            flat[piece] = self._code(self._method, TensorGroup(entries=entries, metadata=group.metadata), **parameters)
        return out


def _draws_at(sparsifier: SparsificationMethod, density: float) -> bool:
    """Whether mergekit's sparsifier calls bernoulli at this density: DARE for any density in
    [0, 1) (a negative one is refused by bernoulli), DELLA only in (0, 1) (it returns zeros first)."""
    if sparsifier == SparsificationMethod.random:
        return 0 <= density < 1
    return 0 < density < 1


def _pieces(numel: int) -> Iterator[slice]:
    for start in range(0, numel, PIECE_ELEMENTS):
        yield slice(start, min(start + PIECE_ELEMENTS, numel))


def _whole_if_none(piece: slice | None) -> slice:
    return slice(None) if piece is None else piece


def _cpu_work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype mergekit's random sparsifiers compute in on CPU."""
    return tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32


def _della_rank_norm(tensor: torch.Tensor, work_dtype: torch.dtype) -> torch.Tensor:
    """``rank_norm`` exactly as ``della_magprune`` computes it (its candidate-independent part)."""
    magnitudes = tensor.abs()
    sorted_indices = torch.argsort(magnitudes, dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(work_dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    return ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)


def _sce_order(tvs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sce_mask's candidate-independent part: the nonzero count, each element's rank by
    |variance| (descending) and the sorted magnitudes (to see whether the k-th and (k+1)-th
    are equal)."""
    var = torch.var(tvs, dim=0, unbiased=False)
    nonzero = torch.count_nonzero(var)
    magnitude = var.abs().view(-1)
    order = torch.argsort(magnitude, descending=True)
    rank = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
    rank[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
    return nonzero, rank, magnitude[order]
