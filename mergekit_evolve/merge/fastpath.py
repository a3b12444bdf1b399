"""Sparsifying merges at memory speed, bitwise equal to mergekit's kernels.

mergekit's TIES, DARE, breadcrumbs, DELLA and SCE kernels spend nearly all their time on work
that is the same for every candidate of a search: sorting each task vector (model - base) by
magnitude, and drawing DARE/DELLA's random numbers (with a fixed ``--random-seed``, every
candidate draws the same stream). ``SparsifyingFastPath`` does that work once per source tensor
and builds each candidate with a few elementwise passes:

* magnitude pruning (``ties``, ``breadcrumbs``, ``breadcrumbs_ties``): the rank of every element
  in mergekit's own ``argsort`` / ``sort`` of ``|delta|`` (the same call on the same tensor, so
  equal magnitudes are ordered exactly as mergekit orders them); a candidate's mask is
  ``rank < k`` (or a rank window for breadcrumbs);
* random pruning (``dare_ties``, ``dare_linear``): torch's CPU ``bernoulli(p)`` draws one 24-bit
  uniform ``u`` per element from the global generator and keeps the element iff ``u < p``. The
  uniforms that ``torch.manual_seed(seed)`` produces are generated once (``torch.rand`` with a
  generator seeded alike yields the same numbers); a cursor walks them in the order mergekit's
  Executor runs the merge tasks, consuming exactly what mergekit would (nothing for a density
  >= 1), so every tensor gets the draws ``mergekit-yaml --random-seed`` gives it;
* DELLA (``della``, ``della_linear``): the per-row normalised magnitude rank (``2 * rank_norm``,
  as mergekit computes it) plus the same uniform stream; ``probs`` and ``u < probs`` per candidate;
* SCE: the variance order of the stacked task vectors; a candidate's top-k mask is ``rank < k``
  when the k-th and (k+1)-th variances differ, and mergekit's own ``torch.topk`` otherwise (which
  of several equal values topk keeps is its own business, so ties at the boundary go to it).

Everything else (task-vector arithmetic, rescaling, sign consensus, normalisation, lambda, dtype
casts) is mergekit's own sequence of torch operations, replicated op for op, or mergekit's
helpers called directly. ``tests/test_merge_fastpath.py`` checks bitwise equality against
mergekit's kernels and against ``run_merge``.

State kept, per non-base source tensor, as a multiple of that source's bytes (bf16 sources / fp32):

=====================================  =================  =============
kind (methods)                         bf16 sources       fp32 sources
=====================================  =================  =============
rank (ties, breadcrumbs[_ties])        2x (int32)         1x
uniform stream (dare_*, della*)        2x (float32)       1x
della rank (della, della_linear)       1x (+ stream)      1x (+ stream)
sce order (per tensor, not per model)  3x / n_models      2x / n_models
=====================================  =================  =============

plus a few bytes per tensor (l1 norms). Nothing is stored for task_arithmetic. State is built
when a candidate first needs it, and building a kind frees the kinds that candidate does not
use, so at most one method's state is resident: for a 1B-parameter family of base + 2 experts
in bf16 (6 GB of sources) the largest, DELLA's, is 12 GB.

Random methods take the fast path only on CPU (CUDA's Philox-based bernoulli is not reproduced)
and only with a seeded merger, and only when every merge task of the candidate takes it (so no
other kernel consumes torch's generator in between). Inputs must be finite for bitwise equality
(a NaN or inf source can differ in which NaN comes out; such candidates are rejected anyway).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from mergekit.common import dtype_from_name
from mergekit.graph import Task
from mergekit.io.tasks import GatherTensors, ReturnTensor
from mergekit.merge_methods import get as get_method
from mergekit.merge_methods.base import (
    GroupMergeMethod,
    ParameterScope,
    PerInputValues,
    TensorEntry,
    TensorGroup,
    TensorMetadata,
)
from mergekit.merge_methods.generalized_task_arithmetic import (
    ConsensusMethod,
    GeneralizedTaskArithmeticMerge,
    get_mask,
)
from mergekit.merge_methods.sce import sce_mask, sce_merge, sce_weight
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.sparsify import SparsificationMethod

__all__ = ["SparsifyingFastPath", "FastMergeTask"]

RANDOM_SPARSIFIERS = (SparsificationMethod.random, SparsificationMethod.della_magprune)
KINDS_OF_SPARSIFIER = {
    None: (),
    SparsificationMethod.magnitude: ("rank_desc", "l1"),
    SparsificationMethod.magnitude_outliers: ("rank_asc", "l1"),
    SparsificationMethod.random: ("stream", "l1"),
    SparsificationMethod.della_magprune: ("della_rank", "stream", "l1"),
}
RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor's default eps
INT32_MAX = 2**31 - 1


class UniformStream:
    """The uniforms torch's CPU generator yields after ``manual_seed(seed)``, made once.

    ``torch.bernoulli(p)`` on CPU draws one ``uniform_real_distribution<float>`` value per element
    (24 random bits) and returns ``u < p``; ``torch.rand`` draws the same values from the same
    generator state. ``begin()`` rewinds the cursor for a candidate; ``take(n)`` hands out the
    next n draws, as the next ``bernoulli`` call of a mergekit merge would consume them.
    """

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
        missing = count - self._values.numel()
        if missing > 0:  # continue the same stream: the generator is where the last draw left it
            more = torch.rand(missing, generator=self._generator)
            self._values = more if not self._values.numel() else torch.cat([self._values, more])

    def begin(self) -> None:
        self._cursor = 0

    def take(self, count: int) -> torch.Tensor:
        self.reserve(self._cursor + count)
        draws = self._values[self._cursor : self._cursor + count]
        self._cursor += count
        return draws


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


class FastMergeTask(Task[Optional[torch.Tensor]]):
    """Stands in for one ``ExecuteMergeMethodTask``: same arguments, label and priority (so
    mergekit's Executor schedules it exactly where it schedules the original), fast kernel."""

    merge: ExecuteMergeMethodTask
    kernel: Any  # a _FastKernel; compared and hashed by identity

    def arguments(self) -> dict[str, Task]:
        return self.merge.arguments()

    def group_label(self) -> Optional[str]:
        return self.merge.group_label()

    def priority(self) -> int:
        return self.merge.priority()

    def uses_accelerator(self) -> bool:
        return self.merge.uses_accelerator()

    def execute(self, tensors: dict, **_kwargs) -> torch.Tensor:
        return self.kernel.run(self.merge, tensors)


class SparsifyingFastPath:
    """Rewrites a candidate's planned merge tasks onto precomputed-state kernels where exact.

    ``inputs``: the merger's resident input values (task -> value), ``random_seed``: the seed
    every candidate runs with (``None``: random methods keep mergekit's kernels).
    """

    def __init__(self, inputs: dict, device: torch.device, random_seed: Optional[int]):
        self._inputs = inputs
        self._device = device
        self.state = SourceState()
        self.stream = UniformStream(random_seed) if random_seed is not None else None
        self.last_fast_tasks = 0  # tensors of the last rewritten candidate on fast kernels

    def nbytes(self) -> dict[str, int]:
        """Bytes of precomputed state per kind (the uniform stream as ``stream``)."""
        sizes = self.state.nbytes()
        if self.stream is not None and self.stream.nbytes:
            sizes["stream"] = self.stream.nbytes
        return sizes

    def rewrite(self, targets: list[ReturnTensor]) -> list[ReturnTensor]:
        kernels = [self._kernel_for(ret.tensor_task) for ret in targets]
        if any(k is not None and k.draws_random for k in kernels) and (
            self.stream is None or None in kernels
        ):
            # Another kernel would draw from torch's generator in between: keep mergekit's
            # kernels for the random tasks, seeded as the merger seeds every candidate.
            kernels = [None if k is not None and k.draws_random else k for k in kernels]
        self._make_room({kind for k in kernels if k is not None for kind in k.kinds})
        self.last_fast_tasks = sum(k is not None for k in kernels)
        draws = sum(k.max_draws() for k in kernels if k is not None and k.draws_random)
        if draws:
            self.stream.reserve(draws)
            self.stream.begin()
        return [
            ret if kernel is None else ReturnTensor.model_construct(
                weight_info=ret.weight_info,
                tensor_task=FastMergeTask.model_construct(merge=ret.tensor_task, kernel=kernel),
                dtype=ret.dtype,
            )
            for ret, kernel in zip(targets, kernels)
        ]

    def _make_room(self, needed: set[str]) -> None:
        """Building a kind not resident yet first frees the kinds this candidate does not use."""
        resident = self.state.built() | ({"stream"} if self.stream and self.stream.nbytes else set())
        if not needed - resident:
            return
        unused = resident - needed
        self.state.drop(unused)
        if "stream" in unused:
            self.stream.clear()

    def _kernel_for(self, task: Task) -> Optional["_FastKernel"]:
        if not isinstance(task, ExecuteMergeMethodTask) or task.base_model is None:
            return None
        method = get_method(task.method_name)
        if isinstance(method, GeneralizedTaskArithmeticMerge):
            kernel_class = _FastTaskArithmetic
        elif method is sce_merge:
            kernel_class = _FastSCE
        else:
            return None
        tensors = self._gathered(task.gather_tensors)
        if not _simple_inputs(task, tensors):
            return None
        kernel = kernel_class(self, method, task, tensors)
        if kernel.draws_random and self._device.type != "cpu":
            return None
        return kernel

    def _gathered(self, gather: Task) -> Optional[dict]:
        """What ``gather`` yields from the resident loads (None if any load is not resident).
        Gather tasks of different plans never compare equal (their maps compare by identity);
        the loads they depend on do."""
        if not isinstance(gather, GatherTensors):
            return None
        loads = gather.arguments()
        if not all(load in self._inputs for load in loads.values()):
            return None
        return gather.execute(**{name: self._inputs[load] for name, load in loads.items()})


def _simple_inputs(task: ExecuteMergeMethodTask, tensors: Optional[dict]) -> bool:
    """Every configured input present, floating point, contiguous, same shape and device, and
    small enough for int32 ranks: the cases where mergekit's adapter calls the kernel directly."""
    if not tensors or any(model not in tensors for model in task.model_order):
        return False
    if task.base_model not in task.model_order:
        return False
    first = tensors[task.model_order[0]]
    return all(
        t.is_floating_point() and t.is_contiguous() and t.shape == first.shape
        and t.device == first.device and t.numel() <= INT32_MAX
        for t in (tensors[m] for m in task.model_order)
    )


class _FastKernel:
    """What ``ExecuteMergeMethodTask.execute`` does for simple inputs, with a fast method."""

    kinds: tuple[str, ...] = ()
    draws_random = False

    def __init__(self, fast: SparsifyingFastPath, method, task: ExecuteMergeMethodTask, tensors: dict):
        self.fast = fast
        self.method = method
        gather = task.gather_tensors
        self.numel = tensors[task.base_model].numel()
        self.non_base = len(task.model_order) - 1
        self.base_key = (task.base_model, gather.weight_info[task.base_model].name)
        self.source_names = {m: gather.weight_info[m].name for m in task.model_order}

    def max_draws(self) -> int:
        return self.numel * self.non_base

    def source_key(self, model, dtype: torch.dtype) -> tuple:
        """Identifies a task vector: the model's source tensor minus the base's, in ``dtype``."""
        return (model, self.source_names[model], *self.base_key, dtype)

    def run(self, task: ExecuteMergeMethodTask, tensors: dict) -> torch.Tensor:
        entries = tuple(
            TensorEntry(id=model, tensor=tensors[model], is_base=model == task.base_model)
            for model in task.model_order
        )
        group = TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(task.output_weight))
        self.method.validate_inputs(
            [entry.id for entry in entries], task.base_model, group_name=task.output_weight.name
        )
        group.validate_tensors()
        parameters = dict(task.parameters.items())
        for parameter in self.method.spec.input_parameters:
            inputs = entries if parameter.scope == ParameterScope.INPUT else group.non_base
            parameters[parameter.name] = PerInputValues(
                [(entry.id, task.input_parameters[entry.id][parameter.name]) for entry in inputs]
            )
        # mergekit's dtype alignment, autocast guard, shape check and out_dtype cast.
        (result,) = _GroupKernel(self)._execute_resolved(
            (group,), [parameters],
            dtype=dtype_from_name(task.dtype), out_dtype=dtype_from_name(task.out_dtype),
        )
        return result

    def merge_group(self, group: TensorGroup, **parameters) -> torch.Tensor:
        raise NotImplementedError


