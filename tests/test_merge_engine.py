"""The merge engine against the real mergekit: in-memory candidates equal mergekit-yaml's output.

One module-scoped family of tiny random Llama models (a base and three "fine-tunes" = base plus
seeded noise), one CLI subprocess that runs every method's YAML through mergekit-yaml's own click
command (plus one call of the mergekit-yaml executable itself), and one InMemoryMerger that
merges all of those recipes in sequence.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoadTensor
from safetensors.torch import load_file, save_file

from mergekit_evolve.errors import CandidateError, InputError
from mergekit_evolve.merge import InMemoryMerger, merge_to_disk
from mergekit_evolve.merge.inmemory import PlannerRoute
from mergekit_evolve.merge.replan import recipe_structure
from mergekit_evolve.zoo.random_models import make_random_model

SEED = 1234
EXPERTS = ("e1", "e2", "e3")


def _make_expert(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A 'fine-tune' of base: same config and tokenizer, weights plus seeded noise."""
    shutil.copytree(base, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(base / "model.safetensors")
    noisy = {name: t + scale * torch.randn(t.shape, generator=generator) for name, t in tensors.items()}
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    base = make_random_model(root / "base", seed=0, num_layers=4, hidden_size=32)
    models = {"base": base}
    for index, name in enumerate(EXPERTS):
        models[name] = _make_expert(base, root / name, seed=100 + index)
    return models


def _recipes(m: dict[str, Path]) -> dict[str, dict]:
    """One recipe per searchable method; per-layer gradients and {filter, value} lists mixed in."""
    base, e1, e2, e3 = (str(m[k]) for k in ("base", *EXPERTS))
    layer_weights = [1.0, 0.2, 0.7]  # gradient over the 4 layers
    by_filter = [{"filter": "mlp", "value": 0.3}, {"filter": "self_attn", "value": 0.8}, {"value": 0.5}]

    def with_base(method, params_per_model, shared=None, experts=(e1, e2, e3)):
        return {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": base}] + [{"model": e, "parameters": p} for e, p in zip(experts, params_per_model)],
            "parameters": shared or {},
            "dtype": "float32",
        }

    ta_params = [
        {"weight": layer_weights, "density": 0.6},
        {"weight": by_filter, "density": [0.8, 0.4]},
        {"weight": 0.4, "density": 0.7},
    ]
    recipes = {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": e1, "parameters": {"weight": layer_weights}},
                {"model": e2, "parameters": {"weight": by_filter}},
                {"model": e3, "parameters": {"weight": 0.5}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        "task_arithmetic": with_base("task_arithmetic", ta_params, {"lambda": 0.9}),
        "ties": with_base("ties", ta_params, {"normalize": True}),
        "dare_ties": with_base("dare_ties", ta_params),
        "dare_linear": with_base("dare_linear", ta_params),
        "breadcrumbs": with_base("breadcrumbs", [dict(p, gamma=0.05) for p in ta_params]),
        "breadcrumbs_ties": with_base("breadcrumbs_ties", [dict(p, gamma=[0.02, 0.1]) for p in ta_params]),
        "della": with_base("della", [dict(p, epsilon=0.1) for p in ta_params], {"lambda": 1.1}),
        "della_linear": with_base("della_linear", [dict(p, epsilon=[0.05, 0.2]) for p in ta_params]),
        "sce": with_base("sce", [{}, {}, {}], {"select_topk": [0.3, 0.9]}),
        "model_stock": with_base("model_stock", [{}, {}], experts=(e1, e2)),
        "ram": with_base("ram", [{}, {}, {}], {"epsilon": 1e-3}),
        "slerp": with_base(
            "slerp", [{}], {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.4}]}, experts=(e1,)
        ),
        "nearswap": with_base("nearswap", [{}], {"t": [0.01, 0.03]}, experts=(e1,)),
        "arcee_fusion": with_base("arcee_fusion", [{}], experts=(e1,)),
        "nuslerp": with_base("nuslerp", [{"weight": [0.2, 0.9]}, {"weight": 0.6}], experts=(e1, e2)),
        "multislerp": with_base("multislerp", [{"weight": 0.2}, {"weight": layer_weights}, {"weight": by_filter}]),
        "karcher": {
            "merge_method": "karcher",
            "models": [{"model": e} for e in (e1, e2, e3)],
            "parameters": {"max_iter": 5},
            "dtype": "float32",
        },
    }
    return recipes


