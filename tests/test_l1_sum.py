"""l1_sum.py and fused.masked_l1: torch's bfloat16 l1 sum known from the kernel's own sums, or
not at all; checked against torch's ``sum()`` itself."""

import pytest
import torch

from mergekit_evolve.merge import fused, l1_sum

needs_kernels = pytest.mark.skipif(not fused.available(), reason="no C compiler: the fused kernels are off")


@pytest.fixture
def threads():
    """Set torch's thread count in a test; restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _task_vector(numel: int, generator: torch.Generator, spread: float = 3.0) -> torch.Tensor:
    """bfloat16 values of both signs over ~spread*2 decades of magnitude (a few exact zeros)."""
    values = torch.randn(numel, generator=generator) * torch.exp(torch.randn(numel, generator=generator) * spread)
    values[torch.rand(numel, generator=generator) < 0.05] = 0
    return values.to(torch.bfloat16)


def _masked_magnitudes(tv: torch.Tensor, keys: torch.Tensor, key_range: tuple[int, int]) -> torch.Tensor:
    kept = (keys.to(torch.int64) >= key_range[0]) & (keys.to(torch.int64) < key_range[1])
    return torch.where(kept, tv.abs(), torch.zeros((), dtype=tv.dtype))


@needs_kernels
@pytest.mark.parametrize("key16", [True, False])
def test_masked_l1_sums_are_within_their_stated_error(key16):
    """Per chunk, the kernel's sum of the kept magnitudes is within MASKED_L1_ERROR of the exact
    (float64) sum; key ranges past the uint16 keys' values keep all or nothing."""
    generator = torch.Generator().manual_seed(0)
    top = 0x8000 if key16 else 1 << 30
    ranges = [(0, top // 3), (top // 4, top // 2), (0, 0x8000), (0x8001, 0x9000), (0, 1 << 20)]
    for numel in (1, 255, 256, 257, 40_000, 100_003):
        tv = _task_vector(numel, generator)
        dtype = torch.int16 if key16 else torch.int32
        keys = torch.randint(0, top, (numel,), generator=generator, dtype=torch.int64).to(dtype)
        chunks = [(0, numel)] if numel < 1000 else [(0, numel // 3), (numel // 3, numel)]
        requests = [fused.MaskedL1(tv, keys, key_range, chunks) for key_range in ranges]
        fused.masked_l1(requests)
        for request, key_range in zip(requests, ranges):
            exact = _masked_magnitudes(tv, keys, key_range).double()
            for known, (begin, end) in zip(request.sums, chunks):
                total = float(exact[begin:end].sum())
                assert abs(known - total) <= fused.MASKED_L1_ERROR * total, (numel, key_range)
    everything = fused.MaskedL1(tv, keys, (0, 2**31 - 1), [(0, numel)])
    fused.masked_l1([everything])
    assert everything.sums[0] == pytest.approx(float(tv.abs().double().sum()), rel=fused.MASKED_L1_ERROR)


@needs_kernels
@pytest.mark.parametrize("count", [1, 2, 3])
def test_torch_sum_is_torch_own_bits_or_nothing(count, threads):
    """At 1, 2 and 3 torch threads, over sizes around the thread split and scales from 1e-20 to
    1e20: every answer is the bits of torch's ``magnitudes.sum()``, and almost every sum is known."""
    threads(count)
    generator = torch.Generator().manual_seed(count)
    known = unknown = 0
    sizes = [7, 4096, l1_sum.GRAIN_SIZE, l1_sum.GRAIN_SIZE + 1, 65_537, 98_303, 250_001, 1_000_003]
    for index, numel in enumerate(sizes * 4):
        tv = _task_vector(numel, generator) * (1e-20, 1e-3, 1.0, 1e20)[index % 4]
        keys = torch.randint(0, 0x8000, (numel,), generator=generator, dtype=torch.int16)
        request = fused.MaskedL1(tv, keys, (0, 0x3000), l1_sum.torch_chunks(numel))
        fused.masked_l1([request])
        answer = l1_sum.torch_sum(request.sums, request.chunks, fused.MASKED_L1_ERROR)
        expected = _masked_magnitudes(tv, keys, (0, 0x3000)).sum()
        if answer is None:
            unknown += 1
            continue
        known += 1
        assert answer.dtype == torch.bfloat16
        assert torch.equal(answer.view(torch.int16), expected.view(torch.int16)), (numel, answer, expected)
    assert known >= 0.85 * (known + unknown)


def test_torch_chunks_follow_torch_parallel_split():
    assert l1_sum.torch_chunks(10, threads=4) == [(0, 10)]
    assert l1_sum.torch_chunks(l1_sum.GRAIN_SIZE, threads=2) == [(0, l1_sum.GRAIN_SIZE)]
    assert l1_sum.torch_chunks(100_000, threads=1) == [(0, 100_000)]
    assert l1_sum.torch_chunks(100_001, threads=2) == [(0, 50_001), (50_001, 100_001)]
    # no more threads than grain-sized pieces: 40000 elements make 2 of them, not 8
    assert l1_sum.torch_chunks(40_000, threads=8) == [(0, 20_000), (20_000, 40_000)]


def test_zero_sums_are_zero_and_extreme_ones_are_left_to_torch():
    chunks = [(0, 1000)]
    zero = l1_sum.torch_sum([0.0], chunks)
    assert zero is not None and torch.equal(
        zero.view(torch.int16), torch.zeros(1000, dtype=torch.bfloat16).sum().view(torch.int16)
    )
    for extreme in (float("inf"), float("nan"), 2.0**-110, 2.0**125):
        assert l1_sum.torch_sum([extreme], chunks) is None
    # halfway between two bfloat16 values (1 and 1 + 2^-7): either could be torch's
    assert l1_sum.torch_sum([1 + 2.0**-8], chunks) is None
    assert l1_sum.torch_sum([1.0], chunks).item() == 1.0


def test_a_wrong_thread_split_is_caught(threads, monkeypatch):
    """If torch split a sum otherwise than torch_chunks says (here: no split at all), the check
    finds it and no sum is answered."""
    threads(2)
    l1_sum.agrees_with_torch.cache_clear()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(l1_sum, "torch_chunks", lambda numel, threads=None: [(0, numel)])
            assert not l1_sum.agrees_with_torch(2)
            assert l1_sum.torch_sum([5.0, 7.0], [(0, 50_000), (50_000, 100_000)]) is None
    finally:
        l1_sum.agrees_with_torch.cache_clear()
    assert l1_sum.agrees_with_torch(2)


@needs_kernels
def test_key16_l1_prefix_is_masked_l1_of_every_range():
    """One pass gives, per torch chunk, the l1 sum of every key range [0, hi) from ``first`` up,
    within KEY16_PREFIX_ERROR of exact; keys that are not high halves of uniforms are refused."""
    generator = torch.Generator().manual_seed(7)
    numel = 70_001
    tv = _task_vector(numel, generator)
    keys = torch.randint(0, fused.KEY16_BINS, (numel,), generator=generator, dtype=torch.int16)
    chunks = [(0, 35_001), (35_001, numel)]
    first = 0x3A80
    prefix = fused.key16_l1_prefix(tv, keys, chunks, first)
    assert prefix.shape == (2, fused.KEY16_BINS - first + 1)
    for high in (first, 0x3B00, 0x3D4C, 0x3F00, 0x3F7F, fused.KEY16_BINS):
        exact = _masked_magnitudes(tv, keys, (0, high)).double()
        for row, (begin, end) in enumerate(chunks):
            total = float(exact[begin:end].sum())
            assert abs(float(prefix[row, high - first]) - total) <= fused.KEY16_PREFIX_ERROR * total, high
    keys[123] = fused.KEY16_BINS
    with pytest.raises(ValueError, match="refused"):
        fused.key16_l1_prefix(tv, keys, chunks, first)