class _GroupKernel(GroupMergeMethod):
    """Lets a fast kernel run inside mergekit's ``GroupMergeMethod._execute``."""

    def __init__(self, kernel: _FastKernel):
        self.spec = kernel.method.spec
        self.kernel = kernel

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        return self.kernel.merge_group(group, **parameters)


class _FastTaskArithmetic(_FastKernel):
    """``GeneralizedTaskArithmeticMerge.merge_group`` with precomputed sparsification state."""

    def __init__(self, fast, method: GeneralizedTaskArithmeticMerge, task, tensors):
        super().__init__(fast, method, task, tensors)
        self.sparsifier = method.sparsification_method
        self.kinds = KINDS_OF_SPARSIFIER[self.sparsifier]
        self.draws_random = self.sparsifier in RANDOM_SPARSIFIERS

    def merge_group(self, group: TensorGroup, **parameters) -> torch.Tensor:
        method = self.method
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        deltas = base.new_empty((len(entries), *base.shape))
        for index, entry in enumerate(entries):
            torch.sub(entry.tensor, base, out=deltas[index])
            if self.sparsifier:
                self._sparsify(deltas[index], entry.id, parameters)

        weights = torch.tensor(
            [parameters["weight"][entry.id] for entry in entries], dtype=deltas.dtype, device=deltas.device
        )
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)

        normalize = parameters["normalize"]
        if method.consensus_method:
            if method.consensus_method != ConsensusMethod.sum:  # "count": mergekit's mask as is
                mask_dtype = torch.int8 if parameters["int8_mask"] else base.dtype
                deltas.mul_(get_mask(deltas, method=method.consensus_method, mask_dtype=mask_dtype))
            else:
                deltas.mul_(_agrees_with_majority(deltas))
            mixed_delta = _sum_entries(deltas)
            if normalize:  # mergekit computes the divisor either way; it is only used here
                # weights * mask: a kept (agreeing, nonzero) delta is exactly a nonzero one now
                divisor = _sum_entries(weights * (deltas != 0))
                divisor.add_(divisor == 0)  # divisor[divisor == 0] = 1
        else:
            mixed_delta = _sum_entries(deltas)
            if normalize:
                divisor = weights.sum(dim=0)
                divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed_delta /= divisor
        if parameters["lambda"] != 1:
            mixed_delta *= parameters["lambda"]
        return (base + mixed_delta).to(base.dtype)

    # ------------------------------------------------------------ sparsification, in place

    def _sparsify(self, delta: torch.Tensor, model, parameters: dict) -> None:
        density = parameters["density"][model]
        rescale = parameters["rescale"]
        if self.sparsifier == SparsificationMethod.magnitude:
            self._magnitude(delta, model, density, rescale)
        elif self.sparsifier == SparsificationMethod.magnitude_outliers:
            self._magnitude_outliers(delta, model, density, rescale, parameters["gamma"][model])
        elif self.sparsifier == SparsificationMethod.random:
            self._bernoulli(delta, model, density, rescale)
        elif self.sparsifier == SparsificationMethod.della_magprune:
            self._della(delta, model, density, rescale, parameters["epsilon"][model])
        else:
            raise NotImplementedError(self.sparsifier)

    def _magnitude(self, delta, model, density: float, rescale: bool) -> None:
        """``mergekit.sparsify.magnitude``: keep the first k of its argsort of |delta|."""
        if density >= 1:
            return
        if density <= 0 or delta.numel() == 0:
            delta.zero_()
            return
        k = max(1, int(density * delta.numel()))
        key = self.source_key(model, delta.dtype)
        rank = self.fast.state.get("rank_desc", key, lambda: _rank_of(_argsort_magnitude(delta, descending=True)))
        self._mask_and_rescale(delta, (rank < k).view(delta.shape), rescale, key)

    def _magnitude_outliers(self, delta, model, density: float, rescale: bool, gamma: float) -> None:
        """``mergekit.sparsify.magnitude_outliers``: a window of its ascending sort of |delta|."""
        if density >= 1:
            return
        num_elems = delta.numel()
        target_n = int(density * num_elems)
        n_top = int(gamma * num_elems)
        n_bot = max(0, num_elems - target_n - n_top)
        start, stop, _ = slice(n_bot, n_bot + target_n).indices(num_elems)  # python slice rules
        key = self.source_key(model, delta.dtype)
        rank = self.fast.state.get("rank_asc", key, lambda: _rank_of(_argsort_magnitude(delta, descending=False)))
        keep = (rank >= start) & (rank < stop) if start < stop else torch.zeros_like(rank, dtype=torch.bool)
        self._mask_and_rescale(delta, keep.view(delta.shape), rescale, key)

    def _bernoulli(self, delta, model, density: float, rescale: bool) -> None:
        """``mergekit.sparsify.bernoulli`` on CPU: keep iff the next uniform draw is < density
        (density as ``full_like`` stores it, in the work dtype)."""
        if density >= 1:
            return
        work_dtype = _cpu_work_dtype(delta)
        p = torch.full((1,), density, dtype=work_dtype).item()
        if not 0 <= p <= 1:
            raise RuntimeError(f"bernoulli: expected 0 <= p <= 1, got density {density}")
        keep = self.fast.stream.take(delta.numel()).view(delta.shape) < p
        self._mask_and_rescale(delta, keep, rescale, self.source_key(model, work_dtype))

    def _della(self, delta, model, density: float, rescale: bool, epsilon: float) -> None:
        """``mergekit.sparsify.della_magprune``: per-row rank-scaled keep probabilities."""
        if density >= 1:
            return
        if density <= 0:
            delta.zero_()
            return
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
        work_dtype = _cpu_work_dtype(delta)
        key = self.source_key(model, work_dtype)
        rank_norm_x2 = self.fast.state.get("della_rank", key, lambda: _della_rank_norm_x2(delta, work_dtype))
        probs = (density - epsilon) + rank_norm_x2 * epsilon  # mergekit: rank_norm * 2 * epsilon
        low, high = torch.aminmax(probs)
        if not (bool(low >= 0) and bool(high <= 1)):  # torch.bernoulli refuses these
            raise RuntimeError("bernoulli: expected 0 <= p <= 1 (della probabilities out of range)")
        keep = self.fast.stream.take(probs.numel()).view(probs.shape) < probs
        self._mask_and_rescale(delta, keep.view(delta.shape), rescale, key)

    def _mask_and_rescale(self, delta: torch.Tensor, keep: torch.Tensor, rescale: bool, key: tuple) -> None:
        """``rescaled_masked_tensor(delta, keep, l1 or None)`` written back into ``delta``.

        ``key`` names the task vector in the work dtype the kernel computes in; the l1 norm of
        the unmasked task vector is computed once (keyed by torch's thread count too, since a
        parallel sum's rounding depends on how it is split)."""
        work = delta if delta.dtype == key[-1] else delta.to(key[-1])
        before = None
        if rescale:
            before = self.fast.state.get("l1", (*key, torch.get_num_threads()), lambda: work.abs().sum())
        work.mul_(keep)  # x * True = x, x * False = +-0: what multiplying by a 1/0 mask gives
        if rescale:
            after = work.abs().sum()
            if not (before < RESCALE_EPS or after < RESCALE_EPS):
                work.mul_(before / after)
        if work is not delta:
            delta.copy_(work)


