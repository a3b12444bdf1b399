"""How DFS searches: block-path pre-scan, the indicators' own step, exact resume, and a new user's run on
the shipped zoo (the search finds paths that compose the two experts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mergekit_evolve import runner
from mergekit_evolve.config import OptimizerConfig, parse_config
from mergekit_evolve.search.cmaes import new_es
from mergekit_evolve.search.dfs_search import block_paths, indicator_stds
from mergekit_evolve.space.dfs import DFSSpace

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def runs_of(hops: tuple) -> list[list[tuple]]:
    """Split a path into maximal runs of consecutive layers of one model."""
    runs: list[list[tuple]] = []
    for hop in hops:
        if runs and runs[-1][-1][0] == hop[0] and runs[-1][-1][1] + 1 == hop[1]:
            runs[-1].append(hop)
        else:
            runs.append([hop])
    return runs


def test_block_paths_are_distinct_runs_of_consecutive_layers_with_scales_one():
    space = DFSSpace([4, 4], repeats=2)
    genomes = block_paths(space, 60, seed=3)
    paths = [space.decode(g) for g in genomes]
    assert len({p.hops for p in paths}) == 60
    assert paths[0].hops == tuple((0, i) for i in range(4)) and paths[1].hops == tuple((1, i) for i in range(4))
    for path in paths:
        assert set(path.scales) == {1.0}
        assert 1 <= len(runs_of(path.hops)) <= 4  # at most one run per (model, repetition) segment
    assert [p.hops for p in map(space.decode, block_paths(space, 60, seed=3))] == [p.hops for p in paths]


def test_indicator_step_flips_the_asked_number_of_slots_on_average():
    space = DFSSpace([4, 4], repeats=2)
    x0 = space.x0()
    opt = OptimizerConfig(seed=0, popsize=200)
    old = new_es(x0, opt).ask()
    new = new_es(x0, opt, extra_options={"CMA_stds": indicator_stds(space, opt.sigma0, 1.5)}).ask()

    def mean_flips(samples):
        return np.mean([np.sum((np.asarray(s)[:16] > 0) != (x0[:16] > 0)) for s in samples])

    assert mean_flips(old) < 0.1  # the old search: a slot flip was a 3-sigma event
    assert 1.2 < mean_flips(new) < 1.8
    scales = np.asarray(new)[:, 16:]
    assert 0.14 < scales.std() < 0.19  # the scales keep sigma0 = 1/6


def dfs_config(family, data: Path, function="fitness_fns:loglik", max_evals=34) -> dict:
    return {
        "space": "dfs",
        "genome": {"models": [str(family["expert0"]), str(family["expert1"])], "merge_method": "linear"},
        "dfs": {"repeats": 2, "prescan": 1},
        "fitness": {
            "tasks": [{"name": "ll", "kind": "callable", "function": function, "data": str(data), "heldout": str(data)}]
        },
        "optimizer": {"max_evals": max_evals, "seed": 4},
        "dtype": "float32",
    }


def test_run_interrupted_in_the_prescan_resumes_to_the_same_result(family, tmp_path, monkeypatch):
    import fitness_fns

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(8)))
    reference = runner.start(
        parse_config(dfs_config(family, data)), tmp_path / "ref", device="cpu", progress=False, save_model=False
    )
    ref = [json.loads(line) for line in (tmp_path / "ref" / "evaluations.jsonl").read_text().splitlines()]
    assert len(ref) == 34 and len({r["key"] for r in ref[:17]}) == 17  # a pre-scan generation of 17 distinct paths
    assert {v for r in ref[:17] for v in r["genome"][16:]} == {0.0}  # block paths: every scale 1
    assert ref[17]["genome"][16:] != ref[0]["genome"][16:]  # then CMA-ES tunes the scales too
    fitness_fns.CALLS["n"] = 0
    monkeypatch.setenv("MKE_INTERRUPT_AT", "10")  # inside the pre-scan generation
    config = parse_config(dfs_config(family, data, function="fitness_fns:interrupting"))
    with pytest.raises(KeyboardInterrupt):
        runner.start(config, tmp_path / "cut", device="cpu", progress=False, save_model=False)
    monkeypatch.delenv("MKE_INTERRUPT_AT")
    resumed = runner.resume(tmp_path / "cut", progress=False)
    cut = [json.loads(line) for line in (tmp_path / "cut" / "evaluations.jsonl").read_text().splitlines()]
    assert [r["genome"] for r in cut] == [r["genome"] for r in ref]  # nothing lost, nothing twice
    assert resumed.best.genome == reference.best.genome


def test_new_user_dfs_on_the_shipped_zoo_composes_the_experts(zoo, tmp_path):
    """The demo's DFS, smaller (population 10, 5 generations: 4 of block paths, 1 of CMA-ES): the search finds
    paths that mix both experts' layers and beat every source on the fitness split; the winner runs the math
    expert's layers under the script expert's embeddings and head (model A)."""
    import torch
    import transformers

    from mergekit_evolve.demo import demo_config
    from mergekit_evolve.fitness.factory import make_fitness

    data = demo_config(zoo, "dfs", 50, 0)
    data["optimizer"]["popsize"] = 10
    config = parse_config(data)
    fitness = make_fitness(config, transformers.AutoTokenizer.from_pretrained(str(zoo.models[zoo.base])))
    sources = {}
    for name in [zoo.base, *zoo.experts]:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(zoo.models[name]), dtype=torch.float32).eval()
        sources[name] = fitness.score(model, "fitness")[zoo.target]
    best_source = max(sources.values())
    summary = runner.start(config, tmp_path / "run", device="cpu", progress=False, save_model=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    assert len(records) == 50 and len({r["key"] for r in records}) == 50

    def models_of_layers(record) -> set[int]:
        genome = np.asarray(record["genome"])
        return {t % 8 // 4 for t in range(16) if genome[t] > 0}  # 2 models x 4 layers, 2 repetitions

    mixing = [r for r in records if models_of_layers(r) == {0, 1}]
    assert max(r["fitness"] for r in mixing) > best_source
    assert summary.best.fitness > best_source
    best_path = json.loads((tmp_path / "run" / "best.json").read_text())["path"]
    assert best_path["base_index"] == 0 and any(m == 1 for m, _ in best_path["hops"])  # A's embeddings, B's layers


def test_budget_in_whole_generations_as_the_paper(tmp_path):
    from mergekit_evolve.errors import InputError

    base = {"genome": {"models": ["a", "b"]}, "fitness": {"tasks": [{"name": "t", "data": "d.jsonl"}]}}
    config = parse_config({**base, "optimizer": {"popsize": 128, "generations": 100}}, base_dir=tmp_path)
    assert config.optimizer.max_evals == 12_800  # the paper's DFS budget
    with pytest.raises(InputError, match="contradicts popsize x generations = 12800"):
        parse_config({**base, "optimizer": {"popsize": 128, "generations": 100, "max_evals": 500}}, base_dir=tmp_path)
    with pytest.raises(InputError, match="generations needs popsize"):
        parse_config({**base, "optimizer": {"generations": 100}}, base_dir=tmp_path)
