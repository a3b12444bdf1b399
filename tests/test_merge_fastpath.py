"""The sparsifying fast path equals mergekit bit for bit: its kernels and run_merge.

Two module-scoped families of tiny random Llamas (fp32: base + 3 experts with odd widths;
bf16: base + 2 experts, where equal magnitudes are everywhere). Each method gets several random
candidates (per-layer gradients, per-filter values, densities of exactly 1 and 0, rescale /
normalize / lambda / int8_mask); the fast merger's tensors must have the same bit patterns as
a merger running mergekit's kernels in the same Executor (``fast_path=False``), and one
candidate per method must equal ``run_merge`` with the same seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_family
from mergekit.config import MergeConfiguration
from safetensors.torch import load_file, save_file

from mergekit_evolve.merge import InMemoryMerger, fused, merge_to_disk
from mergekit_evolve.merge.fastpath import FastMergeTask, UniformStream

SEED = 4321
SPARSIFYING = (
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "task_arithmetic",
)
SHAPES = {
    "fp32": dict(n_experts=3, num_layers=2, hidden_size=24, intermediate_size=40, num_heads=4),
    "bf16": dict(n_experts=2, num_layers=2, hidden_size=32, intermediate_size=48, num_heads=4, dtype=torch.bfloat16),
}
FILTERS = ("self_attn", "mlp")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is faster here (mergekit's DELLA row min/max waits ~20 ms
    per call for a second thread on a busy machine). Exactness holds at any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def fused_at_any_size():
    """The families' tensors are tiny: let the fused kernels take them anyway (the chunked torch
    operations are tested by turning the kernels off)."""
    from mergekit_evolve.merge import fastpath

    threshold = fastpath.FUSED_MIN_ELEMENTS
    fastpath.FUSED_MIN_ELEMENTS = 0
    yield
    fastpath.FUSED_MIN_ELEMENTS = threshold


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    return {name: make_family(tmp_path_factory.mktemp(name), **shape) for name, shape in SHAPES.items()}


def _value(rng: np.random.Generator, low: float, high: float, exact: tuple = ()):
    """A parameter value as a recipe writes it: scalar, layer gradient or per-filter list."""

    def draw():
        return (
            float(exact[rng.integers(len(exact))]) if exact and rng.random() < 0.25 else float(rng.uniform(low, high))
        )  # noqa: E731

    form = rng.integers(3)
    if form == 0:
        return draw()
    if form == 1:
        return [draw(), draw()]
    return [{"filter": FILTERS[rng.integers(2)], "value": draw()}, {"value": draw()}]


def _candidate(method: str, family: dict[str, Path], dtype: str, rng: np.random.Generator) -> MergeConfiguration:
    experts = [str(p) for name, p in family.items() if name != "base"]
    shared: dict = {}
    per_model = []
    for _ in experts:
        params: dict = {}
        if method != "sce":
            params["weight"] = _value(rng, -0.3, 1.2)
        if method.startswith("della"):
            params["density"] = _value(rng, 0.2, 0.8, exact=(1.0,))
            params["epsilon"] = float(rng.uniform(0.01, 0.15))
        elif method not in ("sce", "task_arithmetic"):
            params["density"] = _value(rng, 0.02, 0.98, exact=(1.0, 0.0))
        if method.startswith("breadcrumbs"):
            params["gamma"] = _value(rng, 0.0, 0.1)
        per_model.append(params)
    if method == "sce":
        shared = {"select_topk": _value(rng, 0.05, 0.95, exact=(1.0,)), "int8_mask": bool(rng.random() < 0.5)}
    else:
        shared = {
            "normalize": bool(rng.random() < 0.5),
            "rescale": bool(rng.random() < 0.5),
            "int8_mask": bool(rng.random() < 0.5),
        }
        if rng.random() < 0.5:
            shared["lambda"] = float(rng.uniform(0.6, 1.4))
    return MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": str(family["base"]),
            "models": [{"model": str(family["base"])}]
            + [{"model": e, "parameters": p} for e, p in zip(experts, per_model)],
            "parameters": shared,
            "dtype": dtype,
        }
    )


def _template(family: dict[str, Path], dtype: str) -> MergeConfiguration:
    return _candidate("dare_ties", family, dtype, np.random.default_rng(0))


@pytest.fixture(scope="module")
def mergers(families) -> dict[str, tuple[InMemoryMerger, InMemoryMerger]]:
    """(fast, mergekit kernels) per family, both seeded alike."""
    built = {}
    for name, family in families.items():
        dtype = "float32" if name == "fp32" else "bfloat16"
        template = _template(family, dtype)
        built[name] = (
            InMemoryMerger(template, random_seed=SEED),
            InMemoryMerger(template, random_seed=SEED, fast_path=False),
        )
    return built


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit pattern (so -0.0 and 0.0, or two NaNs, are told apart)."""
    return tensor.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _assert_bitwise(model: torch.nn.Module, expected: dict[str, torch.Tensor], what: str) -> None:
    state = model.state_dict()
    different = [n for n, t in expected.items() if not torch.equal(_bits(state[n]), _bits(t))]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


