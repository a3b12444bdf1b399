"""The sparsifying fast path equals mergekit bit for bit: its kernels and run_merge.

Module-scoped families of tiny random Llamas: fp32 (base + 3 experts with odd widths), bf16
(base + 2 experts, where equal magnitudes are everywhere), fp16, a mixed family (bf16 base,
fp16 and fp32 experts, no ``dtype:`` in the recipe: mergekit promotes each group) and five
fp32 experts. Each method gets several random
candidates (per-layer gradients, per-filter values, densities of exactly 1 and 0, rescale /
normalize / lambda / int8_mask); the fast merger's tensors must have the same bit patterns as
a merger running mergekit's kernels in the same Executor (``fast_path=False``), and one
candidate per method must equal ``run_merge`` with the same seed.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_family
from mergekit.config import MergeConfiguration
from safetensors.torch import load_file, save_file

from mergekit_evolve.merge import InMemoryMerger, merge_to_disk
from mergekit_evolve.merge.fastpath import FastMergeTask, UniformStream, bernoulli_matches_stream

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
    "fp16": dict(n_experts=2, num_layers=1, hidden_size=24, intermediate_size=40, num_heads=4, dtype=torch.float16),
    "mixed": dict(n_experts=2, num_layers=1, hidden_size=24, intermediate_size=40, num_heads=4, dtype=torch.bfloat16),
    "five": dict(n_experts=5, num_layers=1, hidden_size=16, intermediate_size=24, num_heads=2),
}
# the recipe's dtype per family (None: no ``dtype:``, mergekit aligns each group itself)
RECIPE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "mixed": None, "five": "float32"}
MIXED_EXPERT_DTYPES = {"expert0": torch.float16, "expert1": torch.float32}
FILTERS = ("self_attn", "mlp")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is faster here (mergekit's DELLA row min/max waits ~20 ms
    per call for a second thread on a busy machine). Exactness holds at any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    built = {name: make_family(tmp_path_factory.mktemp(name), **shape) for name, shape in SHAPES.items()}
    for member, dtype in MIXED_EXPERT_DTYPES.items():
        path = built["mixed"][member] / "model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(path).items()}, str(path), metadata={"format": "pt"})
    return built


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


def _candidate(method: str, family: dict[str, Path], dtype: str | None, rng: np.random.Generator) -> MergeConfiguration:
    experts = [str(p) for name, p in family.items() if name != "base"]
    shared: dict = {}
    per_model = []
    for _ in experts:
        params: dict = {}
        if method != "sce":
            params["weight"] = _value(rng, -0.3, 1.2)
        if method.startswith("della"):
            params["density"] = _value(rng, 0.2, 0.8, exact=(1.0, 0.0))
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
            **({"dtype": dtype} if dtype else {}),
        }
    )


def _template(family: dict[str, Path], dtype: str | None) -> MergeConfiguration:
    return _candidate("dare_ties", family, dtype, np.random.default_rng(0))


@pytest.fixture(scope="module")
def mergers(families) -> dict[str, tuple[InMemoryMerger, InMemoryMerger]]:
    """(fast, mergekit kernels) per family, both seeded alike."""
    built = {}
    for name, family in families.items():
        template = _template(family, RECIPE_DTYPE[name])
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
    dtype = RECIPE_DTYPE[family_name]
    rng = np.random.default_rng(zlib.crc32(f"{method} {family_name}".encode()))
    for index in range(2):
        config = _candidate(method, families[family_name], dtype, rng)
        expected = _state(reference.merge(config))
        _assert_bitwise(fast.merge(config), expected, f"{method} {family_name} candidate {index}")
        assert fast.fast_path.last_fast_tasks == _stateful_tensors(fast, config)


def _stateful_tensors(merger: InMemoryMerger, config: MergeConfiguration) -> int:
    """The tensors the fast path should take: all of a sparsifying method's and sce's; none of
    task_arithmetic's or linear's (nothing to precompute: mergekit's own kernels)."""
    targets, _ = merger._route.plan(config)
    return 0 if config.merge_method in ("task_arithmetic", "linear") else len(targets)


@pytest.mark.parametrize(
    "method,family_name",
    [(m, "fp32") for m in ("ties", "dare_ties", "breadcrumbs_ties", "della", "sce")]
    + [("ties", "bf16"), ("dare_ties", "bf16"), ("dare_ties", "fp16"), ("della", "mixed"), ("breadcrumbs", "mixed")]
    + [("dare_linear", "five"), ("ties", "five")],
)
def test_equal_to_run_merge(method, family_name, families, mergers, tmp_path):
    fast, _ = mergers[family_name]
    dtype = RECIPE_DTYPE[family_name]
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


def test_bernoulli_probe_holds_on_this_torch():
    """The once-per-process check that gates the random methods' state holds here (so the DARE
    and DELLA tests above and below run the stream, not mergekit's kernels)."""
    assert bernoulli_matches_stream()


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


def test_unseeded_random_methods_keep_mergekit_kernels(families):
    family = families["fp32"]
    merger = InMemoryMerger(_template(family, "float32"))  # random_seed=None
    rng = np.random.default_rng(5)
    assert _fast_tasks(merger, _candidate("dare_ties", family, "float32", rng)) == 0
    assert _fast_tasks(merger, _candidate("ties", family, "float32", rng)) > 0
    assert InMemoryMerger(_template(family, "float32"), fast_path=False).fast_path is None


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


@pytest.mark.parametrize("piece", [64, 96])
@pytest.mark.parametrize("family_name", ["fp32", "bf16", "mixed"])
def test_pieces_bitwise_equal(piece, family_name, families, mergers, monkeypatch):
    """mergekit's merge code run on pieces of every tensor (a 96-element piece also splits
    torch's vector loops off their usual boundaries): the same bits as mergekit's kernels on
    whole tensors, for every sparsifying method, rescaled or not."""
    from mergekit_evolve.merge import fastpath

    monkeypatch.setattr(fastpath, "PIECE_ELEMENTS", piece)
    fast, reference = mergers[family_name]
    dtype = RECIPE_DTYPE[family_name]
    rng = np.random.default_rng(zlib.crc32(f"pieces {piece} {family_name}".encode()))
    for method in SPARSIFYING:
        config = _candidate(method, families[family_name], dtype, rng)
        expected = _state(reference.merge(config))
        _assert_bitwise(fast.merge(config), expected, f"{method} {family_name} in pieces of {piece}")


def test_default_pieces_bitwise_equal_at_two_threads(tmp_path):
    """Tensors of 300k elements at two torch threads: the embedding and head run in two default
    pieces, the halves torch splits a whole-tensor op into fall elsewhere, and DARE's l1 rescale
    sums the whole tensor with torch's own sum: mergekit's bits throughout."""
    family = make_family(
        tmp_path,
        num_layers=1,
        hidden_size=300,
        intermediate_size=611,
        num_heads=2,
        vocab_size=1001,
        dtype=torch.bfloat16,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        template = _template(family, "bfloat16")
        fast = InMemoryMerger(template, random_seed=SEED)
        reference = InMemoryMerger(template, random_seed=SEED, fast_path=False)
        rng = np.random.default_rng(11)
        for method, rescale in (("ties", False), ("dare_ties", True), ("dare_linear", False), ("della", True)):
            config = _candidate(method, family, "bfloat16", rng)
            config.parameters["rescale"] = rescale
            expected = _state(reference.merge(config))
            _assert_bitwise(fast.merge(config), expected, f"{method} at two threads")
            assert fast.fast_path.last_fast_tasks == len(expected)
    finally:
        torch.set_num_threads(threads)


RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family_name", list(SHAPES))
def test_cuda_candidates_bitwise_equal_to_mergekit_kernels(family_name, families):
    """On a GPU: every method's candidates equal mergekit's CUDA kernels bit for bit. The random
    methods keep mergekit's kernels there (CUDA's bernoulli is not reproduced): equal, not fast."""
    dtype = RECIPE_DTYPE[family_name]
    template = _template(families[family_name], dtype)
    fast = InMemoryMerger(template, device="cuda", random_seed=SEED)
    reference = InMemoryMerger(template, device="cuda", random_seed=SEED, fast_path=False)
    rng = np.random.default_rng(zlib.crc32(family_name.encode()))
    for method in ("linear",) + SPARSIFYING:
        for index in range(2):
            config = _any_candidate(method, families[family_name], dtype, rng)
            expected = _state(reference.merge(config))
            model = fast.merge(config)
            assert next(model.parameters()).device.type == "cuda"
            _assert_bitwise(model, expected, f"cuda {method} {family_name} candidate {index}")
            stateful = 0 if method in RANDOM_METHODS else _stateful_tensors(fast, config)
            assert fast.fast_path.last_fast_tasks == stateful, method


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
def test_non_finite_results_are_caught(method, families, mergers):
    """An overflow of a fast-path or a mergekit kernel fails the candidate, in one line."""
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
    assert fast.fast_path.last_fast_tasks == (0 if method == "linear" else len(_state(fast.model)))


def test_state_over_the_memory_budget_keeps_mergekit_kernels(families, caplog):
    """A method whose precomputed state would not fit runs mergekit's kernels (same tensors,
    one warning); state that fits is used."""
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
    roomy = InMemoryMerger(template, random_seed=SEED, fast_path_max_bytes=2 * rank_bytes)
    roomy.merge(config)
    assert roomy.fast_path.last_fast_tasks == len(expected)
    assert 0 < roomy.fast_path.nbytes()["rank_desc"] <= rank_bytes
