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
  when the k-th and (k+1)-th variances differ, and ``torch.topk`` on the stored variances
  otherwise (which of several equal values topk keeps is its own business, so ties at the
  boundary go to it; on CPU unsorted, which keeps the same set); the per-model weights (a mean
  over the whole masked tensor) are computed once when there is no mask.

Everything else (task-vector arithmetic, rescaling, sign consensus, normalisation, lambda, dtype
casts) is mergekit's own sequence of torch operations, replicated op for op, or mergekit's
helpers called directly; masks are applied as integer bit operations (an and with all-ones /
all-zeros words), which give the same values as mergekit's multiplication by a 1/0 mask up to
the sign of a zero, which never reaches the result. All of it is elementwise (sums run over
the entries of one element), so it runs in chunks of ``CHUNK_ELEMENTS`` whose temporaries stay
in cache and are reused from tensor to tensor and candidate to candidate (no allocation, no page
faults), and the result is written straight into the model's parameter. ``linear`` runs the same
way (mergekit's accumulate / divide / cast per chunk). Each chunk is summed as it is written,
so the merger's NaN/inf check needs no second read of the output. On an accelerator a chunk is
a whole tensor, or 64M elements (``ACCELERATOR_CHUNK_ELEMENTS``). On a CPU with a C compiler,
``fused.py``'s kernels do the same arithmetic in one pass per element instead of one per
operation: linear, the task-arithmetic family after sparsification (up to 4 experts, float32 or
bfloat16, sum or no consensus), the masked vectors of a rescaled entry whose mask is a rank
or draw range, and SCE's merge pass after its top-k mask; SCE's mask and weights, DELLA's
probabilities and the rest keep the chunked operations. Where the
fused kernels run a keyed sparsifier (ties, breadcrumbs, dare), the task vectors themselves
(``source - base`` in the dtype) are stored once where memory allows (optional state: without
it the kernels read source and base), so a candidate does no subtraction: DARE's phase one
writes only the kept magnitudes (what the l1 rescale sums) and phase two takes the masked
values from the task vectors' signs and those magnitudes; in bfloat16 phase one writes nothing:
the kept magnitudes' sums per torch thread chunk come from a table per task vector and place in the
draws (``_L1Tables``, every density from 2**-10 up) or from ``fused.masked_l1``, ``l1_sum.py``
works out torch's bfloat16 sum from those (or, for a few in a hundred, leaves it to torch), and
phase two masks by the keys itself. When every
tensor of a candidate takes the fast path, the merger runs the kernels directly, in the order
mergekit's Executor would (learnt once per recipe structure), with no task graph per candidate;
a re-planned candidate (``replan.py``) reuses the last one's kernels and checked input groups, and
its linear tensors written into the model are queued and run as one batch of the fused kernel
(one call per thread for all of them: ~100 tensors of a 100M model are otherwise ~100 calls,
thread hand-offs and Python in between, a third of a linear candidate). Its task-arithmetic tensors run
the same way in two batches (phase one of every rescaled entry, the l1 sums, phase two of every
tensor; ``fused.TaskArithmeticBatch``), and tensors too small for the fused kernels join a batch
that a larger tensor started.
``tests/test_merge_fastpath.py`` checks bitwise equality against mergekit's kernels and against
``run_merge`` (the fused kernels, and the chunked operations with many small chunks), at two
torch threads, and on CUDA where there is a GPU; ``tests/test_merge_fused.py`` checks the fused
kernels against mergekit's torch arithmetic, edge values included.

State kept, per non-base source tensor, as a multiple of that source's bytes (bf16 sources / fp32):

=====================================  =================  =============
kind (methods)                         bf16 sources       fp32 sources
=====================================  =================  =============
rank (ties, breadcrumbs[_ties])        2x (int32)         1x
uniform stream (dare_*)                1x (int16 halves)  1x
uniform stream (della*)                2x (float32)       1x
della rank (della, della_linear)       1x (+ stream)      1x (+ stream)
sce order (per tensor, not per model)  4x / n_models      3x / n_models   (on CUDA 3x / 2x)
task vector (optional; ties, dare_*)   1x                 1x
=====================================  =================  =============

plus a few bytes per tensor (l1 norms). Nothing is stored for task_arithmetic. Scratch reused by
every candidate: a few chunks (about 12 bytes x entries x ``CHUNK_ELEMENTS``, ~12 MB), and for
a rescaled method (dare_*, della*, or ``rescale: true``) the masked task vectors of the largest
tensor, (entries + 1) x its size in the work dtype (0.4 GB for a 1B Llama's embedding, bf16,
2 experts), and a phase-one arena of up to 256 MB (``PHASE_ONE_ARENA_BYTES``) for the batched
task-arithmetic tensors. State is built
when a candidate first needs it, and building a kind frees the kinds that candidate does not
use, so at most one method's state is resident: for a 1B-parameter family of base + 2 experts
in bf16 (6 GB of sources) the largest, DELLA's, is 12 GB. A method whose state would not fit
(``max_state_bytes``, by default 80% of the device's free memory) keeps mergekit's kernels;
optional state that would not fit on top of the needed state is left out (a 1B family in bf16
on 24 GB keeps the ranks or draws, not the task vectors).

Random methods take the fast path only on CPU (CUDA's Philox-based bernoulli is not reproduced)
and only with a seeded merger, and only when every merge task of the candidate takes it (so no
other kernel consumes torch's generator in between). Inputs must be finite for bitwise equality
(a NaN or inf source can differ in which NaN comes out; such candidates are rejected anyway).
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from mergekit.common import dtype_from_name
from mergekit.graph import Task
from mergekit.io.tasks import GatherTensors, ReturnTensor
from mergekit.merge_methods import get as get_method
from mergekit.merge_methods.base import (
    BatchOptions,
    GroupMergeMethod,
    ParameterScope,
    PerInputValues,
    TensorEntry,
    TensorGroup,
    TensorMetadata,
)
from mergekit.merge_methods.batching import prepare_batches
from mergekit.merge_methods.dtype import promoted_dtype
from mergekit.merge_methods.generalized_task_arithmetic import (
    ConsensusMethod,
    GeneralizedTaskArithmeticMerge,
    get_mask,
)
from mergekit.merge_methods.sce import sce_merge
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.sparsify import SparsificationMethod

from mergekit_evolve.merge import fused, l1_sum

__all__ = ["SparsifyingFastPath", "FastMergeTask"]

_log = logging.getLogger(__name__)
RANDOM_SPARSIFIERS = (SparsificationMethod.random, SparsificationMethod.della_magprune)
# Sparsifiers whose mask is a range of per-element keys: the fused kernels can read a stored
# task vector instead of source and base.
KEYED_SPARSIFIERS = (
    SparsificationMethod.magnitude,
    SparsificationMethod.magnitude_outliers,
    SparsificationMethod.random,
)
KINDS_OF_SPARSIFIER = {
    None: (),
    SparsificationMethod.magnitude: ("rank_desc", "l1"),
    SparsificationMethod.magnitude_outliers: ("rank_asc", "l1"),
    SparsificationMethod.random: ("stream", "l1"),
    SparsificationMethod.della_magprune: ("della_rank", "stream", "l1"),
}
RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor's default eps
INT32_MAX = 2**31 - 1
# Elements per chunk of the elementwise passes: a chunk's temporaries (a few bytes per element
# per entry) stay in a core's cache. A multiple of 64, so that every chunk but a tensor's last
# runs torch's vectorised loops to the end, as one whole-tensor call does.
CHUNK_ELEMENTS = 1 << 18
# On an accelerator a chunk is one kernel launch per op, not a cache's worth: chunks this large
# keep launch overhead small (a 7B model's largest tensor, its embedding, is ~131M elements) while
# the scratch stays a few hundred MB.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26
# Tensors from this size on run the fused C kernels on CPU (fused.py), where they are built.
FUSED_MIN_ELEMENTS = 1 << 16
# Phase-one buffers queued for one task-arithmetic batch (the batch runs when they would exceed
# this, or the largest tensor's need). Each batch costs two thread hand-offs, slow on a busy
# core (torch's OpenMP threads spin a while after each sum): at 37M params in bf16 (150 MB of
# magnitudes) one batch of 256 MB beat three of 64 MB by ~5% and ten of 16 MB by ~35%. Pages are
# touched only as far as they are used.
PHASE_ONE_ARENA_BYTES = 256 << 20
# bfloat16 DARE's l1 sums for densities from 2**-10 up are looked up (_L1Tables): the uint16 keys
# from this one (the bfloat16 bits of 2**-10) up, ~10 KB per entry, torch chunk and table.
L1_TABLE_FIRST_KEY = 0x3A80
_BITS_OF = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_INT32_SIGN_SHIFT = torch.tensor(31, dtype=torch.int32)


class UniformStream:
    """The uniforms torch's CPU generator yields after ``manual_seed(seed)``, made once.

    ``torch.bernoulli(p)`` on CPU draws one ``uniform_real_distribution<float>`` value per element
    (24 random bits) and returns ``u < p``; ``torch.rand`` draws the same values from the same
    generator state. ``begin()`` rewinds the cursor for a candidate; ``take(n)`` hands out the
    next n draws, as the next ``bernoulli`` call of a mergekit merge would consume them: float32
    values, or with ``high_halves`` the high 16 bits of each one's bits (int16, half the memory).
    Those decide ``u < p`` exactly where p is a bfloat16 value (DARE in bfloat16 draws against
    ``full_like(delta, density)`` in bfloat16): p's low 16 bits are zero, so for floats >= 0,
    ``bits(u) < bits(p)`` exactly when ``bits(u) >> 16 < bits(p) >> 16``.
    """

    GENERATE_ELEMENTS = 1 << 22  # draws made at a time (a float32 block, then its high halves)

    def __init__(self, seed: int):
        self.seed = seed
        self.high_halves = False
        self.clear()

    def clear(self) -> None:
        """Forget the draws made so far (the next ``reserve`` regenerates them)."""
        self._generator = torch.Generator().manual_seed(self.seed)
        self._values = torch.empty(0, dtype=torch.int16 if self.high_halves else torch.float32)
        self._cursor = 0

    @property
    def nbytes(self) -> int:
        return self._values.numel() * self._values.element_size()

    def reserve(self, count: int, high_halves: bool = False) -> None:
        """At least ``count`` draws, kept as float32 or as their ``high_halves``: a change of
        form starts the stream again (it is made in order, so it cannot be converted back)."""
        if high_halves != self.high_halves:
            self.high_halves = high_halves
            self.clear()
        missing = count - self._values.numel()
        if missing > 0:  # continue the same stream: the generator is where the last draw left it
            more = torch.cat([self._generate(n) for n in _block_sizes(missing, self.GENERATE_ELEMENTS)])
            self._values = more if not self._values.numel() else torch.cat([self._values, more])

    def _generate(self, count: int) -> torch.Tensor:
        draws = torch.rand(count, generator=self._generator)
        if not self.high_halves:
            return draws
        return draws.view(torch.int32).bitwise_right_shift_(16).to(torch.int16)  # 0 <= u < 1: 0..0x3f7f

    def begin(self) -> None:
        self._cursor = 0

    def take(self, count: int) -> torch.Tensor:
        self.reserve(self._cursor + count, self.high_halves)
        draws = self._values[self._cursor : self._cursor + count]
        self._cursor += count
        return draws


class Scratch:
    """Scratch tensors reused by every tensor of every candidate, so a candidate allocates (and
    page-faults) nothing: ``take(role, numel, dtype)`` is the first ``numel`` elements of that
    role's buffer, which grows to the largest request. Chunk-sized roles hold a few chunks;
    the rescaled methods' full-size roles (masked vectors, their magnitudes) hold one tensor
    per non-base entry plus one, in the work dtype, sized by the largest tensor."""

    def __init__(self, device: torch.device):
        self._device = device
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, role: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        key = (role, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # free the smaller one first
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=self._device)
        return buffer[:numel]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(buffer) for buffer in self._buffers.values())


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


def _free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, else the system's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux: accelerate (a mergekit dependency) brings it

    return psutil.virtual_memory().available


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, _L1Tables):
        return value.nbytes
    return 0


class _FiniteTotal:
    """Sum of a kernel's output, chunk by chunk while each chunk is still in cache, for the
    merger's NaN/inf check (which would otherwise read the whole output again): a finite sum
    proves every element finite; a sum that is not (NaN, inf, or an overflow of finite values)
    leaves the exact check to the merger."""

    def __init__(self, out: torch.Tensor):
        self.out = out
        accumulate = torch.float64 if out.dtype == torch.float64 else torch.float32
        self.total = torch.zeros((), dtype=accumulate, device=out.device)

    def add(self, chunk: torch.Tensor) -> None:
        self.total.add_(chunk.sum(dtype=self.total.dtype))

    def vouch(self, fast: SparsifyingFastPath) -> torch.Tensor:
        return _vouch(fast, self.out, bool(torch.isfinite(self.total)))


def _vouch(fast: SparsifyingFastPath, out: torch.Tensor, finite: bool) -> torch.Tensor:
    """Tells the merger that ``out``, just written by a fast kernel, is known finite (or not)."""
    if finite:
        fast.finite_outputs.add(out.data_ptr())
    return out


class FastMergeTask(Task[torch.Tensor | None]):
    """Stands in for one ``ExecuteMergeMethodTask``: same arguments, label and priority (so
    mergekit's Executor schedules it exactly where it schedules the original), fast kernel."""

    merge: ExecuteMergeMethodTask
    kernel: Any  # a _FastKernel; compared and hashed by identity

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
    """Rewrites a candidate's planned merge tasks onto precomputed-state kernels where exact.

    ``inputs``: the merger's resident input values (task -> value), ``random_seed``: the seed
    every candidate runs with (``None``: random methods keep mergekit's kernels).
    ``max_state_bytes``: the most precomputed state to hold; by default what fits in 80% of
    the device's free memory (plus the state this candidate would drop) when a method's state
    is first built. A method whose state does not fit keeps mergekit's kernels (a warning says
    so once), so a 7B TIES search on a GPU without room for its ranks runs, only slower.
    """

    def __init__(self, inputs: dict, device: torch.device, random_seed: int | None, max_state_bytes: int | None = None):
        self._inputs = inputs
        self._device = device
        self.max_state_bytes = max_state_bytes
        self.refused: set[str] = set()  # kinds of state found too large (warned once each)
        self.state = SourceState()
        self.scratch = Scratch(device)
        self.stream = UniformStream(random_seed) if random_seed is not None else None
        self.last_fast_tasks = 0  # tensors of the last rewritten candidate on fast kernels
        self.finite_outputs: set[int] = set()  # data_ptr of outputs whose chunk sums were finite
        self._negative_zeros: dict[tuple, bool] = {}
        self._batching = False  # ``execute`` is running: kernels may queue their work
        self._batch: fused.LinearBatch | None = None
        self._task_batch: fused.TaskArithmeticBatch | None = None
        self._arena: torch.Tensor | None = None  # phase-one buffers of the queued task-arithmetic merges
        self._arena_used = 0  # bytes of it they hold
        self._arena_bytes = 0  # its size (made by the first buffer taken)
        # id(gather task) -> (gather task, merge task, kernel or None) of the last candidate
        self._kernels: dict[int, tuple] = {}
        self._next_kernels: dict[int, tuple] = {}

    def base_has_negative_zero(self, key: tuple, base: torch.Tensor) -> bool:
        """Whether a base tensor holds a -0.0 (found once per tensor and dtype; a few bits)."""
        key = (*key, base.dtype)
        if key not in self._negative_zeros:
            self._negative_zeros[key] = _has_negative_zero(base)
        return self._negative_zeros[key]

    def known_finite(self, value: torch.Tensor) -> bool:
        """True if a fast kernel of this candidate wrote ``value`` and saw it finite."""
        return value.data_ptr() in self.finite_outputs

    def nbytes(self) -> dict[str, int]:
        """Bytes of precomputed state per kind (the uniform stream as ``stream``; the reused
        scratch buffers as ``scratch``)."""
        sizes = self.state.nbytes()
        if self.stream is not None and self.stream.nbytes:
            sizes["stream"] = self.stream.nbytes
        if self.scratch.nbytes:
            sizes["scratch"] = self.scratch.nbytes
        return sizes

    def rewrite(self, targets: list[ReturnTensor], destinations: dict | None = None) -> list[ReturnTensor]:
        """``destinations``: output name -> the tensor (model parameter) the result ends up in;
        a fast kernel writes straight into it when dtype and shape match."""
        self.finite_outputs.clear()
        kernels = [self._kernel_for(ret.tensor_task) for ret in targets]
        self._kernels, self._next_kernels = self._next_kernels, {}  # keep this candidate's only
        for ret, kernel in zip(targets, kernels):
            if kernel is not None:  # (a kernel reused from the last candidate had one too)
                kernel.destination = destinations.get(ret.weight_info.name) if destinations else None
        kernels = self._within_budget(kernels)
        if any(k is not None and k.draws_random for k in kernels) and (self.stream is None or None in kernels):
            # Another kernel would draw from torch's generator in between: keep mergekit's
            # kernels for the random tasks, seeded as the merger seeds every candidate.
            kernels = [None if k is not None and k.draws_random else k for k in kernels]
        self._make_room({kind for k in kernels if k is not None for kind in k.kinds_in_use})
        self.last_fast_tasks = sum(k is not None for k in kernels)
        random = [k for k in kernels if k is not None and k.draws_random]
        if random:
            self.stream.reserve(sum(k.max_draws() for k in random), all(k.high_halves_suffice for k in random))
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

    def execute(self, targets: list[ReturnTensor]) -> Iterator[tuple[ReturnTensor, Any]]:
        """``(target, value)`` for targets that all run on fast kernels, in this order (the
        schedule's: random kernels take their draws in it). Linear kernels writing straight
        into the model are queued and run as one batch of the fused kernels before any value
        is handed out (nothing reads those outputs before). Lazy: runs on the first ``next``."""
        self._batching, self._batch, self._task_batch = True, None, None
        self._arena, self._arena_used, self._arena_bytes = None, 0, 0
        try:
            values = [ret.tensor_task.execute_resident() for ret in targets]
            for batch in (self._batch, self._task_batch):
                if batch is not None:
                    batch.run()
        finally:
            self._batching, self._batch, self._task_batch, self._arena = False, None, None, None
        for ret, value in zip(targets, values):
            yield ret, ret.execute(tensor=value)

    def linear_batch(self) -> fused.LinearBatch | None:
        """The batch linear kernels queue into while ``execute`` runs (None otherwise); made by
        the first kernel that uses it (so models too small for the fused kernels never build
        their library)."""
        if self._batching and self._batch is None:
            self._batch = fused.LinearBatch()
        return self._batch

    def batch_started(self, kind: str) -> bool:
        """Whether a larger tensor of this candidate has started the ``linear`` or
        ``task_arithmetic`` batch (a smaller one may then join it)."""
        return self._batching and (self._batch if kind == "linear" else self._task_batch) is not None

    def task_arithmetic_batch(self, phase_one_bytes: int) -> fused.TaskArithmeticBatch | None:
        """The batch task-arithmetic kernels queue into while ``execute`` runs (None otherwise),
        with room for ``phase_one_bytes`` more of phase-one buffers (``phase_one_buffer``): where
        the arena is full, what is queued runs first. (The arena itself is made by the first
        buffer taken from it: bfloat16 DARE never takes one.)"""
        if not self._batching:
            return None
        if self._task_batch is None:
            self._task_batch = fused.TaskArithmeticBatch()
        if self._arena_used + phase_one_bytes > self._arena_bytes:
            if self._arena_used:
                self._task_batch.run()
                self._arena_used = 0
            self._arena_bytes = max(PHASE_ONE_ARENA_BYTES, phase_one_bytes)
            self._arena = None
        return self._task_batch

    def phase_one_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The next slice of the phase-one arena, for a magnitudes buffer queued in the
        task-arithmetic batch (room reserved with ``task_arithmetic_batch``)."""
        if self._arena is None:  # (nothing queued holds the scratch buffer: the batch ran)
            self._arena = self.scratch.take("phase_one", self._arena_bytes, torch.uint8)
        start, nbytes = self._arena_used, numel * dtype.itemsize
        self._arena_used += arena_bytes(numel, dtype)
        if self._arena_used > self._arena.numel():
            raise RuntimeError("phase-one arena overrun: the batch reserved too little room")
        return self._arena[start : start + nbytes].view(dtype)

    def _within_budget(self, kernels: list) -> list:
        """The kernels, less those needing state that is not resident and would not fit; then
        the optional state on top where it fits (kernels run without it where it does not)."""
        refused = self._unaffordable([k for k in kernels if k is not None], optional=False)
        kernels = [None if k is not None and refused & set(k.kinds) else k for k in kernels]
        live = [k for k in kernels if k is not None]
        for k in live:
            k.use_optional = True
        skipped = self._unaffordable(live, optional=True)
        for k in live:
            k.use_optional = not skipped & set(k.optional_kinds)
        return kernels

    def _unaffordable(self, kernels: list, optional: bool) -> set[str]:
        """Kinds of state these kernels need (``optional``: also their optional kinds) that are
        not resident and would not fit beside what stays (warned once each); with ``optional``
        only optional kinds are refused (the needed ones passed the first round)."""
        kinds_of = (lambda k: k.kinds_in_use) if optional else (lambda k: k.kinds)
        resident = self._resident_kinds()
        needed = {kind for k in kernels for kind in kinds_of(k)}
        new = {kind: sum(k.state_bytes(kind) for k in kernels if kind in kinds_of(k)) for kind in needed - resident}
        if not sum(new.values()):
            return set()
        held = self.state.nbytes() | ({"stream": self.stream.nbytes} if self.stream is not None else {})
        kept = sum(n for kind, n in held.items() if kind in needed)
        if self.max_state_bytes is not None:
            room = self.max_state_bytes - kept
        else:
            room = 0.8 * (_free_bytes(self._device) + sum(held.values()) - kept)
        if sum(new.values()) <= room:
            return set()
        refused = {kind for k in kernels for kind in k.optional_kinds if kind in new} if optional else set(new)
        for kind in sorted(refused - self.refused):
            _log.warning(
                "merge fast path: %s state for this recipe needs %.2f GB, %.2f GB available on %s: %s",
                kind,
                new[kind] / 1e9,
                max(room, 0) / 1e9,
                self._device,
                "these tensors run without it (same results, a little slower)"
                if optional
                else "mergekit's own kernels run these tensors (same results, slower)",
            )
        self.refused |= refused
        return refused

    def _resident_kinds(self) -> set[str]:
        return self.state.built() | ({"stream"} if self.stream and self.stream.nbytes else set())

    def _make_room(self, needed: set[str]) -> None:
        """Building a kind not resident yet first frees the kinds this candidate does not use."""
        resident = self._resident_kinds()
        if not needed - resident:
            return
        unused = resident - needed
        self.state.drop(unused)
        if "stream" in unused:
            self.stream.clear()

    def _kernel_for(self, task: Task) -> _FastKernel | None:
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

    def _new_kernel(self, task: ExecuteMergeMethodTask) -> _FastKernel | None:
        method = get_method(task.method_name)
        if method is get_method("linear"):
            kernel_class = _FastLinear
        elif task.base_model is None:
            return None
        elif isinstance(method, GeneralizedTaskArithmeticMerge):
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

    def _gathered(self, gather: Task) -> dict | None:
        """What ``gather`` yields from the resident loads (None if any load is not resident).
        Gather tasks of different plans never compare equal (their maps compare by identity);
        the loads they depend on do."""
        if not isinstance(gather, GatherTensors):
            return None
        loads = gather.arguments()
        if not all(load in self._inputs for load in loads.values()):
            return None
        return gather.execute(**{name: self._inputs[load] for name, load in loads.items()})


def _has_dtype(group: TensorGroup, dtype: torch.dtype) -> bool:
    return all(entry.tensor.dtype == dtype for entry in group.entries)


def _bound_parameters(spec, task: ExecuteMergeMethodTask, group: TensorGroup) -> dict:
    """The task's resolved parameters bound to the group's entries, as the adapter binds them
    (per-input values for every entry, or for the non-base ones, in entry order)."""
    parameters = dict(task.parameters.items())
    if not spec.input_parameters:
        return parameters
    # the entries' ids are the task's own model objects: find their values by identity
    # (a ModelReference hashes all its fields on every lookup)
    by_identity = {id(model): values for model, values in task.input_parameters.items()}
    values_of = [by_identity.get(id(entry.id)) or task.input_parameters[entry.id] for entry in group.entries]
    for parameter in spec.input_parameters:
        scope = [
            (entry.id, values[parameter.name])
            for entry, values in zip(group.entries, values_of)
            if parameter.scope == ParameterScope.INPUT or not entry.is_base
        ]
        parameters[parameter.name] = PerInputValues(scope)
    return parameters


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
    """Every configured input present, floating point, contiguous, same shape and device, and
    small enough for int32 ranks: the cases where mergekit's adapter calls the kernel directly."""
    if not tensors or any(model not in tensors for model in task.model_order):
        return False
    if task.base_model is not None and task.base_model not in task.model_order:
        return False
    first = tensors[task.model_order[0]]
    return all(
        t.is_floating_point()
        and t.is_contiguous()
        and t.shape == first.shape
        and t.device == first.device
        and t.numel() <= INT32_MAX
        for t in (tensors[m] for m in task.model_order)
    )


class _FastKernel:
    """What ``ExecuteMergeMethodTask.execute`` does for simple inputs, with a fast method."""

    kinds: tuple[str, ...] = ()  # state it needs
    optional_kinds: tuple[str, ...] = ()  # state that speeds it up where memory allows
    draws_random = False
    high_halves_suffice = False  # its draws are compared with bfloat16 values only (UniformStream)

    def __init__(self, fast: SparsifyingFastPath, method, task: ExecuteMergeMethodTask, tensors: dict):
        self.fast = fast
        self.method = method
        gather = task.gather_tensors
        self.tensors = tensors  # what the gather task yields: views of the resident sources
        self.numel = tensors[task.model_order[0]].numel()
        self.element_size = tensors[task.model_order[0]].element_size()
        self.on_cpu = tensors[task.model_order[0]].device.type == "cpu"
        self.non_base = len(task.model_order) - (task.base_model is not None)
        # state keys name models by their string (a pydantic model hashes its fields on every lookup)
        self.base_key = (str(task.base_model), gather.weight_info[task.base_model].name) if task.base_model else ()
        self.source_names = {m: gather.weight_info[m].name for m in task.model_order}
        self.destination: torch.Tensor | None = None  # set by rewrite: where the result goes
        self.use_optional = True  # cleared by rewrite when the optional state does not fit
        self._group: TensorGroup | None = None  # the checked group of the resident tensors
        self._group_aligned = False  # its inputs all have the work dtype already
        self.may_defer = False  # the resident group's result is not read before the merger stores it

    @property
    def kinds_in_use(self) -> tuple[str, ...]:
        return self.kinds + (self.optional_kinds if self.use_optional else ())

    def max_draws(self) -> int:
        return self.numel * self.non_base

    def state_bytes(self, kind: str) -> int:
        """Bytes of ``kind`` state this tensor needs (0: none, or too small to count)."""
        return 0

    def source_key(self, model, dtype: torch.dtype) -> tuple:
        """Identifies a task vector: the model's source tensor minus the base's, in ``dtype``."""
        return (str(model), self.source_names[model], *self.base_key, dtype)

    def run(self, task: ExecuteMergeMethodTask, tensors: dict) -> torch.Tensor:
        """What ``ExecuteMergeMethodTask.execute`` does for these inputs, this kernel as method.

        On the resident tensors (``execute_resident``) the group is built and checked once: a
        kernel serves copies of one task only (``_same_inputs``), whose entries, order and
        checks do not depend on parameter values."""
        resident = tensors is self.tensors
        group = self._group if resident else None
        out_dtype = dtype_from_name(task.out_dtype)
        if group is None:
            group = self._checked_group(task, tensors)
            if resident:
                self._group = group
                self._group_aligned = _has_dtype(group, dtype_from_name(task.dtype) or promoted_dtype(group))
                # a result may be left to a batch only where nothing here reads it (no cast)
                self.may_defer = self._group_aligned and (out_dtype is None or _has_dtype(group, out_dtype))
        parameters = _bound_parameters(self.method.spec, task, group)
        if resident and self._group_aligned:
            return self._execute_aligned(group, parameters, out_dtype)
        # mergekit's dtype alignment, autocast guard, shape check and out_dtype cast.
        (result,) = _GroupKernel(self)._execute_resolved(
            (group,), [parameters], dtype=dtype_from_name(task.dtype), out_dtype=out_dtype
        )
        return result

    def _checked_group(self, task: ExecuteMergeMethodTask, tensors: dict) -> TensorGroup:
        entries = tuple(
            TensorEntry(id=model, tensor=tensors[model], is_base=model == task.base_model) for model in task.model_order
        )
        group = TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(task.output_weight))
        self.method.validate_inputs(
            [entry.id for entry in entries], task.base_model, group_name=task.output_weight.name
        )
        group.validate_tensors()
        return group

    def _execute_aligned(self, group: TensorGroup, parameters: dict, out_dtype: torch.dtype | None) -> torch.Tensor:
        """``GroupMergeMethod._execute`` for one group whose inputs all have the work dtype
        already (its ``align_dtype`` would hand back the same tensors): autocast guard, the
        kernel, shape check, out_dtype cast."""
        like = group.entries[0].tensor
        if torch.is_autocast_enabled(like.device.type):
            with torch.autocast(device_type=like.device.type, enabled=False):
                result = self.merge_group(group, **parameters)
        else:  # the guard would change nothing (and costs more than a small tensor's merge)
            result = self.merge_group(group, **parameters)
        if not isinstance(result, torch.Tensor) or result.shape != like.shape:
            raise TypeError(f"Merge method {self.method.spec.name} must return a tensor of shape {like.shape}")
        return result.to(dtype=out_dtype) if out_dtype is not None else result

    def merge_group(self, group: TensorGroup, **parameters) -> torch.Tensor:
        raise NotImplementedError

    def _writes_destination(self, out: torch.Tensor) -> bool:
        return self.destination is not None and out.data_ptr() == self.destination.data_ptr()

    def _joins_batch(self, kind: str, out: torch.Tensor) -> bool:
        """Whether this tensor's result may go to the ``kind`` batch that a larger tensor of the
        candidate started, whatever its own size."""
        return self.may_defer and self.fast.batch_started(kind) and self._writes_destination(out)

    def output_for(self, like: torch.Tensor) -> torch.Tensor:
        """Where to write a result shaped like ``like``: the destination's storage when it can
        take it as is (the merger then has nothing to copy), else a new tensor."""
        target = self.destination
        if target is not None:
            target = target.data
            if (
                target.dtype == like.dtype
                and target.shape == like.shape
                and target.device == like.device
                and target.is_contiguous()
            ):
                return target
        return torch.empty_like(like, memory_format=torch.contiguous_format)


class _GroupKernel(GroupMergeMethod):
    """Lets a fast kernel run inside mergekit's ``GroupMergeMethod._execute``."""

    def __init__(self, kernel: _FastKernel):
        self.spec = kernel.method.spec
        self.kernel = kernel

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        return self.kernel.merge_group(group, **parameters)


class _EntryPlan:
    """How one non-base entry's (sparsified, rescaled) task vector is made, chunk by chunk.

    ``keep(chunk)``: an int32 mask of the elements mergekit's sparsifier keeps (-1: all bits
    set, kept; 0: zeroed), applied with a bitwise and (torch's masked_fill and where are
    several times slower than integer ops on CPU); ``zero``:
    the whole vector is zero; ``masked``/``scale``: a rescaled entry, whose masked vector was
    made in full first (its l1 norm needs every element) and is multiplied by ``scale`` here.
    ``keys``/``key_range``: the same mask for the fused kernels, when it is ``lo <= key < hi``.
    """

    def __init__(self, source: torch.Tensor):
        self.source = source.view(-1)
        self.zero = False
        self.keep: Callable[[slice], torch.Tensor] | None = None
        self.keys: torch.Tensor | None = None
        self.key_range = (0, 0)
        self.masked: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.task_vector: torch.Tensor | None = None
        self.magnitudes: torch.Tensor | None = None
        self.l1: fused.MaskedL1 | None = None  # phase one's sums instead of the magnitudes
        self.rescale: tuple | None = None  # (l1 before, its value, work dtype): scale not made yet


class _L1Tables:
    """One task vector's tables of bfloat16 DARE's l1 sums for every density
    (``fused.key16_l1_prefix``), one per place of its draws in the uniform stream: an entry's draws
    move when an earlier entry draws none (density 1), so a place gets its table the second time
    it is asked for (phase one sums the first; a search near density 1 asks for many places
    once) and the last ``KEEP`` places keep theirs."""

    KEEP = 4
    REMEMBERED = 64  # places asked for once, remembered until a second ask

    def __init__(self):
        self._tables: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self._asked_once: set[tuple] = set()

    def lookup(self, where: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        table = self._tables.get(where)
        if table is not None:
            self._tables.move_to_end(where)
            return table
        if where not in self._asked_once:
            if len(self._asked_once) >= self.REMEMBERED:
                self._asked_once.clear()
            self._asked_once.add(where)
            return None
        self._asked_once.discard(where)
        table = self._tables[where] = build()
        if len(self._tables) > self.KEEP:
            self._tables.popitem(last=False)
        return table

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(table) for table in self._tables.values())


class _FastTaskArithmetic(_FastKernel):
    """``GeneralizedTaskArithmeticMerge.merge_group`` with precomputed sparsification state,
    run in chunks of ``CHUNK_ELEMENTS`` with reused scratch buffers.

    Every step after sparsification is elementwise (the sums run over entries, per element),
    so computing it chunk by chunk gives each element exactly the operations mergekit applies
    to it, while the chunk's temporaries stay in the core's cache: the sources are read once
    and the result is written once, straight into the model's parameter when it can take it.
    Only the l1 rescale needs a whole tensor (``masked.abs().sum()``: its rounding depends on
    torch's summation order over the full tensor); rescaled entries are masked in full first.
    """

    def __init__(self, fast, method: GeneralizedTaskArithmeticMerge, task, tensors):
        super().__init__(fast, method, task, tensors)
        self.sparsifier = method.sparsification_method
        self.kinds = KINDS_OF_SPARSIFIER[self.sparsifier]
        self.draws_random = self.sparsifier in RANDOM_SPARSIFIERS
        self._joining = False  # this tensor joins a batch a larger one started (merge_group)
        self._phase_one: list | None = None  # phase ones queued for the batch (merge_group)
        # bernoulli against a bfloat16 density (DELLA compares with float32 probabilities)
        bfloat16_work = _cpu_work_dtype(next(iter(tensors.values()))) == torch.bfloat16
        self.high_halves_suffice = self.sparsifier == SparsificationMethod.random and bfloat16_work
        if self.sparsifier in KEYED_SPARSIFIERS and self._fused_method() and _fused_takes(*tensors.values()):
            self.optional_kinds = ("task_vector",)

    def state_bytes(self, kind: str) -> int:
        if kind == "l1" and self.high_halves_suffice:  # DARE's tables of l1 sums (_L1Tables)
            per_table = (fused.KEY16_BINS - L1_TABLE_FIRST_KEY + 1) * 8
            return _L1Tables.KEEP * per_table * len(l1_sum.torch_chunks(self.numel)) * self.non_base
        if kind == "della_rank":  # ranks in the work dtype, as _della stores them
            per_element = _cpu_work_dtype(next(iter(self.tensors.values()))).itemsize
        else:
            stream = 2 if self.high_halves_suffice else 4
            per_element = {"rank_desc": 4, "rank_asc": 4, "stream": stream, "task_vector": self.element_size}.get(
                kind, 0
            )
        return per_element * self.numel * self.non_base

    def _stored_task_vector(self, plan: _EntryPlan, model) -> torch.Tensor | None:
        """``source - base`` in the base's dtype, stored once (the fused kernels read it instead of
        the source and the base, and skip a subtraction and rounding per element); None where
        the optional state is not in use or phase two does not run fused."""
        if not (self._fused_phase_two and "task_vector" in self.kinds_in_use):
            return None
        dtype = self._base.dtype
        return self.fast.state.get("task_vector", self.source_key(model, dtype), lambda: plan.source - self._base)

    def merge_group(self, group: TensorGroup, **parameters) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        self._base, self._shape = base.view(-1), base.shape
        out = self.output_for(base)
        self._joining = self._joins_batch("task_arithmetic", out)
        self._fused_phase_two = self._fused_takes_phase_two(entries, out)
        batch = None
        if self._fused_phase_two and self.may_defer and self._writes_destination(out):
            batch = self.fast.task_arithmetic_batch(self.non_base * arena_bytes(base.numel(), base.dtype))
        self._phase_one = [] if batch is not None else None  # _mask_and_rescale queues phase one here
        plans = [self._plan(index, entry, parameters) for index, entry in enumerate(entries)]
        weights = torch.tensor(
            [parameters["weight"][entry.id] for entry in entries], dtype=base.dtype, device=base.device
        ).unsqueeze(-1)
        divisor = None
        if parameters["normalize"] and not self.method.consensus_method:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        entries = self._fused_entries(plans, weights) if self._fused_phase_two else None
        arguments = dict(
            consensus=self.method.consensus_method == ConsensusMethod.sum,
            normalize=parameters["normalize"],
            divisor=None if divisor is None else float(divisor),
            lambda_=parameters["lambda"],
        )
        if entries is not None and batch is not None:  # written by the batch before the merger reads it
            for job in self._phase_one:
                batch.add_l1(job) if isinstance(job, fused.MaskedL1) else batch.add_phase_one(*job)
            on_done = functools.partial(_vouch, self.fast, out)
            batch.add(lambda: self._with_scales(plans, entries), self._base, out.view(-1), **arguments, on_done=on_done)
            return out
        if self._phase_one:  # queued for a batch that cannot take this merge: now, then
            fused.masked_l1([job for job in self._phase_one if isinstance(job, fused.MaskedL1)])
            for job in self._phase_one:
                if not isinstance(job, fused.MaskedL1):
                    fused.masked_magnitudes(*job)
            entries = self._with_scales(plans, entries)
        if entries is not None:
            return _vouch(self.fast, out, fused.task_arithmetic(entries, self._base, out.view(-1), **arguments))
        # (the fused kernel always sums as torch does; the chunked one may skip a +0, see _sum_entries)
        self._base_negative_zero = self.fast.base_has_negative_zero(self.base_key, base)
        flat_out, total = out.view(-1), _FiniteTotal(out)
        for chunk in _chunks(base.numel(), base.device):
            mixed = self._mixed_delta(plans, weights, chunk, parameters, divisor)
            total.add(torch.add(self._base[chunk], mixed, out=flat_out[chunk]))  # (base + mixed).to(base.dtype)
        return total.vouch(self.fast)

    def _fused_method(self) -> bool:
        """Whether the fused phase two takes this merge at all: not a count consensus, nor more
        entries than it sums in torch's order."""
        consensus = self.method.consensus_method
        return self.non_base <= fused.MAX_ENTRIES and consensus in (None, ConsensusMethod.sum)

    def _fused_takes_phase_two(self, entries: tuple[TensorEntry, ...], out: torch.Tensor) -> bool:
        """Whether the fused kernel runs phase two here: the method, and these tensors (mergekit
        may have cast them to the recipe's dtype) of a dtype and device it takes."""
        tensors = (entry.tensor.view(-1) for entry in entries)
        return self._fused_method() and _fused_takes(self._base, out, *tensors, joining=self._joining)

    def _with_scales(self, plans: list[_EntryPlan], entries: list | None) -> list | None:
        """``entries`` (one per plan) once the queued phase ones have run: the scales they
        wait for made (torch's l1 sums) and set."""
        for index, plan in enumerate(plans):
            if plan.rescale is None:
                continue
            self._set_scale(plan, self._l1_after_masking(plan), *plan.rescale)
            plan.rescale = None
            if entries is not None:
                entries[index].scale = None if plan.scale is None else float(plan.scale)
        return entries

    def _fused_entries(self, plans: list[_EntryPlan], weights: torch.Tensor) -> list | None:
        """The plans as the fused kernel's entries, or None where it cannot take them (a mask
        that is not a key range: DELLA's without rescaling)."""
        entries = []
        for plan, weight in zip(plans, weights.flatten().tolist()):
            scale = None if plan.scale is None else float(plan.scale)
            if plan.zero:
                entries.append(fused.Entry(weight))
            elif plan.task_vector is not None:
                kept = dict(magnitudes=plan.magnitudes, keys=plan.keys, key_range=plan.key_range)
                entries.append(fused.Entry(weight, task_vector=plan.task_vector, scale=scale, **kept))
            elif plan.masked is not None:
                if plan.masked.dtype != self._base.dtype:
                    return None
                entries.append(fused.Entry(weight, masked=plan.masked, scale=scale))
            elif plan.keep is not None and plan.keys is None:
                return None
            else:
                entries.append(fused.Entry(weight, source=plan.source, keys=plan.keys, key_range=plan.key_range))
        return entries

    def _mixed_delta(self, plans, weights, chunk: slice, parameters: dict, divisor) -> torch.Tensor:
        """mergekit's deltas -> weights -> consensus -> sum -> normalize -> lambda, on one chunk."""
        scratch = self.fast.scratch
        dtype, size = self._base.dtype, chunk.stop - chunk.start
        deltas = scratch.take("deltas", len(plans) * size, dtype).view(len(plans), size)
        for index, plan in enumerate(plans):
            self._masked_delta(plan, chunk, deltas[index])
        deltas.mul_(weights)
        consensus = self.method.consensus_method
        if consensus == ConsensusMethod.sum:
            _drop_minority_signs(deltas, scratch)
        elif consensus:  # "count": mergekit's mask as is
            mask_dtype = torch.int8 if parameters["int8_mask"] else dtype
            deltas.mul_(get_mask(deltas, method=consensus, mask_dtype=mask_dtype))
        mixed = _sum_entries(deltas, out=scratch.take("mixed", size, dtype), zero_sign=self._base_negative_zero)
        if parameters["normalize"]:
            if consensus:  # a kept (agreeing, nonzero) delta is exactly a nonzero one now
                divisor = _kept_weight_sum(deltas, weights, scratch)
            mixed.div_(divisor)
        if parameters["lambda"] != 1:
            mixed.mul_(parameters["lambda"])
        return mixed

    def _masked_delta(self, plan: _EntryPlan, chunk: slice, out: torch.Tensor) -> None:
        """The entry's sparsified (and rescaled) task vector on ``chunk``, in the base's dtype."""
        if plan.zero:
            out.zero_()
        elif plan.masked is not None:  # rescaled: (masked * scale).to(dtype)
            if plan.scale is None:
                out.copy_(plan.masked[chunk])
            elif plan.masked.dtype == out.dtype:
                torch.mul(plan.masked[chunk], plan.scale, out=out)
            else:
                out.copy_(plan.masked[chunk] * plan.scale)
        else:
            torch.sub(plan.source[chunk], self._base[chunk], out=out)
            if plan.keep is not None:
                _keep_only(out, plan.keep(chunk), self.fast.scratch)

    # ------------------------------------------------------------ sparsification plans

    def _plan(self, index: int, entry: TensorEntry, parameters: dict) -> _EntryPlan:
        plan = _EntryPlan(entry.tensor)
        plan.task_vector = self._stored_task_vector(plan, entry.id)
        if not self.sparsifier or parameters["density"][entry.id] >= 1:
            return plan
        model, density = entry.id, parameters["density"][entry.id]
        if self.sparsifier == SparsificationMethod.magnitude:
            work_dtype = self._magnitude(plan, model, density)
        elif self.sparsifier == SparsificationMethod.magnitude_outliers:
            work_dtype = self._magnitude_outliers(plan, model, density, parameters["gamma"][model])
        elif self.sparsifier == SparsificationMethod.random:
            work_dtype = self._bernoulli(plan, density)
        elif self.sparsifier == SparsificationMethod.della_magprune:
            work_dtype = self._della(plan, model, density, parameters["epsilon"][model])
        else:
            raise NotImplementedError(self.sparsifier)
        if parameters["rescale"] and not plan.zero:
            self._mask_and_rescale(index, plan, model, work_dtype)
        return plan

    def _task_vector(self, plan: _EntryPlan, work_dtype: torch.dtype) -> torch.Tensor:
        """The whole task vector (source - base) in ``work_dtype``: made only to precompute."""
        delta = plan.source - self._base
        return delta if delta.dtype == work_dtype else delta.to(work_dtype)

    def _magnitude(self, plan: _EntryPlan, model, density: float) -> torch.dtype:
        """``mergekit.sparsify.magnitude``: keep the first k of its argsort of |delta|."""
        dtype = self._base.dtype
        if density <= 0 or self._base.numel() == 0:
            plan.zero = True  # zeros_like, not rescaled
            return dtype
        k = max(1, int(density * self._base.numel()))
        rank = self.fast.state.get(
            "rank_desc",
            self.source_key(model, dtype),
            lambda: _rank_of(_argsort_magnitude(self._task_vector(plan, dtype), descending=True)),
        )
        self._keep_in_range(plan, rank, 0, k)
        return dtype

    def _magnitude_outliers(self, plan: _EntryPlan, model, density: float, gamma: float) -> torch.dtype:
        """``mergekit.sparsify.magnitude_outliers``: a window of its ascending sort of |delta|."""
        dtype = self._base.dtype
        num_elems = self._base.numel()
        target_n = int(density * num_elems)
        n_top = int(gamma * num_elems)
        n_bot = max(0, num_elems - target_n - n_top)
        start, stop, _ = slice(n_bot, n_bot + target_n).indices(num_elems)  # python slice rules
        if start >= stop:  # nothing kept: zeros (the rescale leaves a zero norm alone)
            plan.zero = True
            return dtype
        rank = self.fast.state.get(
            "rank_asc",
            self.source_key(model, dtype),
            lambda: _rank_of(_argsort_magnitude(self._task_vector(plan, dtype), descending=False)),
        )
        self._keep_in_range(plan, rank, start, stop)
        return dtype

    def _keep_in_range(self, plan: _EntryPlan, keys: torch.Tensor, low: int, high: int) -> None:
        """Keep the elements whose key (>= 0: an int32 rank, a uniform draw's int32 bits, or
        their int16 high halves) is in [low, high): the fused kernels take the range itself, the
        chunked path this mask."""
        plan.keys, plan.key_range = keys, (low, high)

        def keep(chunk: slice) -> torch.Tensor:
            kept = _below(keys[chunk], high, self.fast.scratch)
            if low > 0:
                kept.bitwise_and_(_below(keys[chunk], low, self.fast.scratch, "below").bitwise_not_())
            return kept

        plan.keep = keep

    def _bernoulli(self, plan: _EntryPlan, density: float) -> torch.dtype:
        """``mergekit.sparsify.bernoulli`` on CPU: keep iff the next uniform draw is < density
        (density as ``full_like`` stores it, in the work dtype)."""
        work_dtype = _cpu_work_dtype(self._base)
        draws, bound = self.fast.stream.take(self._base.numel()), _bernoulli_bound(density, work_dtype)
        if draws.dtype == torch.int16:  # their high halves: exact against a bfloat16 density
            if work_dtype != torch.bfloat16:
                raise RuntimeError("the draws' high halves decide bernoulli only against bfloat16 densities")
            self._keep_in_range(plan, draws, 0, bound >> 16)
        else:
            self._keep_in_range(plan, draws.view(torch.int32), 0, bound)
        return work_dtype

    def _della(self, plan: _EntryPlan, model, density: float, epsilon: float) -> torch.dtype:
        """``mergekit.sparsify.della_magprune``: per-row rank-scaled keep probabilities."""
        work_dtype = _cpu_work_dtype(self._base)
        if density <= 0:
            plan.zero = True
            return work_dtype
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
        rank_norm_x2, extremes = self.fast.state.get(
            "della_rank",
            self.source_key(model, work_dtype),
            lambda: _della_rank_norm_x2(self._task_vector(plan, work_dtype).view(self._shape), work_dtype),
        )
        # mergekit: (density - epsilon) + rank_norm * 2 * epsilon; rounding is monotone, so the
        # probabilities' range is that of the rank extremes (NaN for one-element rows)
        low, high = torch.aminmax(extremes * epsilon + (density - epsilon))
        if not (bool(low >= 0) and bool(high <= 1)):  # torch.bernoulli refuses these
            raise RuntimeError("bernoulli: expected 0 <= p <= 1 (della probabilities out of range)")
        draws = self.fast.stream.take(self._base.numel()).view(torch.int32)  # (float32 draws: rewrite)

        def keep(chunk: slice) -> torch.Tensor:
            size = chunk.stop - chunk.start
            probs = self.fast.scratch.take("probs", size, work_dtype)
            torch.mul(rank_norm_x2[chunk], epsilon, out=probs).add_(density - epsilon)
            if work_dtype != torch.float32:
                probs = self.fast.scratch.take("probs32", size, torch.float32).copy_(probs)
            # u < probs on the bits (both >= 0), as in _bernoulli
            kept = torch.sub(
                draws[chunk], probs.view(torch.int32), out=self.fast.scratch.take("keep", size, torch.int32)
            )
            return kept.bitwise_right_shift_(_INT32_SIGN_SHIFT)

        plan.keep = keep
        return work_dtype

    def _mask_and_rescale(self, index: int, plan: _EntryPlan, model, work_dtype: torch.dtype) -> None:
        """``rescaled_masked_tensor(delta, keep, l1)``: the masked vector in full (in the work
        dtype), its l1 norm as mergekit sums it, and the scale phase two multiplies by.

        The l1 norm of the unmasked task vector is computed once (keyed by torch's thread
        count too, since a parallel sum's rounding depends on how it is split)."""
        numel = self._base.numel()
        key = (*self.source_key(model, work_dtype), torch.get_num_threads())
        before, before_value = self.fast.state.get(
            "l1", key, lambda: _with_value(self._task_vector(plan, work_dtype).abs().sum())
        )
        stored = plan.task_vector is not None and plan.keys is not None and work_dtype == self._base.dtype
        if stored and work_dtype == torch.bfloat16 and l1_sum.agrees_with_torch(torch.get_num_threads()):
            # the l1 sum without writing the masked magnitudes at all (phase two masks by keys):
            # looked up where it can be, else summed by phase one (masked_l1)
            chunks = l1_sum.torch_chunks(numel)
            after = self._l1_from_table(plan, model, chunks)
            if after is not None:  # known now: no phase one at all
                self._set_scale(plan, after, before, before_value, work_dtype)
                return
            plan.l1 = fused.MaskedL1(plan.task_vector, plan.keys, plan.key_range, chunks)
            plan.rescale = (before, before_value, work_dtype)
            if self._phase_one is not None:  # run by the batch; the scale made after it
                self._phase_one.append(plan.l1)
            else:
                fused.masked_l1([plan.l1])
                self._with_scales([plan], None)
            return
        if stored and self._phase_one is not None:  # run by the batch; the scale made after it
            magnitudes = plan.magnitudes = self.fast.phase_one_buffer(numel, work_dtype)
            self._phase_one.append((plan.task_vector, plan.keys, plan.key_range, magnitudes))
            plan.rescale = (before, before_value, work_dtype)
            return
        if stored:  # phase two makes the masked vector from the task vector's signs and these
            magnitudes = plan.magnitudes = self.fast.scratch.take(f"magnitudes{index}", numel, work_dtype)
            fused.masked_magnitudes(plan.task_vector, plan.keys, plan.key_range, magnitudes)
        else:
            plan.task_vector = None
            magnitudes = self.fast.scratch.take("magnitudes", numel, work_dtype)
            if self._phase_one is not None:  # read by the batch's phase two, after later tensors
                plan.masked = self.fast.phase_one_buffer(numel, work_dtype)
            else:
                plan.masked = self.fast.scratch.take(f"masked{index}", numel, work_dtype)
            fused_takes = _fused_takes(self._base, plan.source, joining=self._joining)
            if plan.keys is not None and work_dtype == self._base.dtype and fused_takes:
                fused.mask_task_vector(plan.source, self._base, plan.keys, plan.key_range, plan.masked, magnitudes)
            else:
                self._mask_in_chunks(plan, work_dtype, plan.masked, magnitudes)
        self._set_scale(plan, magnitudes.sum(), before, before_value, work_dtype)

    def _l1_from_table(self, plan: _EntryPlan, model, chunks: list[tuple[int, int]]) -> torch.Tensor | None:
        """torch's ``magnitudes.sum()`` of a bfloat16 DARE entry from its task vector's table of
        l1 sums per key for these draws (``_L1Tables``; where the table does not settle it, torch
        sums: a phase one's sums would not either); None where there is no table (yet)."""
        low, high = plan.key_range
        if plan.keys.dtype != torch.int16 or low != 0 or not L1_TABLE_FIRST_KEY <= high <= fused.KEY16_BINS:
            return None
        tables = self.fast.state.get("l1", ("tables", *self.source_key(model, torch.bfloat16)), _L1Tables)
        prefix = tables.lookup(
            (plan.keys.storage_offset(), tuple(chunks)),
            lambda: fused.key16_l1_prefix(plan.task_vector, plan.keys, chunks, L1_TABLE_FIRST_KEY),
        )
        if prefix is None:
            return None
        sums = prefix[:, high - L1_TABLE_FIRST_KEY].tolist()
        known = l1_sum.torch_sum(sums, chunks, fused.KEY16_PREFIX_ERROR)
        return known if known is not None else self._l1_by_torch(plan)

    def _l1_after_masking(self, plan: _EntryPlan) -> torch.Tensor:
        """torch's ``magnitudes.sum()`` of a rescaled entry once phase one has run: from
        ``masked_l1``'s sums where they settle it (l1_sum.py), else summed by torch."""
        if plan.l1 is None:
            return plan.magnitudes.sum()
        known = l1_sum.torch_sum(plan.l1.sums, plan.l1.chunks, fused.MASKED_L1_ERROR)
        return known if known is not None else self._l1_by_torch(plan)

    def _l1_by_torch(self, plan: _EntryPlan) -> torch.Tensor:
        """The kept magnitudes of a stored bfloat16 task vector written out and summed by torch."""
        magnitudes = self.fast.scratch.take("magnitudes", self._base.numel(), torch.bfloat16)
        fused.masked_magnitudes(plan.task_vector, plan.keys, plan.key_range, magnitudes)
        return magnitudes.sum()

    @staticmethod
    def _set_scale(plan: _EntryPlan, after: torch.Tensor, before, before_value: float, work_dtype) -> None:
        """mergekit's rescale: ``before / after`` unless either l1 norm is below its eps."""
        # mergekit's ``before < eps or after < eps``, on python floats (one conversion instead of
        # two tensor comparisons per entry; torch compares in the tensor's dtype, so eps in it)
        eps = _in_dtype(RESCALE_EPS, work_dtype)
        if not (before_value < eps or after.item() < eps):
            plan.scale = before / after

    def _mask_in_chunks(self, plan: _EntryPlan, work_dtype, masked: torch.Tensor, magnitudes: torch.Tensor) -> None:
        for chunk in _chunks(masked.numel(), self._base.device):
            if work_dtype == self._base.dtype:
                torch.sub(plan.source[chunk], self._base[chunk], out=masked[chunk])
            else:
                masked[chunk].copy_(plan.source[chunk] - self._base[chunk])
            _keep_only(masked[chunk], plan.keep(chunk), self.fast.scratch)
            torch.abs(masked[chunk], out=magnitudes[chunk])


def arena_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes a buffer takes in the phase-one arena: whole 64-byte lines, so that every buffer
    starts aligned as torch aligns its allocations (a sum's vector loop sees the same layout)."""
    return -(-numel * dtype.itemsize // 64) * 64


def _block_sizes(count: int, block: int) -> list[int]:
    return [min(block, count - start) for start in range(0, count, block)]


@functools.lru_cache(maxsize=4096)
def _bernoulli_bound(density: float, work_dtype: torch.dtype) -> int:
    """The draws' bits that ``bernoulli(full_like(delta, density))`` keeps are those below this:
    p is density as ``full_like`` stores it in the work dtype, and for floats >= 0, u < p
    exactly when u's bits, read as an integer, are below p's."""
    p = torch.full((1,), density, dtype=work_dtype).item()
    if not 0 <= p <= 1:
        raise RuntimeError(f"bernoulli: expected 0 <= p <= 1, got density {density}")
    return int(torch.tensor(p, dtype=torch.float32).view(torch.int32))


@functools.cache
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (how torch compares a tensor of that dtype with it)."""
    return torch.tensor(value, dtype=dtype).item()


def _with_value(total: torch.Tensor) -> tuple[torch.Tensor, float]:
    return total, total.item()


def _fused_takes(first: torch.Tensor, *others: torch.Tensor, joining: bool = False) -> bool:
    """Whether the fused C kernels run this tensor: large enough to gain from them (smaller ones
    are a few chunked operations; a family of small models, such as the zoo, never even builds
    the library), or ``joining`` a batch a larger tensor started (where it costs no call of
    its own), and of a kind they take."""
    return (joining or first.numel() >= FUSED_MIN_ELEMENTS) and fused.supports(first, *others)


def _chunks(numel: int, device: torch.device):
    size = CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


def _below(values: torch.Tensor, limit: int, scratch: Scratch, role: str = "keep") -> torch.Tensor:
    """int32 mask: -1 where ``values < limit``, else 0 (the sign of values - limit, smeared by an
    arithmetic shift; int32 values and limit both >= 0, so the difference cannot overflow)."""
    out = scratch.take(role, values.numel(), torch.int32)
    return torch.sub(values, limit, out=out).bitwise_right_shift_(_INT32_SIGN_SHIFT)


def _keep_only(values: torch.Tensor, keep: torch.Tensor, scratch: Scratch) -> None:
    """``values * mask`` for a 1/0 mask, in place: kept elements unchanged, the others +0 where
    mergekit's product gives +-0 (a zero's sign never reaches the result: the sums start from
    +0, the sign election and the divisor ignore zeros)."""
    bits = _BITS_OF[values.dtype]
    if bits != torch.int32:
        keep = scratch.take("keep_bits", keep.numel(), bits).copy_(keep)  # -1 stays all ones
    values.view(bits).bitwise_and_(keep)


@functools.cache
def _float_bits(dtype: torch.dtype) -> tuple[torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integer dtype of the same width, its sign-bit shift, mask of the non-sign bits, bits of
    1.0); the constants as 0-d tensors of that dtype (a python int would be wrapped into a
    tensor and converted on every call)."""
    bits = _BITS_OF[dtype]
    width = torch.iinfo(bits).bits
    constant = lambda value: torch.tensor(value, dtype=bits)  # noqa: E731
    return (bits, constant(width - 1), constant((1 << (width - 1)) - 1), torch.ones((), dtype=dtype).view(bits).clone())


def _drop_minority_signs(deltas: torch.Tensor, scratch: Scratch) -> None:
    """TIES' sign consensus, in place: ``get_mask(deltas, "sum")`` keeps d iff sign(d) equals
    the sign of the column sum (>= 0 counting as +). Kept here: d whose sign bit equals the
    column sum's, which agrees on every nonzero d. For d = +-0 or a column sum of -0 (two -0
    entries) the two may differ, but a zero contributes nothing: the masked deltas are only
    summed (by sums that start from +0, so a zero's sign never shows) and counted where nonzero.
    On the bits: (d xor not(sum)) has its sign bit set where the signs agree; an arithmetic
    shift smears it into an all-ones / all-zeros mask."""
    entries, size = deltas.shape
    bits, sign_shift, _, _ = _float_bits(deltas.dtype)
    column_sum = scratch.take("column_sum", size, deltas.dtype)
    torch.add(deltas[0], deltas[1], out=column_sum) if entries == 2 else torch.sum(deltas, dim=0, out=column_sum)
    agree = scratch.take("agree", entries * size, bits).view(entries, size)
    torch.bitwise_xor(deltas.view(bits), column_sum.view(bits).bitwise_not_(), out=agree)
    deltas.view(bits).bitwise_and_(agree.bitwise_right_shift_(sign_shift))


def _kept_weight_sum(deltas: torch.Tensor, weights: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """mergekit's ``divisor = (weights * mask).sum(dim=0); divisor[divisor == 0] = 1`` with the
    mask read off the masked deltas (kept = nonzero), on the bits: -(|d| bits) is negative
    exactly for a nonzero d; shifted, it selects the weight's bits or +0."""
    entries, size = deltas.shape
    bits, sign_shift, magnitude_bits, one_bits = _float_bits(deltas.dtype)
    kept = scratch.take("agree", entries * size, bits).view(entries, size)
    torch.bitwise_and(deltas.view(bits), magnitude_bits, out=kept).neg_().bitwise_right_shift_(sign_shift)
    kept.bitwise_and_(weights.view(bits))
    divisor = _sum_entries(kept.view(deltas.dtype), out=scratch.take("divisor", size, deltas.dtype))
    zero = scratch.take("divisor_zero", size, bits)  # -1 where the divisor is (+)0
    torch.bitwise_and(divisor.view(bits), magnitude_bits, out=zero).neg_().bitwise_right_shift_(sign_shift)
    divisor.view(bits).bitwise_or_(zero.bitwise_not_().bitwise_and_(one_bits))
    return divisor


class _FastLinear(_FastKernel):
    """``mergekit.merge_methods.linear.linear_merge`` in chunks, written straight to the output.

    mergekit packs the group (``prepare_batches``) and accumulates ``zeros -> addcmul_ per input
    -> div_ -> to(dtype)`` over the whole tensor; the same operations per chunk give every
    element the same arithmetic, without the float32 accumulator of a whole tensor."""

    def merge_group(self, group: TensorGroup, **parameters) -> torch.Tensor:
        out = self.output_for(group.entries[0].tensor)
        if self._one_fused_dtype(group, out) and fused.supports_linear():
            return self._fused(group, parameters, out)
        spec = self.method.spec
        (prepared,) = prepare_batches((group,), [parameters], spec, BatchOptions(), input_dtypes=[None])
        batch, packed = prepared.pack(spec)
        first = batch.tensors[0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        weight = packed["weight"].to(dtype)
        denominator = weight.sum(dim=1) if packed["normalize"] else None
        coefficients = weight.unbind(1)
        sources = [tensor.reshape(-1) for tensor in batch.tensors]
        flat_out, total = out.view(-1), _FiniteTotal(out)
        for chunk in _chunks(flat_out.numel(), flat_out.device):
            # accumulate in the output itself when it has the accumulator's dtype (no copy)
            if out.dtype == dtype:
                result = flat_out[chunk].zero_()
            else:
                result = self.fast.scratch.take("linear", chunk.stop - chunk.start, dtype).zero_()
            for source, coefficient in zip(sources, coefficients):
                result.addcmul_(source[chunk], coefficient)
            if denominator is not None:
                result.div_(denominator)
            if out.dtype != dtype:
                flat_out[chunk].copy_(result)  # result.to(first.dtype)
            total.add(flat_out[chunk])
        return total.vouch(self.fast)

    def _one_fused_dtype(self, group: TensorGroup, out: torch.Tensor) -> bool:
        """One dtype throughout (so mergekit's packing converts nothing), float32 or bfloat16."""
        dtype = out.dtype
        joining = self._joins_batch("linear", out)
        return all(entry.tensor.dtype == dtype for entry in group.entries) and _fused_takes(
            out, *(entry.tensor for entry in group.entries), joining=joining
        )

    def _fused(self, group: TensorGroup, parameters: dict, out: torch.Tensor) -> torch.Tensor:
        """The fused kernel, with the weights as mergekit packs them for one group: a float32
        row in the group's order (``TensorBatch.pack``); its sum over the row the denominator."""
        weights = tuple(parameters["weight"][entry.id] for entry in group.entries)
        coefficients, denominator = _packed_weights(weights, bool(parameters["normalize"]))
        sources = [entry.tensor.view(-1) for entry in group.entries]
        batch = self.fast.linear_batch() if self.may_defer and self._writes_destination(out) else None
        if batch is not None:  # written by the batch before the merger reads it; vouched for then
            batch.add(sources, coefficients, denominator, out.view(-1), lambda finite: _vouch(self.fast, out, finite))
            return out
        return _vouch(self.fast, out, fused.linear(sources, coefficients, denominator, out.view(-1)))


@functools.lru_cache(maxsize=1024)
def _packed_weights(weights: tuple, normalize: bool) -> tuple[tuple[float, ...], float | None]:
    """The weights as mergekit packs them for one group (a float32 row), and the row's float32
    sum when normalising. Cached: the tensors of one layer (and of a whole recipe without
    gradients) share their weights, and torch.tensor costs more than the kernel of a norm."""
    row = torch.tensor([weights], dtype=torch.float32)
    return tuple(row[0].tolist()), float(row.sum(dim=1)) if normalize else None


class _FastSCE(_FastKernel):
    """``mergekit.merge_methods.sce.sce_merge`` in chunks, with the variance order precomputed.

    SCE's steps, as mergekit runs them on the stacked task vectors ``tv = model - base``:
    top-k mask by |variance across models| (``select_topk``), per-model weight = mean of the
    masked ``tv**2`` over the whole tensor (normalised to sum 1), sign election (kept: nonzero
    ``tv`` whose sign is that of the column sum), ``sum(tv * w * kept) / sum(w * kept)`` with the
    divisor clamped at 1e-6, plus base. The weights need the whole masked tensor (a mean, whose
    rounding depends on torch's reduction over it): without a mask they are the same for every
    candidate and computed once; with one, the masked vectors are made in full first, as
    rescaled DARE entries are. The rest is elementwise and runs chunk by chunk.

    The top-k set is ``rank < k`` when the k-th and (k+1)-th largest variances differ. When they
    are equal, which of the equal ones ``torch.topk`` keeps is its own business: on CPU it is
    asked again (unsorted: its set does not depend on ``sorted``, only the order within it,
    and that saves the sort of k elements), on the stored magnitudes; elsewhere mergekit's own
    sce kernel merges that tensor.
    """

    kinds = ("sce_order", "sce_weights")

    def state_bytes(self, kind: str) -> int:
        if kind != "sce_order":
            return 0
        magnitudes = 2 if self.on_cpu else 1  # sorted, and (CPU) as they are
        return (4 + magnitudes * self.element_size) * self.numel

    def merge_group(self, group: TensorGroup, int8_mask: bool = False, select_topk: float = 1.0) -> torch.Tensor:
        entries = group.non_base
        if not entries:
            return group.base.tensor
        self._base, self._shape = group.base.tensor.view(-1), group.base.tensor.shape
        self._sources = [entry.tensor.view(-1) for entry in entries]
        self._models = tuple(entry.id for entry in entries)
        if select_topk < 1:
            keep = self._topk_keep(select_topk)
            if keep is None:  # nothing kept, or topk's choice off the CPU: mergekit's own steps
                return self._merge_whole(group, int8_mask, select_topk)
            masked = self._masked_in_full(keep)
            weights = self._weights_of(masked.view(len(entries), -1))
        else:
            masked = None
            weights = self.fast.state.get("sce_weights", (*self._tensor_key(), torch.get_num_threads()), self._weights)
        out = self.output_for(group.base.tensor)
        if len(entries) <= fused.MAX_ENTRIES and _fused_takes(self._base, out, *self._sources):
            return self._fused(masked, weights, out)
        self._base_negative_zero = self.fast.base_has_negative_zero(self.base_key, group.base.tensor)
        flat_out, total = out.view(-1), _FiniteTotal(out)
        for chunk in _chunks(self._base.numel(), self._base.device):
            tvs = self._task_vectors(chunk, masked)
            total.add(torch.add(self._base[chunk], self._merged_delta(tvs, weights), out=flat_out[chunk]))
        return total.vouch(self.fast)

    def _fused(self, masked: torch.Tensor | None, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The fused kernel: the (masked) task vectors as entries of weight 1, the per-model
        weights and clamp bound as values of the dtype, as mergekit's arithmetic holds them."""
        dtype = self._base.dtype
        if masked is None:
            entries = [fused.Entry(1.0, source=source) for source in self._sources]
        else:
            entries = [fused.Entry(1.0, masked=row) for row in masked.view(len(self._sources), -1)]
        model_weights = weights.to(dtype).tolist()
        finite = fused.sce(entries, model_weights, self._base, out.view(-1), min_divisor=_in_dtype(1e-6, dtype))
        return _vouch(self.fast, out, finite)

    def _tensor_key(self) -> tuple:
        models = tuple(str(m) for m in self._models)
        return (models, tuple(self.source_names[m] for m in self._models), *self.base_key, self._base.dtype)

    def _task_vectors(self, chunk: slice, masked: torch.Tensor | None) -> torch.Tensor:
        """The (masked) task vectors on ``chunk``, stacked: (models, chunk)."""
        size = chunk.stop - chunk.start
        if masked is not None:
            return masked.view(len(self._sources), -1)[:, chunk]
        tvs = self.fast.scratch.take("tvs", len(self._sources) * size, self._base.dtype).view(-1, size)
        for index, source in enumerate(self._sources):
            torch.sub(source[chunk], self._base[chunk], out=tvs[index])
        return tvs

    def _masked_in_full(self, keep: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """``task_vectors * mask``: every model's task vector, top-k elements kept, in full."""
        numel = self._base.numel()
        masked = self.fast.scratch.take("masked0", len(self._sources) * numel, self._base.dtype)
        rows = masked.view(len(self._sources), numel)
        for chunk in _chunks(numel, self._base.device):
            mask = keep(chunk)
            for index, source in enumerate(self._sources):
                torch.sub(source[chunk], self._base[chunk], out=rows[index, chunk])
                _keep_only(rows[index, chunk], mask, self.fast.scratch)
        return masked

    def _weights(self) -> torch.Tensor:
        """sce_weight of the unmasked task vectors (the same for every candidate)."""
        numel = self._base.numel()
        tvs = torch.stack([source - self._base for source in self._sources])
        return self._weights_of(tvs.view(len(self._sources), numel))

    def _weights_of(self, tvs: torch.Tensor) -> torch.Tensor:
        """``mergekit.merge_methods.sce.sce_weight`` op for op, squares in reused scratch."""
        squares = self.fast.scratch.take("magnitudes", tvs.numel(), tvs.dtype).view(tvs.shape)
        weights = torch.square(tvs, out=squares).mean(dim=1)
        weight_sum = torch.sum(weights).item()
        if abs(weight_sum) < 1e-6:
            return torch.ones_like(weights) / weights.shape[0]
        return weights / weight_sum

    def _merged_delta(self, tvs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum(tv * w * kept) / sum(w * kept).clamp(min=1e-6)`` on one chunk (kept: nonzero, with
        the column sum's sign; a zero's sign never reaches a sum that starts from +0)."""
        scratch = self.fast.scratch
        entries, size = tvs.shape
        dtype = tvs.dtype
        bits, sign_shift, magnitude_bits, _ = _float_bits(dtype)
        column_sum = scratch.take("column_sum", size, dtype)
        torch.add(tvs[0], tvs[1], out=column_sum) if entries == 2 else torch.sum(tvs, dim=0, out=column_sum)
        kept = scratch.take("agree", entries * size, bits).view(entries, size)
        torch.bitwise_xor(tvs.view(bits), column_sum.view(bits).bitwise_not_(), out=kept)
        kept.bitwise_right_shift_(sign_shift)  # -1 where the signs agree
        nonzero = scratch.take("nonzero", entries * size, bits).view(entries, size)
        torch.bitwise_and(tvs.view(bits), magnitude_bits, out=nonzero).neg_().bitwise_right_shift_(sign_shift)
        kept.bitwise_and_(nonzero)
        column = weights.to(dtype).unsqueeze(-1)
        products = scratch.take("deltas", entries * size, dtype).view(entries, size)
        torch.mul(tvs, column, out=products).view(bits).bitwise_and_(kept)
        kept_weights = kept.bitwise_and_(column.view(bits)).view(dtype)
        merged = _sum_entries(products, out=scratch.take("mixed", size, dtype), zero_sign=self._base_negative_zero)
        divisor = _sum_entries(kept_weights, out=scratch.take("divisor", size, dtype))
        return merged.div_(divisor.clamp_(min=1e-6))

    def _topk_keep(self, density: float) -> Callable[[slice], torch.Tensor] | None:
        """``sce_mask``'s selection as an int32 mask per chunk (None: let mergekit's code run)."""
        nonzero, rank, sorted_magnitude, magnitude = self.fast.state.get(
            "sce_order", self._tensor_key(), lambda: _sce_order(self._stacked_task_vectors())
        )
        k = int(nonzero * density)  # as sce_mask computes it (a 0-d tensor times a float)
        if k == 0:
            return None
        if not (k < rank.numel() and bool(sorted_magnitude[k - 1] == sorted_magnitude[k])):
            return lambda chunk: _below(rank[chunk], k, self.fast.scratch)
        if magnitude is None:
            return None
        _, indices = torch.topk(magnitude, k=k, largest=True, sorted=False)
        mask = self.fast.scratch.take("sce_keep", magnitude.numel(), torch.int32).zero_()
        mask.index_fill_(0, indices, -1)
        return lambda chunk: mask[chunk]

    def _stacked_task_vectors(self) -> torch.Tensor:
        """mergekit's ``task_vectors``: (models, *tensor shape)."""
        return torch.stack([source - self._base for source in self._sources]).view(-1, *self._shape)

    def _merge_whole(self, group: TensorGroup, int8_mask: bool, select_topk: float) -> torch.Tensor:
        """mergekit's own sce kernel on the whole tensor (rare cases only)."""
        return self.method.merge_group(group, int8_mask=int8_mask, select_topk=select_topk)


# ---------------------------------------------------------------- exact rewrites of mergekit steps


def _sum_entries(stacked: torch.Tensor, out: torch.Tensor | None = None, zero_sign: bool = True) -> torch.Tensor:
    """``stacked.sum(dim=0)``, bit for bit, in fewer passes when there are two entries.

    torch reduces dim 0 by adding the rows, in order, to a +0 accumulator of the accumulate
    type (float32 for bf16/fp16) and rounding once at the end; for two rows that is exactly
    ``(a + b) + 0`` in any dtype: the half-precision add also rounds float32(a) + float32(b)
    once, and the trailing ``+ 0`` turns a -0 into the +0 the accumulator gives.
    ``zero_sign=False`` skips that ``+ 0`` where the caller knows the sign of a zero sum
    cannot reach its result. (``tests/test_merge_fastpath.py::test_sum_entries_is_torch_sum``
    checks this.)
    """
    if stacked.shape[0] != 2:
        return stacked.sum(dim=0) if out is None else torch.sum(stacked, dim=0, out=out)
    total = torch.add(stacked[0], stacked[1], out=out)
    return total.add_(0.0) if zero_sign else total


def _has_negative_zero(tensor: torch.Tensor) -> bool:
    """True if any element is -0.0: only then can the sign of a zero delta reach ``base + delta``
    (-0 + -0 = -0, any other sum with a zero gives the other term or +0)."""
    bits, sign_shift, _, _ = _float_bits(tensor.dtype)
    sign_bit_only = torch.tensor(1, dtype=bits).bitwise_left_shift(sign_shift)
    return bool((tensor.view(bits) == sign_bit_only).any())


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


def _della_rank_norm_x2(delta: torch.Tensor, work_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``2 * rank_norm`` exactly as ``della_magprune`` computes it (flat), and its extremes."""
    tensor = delta.unsqueeze(0) if delta.dim() < 2 else delta
    magnitudes = tensor.abs()
    sorted_indices = torch.argsort(magnitudes, dim=1, descending=False)
    ranks = sorted_indices.argsort(dim=1).to(work_dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    rank_norm_x2 = (rank_norm * 2).view(-1)
    return rank_norm_x2, torch.stack(torch.aminmax(rank_norm_x2))


def _sce_order(tvs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """sce_mask's candidate-independent part: nonzero count, rank by |variance| (descending), the
    sorted magnitudes (to see whether the k-th and (k+1)-th are equal) and, on CPU, the
    magnitudes themselves (what ``torch.topk`` is asked when they are)."""
    var = torch.var(tvs, dim=0, unbiased=False)
    nonzero = torch.count_nonzero(var)
    magnitude = var.abs().view(-1)
    order = torch.argsort(magnitude, descending=True)
    return nonzero, _rank_of(order), magnitude[order], magnitude if magnitude.device.type == "cpu" else None