def _fast_tasks(merger: InMemoryMerger, config: MergeConfiguration) -> int:
    """How many of the candidate's planned tensors the fast path takes."""
    targets, _ = merger._route.plan(config)
    return sum(isinstance(t.tensor_task, FastMergeTask) for t in merger.fast_path.rewrite(targets))


@pytest.mark.parametrize("family_name", list(SHAPES))
@pytest.mark.parametrize("method", SPARSIFYING)
def test_candidates_bitwise_equal_to_mergekit_kernels(method, family_name, families, mergers):
    fast, reference = mergers[family_name]
    dtype = "float32" if family_name == "fp32" else "bfloat16"
    rng = np.random.default_rng(abs(hash((method, family_name))) % 2**32)
    for index in range(2):
        config = _candidate(method, families[family_name], dtype, rng)
        expected = _state(reference.merge(config))
        _assert_bitwise(fast.merge(config), expected, f"{method} {family_name} candidate {index}")
        assert fast.fast_path.last_fast_tasks == len(expected)  # every tensor took the fast path


@pytest.mark.parametrize(
    "method,family_name",
    [(m, "fp32") for m in ("ties", "dare_ties", "breadcrumbs_ties", "della", "sce")]
    + [("ties", "bf16"), ("dare_ties", "bf16")],
)
def test_equal_to_run_merge(method, family_name, families, mergers, tmp_path):
    fast, _ = mergers[family_name]
    dtype = "float32" if family_name == "fp32" else "bfloat16"
    config = _candidate(method, families[family_name], dtype, np.random.default_rng(7))
    out = merge_to_disk(config, tmp_path / method, random_seed=SEED, write_model_card=False)
    _assert_bitwise(fast.merge(config), load_file(out / "model.safetensors"), f"{method} vs run_merge")
    # every tensor was fast, so the kernels ran directly, in the order mergekit's Executor runs them
    assert any(fast._schedule_orders.values())


def test_uniform_stream_is_what_bernoulli_draws():
    """torch.bernoulli(p) on CPU after manual_seed(s) keeps u < p for the uniforms torch.rand
    gives a generator seeded with s: the premise of reproducing DARE/DELLA draws."""
    sizes, densities = (1000, 37, 4097, 5), (0.3, 0.9, 0.55, 0.01)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        masks = [
            torch.bernoulli(torch.full((n,), d, dtype=dtype))
            for n, d, dtype in zip(sizes, densities, (torch.float32, torch.bfloat16) * 2)
        ]
        della = torch.bernoulli(torch.linspace(0.1, 0.9, 300).reshape(10, 30))
    stream = UniformStream(SEED)
    stream.begin()
    for mask, n, d, dtype in zip(masks, sizes, densities, (torch.float32, torch.bfloat16) * 2):
        p = torch.full((1,), d, dtype=dtype).item()
        assert torch.equal(mask, (stream.take(n) < p).to(dtype))
    probs = torch.linspace(0.1, 0.9, 300).reshape(10, 30)
    assert torch.equal(della, (stream.take(300).view(10, 30) < probs).float())


