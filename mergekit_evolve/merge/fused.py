"""Fused CPU kernels for the fast path: one pass over memory per merge instead of one per op.

On a CPU the fast path's chunked torch operations run near memory speed each, but a DARE-TIES
candidate chains about twenty of them per element and a linear merge five, so a candidate costs
several times the memory traffic it needs. ``fused.c`` does the same arithmetic per element in
one pass (see its header for the exactness argument); ``tests/test_merge_fused.py`` checks every
kernel against fastpath.py's torch operations bit for bit, and tests/test_merge_fastpath.py
checks the fast path with these kernels against mergekit's own.

The kernels are plain C (no torch headers), compiled on first use (about 30 s on two cores, once
per machine and version; on x86-64 each kernel is built for AVX-512, AVX2 and the baseline, and
the CPU picks one at load time) with the system C compiler (``$CC`` or ``cc``) into the user cache
(``$MERGEKIT_EVOLVE_CACHE`` or ``~/.cache/mergekit_evolve``, keyed by the source, the flags and
the compiler) and loaded with ctypes, which releases the GIL during a call: a tensor is split
into one contiguous range per torch thread, run on a small thread pool; a batch (a candidate's
linear or task-arithmetic tensors written straight into the model) is cut into pieces that the
threads take in turn, in one call each. Without a compiler, or
with ``MERGEKIT_EVOLVE_FUSED=0``, the fast path keeps its torch operations (same bits, slower).
Float32 and bfloat16 tensors on CPU only; anything else keeps the torch operations. (bfloat16
arithmetic is emulated in float32 with a rounding after each operation, as torch's CPU kernels
do, so the bfloat16 kernels are bound by computation more than by memory on two cores.)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "available",
    "supports",
    "supports_linear",
    "Entry",
    "linear",
    "LinearBatch",
    "TaskArithmeticBatch",
    "mask_task_vector",
    "masked_magnitudes",
    "MaskedL1",
    "masked_l1",
    "key16_l1_prefix",
    "task_arithmetic",
    "sce",
]

_log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("fused.c")
# No fused multiply-add, no fast-math: each C operation is one IEEE operation, as in torch
# (-fopenmp-simd: only the loops marked `omp simd reduction` may sum in another order).
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
MAX_ENTRIES = 4  # fused.c's MAX_ENTRIES: torch sums up to 4 rows in order, more in another order
MIN_ELEMENTS_PER_THREAD = 1 << 16  # below this a second thread costs more than it saves
# masked_l1's relative error: fused.c's float32 blocks of L1_BLOCK terms, then float64 (to 2^31 terms)
MASKED_L1_ERROR = 256 * 2.0**-24 + 2.0**-22
KEY16_BINS = 0x3F80  # fused.c's: uint16 keys are the high halves of uniforms in [0, 1)
# key16_l1_prefix's relative error: float64 bins of up to 2^31 terms, then a prefix sum over the bins
KEY16_PREFIX_ERROR = 2.0**-21
PIECES_PER_THREAD = 16  # a batch's pieces per thread (fewer: a late thread holds the others up)
ALIGN = 64  # elements; thread ranges start on whole cache lines


class _Entry(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("has_scale", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("weight", ctypes.c_float),
        ("data", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("key_lo", ctypes.c_int32),
        ("key_hi", ctypes.c_int32),
        ("magnitudes", ctypes.c_void_p),
        ("key16", ctypes.c_int32),
    ]


@dataclass
class Entry:
    """One non-base entry of ``task_arithmetic``: ``masked`` (phase one's vector, times ``scale``
    unless None), or ``source`` - base kept where ``keys[j]`` is in ``key_range`` (all kept when
    ``keys`` is None), or a stored ``task_vector`` (source - base in the dtype) kept the same way
    and times ``scale`` unless None, or (with ``magnitudes``, from ``masked_magnitudes``) the
    task vector's signs on those magnitudes times ``scale``, or the zero vector when all are
    None. ``weight``: its value in the dtype."""

    weight: float
    masked: torch.Tensor | None = None
    scale: float | None = None
    source: torch.Tensor | None = None
    task_vector: torch.Tensor | None = None
    magnitudes: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    key_range: tuple[int, int] = (0, 0)

    def as_struct(self) -> _Entry:
        keys = 0 if self.keys is None else self.keys.data_ptr()
        key16 = _key16(self.keys)
        has_scale, scale = self.scale is not None, 0.0 if self.scale is None else self.scale
        if self.masked is not None:
            return _Entry(1, has_scale, scale, self.weight, self.masked.data_ptr(), 0, 0, 0)
        if self.task_vector is not None and self.magnitudes is not None:
            magnitudes = self.magnitudes.data_ptr()
            return _Entry(4, has_scale, scale, self.weight, self.task_vector.data_ptr(), 0, 0, 0, magnitudes)
        if self.task_vector is not None:
            data = self.task_vector.data_ptr()
            return _Entry(3, has_scale, scale, self.weight, data, keys, *self.key_range, 0, key16)
        if self.source is not None:
            return _Entry(2, 0, 0.0, self.weight, self.source.data_ptr(), keys, *self.key_range, 0, key16)
        return _Entry(0, 0, 0.0, self.weight, 0, 0, 0, 0)


def _key16(keys: torch.Tensor | None) -> int:
    """1 for uint16 keys (int16 tensors holding 0..0x7fff, fastpath.py's high halves of the
    draws), 0 for int32 keys; anything else is refused."""
    if keys is None or keys.dtype == torch.int32:
        return 0
    if keys.dtype == torch.int16:
        return 1
    raise ValueError(f"fused kernels take int32 or int16 keys, got {keys.dtype}")


def _cache_dir() -> Path:
    cache = os.environ.get("MERGEKIT_EVOLVE_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "mergekit_evolve") / "kernels"


def _compile(compiler: str) -> Path:
    """The shared library for this source, flags and compiler, built once into the cache."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), platform.machine().encode()]))
    target = _cache_dir() / f"fused-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent process sees the whole library or none.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
        subprocess.run(command, capture_output=True, text=True, check=True)
        os.replace(built, target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("MERGEKIT_EVOLVE_FUSED", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        _log.info("fused merge kernels off: no C compiler (set CC) on this %s machine", platform.machine())
        return None
    try:
        library = ctypes.CDLL(str(_compile(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        _log.warning("fused merge kernels off (the fast path stays exact, only slower): %s", str(detail)[-500:])
        return None
    i64, vp, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    library.linear.argtypes = library.linear_fma.argtypes = [i32, i32, vp, vp, i32, f32, vp, i64, i64]
    library.has_fma.argtypes, library.has_fma.restype = [], ctypes.c_int
    library.mask_task_vector.argtypes = [i32, vp, vp, vp, i32, ctypes.c_int32, ctypes.c_int32, vp, vp, i64, i64]
    library.masked_magnitudes.argtypes = [i32, vp, vp, i32, ctypes.c_int32, ctypes.c_int32, vp, i64, i64]
    library.task_arithmetic.argtypes = [i32, i32, vp, vp, vp, i32, i32, f32, i32, f32, i64, i64]
    library.sce.argtypes = [i32, i32, vp, vp, vp, vp, f32, i64, i64]
    library.linear_batch.argtypes = [i32, vp, i32, vp]
    library.masked_magnitudes_batch.argtypes = library.task_arithmetic_batch.argtypes = [vp, i32, vp]
    library.masked_l1_batch.argtypes = library.key16_l1_histogram_batch.argtypes = [vp, i32, vp]
    kernels = (library.linear, library.linear_fma, library.mask_task_vector, library.masked_magnitudes)
    batches = (library.linear_batch, library.masked_magnitudes_batch, library.task_arithmetic_batch)
    library.masked_l1_batch.restype = library.key16_l1_histogram_batch.restype = ctypes.c_int
    for function in (*kernels, library.task_arithmetic, library.sce, *batches):
        function.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether the fused kernels are built and loaded (compiled on the first call)."""
    return _library() is not None


def supports(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors: contiguous float32/bfloat16 on CPU."""
    return available() and all(
        t is None or (t.device.type == "cpu" and t.dtype in DTYPE_CODES and t.is_contiguous()) for t in tensors
    )


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergekit-evo-fused")


def _run(function, numel: int, *arguments) -> bool:
    """``function(*arguments, begin, end)`` over [0, numel), in one contiguous range per torch
    thread; True if every call found its outputs finite."""
    parts = max(1, min(torch.get_num_threads(), numel // MIN_ELEMENTS_PER_THREAD))
    if parts == 1:
        return _checked(function(*arguments, 0, numel))
    step = -(-numel // parts // ALIGN) * ALIGN
    ranges = [(start, min(start + step, numel)) for start in range(0, numel, step)]
    # the other ranges on the pool, the first one here meanwhile
    others = [_pool(parts).submit(function, *arguments, *r) for r in ranges[1:]]
    first = _checked(function(*arguments, *ranges[0]))
    return all([_checked(future.result()) for future in others]) and first


def _checked(result: int) -> bool:
    if result < 0:
        raise ValueError(f"fused kernel refused its arguments (code {result})")
    return bool(result)


@functools.cache
def _linear_kernel():
    """The C linear kernel that computes what torch's ``addcmul_`` computes here (a product
    rounded then added, or one fused multiply-add: it depends on torch's build for this CPU),
    found by asking torch on a probe; None if neither does."""
    generator = torch.Generator().manual_seed(0)
    sources = [torch.randn(4099, generator=generator) * scale for scale in (1.0, 7.0, 0.03)]
    weight = torch.tensor([[0.3, -1.7, 2.9]])
    expected = torch.zeros(4099)  # as mergekit's linear_merge accumulates
    for source, coefficient in zip(sources, weight.unbind(1)):
        expected.addcmul_(source, coefficient)
    library = _library()
    candidates = [library.linear_fma, library.linear] if library.has_fma() else [library.linear]
    for kernel in candidates:
        out = torch.empty(4099)
        _call_linear(kernel, sources, weight[0].tolist(), None, out)
        if torch.equal(out.view(torch.int32), expected.view(torch.int32)):
            return kernel
    _log.warning("fused linear kernel off: torch's addcmul_ rounds differently from both C versions here")
    return None


def supports_linear() -> bool:
    """Whether the fused linear kernel reproduces torch's arithmetic on this machine."""
    return available() and _linear_kernel() is not None


def linear(
    sources: list[torch.Tensor], coefficients: Sequence[float], denominator: float | None, out: torch.Tensor
) -> bool:
    """mergekit's linear merge of flat ``sources`` into flat ``out``, all of one dtype (float32
    accumulation); True if every output is finite. Only where ``supports_linear()``."""
    return _call_linear(_linear_kernel(), sources, coefficients, denominator, out)


def _call_linear(kernel, sources, coefficients, denominator, out) -> bool:
    return _run(kernel, out.numel(), *_linear_arguments(sources, coefficients, denominator, out))


def _linear_arguments(sources, coefficients, denominator, out) -> tuple:
    """The C linear kernels' arguments before the range: (dtype, n, source pointers,
    coefficients, normalize, denominator, out); the two arrays must outlive the call."""
    if any(source.dtype != out.dtype for source in sources):
        raise ValueError("fused linear takes sources of the output's dtype")
    n = len(sources)
    pointers = (ctypes.c_void_p * n)(*(s.data_ptr() for s in sources))
    values = (ctypes.c_float * n)(*coefficients)
    normalize = denominator is not None
    return (
        DTYPE_CODES[out.dtype],
        n,
        pointers,
        values,
        int(normalize),
        denominator if normalize else 1.0,
        out.data_ptr(),
    )


class _LinearJob(ctypes.Structure):
    """fused.c's LinearJob: one tensor's range of a batch of linear merges."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("normalize", ctypes.c_int32),
        ("denominator", ctypes.c_float),
        ("sources", ctypes.c_void_p),
        ("coefficients", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("begin", ctypes.c_int64),
        ("end", ctypes.c_int64),
        ("finite", ctypes.c_int32),
    ]


def _pieces(numels: Sequence[int]) -> list[tuple[int, int, int]]:
    """A batch's items (``numels`` elements each) cut into ``(item, begin, end)`` pieces that the
    threads take in turn (fused.c's ``next_job``): about ``PIECES_PER_THREAD`` per thread, cut on
    whole cache lines, none under ``MIN_ELEMENTS_PER_THREAD`` elements unless its item is."""
    threads = torch.get_num_threads()
    size = max(MIN_ELEMENTS_PER_THREAD, -(-sum(numels) // (threads * PIECES_PER_THREAD) // ALIGN) * ALIGN)
    return [
        (index, begin, min(begin + size, numel))
        for index, numel in enumerate(numels)
        for begin in range(0, numel, size)
    ]


def _run_pieces(function, array: ctypes.Array, elements: int, *leading) -> None:
    """``function(*leading, jobs, count, counter)`` on this thread and, where the ``elements``
    are enough for more, on the pool meanwhile: each call takes pieces until none is left."""
    counter = ctypes.c_int32(0)
    arguments = (*leading, ctypes.addressof(array), len(array), ctypes.addressof(counter))
    threads = max(1, min(torch.get_num_threads(), elements // MIN_ELEMENTS_PER_THREAD))
    others = [_pool(threads).submit(function, *arguments) for _ in range(threads - 1)]
    _checked(function(*arguments))
    for future in others:
        _checked(future.result())


def _finite_per_item(count: int, pieces: list[tuple], array: ctypes.Array) -> list[bool]:
    finite = [True] * count
    for (index, _, _), job in zip(pieces, array):
        finite[index] = finite[index] and bool(job.finite)
    return finite


class LinearBatch:
    """Linear merges collected (``add``) and then run in one call of the kernels per thread
    (``run``): each tensor gets exactly ``linear``'s per-element arithmetic; what is saved is a
    call, a thread hand-off and the Python around them per tensor (a linear candidate of a
    100M-parameter model is ~100 tensors, most of them a fraction of a millisecond of work).
    Only where ``supports_linear()``; an output must not be read before ``run``."""

    def __init__(self):
        self._jobs: list[tuple] = []  # (linear's arguments, numel, tensors to keep alive, on_done)

    def __len__(self) -> int:
        return len(self._jobs)

    def add(
        self,
        sources: list[torch.Tensor],
        coefficients: Sequence[float],
        denominator: float | None,
        out: torch.Tensor,
        on_done: Callable[[bool], None],
    ) -> None:
        """Queue ``linear(sources, coefficients, denominator, out)``; ``on_done(finite)`` after."""
        arguments = _linear_arguments(sources, coefficients, denominator, out)
        self._jobs.append((arguments, out.numel(), (out, sources), on_done))

    def run(self) -> None:
        """Merge every queued tensor, then call each ``on_done``."""
        if not self._jobs:
            return
        jobs, self._jobs = self._jobs, []
        numels = [numel for _, numel, _, _ in jobs]
        pieces = _pieces(numels)
        fma = int(_linear_kernel() is _library().linear_fma)
        array = self._array(jobs, pieces)
        _run_pieces(_library().linear_batch, array, sum(numels), fma)
        for (_, _, _, on_done), finite in zip(jobs, _finite_per_item(len(jobs), pieces, array)):
            on_done(finite)

    @staticmethod
    def _array(jobs: list[tuple], pieces: list[tuple]) -> ctypes.Array:
        array = (_LinearJob * len(pieces))()
        for slot, (index, begin, end) in zip(array, pieces):
            dtype, n, pointers, values, normalize, denominator, out = jobs[index][0]
            slot.dtype, slot.n, slot.normalize, slot.denominator, slot.out = dtype, n, normalize, denominator, out
            slot.sources, slot.coefficients = ctypes.addressof(pointers), ctypes.addressof(values)
            slot.begin, slot.end = begin, end
        return array


class _MagnitudesJob(ctypes.Structure):
    """fused.c's MagnitudesJob: one range of one entry's phase one."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("key_lo", ctypes.c_int32),
        ("key_hi", ctypes.c_int32),
        ("key16", ctypes.c_int32),
        ("task_vector", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("magnitudes", ctypes.c_void_p),
        ("begin", ctypes.c_int64),
        ("end", ctypes.c_int64),
    ]


class _L1Job(ctypes.Structure):
    """fused.c's L1Job: one piece of one chunk of one entry's masked l1 sum."""

    _fields_ = [
        ("key_lo", ctypes.c_int32),
        ("key_hi", ctypes.c_int32),
        ("key16", ctypes.c_int32),
        ("task_vector", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("begin", ctypes.c_int64),
        ("end", ctypes.c_int64),
        ("sum", ctypes.c_double),
    ]


class MaskedL1:
    """The sums over ``chunks`` (ranges of the vector) of what ``masked_magnitudes`` would write
    for a bfloat16 ``task_vector`` (``|task_vector|`` where ``keys[j]`` is in ``key_range``, else
    0), in float64 and without writing it: ``sums``, set by ``masked_l1`` (l1_sum.py turns them
    into torch's ``magnitudes.sum()``)."""

    def __init__(
        self,
        task_vector: torch.Tensor,
        keys: torch.Tensor,
        key_range: tuple[int, int],
        chunks: Sequence[tuple[int, int]],
    ):
        if task_vector.dtype != torch.bfloat16 or not supports(task_vector) or not keys.is_contiguous():
            raise ValueError("fused masked_l1 takes a contiguous bfloat16 task vector (and keys) on CPU")
        self.task_vector, self.keys, self.key_range, self.chunks = task_vector, keys, key_range, list(chunks)
        self.key16 = _key16(keys)  # (refuses other key dtypes)
        self.sums: list[float] | None = None


def masked_l1(requests: Sequence[MaskedL1]) -> None:
    """Fill each request's ``sums``, all of them in one call of the kernel per thread."""
    items = [(request, chunk) for request in requests for chunk in request.chunks]
    if not items:
        return
    numels = [end - begin for _, (begin, end) in items]
    pieces = _pieces(numels)
    array = (_L1Job * len(pieces))()
    for slot, (index, begin, end) in zip(array, pieces):
        request, (offset, _) = items[index]
        slot.key_lo, slot.key_hi = request.key_range
        slot.key16, slot.task_vector, slot.keys = request.key16, request.task_vector.data_ptr(), request.keys.data_ptr()
        slot.begin, slot.end = offset + begin, offset + end
    _run_pieces(_library().masked_l1_batch, array, sum(numels))
    totals = [0.0] * len(items)
    for (index, _, _), job in zip(pieces, array):
        totals[index] += job.sum
    position = 0
    for request in requests:
        request.sums = totals[position : position + len(request.chunks)]
        position += len(request.chunks)


class _HistogramJob(ctypes.Structure):
    """fused.c's HistogramJob: one torch chunk of one task vector's key16 l1 histogram."""

    _fields_ = [
        ("task_vector", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("begin", ctypes.c_int64),
        ("end", ctypes.c_int64),
        ("histogram", ctypes.c_void_p),
    ]


def key16_l1_prefix(
    task_vector: torch.Tensor, keys: torch.Tensor, chunks: Sequence[tuple[int, int]], first: int
) -> torch.Tensor:
    """``prefix[c, hi - first]``: ``masked_l1`` of the bfloat16 ``task_vector`` over ``chunks[c]``
    for the key range ``[0, hi)``, for every ``hi`` from ``first`` to ``KEY16_BINS`` (float64,
    within ``KEY16_PREFIX_ERROR``): one pass over the vector for every density DARE may draw
    against. ``keys``: uint16 (int16 holding 0..0x3f7f)."""
    if task_vector.dtype != torch.bfloat16 or keys.dtype != torch.int16 or not supports(task_vector):
        raise ValueError("fused key16_l1_prefix takes a contiguous bfloat16 task vector and int16 keys on CPU")
    histograms = torch.zeros(len(chunks), KEY16_BINS, dtype=torch.float64)
    array = (_HistogramJob * len(chunks))()
    for slot, (begin, end), histogram in zip(array, chunks, histograms):
        slot.task_vector, slot.keys, slot.histogram = task_vector.data_ptr(), keys.data_ptr(), histogram.data_ptr()
        slot.begin, slot.end = begin, end
    _run_pieces(_library().key16_l1_histogram_batch, array, len(chunks) * MIN_ELEMENTS_PER_THREAD)
    below = torch.cat([torch.zeros(len(chunks), 1, dtype=torch.float64), histograms.cumsum(dim=1)], dim=1)
    return below[:, first:].contiguous()


class _TaskArithmeticJob(ctypes.Structure):
    """fused.c's TaskArithmeticJob: one range of one tensor's phase two."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("consensus", ctypes.c_int32),
        ("normalize", ctypes.c_int32),
        ("divisor", ctypes.c_float),
        ("apply_lambda", ctypes.c_int32),
        ("lambda_", ctypes.c_float),
        ("finite", ctypes.c_int32),
        ("entries", ctypes.c_void_p),
        ("base", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("begin", ctypes.c_int64),
        ("end", ctypes.c_int64),
    ]


@dataclass
class _QueuedMerge:
    entries: Callable[[], list[Entry]]
    base: torch.Tensor
    out: torch.Tensor
    flags: tuple[int, int, float, int, float]  # consensus, normalize, divisor, apply_lambda, lambda_
    on_done: Callable[[bool], None]


class TaskArithmeticBatch:
    """``task_arithmetic`` merges (and the phase one their rescaled entries need:
    ``masked_magnitudes``, or in bfloat16 ``masked_l1``) collected and run in two calls of the
    kernels per thread: ``run`` does phase one of every queued entry, then asks each tensor for
    its entries (``add``'s ``entries``: where the l1 sums are made and the scales set, between
    the two calls), then phase two of every tensor. Each element gets exactly the single calls'
    arithmetic. An output, and a magnitudes buffer, must not be read before ``run`` (or its
    ``entries`` call)."""

    def __init__(self):
        self._phase_one: list[tuple] = []  # (task vector, keys, key range, magnitudes)
        self._l1: list[MaskedL1] = []
        self._merges: list[_QueuedMerge] = []

    def __len__(self) -> int:
        return len(self._merges)

    def add_phase_one(
        self, task_vector: torch.Tensor, keys: torch.Tensor, key_range: tuple[int, int], magnitudes: torch.Tensor
    ) -> None:
        """Queue ``masked_magnitudes(task_vector, keys, key_range, magnitudes)``."""
        if task_vector.dtype != magnitudes.dtype:
            raise ValueError("fused masked_magnitudes takes magnitudes of the task vector's dtype")
        _key16(keys)  # (refuses other key dtypes)
        self._phase_one.append((task_vector, keys, key_range, magnitudes))

    def add_l1(self, request: MaskedL1) -> None:
        """Queue ``masked_l1([request])`` (its sums are set before any ``entries`` call)."""
        self._l1.append(request)

    def add(
        self,
        entries: Callable[[], list[Entry]],
        base: torch.Tensor,
        out: torch.Tensor,
        *,
        consensus: bool,
        normalize: bool,
        divisor: float | None,
        lambda_: float,
        on_done: Callable[[bool], None],
    ) -> None:
        """Queue ``task_arithmetic(entries(), base, out, ...)``; ``on_done(finite)`` after."""
        flags = (int(consensus), int(normalize), 1.0 if divisor is None else divisor, int(lambda_ != 1), lambda_)
        self._merges.append(_QueuedMerge(entries, base, out, flags, on_done))

    def run(self) -> None:
        """Phase one of every queued entry, each tensor's ``entries``, phase two of every tensor,
        then each ``on_done``."""
        phase_one, self._phase_one = self._phase_one, []
        l1, self._l1 = self._l1, []
        merges, self._merges = self._merges, []
        masked_l1(l1)
        if phase_one:
            numels = [task_vector.numel() for task_vector, _, _, _ in phase_one]
            pieces = _pieces(numels)
            _run_pieces(_library().masked_magnitudes_batch, self._phase_one_array(phase_one, pieces), sum(numels))
        if not merges:
            return
        structs = [self._entry_structs(merge.entries()) for merge in merges]
        numels = [merge.base.numel() for merge in merges]
        pieces = _pieces(numels)
        array = self._phase_two_array(merges, structs, pieces)
        _run_pieces(_library().task_arithmetic_batch, array, sum(numels))
        for merge, finite in zip(merges, _finite_per_item(len(merges), pieces, array)):
            merge.on_done(finite)

    @staticmethod
    def _entry_structs(entries: list[Entry]) -> ctypes.Array:
        if len(entries) > MAX_ENTRIES:
            raise ValueError(f"fused task_arithmetic takes at most {MAX_ENTRIES} entries, got {len(entries)}")
        return (_Entry * len(entries))(*(entry.as_struct() for entry in entries))

    @staticmethod
    def _phase_one_array(phase_one: list[tuple], pieces: list[tuple]) -> ctypes.Array:
        array = (_MagnitudesJob * len(pieces))()
        for slot, (index, begin, end) in zip(array, pieces):
            task_vector, keys, (key_lo, key_hi), magnitudes = phase_one[index]
            slot.dtype, slot.key_lo, slot.key_hi = DTYPE_CODES[task_vector.dtype], key_lo, key_hi
            slot.key16 = _key16(keys)
            slot.task_vector, slot.keys, slot.magnitudes = (
                task_vector.data_ptr(),
                keys.data_ptr(),
                magnitudes.data_ptr(),
            )
            slot.begin, slot.end = begin, end
        return array

    @staticmethod
    def _phase_two_array(merges: list[_QueuedMerge], structs: list[ctypes.Array], pieces: list[tuple]) -> ctypes.Array:
        array = (_TaskArithmeticJob * len(pieces))()
        for slot, (index, begin, end) in zip(array, pieces):
            merge = merges[index]
            slot.dtype, slot.n = DTYPE_CODES[merge.base.dtype], len(structs[index])
            slot.consensus, slot.normalize, slot.divisor, slot.apply_lambda, slot.lambda_ = merge.flags
            slot.entries, slot.base, slot.out = (
                ctypes.addressof(structs[index]),
                merge.base.data_ptr(),
                merge.out.data_ptr(),
            )
            slot.begin, slot.end = begin, end
        return array


def mask_task_vector(
    source: torch.Tensor,
    base: torch.Tensor,
    keys: torch.Tensor | None,
    key_range: tuple[int, int],
    masked: torch.Tensor,
    magnitudes: torch.Tensor,
) -> None:
    """``masked = keep ? source - base : +0`` and ``magnitudes = |masked|`` (all one dtype)."""
    _run(
        _library().mask_task_vector,
        base.numel(),
        DTYPE_CODES[base.dtype],
        source.data_ptr(),
        base.data_ptr(),
        0 if keys is None else keys.data_ptr(),
        _key16(keys),
        *key_range,
        masked.data_ptr(),
        magnitudes.data_ptr(),
    )


def masked_magnitudes(
    task_vector: torch.Tensor, keys: torch.Tensor, key_range: tuple[int, int], magnitudes: torch.Tensor
) -> None:
    """``magnitudes = |task_vector|`` where ``keys[j]`` is in ``key_range``, else +0 (one dtype):
    what the l1 rescale sums, when phase two reads the stored task vector itself."""
    _run(
        _library().masked_magnitudes,
        task_vector.numel(),
        DTYPE_CODES[task_vector.dtype],
        task_vector.data_ptr(),
        keys.data_ptr(),
        _key16(keys),
        *key_range,
        magnitudes.data_ptr(),
    )


def task_arithmetic(
    entries: list[Entry],
    base: torch.Tensor,
    out: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    divisor: float | None,
    lambda_: float,
) -> bool:
    """GeneralizedTaskArithmeticMerge's phase two (weights, TIES sign consensus, sum, normalize,
    lambda, + base) into flat ``out``; ``divisor``: the fixed divisor of a normalized merge
    without consensus. True if every output is finite."""
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"fused task_arithmetic takes at most {MAX_ENTRIES} entries, got {len(entries)}")
    structs = (_Entry * len(entries))(*(entry.as_struct() for entry in entries))
    return _run(
        _library().task_arithmetic,
        base.numel(),
        DTYPE_CODES[base.dtype],
        len(entries),
        structs,
        base.data_ptr(),
        out.data_ptr(),
        int(consensus),
        int(normalize),
        1.0 if divisor is None else divisor,
        int(lambda_ != 1),
        lambda_,
    )


def sce(entries: list[Entry], weights: list[float], base: torch.Tensor, out: torch.Tensor, min_divisor: float) -> bool:
    """mergekit's ``sce_merge`` after its top-k mask into flat ``out``: ``entries`` are the (masked)
    task vectors, each with weight 1.0; ``weights`` the per-model SCE weights and ``min_divisor``
    1e-6, both as values of the dtype. True if every output is finite."""
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"fused sce takes at most {MAX_ENTRIES} entries, got {len(entries)}")
    structs = (_Entry * len(entries))(*(entry.as_struct() for entry in entries))
    values = (ctypes.c_float * len(weights))(*weights)
    return _run(
        _library().sce,
        base.numel(),
        DTYPE_CODES[base.dtype],
        len(entries),
        structs,
        values,
        base.data_ptr(),
        out.data_ptr(),
        min_divisor,
    )