class _FastSCE(_FastKernel):
    """``mergekit.merge_methods.sce.sce_merge`` with the variance order precomputed."""

    kinds = ("sce_order",)

    def merge_group(self, group: TensorGroup, int8_mask: bool = False, select_topk: float = 1.0) -> torch.Tensor:
        tensors = [entry.tensor for entry in group.non_base]
        base_tensor = group.base.tensor
        if not tensors:
            return base_tensor
        mask_dtype = torch.int8 if int8_mask else base_tensor.dtype
        task_vectors = torch.stack([t - base_tensor for t in tensors], dim=0)
        if select_topk < 1:
            mask = self._topk_mask(task_vectors, select_topk, mask_dtype, group)
            task_vectors = task_vectors * mask.unsqueeze(0)
        erase_mask = get_mask(task_vectors, method="sum", mask_dtype=mask_dtype)
        tv_weights = sce_weight(task_vectors)
        while tv_weights.dim() < task_vectors.dim():
            tv_weights = tv_weights.unsqueeze(-1)
        erased_weights = tv_weights * erase_mask
        merged_tv = (task_vectors * erased_weights).sum(dim=0)
        final_tv = merged_tv / torch.sum(erased_weights, dim=0).clamp(min=1e-6)
        return base_tensor + final_tv

    def _topk_mask(self, tvs: torch.Tensor, density: float, mask_dtype, group: TensorGroup) -> torch.Tensor:
        if density <= 0:
            return sce_mask(tvs, density, mask_dtype)
        models = tuple(entry.id for entry in group.non_base)
        key = (models, tuple(self.source_names[m] for m in models), *self.base_key, tvs.dtype)
        nonzero, rank, sorted_magnitude = self.fast.state.get("sce_order", key, lambda: _sce_order(tvs))
        k = int(nonzero * density)  # as sce_mask computes it (a 0-d tensor times a float)
        boundary_tied = 0 < k < rank.numel() and not bool(sorted_magnitude[k - 1] > sorted_magnitude[k])
        if k == 0 or boundary_tied:
            return sce_mask(tvs, density, mask_dtype)  # topk decides among equal variances
        return (rank < k).view(tvs.shape[1:]).to(mask_dtype)


