"""torch's ``x.sum()`` of a nonnegative bfloat16 vector, known without running it.

DARE's l1 rescale divides by ``masked.abs().sum()``: torch sums a bfloat16 vector in float32 (in
an order of its own) and rounds the result to bfloat16. The fast path knows the sum of every
piece of that vector within a tiny known error (fused.c's ``masked_l1_batch``) without writing the
vector, and that is enough to know torch's bfloat16 result almost always, with no copy of torch's
order within a piece:

* how torch splits a full reduction over its threads (``torch_chunks``: ``at::parallel_for``'s
  contiguous chunks of a two-pass reduction; one chunk below ``GRAIN_SIZE`` elements or on one
  thread) and that each chunk's float32 sum is rounded to bfloat16 into its slot of a bfloat16
  buffer, whose slots torch then sums in its scalar loop (done here the same way for fewer than 8
  threads; for more, torch sums the slots);
* that torch's cascade sum passes each element through a bounded number of float32 roundings
  (``roundings_bound``), so a chunk's float32 sum is within a known relative distance of the exact
  one (every term is >= 0, so no cancellation);
* rounding to float32 and then to bfloat16 is monotone: when both ends of that interval round to
  the same bfloat16 value, torch's rounded chunk sum is that value, whatever its order.

When an end differs (a few chunks in a hundred), or a sum is not finite, or torch here splits or rounds
otherwise than this module expects (``agrees_with_torch`` checks once per thread count, on random
vectors), the answer is None and the caller sums with torch as before. So a result is either
torch's own bits or absent; tests/test_l1_sum.py checks both against torch.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
from collections.abc import Sequence

import torch

__all__ = ["torch_chunks", "roundings_bound", "torch_sum", "agrees_with_torch"]

_log = logging.getLogger(__name__)

GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: below it torch reduces on one thread
_F32_UNIT = 2.0**-24  # float32's unit roundoff
# float32 sums whose bfloat16 rounding is certain only away from over- and underflow
_SMALLEST, _LARGEST = 2.0**-100, 2.0**120
# thread slots summed in the scalar loop on any CPU (torch's bfloat16 vectors hold 8 or more)
_SCALAR_SLOTS = 8


def torch_chunks(numel: int, threads: int | None = None) -> list[tuple[int, int]]:
    """The contiguous ranges torch sums a vector of ``numel`` elements in, one per thread, as
    ``at::parallel_for(0, numel, GRAIN_SIZE)`` splits a two-pass reduction."""
    threads = torch.get_num_threads() if threads is None else threads
    if numel <= GRAIN_SIZE or threads == 1:
        return [(0, numel)]
    used = min(threads, -(-numel // GRAIN_SIZE))
    step = -(-numel // used)
    return [(begin, min(begin + step, numel)) for begin in range(0, numel, step)]


@functools.lru_cache(maxsize=4096)
def roundings_bound(numel: int) -> int:
    """An upper bound, with half again to spare, on the float32 roundings any element's value
    goes through in torch's sum of ``numel`` contiguous bfloat16 elements (SumKernel.cpp's
    vectorized inner sum, for vectors of 8 to 64 elements: a vector's two halves added, 4
    interleaved rows of vectors in a cascade of 4 levels of 2**max(4, ceil(log2(rows)) // 4)
    steps whose top level takes every carry, the rows' tails and the rows merged, then the
    scalar tail and the float lanes in sequence)."""
    worst = 0
    for elements in (8, 16, 32, 64):
        rows = max(1, numel // (elements * 4))
        step = 1 << max(4, math.ceil(math.log2(rows)) // 4)
        worst = max(worst, 4 * step + rows // step**3 + 2 * elements + 16)
    return worst * 3 // 2


def _float32(value: float) -> float:
    """``value`` rounded to float32 (to nearest, ties to even)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _bfloat16(value: float) -> float:
    """A finite float32 ``value`` rounded to bfloat16 as torch rounds (to nearest, ties to even)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return struct.unpack("<f", struct.pack("<I", rounded))[0]


def _chunk_sum(known: float, numel: int, error: float) -> float | None:
    """torch's bfloat16 rounding of its float32 sum of ``numel`` nonnegative terms, from
    ``known``: their sum within a relative ``error`` of exact; None where that rounding is
    uncertain."""
    if known == 0:
        return 0.0  # every term is +0: so is any sum of them
    if not (_SMALLEST <= known <= _LARGEST):  # (NaN and inf too)
        return None
    roundings = roundings_bound(numel)
    torch_error = roundings * _F32_UNIT / (1 - roundings * _F32_UNIT)
    # exact in [known / (1 + error), known / (1 - error)], torch's float32 sum within torch_error
    # of exact (and a few float64 ulps for the arithmetic here); float32 then bfloat16 rounding
    # is monotone, so equal ends settle every value between
    low = known * (1 - torch_error) / (1 + error) * (1 - 2**-50)
    high = known * (1 + torch_error) / (1 - error) * (1 + 2**-50)
    low_bf16 = _bfloat16(_float32(low))
    return low_bf16 if low_bf16 == _bfloat16(_float32(high)) else None


def torch_sum(
    chunk_sums: Sequence[float], chunks: Sequence[tuple[int, int]], error: float = 0.0
) -> torch.Tensor | None:
    """What torch's ``x.sum()`` returns (a bfloat16 0-d tensor) for a nonnegative bfloat16 vector
    ``x`` whose sum over each of ``torch_chunks(x.numel())`` is ``chunk_sums`` (each within a
    relative ``error`` of exact); None where it is uncertain (the caller sums with torch)."""
    if not agrees_with_torch(torch.get_num_threads()):
        return None
    return _from_chunks(chunk_sums, chunks, error)


def _from_chunks(chunk_sums: Sequence[float], chunks: Sequence[tuple[int, int]], error: float):
    rounded = [_chunk_sum(total, end - begin, error) for total, (begin, end) in zip(chunk_sums, chunks)]
    if any(value is None for value in rounded):
        return None
    if len(rounded) == 1:
        return torch.tensor(rounded[0], dtype=torch.bfloat16)
    # two-pass reduction: one bfloat16 slot per thread (unused ones +0), summed by torch's loop
    slots = rounded + [0.0] * (torch.get_num_threads() - len(rounded))
    if len(slots) < _SCALAR_SLOTS:
        return torch.tensor(_bfloat16(_scalar_row_sum(slots)), dtype=torch.bfloat16)
    return torch.tensor(slots, dtype=torch.bfloat16).sum()


def _scalar_row_sum(values: list[float]) -> float:
    """torch's float32 sum of fewer values than a vector holds (SumKernel.cpp's scalar
    ``row_sum``): four interleaved running sums, the tail into the first, then the four in order."""
    partial = [0.0] * 4
    rows = len(values) // 4
    for row in range(rows):
        for k in range(4):
            partial[k] = _float32(partial[k] + values[4 * row + k])
    for value in values[4 * rows :]:
        partial[0] = _float32(partial[0] + value)
    for k in range(1, 4):
        partial[0] = _float32(partial[0] + partial[k])
    return partial[0]


@functools.cache
def agrees_with_torch(threads: int) -> bool:
    """Whether ``torch_sum`` gives torch's own bits with ``threads`` (torch's current) threads, on
    random vectors: sizes around the thread split (where a wrong split would show in about one
    vector in ten) and the cascade's steps, scales from tiny to large. Where torch splits or rounds
    otherwise, no answer could be trusted, so none is given (checked once per thread count)."""
    if threads != torch.get_num_threads():
        raise ValueError("agrees_with_torch(threads) is asked with torch's current thread count")
    generator = torch.Generator().manual_seed(1234)
    split = torch.randint(GRAIN_SIZE + 1, 3 * GRAIN_SIZE, (64,), generator=generator).tolist()
    for index, numel in enumerate([1, 100, 4097, GRAIN_SIZE, 250_003, *split]):
        scale = (1e-3, 1.0, 3e4)[index % 3]
        x = (torch.rand(numel, generator=generator) * scale).to(torch.bfloat16)
        x[torch.rand(numel, generator=generator) < 0.3] = 0
        chunks = torch_chunks(numel)
        wide = x.double()  # (torch's float64 sums: well within 2^-40 of exact)
        known = _from_chunks([float(wide[b:e].sum()) for b, e in chunks], chunks, 2.0**-40)
        if known is not None and not torch.equal(known.view(torch.int16), x.sum().view(torch.int16)):
            _log.warning("l1 sums from the fused kernel off: torch %s sums otherwise here", torch.__version__)
            return False
    return True