# Runs every recipe through mergekit-yaml's click command (the code the executable runs),
# one process for all of them: the executable costs ~4 s of start-up per call.
CLI_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
seed, jobs = sys.argv[1], sys.argv[2:]
for config_file, out_dir in zip(jobs[::2], jobs[1::2]):
    main([config_file, out_dir, "--random-seed", seed, "--quiet"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def cli_outputs(family, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("cli")
    jobs = []
    for method, recipe in _recipes(family).items():
        (root / f"{method}.yaml").write_text(yaml.safe_dump(recipe))
        jobs += [str(root / f"{method}.yaml"), str(root / method)]
    _run_cli([sys.executable, "-c", CLI_DRIVER, str(SEED), *jobs])
    # The executable itself, once, on a random method: proves the driver is the real thing.
    _run_cli(
        [
            "mergekit-yaml",
            str(root / "dare_ties.yaml"),
            str(root / "dare_ties_exe"),
            "--random-seed",
            str(SEED),
            "--quiet",
        ]
    )
    outputs = {m: load_file(root / m / "model.safetensors") for m in _recipes(family)}
    outputs["dare_ties_exe"] = load_file(root / "dare_ties_exe" / "model.safetensors")
    return outputs


def _run_cli(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"mergekit CLI failed:\n{done.stderr[-3000:]}"


def _config(recipe: dict) -> MergeConfiguration:
    return MergeConfiguration.model_validate(recipe)


def _template(family) -> MergeConfiguration:
    return _config(_recipes(family)["dare_ties"])  # base + all three experts


@pytest.fixture(scope="module")
def merger(family) -> InMemoryMerger:
    return InMemoryMerger(_template(family), random_seed=SEED)


def _assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(expected) <= set(state)
    different = [name for name, t in expected.items() if not torch.equal(state[name], t)]
    assert not different, f"tensors differ from mergekit-yaml: {different[:5]}"


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


def test_cli_driver_matches_executable(cli_outputs):
    for name, tensor in cli_outputs["dare_ties"].items():
        assert torch.equal(tensor, cli_outputs["dare_ties_exe"][name]), name


@pytest.mark.parametrize("method", list(_recipes({k: Path(k) for k in ("base", *EXPERTS)})))
def test_method_matches_mergekit_yaml(method, family, merger, cli_outputs):
    expected = cli_outputs[method]
    model = merger.merge(_config(_recipes(family)[method]))
    assert not model.training
    _assert_state_equal(model, expected)
    # Not vacuous: the merge is none of its inputs.
    for source in family.values():
        source_tensors = load_file(source / "model.safetensors")
        assert any(not torch.equal(expected[n], source_tensors[n]) for n in expected), source


def test_sources_stay_untouched(family, merger):
    """Merge methods get borrowed resident tensors; none may write into them."""
    for method in ("ties", "breadcrumbs", "nearswap", "sce", "model_stock"):
        merger.merge(_config(_recipes(family)[method]))
    for task, value in merger._inputs.items():
        if isinstance(task, LoadTensor):
            on_disk = load_file(Path(task.model.model.path) / "model.safetensors")[task.tensor]
            assert torch.equal(value, on_disk), task.tensor


def test_model_never_shares_storage_with_sources(family, merger):
    """passthrough returns its input tensor itself: the model must get a copy, not the source."""
    config = _config({"merge_method": "passthrough", "models": [{"model": str(family["base"])}], "dtype": "float32"})
    model = merger.merge(config)
    _assert_state_equal(model, load_file(family["base"] / "model.safetensors"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # a caller writing into the model in place
    test_sources_stay_untouched(family, merger)


def test_sources_rewritten_in_place_do_not_leak_in(family, tmp_path):
    """The merger's sources are its own copies, not views of files that may change under it."""
    models = {name: Path(shutil.copytree(path, tmp_path / name)) for name, path in family.items()}
    config = _config(_recipes(models)["ties"])
    merger = InMemoryMerger(config)
    before = _snapshot(merger.merge(config))
    shard = models["e1"] / "model.safetensors"
    with open(shard, "r+b") as handle:  # same file, same size, zeroed tensor data
        handle.seek(4096)
        handle.write(b"\0" * (shard.stat().st_size - 4096))
    after = _snapshot(merger.merge(config))
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_sequence_has_no_stale_state(family, merger, cli_outputs):
    linear, ties = (_config(_recipes(family)[m]) for m in ("linear", "ties"))
    _assert_state_equal(merger.merge(linear), cli_outputs["linear"])
    _assert_state_equal(merger.merge(ties), cli_outputs["ties"])
    _assert_state_equal(merger.merge(linear), cli_outputs["linear"])


def test_random_methods_reproducible_per_candidate(family, merger):
    dare = _config(_recipes(family)["dare_ties"])
    other = _recipes(family)["dare_linear"]
    first = _snapshot(merger.merge(dare))
    merger.merge(_config(other))
    python_torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    second = _snapshot(merger.merge(dare))
    assert all(torch.equal(first[n], second[n]) for n in first)
    # The caller's RNGs are left as they were (a search loop's sampler must not be reseeded).
    assert torch.equal(torch.get_rng_state(), python_torch_state)
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()


def test_unseeded_random_methods_differ(family):
    unseeded = InMemoryMerger(_template(family))
    dare = _config(_recipes(family)["dare_ties"])
    first = _snapshot(unseeded.merge(dare))
    second = _snapshot(unseeded.merge(dare))
    assert any(not torch.equal(first[n], second[n]) for n in first)


def test_nan_raises_candidate_error_naming_tensor(family, merger, cli_outputs):
    recipe = _recipes(family)["linear"]
    recipe["parameters"] = {"normalize": False}
    recipe["models"][0]["parameters"] = {"weight": [{"filter": "down_proj", "value": math.nan}, {"value": 1.0}]}
    with pytest.raises(CandidateError, match=r"model\.layers\.\d\.mlp\.down_proj\.weight"):
        merger.merge(_config(recipe))
    huge = _recipes(family)["linear"]
    huge["parameters"] = {"normalize": False}
    huge["models"][1]["parameters"] = {"weight": 3e38}
    huge["models"][2]["parameters"] = {"weight": 3e38}
    with pytest.raises(CandidateError, match="NaN or infinite"):
        merger.merge(_config(huge))
    # The next good candidate overwrites every tensor.
    _assert_state_equal(merger.merge(_config(_recipes(family)["linear"])), cli_outputs["linear"])


def test_failed_planning_is_a_candidate_error(family, merger):
    recipe = _recipes(family)["ties"]
    del recipe["models"][1]["parameters"]["weight"]  # required by ties
    with pytest.raises(CandidateError, match="weight"):
        merger.merge(_config(recipe))


def test_foreign_model_is_an_input_error(family, merger, tmp_path):
    stranger = _make_expert(family["base"], tmp_path / "stranger", seed=7)
    recipe = _recipes(family)["slerp"]
    recipe["models"][1]["model"] = str(stranger)
    with pytest.raises(InputError, match="template"):
        merger.merge(_config(recipe))


def test_exposes_model_tokenizer_and_sources(family, merger):
    assert merger.source_paths == tuple(family[k] for k in ("base", *EXPERTS))
    assert isinstance(merger.model, transformers.LlamaForCausalLM)
    ids = merger.tokenizer("abc")["input_ids"]
    expected = transformers.AutoTokenizer.from_pretrained(family["base"])("abc")["input_ids"]
    assert ids == expected and len(ids) >= 3
    timings = merger.last_timings
    assert timings.plan_s > 0 and timings.execute_s > 0 and timings.total_s >= timings.copy_s


def test_bf16_resident_model_matches_cli_dtype(family, tmp_path):
    recipe = _recipes(family)["linear"]
    recipe["dtype"] = "bfloat16"
    config = _config(recipe)
    model = InMemoryMerger(config).merge(config)
    assert model.dtype == torch.bfloat16
    out = merge_to_disk(config, tmp_path / "bf16", write_model_card=False)
    _assert_state_equal(model, load_file(out / "model.safetensors"))


def test_planner_route_private_names_and_equivalence(family):
    """Fails loudly if mergekit's private planning API changes under PlannerRoute."""
    import importlib

    from mergekit.merge_methods import merge_state_dicts
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    for owner, attribute in PlannerRoute.PRIVATE_NAMES:
        module_name, _, class_name = owner.rpartition(".")
        if owner == "mergekit.merge":
            target = importlib.import_module(owner)
        else:
            target = getattr(importlib.import_module(module_name), class_name)
        assert hasattr(target, attribute) or attribute in getattr(target, "__annotations__", {}), (
            f"{owner}.{attribute} is gone: PlannerRoute in mergekit_evolve/merge/inmemory.py "
            "must be updated for this mergekit version"
        )
    import inspect

    from mergekit.graph import Executor

    from mergekit_evolve.merge.fastpath import REBOUND_NAMES, _rebound

    for function, name in REBOUND_NAMES:  # the fast path runs these with one name answered from state
        assert name in function.__code__.co_names, f"{function.__qualname__} no longer calls {name}"
    with pytest.raises(RuntimeError, match="no longer calls no_such_name: the fast path needs an update"):
        _rebound(REBOUND_NAMES[0][0], "no_such_name", print)

    assert "task_handle in self.targets" in inspect.getsource(Executor._run), (
        "Executor._run no longer uses targets only for membership: PlannerRoute.executor must "
        "stop turning Executor.targets into a set"
    )
    config = _config(_recipes(family)["linear"])
    route = PlannerRoute(config, MergeOptions(quiet=True))
    targets, tokenizer_task = route.plan(config)
    assert tokenizer_task is None
    assert len(targets) == len(load_file(family["base"] / "model.safetensors"))
    assert all(isinstance(t.tensor_task, ExecuteMergeMethodTask) for t in targets)
    assert isinstance(MergePlanner(config, route.arch_info, route.options, None)._tensors, list)
    # plan_in_memory is still the broken route; when mergekit fixes it, PlannerRoute can use it.
    broken = MergePlanner(config, route.arch_info, MergeOptions(), route._out_config)
    with pytest.raises(TypeError, match="abstract"):
        broken.plan_in_memory()
    # ... and the tensors it yields equal mergekit's public in-memory API.
    plain = {"weight": 1.0}
    recipe = _recipes(family)["linear"]
    for model_in in recipe["models"]:
        model_in["parameters"] = plain
    config = _config(recipe)
    merged = InMemoryMerger(config).merge(config)
    expected = merge_state_dicts(
        [load_file(family[e] / "model.safetensors") for e in EXPERTS],
        "linear",
        parameters={"weight": 1.0, "normalize": True},
    )
    _assert_state_equal(merged, expected)


def _structure_recipes(m: dict[str, Path], module: str) -> dict[str, dict]:
    """The engine's recipes plus the other two ways to write one: slices (per-slice and
    per-source parameters) and modules (module-level parameters)."""
    base, e1, e2 = (str(m[k]) for k in ("base", "e1", "e2"))
    by_filter = [{"filter": "mlp", "value": 0.3}, {"value": [0.5, 0.9]}]

    def slices(*unweighted):
        def sources(low, high, first, second):
            return [
                {"model": e1, "layer_range": [low, high], "parameters": first},
                {"model": e2, "layer_range": [low, high], "parameters": second},
                *({"model": model, "layer_range": [low, high]} for model in unweighted),
            ]

        first = {"weight": [0.2, 0.8], "density": 0.5}
        second = {"weight": 0.3, "density": by_filter}
        return [
            {"sources": sources(0, 2, first, {"weight": 0.5}), "parameters": {"density": 0.7}},
            {"sources": sources(2, 4, second, {"weight": by_filter, "density": 0.4})},
        ]

    recipes = dict(_recipes(m))
    recipes["ties_slices"] = {"merge_method": "ties", "base_model": base, "slices": slices(base), "dtype": "float32"}
    recipes["linear_modules"] = {
        "merge_method": "linear",
        "modules": {module: {"slices": slices(), "parameters": {"weight": 0.25}}},
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    return recipes


def _new_values(setting, rng: np.random.Generator):
    """``setting`` with every float scaled by a random factor in [0.5, 1) (the same shape:
    lists, filters; densities stay densities, DELLA's epsilon stays within them)."""
    if isinstance(setting, float):
        return round(setting * float(rng.uniform(0.5, 1.0)), 4)
    if isinstance(setting, list):
        return [_new_values(item, rng) for item in setting]
    if isinstance(setting, dict):
        return {key: value if key == "filter" else _new_values(value, rng) for key, value in setting.items()}
    return setting


def _revalued(recipe: dict, rng: np.random.Generator) -> dict:
    """The recipe with new values in every ``parameters`` block (same structure)."""
    if isinstance(recipe, list):
        return [_revalued(item, rng) for item in recipe]
    if not isinstance(recipe, dict):
        return recipe
    return {
        key: {name: _new_values(v, rng) for name, v in value.items()} if key == "parameters" else _revalued(value, rng)
        for key, value in recipe.items()
    }


def _task_fields(target) -> tuple:
    """A planned target's task, with its gather task compared by what it gathers (a plan's
    gather tasks hold maps that compare by identity)."""
    fields = dict(target.tensor_task.__dict__)
    gather = fields.pop("gather_tensors")
    return target.weight_info, target.dtype, fields, dict(gather.weight_info.items()), gather.dtype


def test_replanned_candidates_equal_fresh_plans(family):
    """A candidate of a structure planned before re-resolves only its parameters; the tasks
    equal mergekit's planner's, for every method and every way to write a recipe."""
    from mergekit.options import MergeOptions

    rng = np.random.default_rng(0)
    template = _config(_recipes(family)["linear"])
    route = PlannerRoute(template, MergeOptions(quiet=True))
    module = next(iter(route.arch_info.modules))
    for name, recipe in _structure_recipes(family, module).items():
        first = _config(recipe)
        planned, _ = route.plan(first)
        skeleton = route._skeletons[recipe_structure(first)]
        assert skeleton is not None, name
        assert [_task_fields(t) for t in planned] == [_task_fields(t) for t in route._plan_in_full(first)[0]], name
        for _ in range(2):
            revalued = _revalued(recipe, rng)
            replanned, _ = route.plan(_config(revalued))
            fresh, _, _ = route._plan_in_full(_config(revalued))
            assert [_task_fields(t) for t in replanned] == [_task_fields(t) for t in fresh], name
            # it did take the skeleton's route (its gather tasks, not new ones) ...
            assert all(a.tensor_task.gather_tensors is b.tensor_task.gather_tensors for a, b in zip(replanned, planned))
        # ... and not vacuously: where there were values to change, the parameters changed
        if revalued != recipe:
            parameters = [(t.tensor_task.parameters, t.tensor_task.input_parameters) for t in replanned]
            assert parameters != [(t.tensor_task.parameters, t.tensor_task.input_parameters) for t in planned], name


def test_structure_excludes_values_only(family):
    recipe = _recipes(family)["ties"]
    structure = recipe_structure(_config(recipe))
    assert recipe_structure(_config(_revalued(recipe, np.random.default_rng(1)))) == structure
    for change in ("dtype", "merge_method", "layers"):
        other = _recipes(family)["ties"]
        if change == "dtype":
            other["dtype"] = "bfloat16"
        elif change == "merge_method":
            other["merge_method"] = "dare_ties"
        else:
            other["models"] = other["models"][:-1]
        assert recipe_structure(_config(other)) != structure, change


def test_replanned_merges_equal_first_merges(family, merger):
    """Merged by a merger whose skeleton, kernels and checked groups come from an earlier
    candidate, a recipe gives the tensors a fresh merger (full plan, new kernels) gives."""
    rng = np.random.default_rng(2)
    for method in ("linear", "ties", "dare_ties", "della", "sce", "slerp"):
        recipe = _recipes(family)[method]
        merger.merge(_config(recipe))  # the structure's skeleton and kernels
        candidate = _config(_revalued(recipe, rng))
        replanned = _snapshot(merger.merge(candidate))
        # (a template of another structure: the fresh merger plans the candidate in full)
        fresh = InMemoryMerger(_config(_recipes(family)["ram"]), random_seed=SEED).merge(candidate)
        _assert_state_equal(fresh, replanned)
        assert any(not torch.equal(replanned[n], t) for n, t in _snapshot(merger.merge(_config(recipe))).items())


def test_tokenizer_source_union_resizes_like_run_merge(family, tmp_path):
    recipe = _recipes(family)["linear"]
    recipe["tokenizer_source"] = "union"
    config = _config(recipe)
    merger = InMemoryMerger(config)
    out = merge_to_disk(config, tmp_path / "union", write_model_card=False)
    _assert_state_equal(merger.merge(config), load_file(out / "model.safetensors"))
    assert merger.model.config.vocab_size == len(merger.tokenizer.get_vocab())


def test_merge_to_disk_writes_loadable_model(family, merger, tmp_path, monkeypatch):
    # Relative model paths: made absolute, so the model-card step stays offline.
    monkeypatch.chdir(family["base"].parent)
    recipe = _recipes(family)["dare_ties"]
    recipe["base_model"] = "base"
    recipe["models"] = [dict(m, model=Path(m["model"]).name) for m in recipe["models"]]
    config = _config(recipe)
    before = config.model_dump()
    numpy_state, torch_state = np.random.get_state()[1].tolist(), torch.get_rng_state()
    out = merge_to_disk(config, tmp_path / "final", random_seed=SEED)
    assert config.model_dump() == before  # not mutated
    # run_merge reseeds numpy/torch globally; a search loop's sampler must not notice.
    assert np.random.get_state()[1].tolist() == numpy_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert out == tmp_path / "final"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _assert_state_equal(loaded, _snapshot(merger.merge(_config(_recipes(family)["dare_ties"]))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp folders left


def test_merge_to_disk_failure_leaves_nothing(family, tmp_path):
    broken = _make_expert(family["base"], tmp_path / "broken", seed=5)
    # Copies: load_file's tensors map the file that is about to be rewritten.
    tensors = {name: t.clone() for name, t in load_file(broken / "model.safetensors").items()}
    del tensors["model.norm.weight"]  # merged last: fails after other tensors were written
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    recipe = _recipes(family)["linear"]
    recipe["models"][0]["model"] = str(broken)
    outputs = tmp_path / "outputs"
    with pytest.raises(Exception, match="model.norm.weight"):
        merge_to_disk(_config(recipe), outputs / "fresh")
    assert list(outputs.iterdir()) == []
    # An existing model at out_dir survives a failed re-merge untouched.
    good = merge_to_disk(_config(_recipes(family)["linear"]), outputs / "kept", write_model_card=False)
    before = load_file(good / "model.safetensors")
    with pytest.raises(Exception, match="model.norm.weight"):
        merge_to_disk(_config(recipe), good)
    _assert_state_equal_dicts(load_file(good / "model.safetensors"), before)
    assert sorted(p.name for p in outputs.iterdir()) == ["kept"]


def _assert_state_equal_dicts(actual, expected):
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[n], expected[n]) for n in expected)