# ---------------------------------------------------------------- exact rewrites of mergekit steps


def _sum_entries(stacked: torch.Tensor) -> torch.Tensor:
    """``stacked.sum(dim=0)``, bit for bit, in fewer passes when there are two entries.

    torch reduces dim 0 by adding the rows, in order, to a +0 accumulator of the accumulate
    type (float32 for bf16/fp16) and rounding once at the end; for two rows that is exactly
    ``(a + b) + 0`` in any dtype: the half-precision add also rounds float32(a) + float32(b)
    once, and the trailing ``+ 0`` turns a -0 into the +0 the accumulator gives.
    (``tests/test_merge_fastpath.py::test_sum_entries_is_torch_sum`` checks this.)
    """
    if stacked.shape[0] != 2:
        return stacked.sum(dim=0)
    total = stacked[0] + stacked[1]
    return total.add_(0.0)


def _agrees_with_majority(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' sign consensus as a keep-mask, up to zeros: ``get_mask(deltas, "sum")`` keeps d iff
    sign(d) equals the sign of the column sum (>= 0 counting as +). Here d is kept iff its sign
    bit differs from "column sum >= 0", which agrees on every nonzero d. For d = +-0 the two may
    differ, but a zero contributes nothing: the masked deltas are only summed (by a sum that
    starts from +0, so a zero's sign never shows) and counted where nonzero."""
    column_sum = deltas[0] + deltas[1] if deltas.shape[0] == 2 else deltas.sum(dim=0)  # sign only
    return torch.signbit(deltas) ^ (column_sum >= 0)


# ---------------------------------------------------------------- precomputation (exact replicas)


def _cpu_work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype mergekit's random sparsifiers compute in on CPU."""
    return tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32


def _argsort_magnitude(delta: torch.Tensor, descending: bool) -> torch.Tensor:
    """The exact call mergekit's magnitude sparsifiers make (their order of equal magnitudes
    is whatever this call returns, so it must be this call on this tensor)."""
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    if descending:
        return torch.argsort(w, descending=True)  # sparsify.magnitude
    return torch.sort(w, descending=False).indices  # sparsify.magnitude_outliers


def _rank_of(order: torch.Tensor) -> torch.Tensor:
    """Position of each element in ``order`` (its inverse permutation), as int32."""
    rank = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
    rank[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
    return rank


def _della_rank_norm_x2(delta: torch.Tensor, work_dtype: torch.dtype) -> torch.Tensor:
    """``2 * rank_norm`` exactly as ``della_magprune`` computes it."""
    tensor = delta.unsqueeze(0) if delta.dim() < 2 else delta
    magnitudes = tensor.abs()
    sorted_indices = torch.argsort(magnitudes, dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(work_dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    return rank_norm * 2


def _sce_order(tvs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sce_mask's candidate-independent part: nonzero count, rank by |variance| (descending) and
    the sorted magnitudes (to see whether the k-th and (k+1)-th are equal)."""
    var = torch.var(tvs, dim=0, unbiased=False)
    nonzero = torch.count_nonzero(var)
    magnitude = var.abs().view(-1)
    order = torch.argsort(magnitude, descending=True)
    return nonzero, _rank_of(order), magnitude[order]