def test_high_halves_of_the_draws_decide_bernoulli_against_bfloat16_densities():
    """DARE in bfloat16 keeps u < p for a bfloat16 p: the int16 high halves of the draws' bits
    (half the stream's memory) decide it exactly, for every bfloat16 p in [0, 1]; and they are
    the high halves of the float32 stream, made in blocks or not, switching forms or not."""
    from mergekit_evolve.merge.fastpath import _bernoulli_bound

    sizes = (5000, 3, 70_001)
    floats, halves = UniformStream(SEED), UniformStream(SEED)
    halves.GENERATE_ELEMENTS = 1000  # blocks end inside the tensors
    floats.reserve(sum(sizes))
    halves.reserve(100)  # float32 first: switching forms starts the stream again
    halves.reserve(sum(sizes), high_halves=True)
    assert halves._values.dtype == torch.int16 and 2 * halves.nbytes == floats.nbytes
    assert torch.equal(halves._values, (floats._values.view(torch.int32) >> 16).to(torch.int16))
    # every bfloat16 value in [0, 1] against the first 2000 draws
    p = torch.arange(0, 0x3F81, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    u = floats._values[:2000]
    assert torch.equal(u[None, :] < p.float()[:, None], halves._values[None, :2000] < (p.view(torch.int16)[:, None]))
    densities = (0.3, 2**-9, 0.999, 0.55)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        masks = [torch.bernoulli(torch.full((n,), d, dtype=torch.bfloat16)) for n, d in zip(sizes, densities)]
    halves.begin()
    for mask, n, d in zip(masks, sizes, densities):
        kept = halves.take(n) < (_bernoulli_bound(d, torch.bfloat16) >> 16)
        assert torch.equal(mask.bool(), kept)


def test_state_is_one_method_at_a_time(families, tmp_path):
    family = families["fp32"]
    merger = InMemoryMerger(_template(family, "float32"), random_seed=SEED)
    expert_elements = sum(
        t.numel() for name, p in family.items() if name != "base" for t in load_file(p / "model.safetensors").values()
    )
    rng = np.random.default_rng(3)
    ties = _candidate("ties", family, "float32", rng)
    ties.models[1].parameters["density"] = 0.5  # at least one expert sparsified
    merger.merge(ties)
    assert merger.fast_path.nbytes()["rank_desc"] == 4 * expert_elements  # int32 per element
    linear = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family.values()],
            "dtype": "float32",
        }
    )
    merger.merge(linear)  # needs no state: keeps what is there
    assert "rank_desc" in merger.fast_path.nbytes()
    merger.merge(_candidate("dare_ties", family, "float32", rng))
    sizes = merger.fast_path.nbytes()
    assert "rank_desc" not in sizes and sizes["stream"] == 4 * expert_elements


def test_bfloat16_dare_keeps_half_the_draws(families, mergers):
    """DARE in bfloat16 keeps the draws' high halves (2 bytes per element instead of 4); DELLA,
    which compares them with float32 probabilities, the float32 draws: each with mergekit's bits."""
    family = families["bf16"]
    fast, reference = mergers["bf16"]
    expert_elements = sum(
        t.numel() for name, p in family.items() if name != "base" for t in load_file(p / "model.safetensors").values()
    )
    rng = np.random.default_rng(13)
    for method, per_element in (("dare_linear", 2), ("della", 4), ("dare_ties", 2)):
        config = _candidate(method, family, "bfloat16", rng)
        config.models[1].parameters["density"] = 0.5  # at least one expert draws
        expected = _state(reference.merge(config))
        _assert_bitwise(fast.merge(config), expected, f"{method} bf16")
        assert fast.fast_path.nbytes()["stream"] == per_element * expert_elements, method


def test_unseeded_random_methods_keep_mergekit_kernels(families):
    family = families["fp32"]
    merger = InMemoryMerger(_template(family, "float32"))  # random_seed=None
    rng = np.random.default_rng(5)
    assert _fast_tasks(merger, _candidate("dare_ties", family, "float32", rng)) == 0
    assert _fast_tasks(merger, _candidate("ties", family, "float32", rng)) > 0
    assert InMemoryMerger(_template(family, "float32"), fast_path=False).fast_path is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sum_entries_is_torch_sum(dtype):
    """The two-entry shortcut equals torch's dim-0 sum bitwise, signed zeros and wide exponent
    ranges included; three entries go to torch.sum itself."""
    from mergekit_evolve.merge.fastpath import _sum_entries

    generator = torch.Generator().manual_seed(0)
    for entries in (2, 3):
        rows = torch.randn(entries, 5000, generator=generator) * torch.logspace(-6, 4, 5000)
        rows = rows.to(dtype)
        rows[:, ::7] = -0.0
        rows[0, ::3] = 0.0
        rows[1, ::11] = -rows[0, ::11]  # exact cancellations
        assert torch.equal(_bits(_sum_entries(rows)), _bits(rows.sum(dim=0)))


def test_config_key_turns_the_fast_path_off(family, tmp_path):
    """``merge_fast_path: false`` reaches the merger; both settings give the same tensors."""
    from mergekit_evolve.config import parse_config
    from mergekit_evolve.search.problems import PSProblem

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    models = {}
    for fast in (True, False):
        config = parse_config(
            {
                "genome": {
                    "models": [str(family["expert0"]), str(family["expert1"])],
                    "merge_method": "dare_ties",
                    "base_model": str(family["base"]),
                    "layer_granularity": 2,
                },
                "fitness": {"tasks": [{"name": "t", "data": str(data)}]},
                "dtype": "float32",
                "merge_fast_path": fast,
            }
        )
        problem = PSProblem(config)
        assert (problem.merger.fast_path is not None) is fast
        models[fast] = _state(problem.build(problem.decode(problem.x0(random=True, seed=1))))
    assert problem.merger.fast_path is None
    assert all(torch.equal(_bits(models[True][n]), _bits(models[False][n])) for n in models[False])


