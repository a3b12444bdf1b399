"""The fused C kernels (mergekit_evolve/merge/fused.c) against mergekit's own torch arithmetic,
bit for bit, on random values and the edge cases (signed zeros, subnormals, overflow to inf,
bfloat16 rounding ties), at one and two threads. End-to-end equality with mergekit's merge
methods, through the fast path, is tests/test_merge_fastpath.py's."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods.base import TensorEntry, TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.merge_methods.sce import sce_merge, sce_weight

from mergekit_evolve.merge import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="no C compiler: the fused kernels are off")
needs_linear = pytest.mark.skipif(not fused.supports_linear(), reason="torch's addcmul_ is neither C version here")

DTYPES = [torch.float32, torch.bfloat16]
SIZES = [1, 63, 1000, 200_003]  # the last one splits across two threads


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def _values(size: int, dtype: torch.dtype, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random values with every kind of edge case sprinkled in."""
    values = torch.randn(size, generator=generator) * scale
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1.0, -1.0, 2.0**-126])
    picks = torch.randint(0, size, (max(1, size // 50),), generator=generator)
    values[picks] = special[torch.randint(0, len(special), picks.shape, generator=generator)]
    return values.to(dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit patterns, except that a NaN may be another NaN or an inf (torch canonicalises
    the NaNs it rounds to bfloat16, the kernels keep them; where an overflowed delta loses the
    sign election mergekit multiplies it by 0, giving NaN, and the kernels drop it, leaving the
    other infinite entry). Either way the element is not finite, and the merger rejects such a
    candidate: the fast path's contract is for finite results."""
    not_finite = ~actual.isfinite() & ~expected.isfinite()
    either_nan = not_finite & (actual.isnan() | expected.isnan())
    differ = ((_bits(actual) != _bits(expected)) & ~either_nan).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{differ.numel()} of {actual.numel()} differ; first at {differ[0].item()}: "
        f"{actual[differ[0]].item()!r} vs {expected[differ[0]].item()!r}"
    )


@needs_linear
@pytest.mark.parametrize("n", [1, 3, 4, 6])  # up to 4 unrolled, then block by block
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_linear_is_mergekits_accumulation(size, dtype, normalize, n, threads):
    generator = torch.Generator().manual_seed(size)
    sources = [_values(size, dtype, generator, scale) for scale in (1.0, 3.0, 0.01, 0.5, 9.0, 0.2)[:n]]
    weight = torch.tensor([[0.2, -0.7, 1.3, 0.45, -0.05, 0.8][:n]])  # mergekit packs them as float32 [batch, n]
    expected = _mergekit_linear(sources, weight, normalize, dtype)
    out = torch.empty(size, dtype=dtype)
    finite = fused.linear(sources, weight[0].tolist(), float(weight.sum(dim=1)) if normalize else None, out)
    _assert_bitwise(out, expected)
    assert finite == bool(torch.isfinite(expected).all())


def _mergekit_linear(sources: list[torch.Tensor], weight: torch.Tensor, normalize: bool, dtype) -> torch.Tensor:
    """linear_merge's arithmetic: float32 zeros, addcmul_ per input, div_ by the weights' sum, cast."""
    expected = torch.zeros(sources[0].numel())
    for source, coefficient in zip(sources, weight.unbind(1)):
        expected.addcmul_(source, coefficient)
    if normalize:
        expected.div_(weight.sum(dim=1))
    return expected.to(dtype)


@needs_linear
def test_linear_batch_is_linear_per_tensor(threads):
    """A batch (one kernel call per thread for all its tensors, a tensor's elements split
    between the threads where the shares meet) gives each tensor linear's bits and its own
    finiteness; dtypes, input counts and normalisation may differ from tensor to tensor."""
    generator = torch.Generator().manual_seed(7)
    shapes = [(200_003, torch.float32, 3, True), (1, torch.bfloat16, 1, False), (63, torch.float32, 6, False)]
    shapes += [(70_001, torch.bfloat16, 4, True), (1000, torch.float32, 2, True), (131_072, torch.bfloat16, 3, False)]
    batch, jobs, finite = fused.LinearBatch(), [], {}
    for index, (size, dtype, n, normalize) in enumerate(shapes):
        sources = [_values(size, dtype, generator, scale) for scale in (1.0, 3.0, 0.01, 0.5, 9.0, 0.2)[:n]]
        if index == 0:  # one surely finite (no huge values) ...
            sources = [torch.randn(size, generator=generator).to(dtype) for _ in range(n)]
        if index == 4:  # ... and one surely not: only its flag says so
            sources[0][17] = float("inf")
        weight = torch.rand(1, n, generator=generator) * 2 - 0.5
        out = torch.full((size,), 7.0, dtype=dtype)
        denominator = float(weight.sum(dim=1)) if normalize else None
        batch.add(sources, weight[0].tolist(), denominator, out, lambda ok, index=index: finite.update({index: ok}))
        jobs.append((out, _mergekit_linear(sources, weight, normalize, dtype)))
    assert len(batch) == len(shapes) and not finite  # nothing runs before run()
    batch.run()
    assert len(batch) == 0
    for index, (out, expected) in enumerate(jobs):
        _assert_bitwise(out, expected)
        assert finite[index] == bool(torch.isfinite(expected).all()), index
    assert finite[4] is False and finite[0] is True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_mask_task_vector_is_masked_delta_and_magnitudes(size, dtype, threads):
    generator = torch.Generator().manual_seed(size + 1)
    base, source = _values(size, dtype, generator), _values(size, dtype, generator)
    keys = torch.randint(0, 1000, (size,), dtype=torch.int32, generator=generator)
    masked, magnitudes = torch.empty(size, dtype=dtype), torch.empty(size, dtype=dtype)
    fused.mask_task_vector(source, base, keys, (100, 700), masked, magnitudes)
    keep = (keys >= 100) & (keys < 700)
    expected = (source - base) * keep  # mergekit's tensor * mask; a dropped element becomes +0 here
    expected[~keep] = 0.0
    _assert_bitwise(masked, expected)
    _assert_bitwise(magnitudes, expected.abs())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_masked_magnitudes_are_those_of_the_masked_task_vector(size, dtype, threads):
    generator = torch.Generator().manual_seed(size + 2)
    task_vector = _values(size, dtype, generator)
    keys = torch.randint(0, 1000, (size,), dtype=torch.int32, generator=generator)
    magnitudes = torch.empty(size, dtype=dtype)
    fused.masked_magnitudes(task_vector, keys, (100, 700), magnitudes)
    keep = (keys >= 100) & (keys < 700)
    _assert_bitwise(magnitudes, (task_vector * keep).abs())  # mergekit: (delta * mask).abs()


@pytest.mark.parametrize("dtype", DTYPES)
def test_high_half_keys_keep_what_the_full_draws_keep(dtype, threads):
    """Keys given as the int16 high halves of the draws' bits, with the range's bound shifted
    alike (DARE against a bfloat16 density, whose bits' low half is zero), keep exactly what
    the int32 draws keep: phase one (both forms) and phase two's keyed entries (kinds 2 and 3)."""
    size = 200_003
    generator = torch.Generator().manual_seed(size + 5)
    draws = torch.rand(size, generator=generator)
    keys32, keys16 = draws.view(torch.int32), (draws.view(torch.int32) >> 16).to(torch.int16)
    p = torch.tensor(0.4, dtype=torch.bfloat16).float()
    full, half = (0, int(p.view(torch.int32))), (0, int(p.view(torch.int32)) >> 16)
    base, source = _values(size, dtype, generator), _values(size, dtype, generator)
    task_vector = source - base
    expected = torch.where(draws < p, task_vector, torch.zeros((), dtype=dtype))
    for keys, key_range in ((keys32, full), (keys16, half)):
        magnitudes = torch.empty_like(task_vector)
        fused.masked_magnitudes(task_vector, keys, key_range, magnitudes)
        _assert_bitwise(magnitudes, expected.abs())
        masked, magnitudes = torch.empty_like(task_vector), torch.empty_like(task_vector)
        fused.mask_task_vector(source, base, keys, key_range, masked, magnitudes)
        _assert_bitwise(masked, expected)
    merged = []
    for keys, key_range in ((keys32, full), (keys16, half)):
        entries = [
            fused.Entry(0.75, source=source, keys=keys, key_range=key_range),
            fused.Entry(0.375, task_vector=task_vector, keys=keys, key_range=key_range, scale=1.25),
        ]
        out = torch.empty_like(base)
        fused.task_arithmetic(entries, base, out, consensus=True, normalize=False, divisor=None, lambda_=1.0)
        merged.append(out)
    _assert_bitwise(merged[1], merged[0])
    with pytest.raises(ValueError, match="int32 or int16 keys"):
        fused.masked_magnitudes(task_vector, keys32.to(torch.int64), full, torch.empty_like(task_vector))


def _mergekit_phase_two(deltas, weights, base, consensus: bool, normalize: bool, lambda_: float) -> torch.Tensor:
    """GeneralizedTaskArithmeticMerge.merge_group after sparsification, as mergekit writes it."""
    deltas = torch.stack(deltas)
    weights = torch.tensor(weights, dtype=deltas.dtype).unsqueeze(-1)
    deltas.mul_(weights)
    if consensus:
        mask = get_mask(deltas, method="sum", mask_dtype=deltas.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


@pytest.mark.parametrize("lambda_", [1.0, 0.73])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("entries", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_is_mergekits_phase_two(dtype, entries, consensus, normalize, lambda_, threads):
    size = 200_003
    generator = torch.Generator().manual_seed(entries * 7 + consensus)
    base = _values(size, dtype, generator)
    weights = [float(torch.tensor(w, dtype=dtype)) for w in (0.6, -0.35, 1.1, 0.25, 0.9)[:entries]]
    deltas, plans = [], []
    for index in range(entries):
        source = _values(size, dtype, generator, scale=1.5)
        kind = (index + 2 * entries) % 6  # every kind appears at some entry count
        if kind == 0:  # source - base kept on a rank window (magnitude pruning)
            keys = torch.randperm(size, generator=generator).to(torch.int32)
            keep = (keys >= 1000) & (keys < size // 2)
            delta = source - base
            deltas.append(torch.where(keep, delta, torch.zeros((), dtype=dtype)))
            plans.append(fused.Entry(weights[index], source=source, keys=keys, key_range=(1000, size // 2)))
        elif kind == 1:  # a masked vector times its l1 rescale factor (DARE)
            masked = _values(size, dtype, generator)
            scale = torch.tensor(1.37, dtype=dtype)
            deltas.append(masked * scale)
            plans.append(fused.Entry(weights[index], masked=masked, scale=float(scale)))
        elif kind == 2:  # source - base, nothing pruned
            deltas.append(source - base)
            plans.append(fused.Entry(weights[index], source=source))
        elif kind == 3:  # a stored task vector kept on a draw range, times its rescale (DARE)
            task_vector = source - base
            keys = torch.randint(0, 2**24, (size,), dtype=torch.int32, generator=generator)
            keep = keys < 2**23
            scale = torch.tensor(0.61, dtype=dtype)
            deltas.append(torch.where(keep, task_vector, torch.zeros((), dtype=dtype)) * scale)
            kept = dict(keys=keys, key_range=(0, 2**23), scale=float(scale))
            plans.append(fused.Entry(weights[index], task_vector=task_vector, **kept))
        elif kind == 4:  # a stored task vector, nothing pruned
            deltas.append(source - base)
            plans.append(fused.Entry(weights[index], task_vector=source - base))
        else:  # a stored task vector's signs on phase one's magnitudes, times the rescale (DARE)
            task_vector = source - base
            keys = torch.randint(0, 2**24, (size,), dtype=torch.int32, generator=generator)
            magnitudes = torch.empty_like(task_vector)
            fused.masked_magnitudes(task_vector, keys, (2**20, 2**23), magnitudes)
            keep = (keys >= 2**20) & (keys < 2**23)
            scale = torch.tensor(2.3, dtype=dtype)
            deltas.append(torch.where(keep, task_vector, torch.zeros((), dtype=dtype)) * scale)
            stored = dict(task_vector=task_vector, magnitudes=magnitudes, scale=float(scale))
            plans.append(fused.Entry(weights[index], **stored))
    expected = _mergekit_phase_two(deltas, weights, base, consensus, normalize, lambda_)
    divisor = None
    if normalize and not consensus:
        total = torch.tensor(weights, dtype=dtype).sum()
        divisor = 1.0 if abs(float(total)) < 1e-8 else float(total)
    out = torch.empty_like(base)
    finite = fused.task_arithmetic(
        plans, base, out, consensus=consensus, normalize=normalize, divisor=divisor, lambda_=lambda_
    )
    _assert_bitwise(out, expected)
    assert finite == bool(torch.isfinite(expected).all())


def test_task_arithmetic_batch_is_phase_one_then_phase_two_per_tensor(threads):
    """A batch runs every queued phase one (masked_magnitudes), then asks each tensor for its
    entries (where the fast path sums the magnitudes into scales), then phase two of every
    tensor in one call per thread: each tensor gets the single calls' bits and its own
    finiteness, whatever its dtype, entry count, flags and size (shares cut inside tensors)."""
    generator = torch.Generator().manual_seed(11)
    shapes = [(200_003, torch.bfloat16, 2, True, True), (1, torch.float32, 1, False, False)]
    shapes += [(70_001, torch.float32, 3, True, False), (131_072, torch.bfloat16, 4, False, True)]
    batch, expected, finite, asked = fused.TaskArithmeticBatch(), [], {}, []
    for index, (size, dtype, n, consensus, normalize) in enumerate(shapes):
        values = _values if index else lambda size, dtype, generator, scale=1.0: torch.randn(size).to(dtype) * scale
        base = values(size, dtype, generator)  # (the first tensor surely finite: no edge values)
        if index == 1:  # one surely not finite: only its flag says so
            base[0] = float("inf")
        weights = [float(torch.tensor(w, dtype=dtype)) for w in (0.6, -0.35, 1.1, 0.25)[:n]]
        task_vectors = [values(size, dtype, generator, scale=0.5) for _ in range(n)]
        keys = [torch.randint(0, 2**24, (size,), dtype=torch.int32, generator=generator) for _ in range(n)]
        magnitudes = [torch.full((size,), 5.0, dtype=dtype) for _ in range(n)]
        singles = [torch.empty_like(m) for m in magnitudes]
        for tv, key, queued, single in zip(task_vectors, keys, magnitudes, singles):
            batch.add_phase_one(tv, key, (2**20, 2**23), queued)
            fused.masked_magnitudes(tv, key, (2**20, 2**23), single)

        def entries(index=index, tvs=task_vectors, mags=magnitudes, singles=singles, weights=weights, dtype=dtype):
            for queued, single in zip(mags, singles):  # phase one ran before any tensor is asked
                _assert_bitwise(queued, single)
            asked.append(index)
            scales = [float(torch.tensor(1.5, dtype=dtype) / (1 + m.float().sum()).to(dtype)) for m in mags]
            return [
                fused.Entry(w, task_vector=tv, magnitudes=m, scale=c) for w, tv, m, c in zip(weights, tvs, mags, scales)
            ]

        arguments = dict(consensus=consensus, normalize=normalize, divisor=1.7 if normalize else None, lambda_=0.8)
        out = torch.full((size,), 9.0, dtype=dtype)
        batch.add(entries, base, out, **arguments, on_done=lambda ok, index=index: finite.update({index: ok}))
        expected.append((out, base, entries, arguments))
    assert len(batch) == len(shapes) and not finite and not asked  # nothing runs before run()
    batch.run()
    assert len(batch) == 0 and asked == list(range(len(shapes)))
    for index, (out, base, entries, arguments) in enumerate(expected):
        single = torch.empty_like(out)
        ok = fused.task_arithmetic(entries(), base, single, **arguments)
        _assert_bitwise(out, single)
        assert finite[index] == ok
    assert finite[1] is False and finite[0] is True


@pytest.mark.parametrize("stored", [False, True], ids=["from-sources", "masked-vectors"])
@pytest.mark.parametrize("entries", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sce_is_mergekits_sce_merge(dtype, entries, stored, threads):
    """mergekit's sce_merge (no top-k mask) against the kernel given the sources, or the task
    vectors as phase one's masked vectors (what the fast path passes after its top-k mask)."""
    size = 200_003
    generator = torch.Generator().manual_seed(entries * 11 + stored)
    # finite weights: large task vectors overflow mergekit's mean of squares to inf, making every
    # weight NaN (a non-finite candidate either way); subnormals, signed zeros and ties stay
    base = _values(size, dtype, generator).clamp(-1e15, 1e15)
    sources = [_values(size, dtype, generator, scale=1.5).clamp(-1e15, 1e15) for _ in range(entries)]
    sources[0][: size // 3] = base[: size // 3]  # zero task vectors: excluded from sign election and divisor
    group = TensorGroup(
        entries=(TensorEntry(id="base", tensor=base, is_base=True),)
        + tuple(TensorEntry(id=index, tensor=source) for index, source in enumerate(sources))
    )
    expected = sce_merge.merge_group(group, int8_mask=False, select_topk=1.0)  # mergekit's own kernel
    task_vectors = torch.stack([source - base for source in sources])
    weights = sce_weight(task_vectors).tolist()
    if stored:
        plans = [fused.Entry(1.0, masked=tv) for tv in task_vectors]
    else:
        plans = [fused.Entry(1.0, source=source) for source in sources]
    out = torch.empty_like(base)
    min_divisor = torch.tensor(1e-6, dtype=dtype).item()
    finite = fused.sce(plans, weights, base, out, min_divisor=min_divisor)
    _assert_bitwise(out, expected)
    assert finite == bool(torch.isfinite(expected).all())


def test_zero_entries_and_refusals():
    base = torch.randn(1000)
    out = torch.empty_like(base)
    assert fused.task_arithmetic(
        [fused.Entry(0.5)], base, out, consensus=True, normalize=True, divisor=None, lambda_=1.0
    )
    assert torch.equal(out, base)  # a zero task vector leaves the base (mergekit: base + 0)
    assert fused.supports(base) and not fused.supports(base.double()) and not fused.supports(base[::2])
    with pytest.raises(ValueError, match="at most 4 entries"):
        fused.task_arithmetic(
            [fused.Entry(1.0)] * 5, base, out, consensus=False, normalize=False, divisor=None, lambda_=1.0
        )