CHUNKED = ("linear", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della", "task_arithmetic", "sce")


def _linear_candidate(family: dict[str, Path], dtype: str, rng: np.random.Generator) -> MergeConfiguration:
    return MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": _value(rng, -0.3, 1.2)}} for p in family.values()],
            "parameters": {"normalize": bool(rng.random() < 0.5)},
            "dtype": dtype,
        }
    )


def _any_candidate(method: str, family: dict[str, Path], dtype: str, rng: np.random.Generator) -> MergeConfiguration:
    if method == "linear":
        return _linear_candidate(family, dtype, rng)
    return _candidate(method, family, dtype, rng)


@pytest.mark.parametrize("chunk", [64, 96])
@pytest.mark.parametrize("family_name", list(SHAPES))
def test_chunks_and_reused_buffers_bitwise_equal(chunk, family_name, families, mergers, monkeypatch):
    """The torch operations' path (where the fused C kernels are off or cannot take a tensor):
    tensors split into many chunks (a 96-element chunk also splits torch's vector loops off
    their usual boundaries), scratch buffers reused across consecutive candidates of different
    methods and parameters, results written into the model's parameters: still mergekit's bits."""
    from mergekit_evolve.merge import fastpath, fused

    monkeypatch.setattr(fastpath, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(fused, "supports", lambda *tensors: False)
    monkeypatch.setattr(fused, "supports_linear", lambda: False)
    fast, reference = mergers[family_name]
    dtype = "float32" if family_name == "fp32" else "bfloat16"
    rng = np.random.default_rng(chunk)
    for method in CHUNKED * 2:
        config = _any_candidate(method, families[family_name], dtype, rng)
        expected = _state(reference.merge(config))
        model = fast.merge(config)
        _assert_bitwise(model, expected, f"{method} {family_name} chunk {chunk}")
        assert fast.fast_path.last_fast_tasks == len(expected)
    assert fast.fast_path.nbytes()["scratch"] > 0
    storages = {name: p.data_ptr() for name, p in fast.model.named_parameters()}
    fast.merge(_candidate("ties", families[family_name], dtype, rng))
    assert storages == {name: p.data_ptr() for name, p in fast.model.named_parameters()}  # written in place


@pytest.mark.skipif(not fused.available(), reason="no C compiler: the fused kernels are off")
@pytest.mark.parametrize("family_name", list(SHAPES))
def test_fused_kernels_carry_the_candidates(family_name, families, mergers, monkeypatch):
    """Where the fused C kernels are built they run every task-arithmetic-family and linear
    tensor (and phase one of each rescaled entry whose mask is a key range, from the stored task
    vectors: in bfloat16 only its l1 sums, masked_l1), with mergekit's bits."""
    calls = {name: 0 for name in ("linear", "mask_task_vector", "masked_magnitudes", "task_arithmetic", "sce")}
    for name in calls:
        monkeypatch.setattr(fused, name, _counted(getattr(fused, name), calls, name))
    # tensors written straight into the model go to a batch, one kernel call per thread for all
    batched = {"linear": 0, "task_arithmetic": 0, "masked_magnitudes": 0, "masked_l1": 0}
    for batch_class, method, name in [
        (fused.LinearBatch, "add", "linear"),
        (fused.TaskArithmeticBatch, "add", "task_arithmetic"),
        (fused.TaskArithmeticBatch, "add_phase_one", "masked_magnitudes"),
        (fused.TaskArithmeticBatch, "add_l1", "masked_l1"),
    ]:
        monkeypatch.setattr(batch_class, method, _counted(getattr(batch_class, method), batched, name))
    fast, reference = mergers[family_name]
    dtype = "float32" if family_name == "fp32" else "bfloat16"
    rng = np.random.default_rng(5)
    tensors = 0
    for method in ("linear", "ties", "dare_ties", "breadcrumbs", "della", "sce"):
        config = _any_candidate(method, families[family_name], dtype, rng)
        if method == "sce":
            config.parameters["select_topk"] = 0.6  # a top-k mask that keeps something
        elif method != "linear":
            config.parameters["rescale"] = True  # phase one in full for every masked entry
        expected = _state(reference.merge(config))
        _assert_bitwise(fast.merge(config), expected, f"{method} {family_name} fused")
        tensors += len(expected)
    merged = calls["linear"] + calls["task_arithmetic"] + calls["sce"]
    assert merged + batched["linear"] + batched["task_arithmetic"] == tensors
    assert batched["linear"] > 0 and batched["task_arithmetic"] > 0
    # dare_ties' phase one, from the stored task vectors (della's keep probabilities are not a key range)
    assert calls["mask_task_vector"] == 0
    if dtype == "bfloat16":  # (masked_magnitudes only where l1_sum cannot settle torch's sum)
        assert batched["masked_l1"] > 0 and batched["masked_magnitudes"] == 0
    else:
        assert calls["masked_magnitudes"] + batched["masked_magnitudes"] > 0 and batched["masked_l1"] == 0


def _counted(function, counts: dict, name: str):
    def counted(*args, **kwargs):
        counts[name] += 1
        return function(*args, **kwargs)

    return counted


@pytest.mark.skipif(not fused.available(), reason="no C compiler: the fused kernels are off")
@pytest.mark.parametrize("arena_bytes", [0, 6000])
@pytest.mark.parametrize("family_name", list(SHAPES))
def test_task_arithmetic_batches_of_any_size_bitwise_equal(arena_bytes, family_name, families, mergers, monkeypatch):
    """A candidate's queued task-arithmetic merges run whenever their phase-one buffers would
    overfill the arena (0: one tensor per batch, the arena grown to each; a few KB: several
    tensors per batch, cut anywhere), with later tensors planned in between: still mergekit's bits.
    (bfloat16 rescaled key masks take no buffer at all: their l1 sums come from masked_l1.)"""
    from mergekit_evolve.merge import fastpath

    monkeypatch.setattr(fastpath, "PHASE_ONE_ARENA_BYTES", arena_bytes)
    runs = {"run": 0}
    monkeypatch.setattr(fused.TaskArithmeticBatch, "run", _counted(fused.TaskArithmeticBatch.run, runs, "run"))
    fast, reference = mergers[family_name]
    dtype = "float32" if family_name == "fp32" else "bfloat16"
    rng = np.random.default_rng(arena_bytes)
    for method in ("dare_ties", "della", "dare_linear", "ties"):
        config = _candidate(method, families[family_name], dtype, rng)
        config.parameters["rescale"] = True  # every masked entry has a phase one (arena buffer)
        before = runs["run"]
        expected = _state(reference.merge(config))
        _assert_bitwise(fast.merge(config), expected, f"{method} {family_name} arena {arena_bytes}")
        if dtype == "float32" or method == "della":
            assert runs["run"] - before > 2  # the candidate ran in several batches
        else:
            assert runs["run"] - before == 1  # no arena buffer: one batch whatever its size


@pytest.mark.skipif(not fused.available(), reason="no C compiler: the fused kernels are off")
@pytest.mark.parametrize("family_name", list(SHAPES))
def test_small_tensors_join_the_batch_a_larger_one_started(family_name, families, mergers, monkeypatch):
    """Tensors below the fused kernels' size (the norms here: 32 or 24 elements against 1000)
    keep the chunked torch operations on their own but join a batch that a larger tensor of the
    candidate started: more tensors batched than are large, with mergekit's bits."""
    from mergekit_evolve.merge import fastpath

    monkeypatch.setattr(fastpath, "FUSED_MIN_ELEMENTS", 1000)
    counts = {"linear": 0, "task_arithmetic": 0}
    monkeypatch.setattr(fused.LinearBatch, "add", _counted(fused.LinearBatch.add, counts, "linear"))
    monkeypatch.setattr(
        fused.TaskArithmeticBatch, "add", _counted(fused.TaskArithmeticBatch.add, counts, "task_arithmetic")
    )
    fast, reference = mergers[family_name]
    dtype = "float32" if family_name == "fp32" else "bfloat16"
    rng = np.random.default_rng(17)
    for method, kind in (("linear", "linear"), ("dare_ties", "task_arithmetic"), ("ties", "task_arithmetic")):
        config = _any_candidate(method, families[family_name], dtype, rng)
        if method != "linear":
            config.parameters["rescale"] = True
        before = counts[kind]
        expected = _state(reference.merge(config))
        _assert_bitwise(fast.merge(config), expected, f"{method} {family_name} small tensors joining")
        large = sum(t.numel() >= 1000 for t in expected.values())
        assert large < counts[kind] - before <= len(expected), method


def test_task_vectors_over_the_budget_are_left_out(families, monkeypatch, caplog):
    """Stored task vectors are optional state: where they do not fit beside the needed state,
    the fused kernels read source and base instead (one warning), with the same bits."""
    phase_one = []
    kernel = fused.mask_task_vector
    monkeypatch.setattr(fused, "mask_task_vector", lambda *a, **k: phase_one.append(1) or kernel(*a, **k))
    family = families["fp32"]
    template = _template(family, "float32")
    reference = InMemoryMerger(template, random_seed=SEED, fast_path=False)
    stream_bytes = 4 * sum(p.numel() for p in reference.model.parameters()) * (len(family) - 1)
    tight = InMemoryMerger(template, random_seed=SEED, fast_path_max_bytes=stream_bytes * 3 // 2)
    rng = np.random.default_rng(8)
    for _ in range(2):
        config = _candidate("dare_ties", family, "float32", rng)
        config.parameters["rescale"] = True
        with caplog.at_level("WARNING", logger="mergekit_evolve.merge.fastpath"):
            _assert_bitwise(tight.merge(config), _state(reference.merge(config)), "dare_ties without task vectors")
        assert tight.fast_path.last_fast_tasks == len(reference.model.state_dict())
    sizes = tight.fast_path.nbytes()
    assert "task_vector" not in sizes and 0 < sizes["stream"] <= stream_bytes
    assert phase_one  # the masked vectors made from source and base
    assert len([r for r in caplog.records if "task_vector state" in r.getMessage()]) == 1


@pytest.mark.skipif(not fused.available(), reason="no C compiler: the fused kernels are off")
def test_results_cast_to_another_out_dtype_bitwise_equal(families, monkeypatch):
    """With ``out_dtype: float32`` on a bfloat16 merge the kernels' results are cast before the
    model takes them, so nothing is left to a batch: DARE's l1 sums run per tensor (masked_l1
    at once) and still give mergekit's bits."""
    family = families["bf16"]
    template = _template(family, "bfloat16")
    template.out_dtype = "float32"
    fast = InMemoryMerger(template, random_seed=SEED)
    reference = InMemoryMerger(template, random_seed=SEED, fast_path=False)
    calls = {"masked_l1": 0, "add_l1": 0}
    monkeypatch.setattr(fused, "masked_l1", _counted(fused.masked_l1, calls, "masked_l1"))
    monkeypatch.setattr(
        fused.TaskArithmeticBatch, "add_l1", _counted(fused.TaskArithmeticBatch.add_l1, calls, "add_l1")
    )
    rng = np.random.default_rng(3)
    for method in ("dare_ties", "dare_linear", "ties"):
        config = _any_candidate(method, family, "bfloat16", rng)
        config.out_dtype, config.parameters["rescale"] = "float32", True
        expected = _state(reference.merge(config))
        assert {t.dtype for t in expected.values()} == {torch.float32}
        _assert_bitwise(fast.merge(config), expected, f"{method} cast to float32")
    assert calls["masked_l1"] > 0 and calls["add_l1"] == 0


def test_l1_tables_are_built_on_a_second_ask_and_the_last_few_kept():
    """A place of the draws gets its table the second time it is asked for (a search near
    density 1 moves the draws of later entries to many places, each asked for once), and only the
    last KEEP places keep theirs."""
    from mergekit_evolve.merge.fastpath import _L1Tables

    tables, built = _L1Tables(), []

    def build(where):
        built.append(where)
        return torch.zeros(2, 3, dtype=torch.float64)

    assert tables.lookup((0,), lambda: build((0,))) is None and built == []
    assert tables.lookup((0,), lambda: build((0,))) is not None and built == [(0,)]
    assert tables.lookup((0,), lambda: build((0,))) is not None and built == [(0,)]  # kept
    for where in range(1, _L1Tables.KEEP + 1):  # KEEP more places, each asked for twice
        tables.lookup((where,), lambda: build(None))
        tables.lookup((where,), lambda where=where: build((where,)))
    assert tables.nbytes == _L1Tables.KEEP * 2 * 3 * 8
    assert tables.lookup((0,), lambda: build("again")) is None  # the oldest one was let go


def test_default_chunks_bitwise_equal_at_two_threads(tmp_path, monkeypatch):
    """Tensors of ~125k elements at two torch threads: several default-size chunks, and the
    halves where torch splits a whole-tensor op between the threads fall off vector boundaries
    (196 x 611 elements), so mergekit's single calls and the chunked ones split differently.
    DARE's l1 sums over those halves come from masked_l1 (l1_sum.py), or from torch where that
    cannot settle them: both give mergekit's bits."""
    from mergekit_evolve.merge import l1_sum

    family = make_family(
        tmp_path,
        num_layers=1,
        hidden_size=196,
        intermediate_size=611,
        num_heads=2,
        vocab_size=1001,
        dtype=torch.bfloat16,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    answers = {"known": 0, "unknown": 0}
    torch_sum = l1_sum.torch_sum

    def counted(*args, **kwargs):
        known = torch_sum(*args, **kwargs)
        answers["known" if known is not None else "unknown"] += 1
        return known

    monkeypatch.setattr(l1_sum, "torch_sum", counted)
    try:
        template = _template(family, "bfloat16")
        fast = InMemoryMerger(template, random_seed=SEED)
        reference = InMemoryMerger(template, random_seed=SEED, fast_path=False)
        rng = np.random.default_rng(11)
        for method in ("linear", "ties", "dare_ties", "della", "sce", "dare_ties", "dare_linear"):
            config = _any_candidate(method, family, "bfloat16", rng)
            if method.startswith("dare"):
                config.parameters["rescale"] = True
            expected = _state(reference.merge(config))
            _assert_bitwise(fast.merge(config), expected, f"{method} at two threads")
        assert answers["known"] > 0  # (a few chunks in a hundred are left to torch)
        monkeypatch.setattr(l1_sum, "torch_sum", lambda *args, **kwargs: None)  # every sum left to torch
        config = _any_candidate("dare_ties", family, "bfloat16", rng)
        config.parameters["rescale"] = True
        expected = _state(reference.merge(config))
        _assert_bitwise(fast.merge(config), expected, "dare_ties at two threads, torch's l1 sums")
    finally:
        torch.set_num_threads(threads)


RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk", [None, 96])
@pytest.mark.parametrize("family_name", list(SHAPES))
def test_cuda_candidates_bitwise_equal_to_mergekit_kernels(chunk, family_name, families, monkeypatch):
    """On a GPU: every method's candidates equal mergekit's CUDA kernels bit for bit, with the
    accelerator's whole-tensor chunks and with many small ones. The random methods keep
    mergekit's kernels there (CUDA's bernoulli is not reproduced): equal, and not fast."""
    from mergekit_evolve.merge import fastpath

    if chunk:
        monkeypatch.setattr(fastpath, "ACCELERATOR_CHUNK_ELEMENTS", chunk)
    dtype = "float32" if family_name == "fp32" else "bfloat16"
    template = _template(families[family_name], dtype)
    fast = InMemoryMerger(template, device="cuda", random_seed=SEED)
    reference = InMemoryMerger(template, device="cuda", random_seed=SEED, fast_path=False)
    rng = np.random.default_rng(abs(hash((family_name, chunk))) % 2**32)
    for method in ("linear",) + SPARSIFYING:
        for index in range(2):
            config = _any_candidate(method, families[family_name], dtype, rng)
            expected = _state(reference.merge(config))
            model = fast.merge(config)
            assert next(model.parameters()).device.type == "cuda"
            _assert_bitwise(model, expected, f"cuda {method} {family_name} candidate {index}")
            fast_tasks = 0 if method in RANDOM_METHODS else len(expected)
            assert fast.fast_path.last_fast_tasks == fast_tasks, method


@pytest.mark.parametrize("select_topk", [0.0, 0.001, 0.5, 1.0])
def test_sce_selections_at_the_edges(select_topk, families, mergers):
    """No element selected (density 0, or k rounding to 0: mergekit's own steps), half, all."""
    fast, reference = mergers["bf16"]
    family = families["bf16"]
    config = _candidate("sce", family, "bfloat16", np.random.default_rng(5))
    config = config.model_copy(update={"parameters": {"select_topk": select_topk, "int8_mask": True}})
    expected = _state(reference.merge(config))
    _assert_bitwise(fast.merge(config), expected, f"sce select_topk {select_topk}")
    assert fast.fast_path.last_fast_tasks == len(expected)


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_non_finite_results_written_in_place_are_caught(method, families, mergers):
    """The fast kernels vouch for finiteness from their chunk sums; an overflow still fails."""
    from mergekit_evolve.errors import CandidateError

    fast, _ = mergers["fp32"]
    family = families["fp32"]
    if method == "linear":
        models = [{"model": str(p), "parameters": {"weight": 3e38}} for p in family.values()]
        config = {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}
    else:
        experts = [
            {"model": str(p), "parameters": {"weight": 1.0, "density": 0.9}} for n, p in family.items() if n != "base"
        ]
        config = {
            "merge_method": "ties",
            "base_model": str(family["base"]),
            "models": [{"model": str(family["base"])}] + experts,
            "parameters": {"normalize": False, "lambda": 1e39},  # overflows float32
        }
    with pytest.raises(CandidateError, match="NaN or infinite"):
        fast.merge(MergeConfiguration.model_validate({**config, "dtype": "float32"}))
    assert fast.fast_path.last_fast_tasks > 0


def test_finite_total_vouches_only_for_finite_sums():
    from mergekit_evolve.merge.fastpath import SparsifyingFastPath, _FiniteTotal

    fast = SparsifyingFastPath({}, torch.device("cpu"), None)
    for values, vouched in (([1.0, 2.0], True), ([1.0, float("inf")], False), ([3e38, 3e38], False)):
        out = torch.tensor(values)
        total = _FiniteTotal(out)
        total.add(out[:1])
        total.add(out[1:])
        assert total.vouch(fast) is out
        assert fast.known_finite(out) is vouched
        fast.finite_outputs.clear()


def test_state_over_the_memory_budget_keeps_mergekit_kernels(families, caplog):
    """A method whose precomputed state would not fit runs mergekit's kernels (same tensors,
    one warning); methods needing no state, and state that fits, stay fast."""
    family = families["fp32"]
    template = _template(family, "float32")
    reference = InMemoryMerger(template, random_seed=SEED, fast_path=False)
    rank_bytes = 4 * sum(p.numel() for p in reference.model.parameters()) * (len(family) - 1)
    tight = InMemoryMerger(template, random_seed=SEED, fast_path_max_bytes=rank_bytes // 2)
    rng = np.random.default_rng(3)
    for _ in range(2):
        config = _candidate("ties", family, "float32", rng)
        expected = _state(reference.merge(config))
        with caplog.at_level("WARNING", logger="mergekit_evolve.merge.fastpath"):
            _assert_bitwise(tight.merge(config), expected, "ties over budget")
        assert tight.fast_path.last_fast_tasks == 0
        assert "rank_desc" not in tight.fast_path.nbytes()
    assert len([r for r in caplog.records if "rank_desc state" in r.getMessage()]) == 1  # warned once
    linear = _linear_candidate(family, "float32", rng)
    _assert_bitwise(tight.merge(linear), _state(reference.merge(linear)), "linear")
    assert tight.fast_path.last_fast_tasks == len(expected)
    roomy = InMemoryMerger(template, random_seed=SEED, fast_path_max_bytes=2 * rank_bytes)
    roomy.merge(config)
    assert roomy.fast_path.last_fast_tasks == len(expected)
    assert 0 < roomy.fast_path.nbytes()["rank_desc"] <= rank_bytes


@pytest.mark.parametrize("fused_kernels", [True, False], ids=["fused", "chunked"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_signed_zeros_in_the_base_reach_the_result_as_in_mergekit(dtype, fused_kernels, tmp_path, monkeypatch):
    """Where the base holds -0.0 and every weighted delta is a zero, mergekit's sums (which
    start from +0) give +0 + base; a kernel that skipped that +0 would give -0. The chunked
    path keeps it exactly where the base has a -0 (and skips it elsewhere); the fused kernels
    always add it."""
    if not fused_kernels:
        monkeypatch.setattr(fused, "supports", lambda *tensors: False)
        monkeypatch.setattr(fused, "supports_linear", lambda: False)
    family = make_family(tmp_path, n_experts=2, num_layers=1, hidden_size=16, intermediate_size=24, num_heads=2)
    name = "model.layers.0.mlp.up_proj.weight"
    for member, path in family.items():
        tensors = load_file(path / "model.safetensors")
        tensors[name].view(-1)[:40] = -0.0 if member == "base" else 0.0
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    template = _template(family, dtype)
    fast = InMemoryMerger(template, random_seed=SEED)
    reference = InMemoryMerger(template, random_seed=SEED, fast_path=False)
    experts = [str(p) for member, p in family.items() if member != "base"]
    for method, extra in (("task_arithmetic", {}), ("ties", {"density": 1.0}), ("sce", None)):
        models = [{"model": str(family["base"])}] + [
            {"model": e, "parameters": {} if extra is None else {"weight": -0.6 - 0.1 * i, **extra}}
            for i, e in enumerate(experts)
        ]
        parameters = {"normalize": False} if method != "sce" else {}
        config = MergeConfiguration.model_validate(
            {
                "merge_method": method,
                "base_model": str(family["base"]),
                "models": models,
                "parameters": parameters,
                "dtype": dtype,
            }
        )
        expected = _state(reference.merge(config))
        _assert_bitwise(fast.merge(config), expected, f"{method} {dtype} with -0 in the base")
        assert fast.fast_path.last_fast_tasks == len(expected)
        assert _bits(expected[name]).view(-1)[:40].eq(0).all()  # +0 bits: the case is exercised
