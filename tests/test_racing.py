"""Racing on the zoo: survivors score exactly as a full evaluation, stopped candidates cost fewer
tokens, the best of a generation is never stopped, and an interrupted racing run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from interrupting import StopAfter
from searching import search_in

from mergekit_evolve import runner
from mergekit_evolve.config import parse_config
from mergekit_evolve.demo import demo_config
from mergekit_evolve.search.executors import LocalExecutor
from mergekit_evolve.search.problems import make_problem
from mergekit_evolve.search.rundir import RunDir


def zoo_config(zoo, racing, max_evals=8, **optimizer) -> dict:
    config = demo_config(zoo, "ps", max_evals, seed=1)
    # Selected on the script skill (150 rows, accuracies spread from 0.4 to 0.9 over the space) with
    # a wide first generation (sigma0 0.4), as early in a run.
    script = zoo.tasks["script"]
    config["fitness"]["tasks"] = [{"name": "script", "data": str(script.fitness), "max_new_tokens": 8}]
    config["optimizer"].update(popsize=8, sigma0=0.4, racing=racing, **optimizer)
    return config


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_and_raced(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("racing")
    for name, racing in (("full", None), ("raced", True)):
        runner.start(parse_config(zoo_config(zoo, racing)), root / name, device="cpu", progress=False, save_model=False)
    return records(root / "full"), records(root / "raced")


def test_survivors_score_exactly_as_the_full_evaluation(full_and_raced):
    full, raced = (sorted(r, key=lambda r: r["candidate"]) for r in full_and_raced)
    assert [r["genome"] for r in full] == [r["genome"] for r in raced]  # the same first generation
    survivors = [r for r in raced if r["racing"]["stopped_at"] is None]
    assert len(survivors) >= 4  # CMA-ES's mu = 4 ranks are always exact
    for r in survivors:
        assert r["fitness"] == full[r["candidate"]]["fitness"]
        assert r["racing"]["fraction"] == 1.0


def test_stopped_candidates_save_tokens_and_never_include_the_best(full_and_raced):
    full, raced = (sorted(r, key=lambda r: r["candidate"]) for r in full_and_raced)
    stopped = [r for r in raced if r["racing"]["stopped_at"] is not None]
    assert stopped, "a wide generation should let racing stop someone"
    for r in stopped:
        assert r["racing"]["fraction"] < 1.0
        assert r["tokens"] < full[r["candidate"]]["tokens"]
    assert sum(r["tokens"] for r in raced) < sum(r["tokens"] for r in full)
    true_top = sorted(full, key=lambda r: (-r["fitness"], r["candidate"]))[:4]
    assert all(raced[r["candidate"]]["racing"]["stopped_at"] is None for r in true_top)


def test_interrupted_racing_run_resumes_to_the_same_result(zoo, tmp_path):
    config = parse_config(zoo_config(zoo, True, max_evals=8))
    problem = make_problem(config, "cpu")
    fitness = runner.make_fitness(config, problem.tokenizer)
    racing = runner.make_racing(config, fitness)

    def search(out: Path, executor) -> list[dict]:
        search_in(out, problem, executor, config.optimizer, racing=racing)
        return records(out)

    score = runner.make_score(fitness)
    reference = search(tmp_path / "ref", LocalExecutor(problem, score))
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "cut", StopAfter(problem, score, 13))  # generation 1, stage 2 of 4
    stages_before = len(RunDir(tmp_path / "cut").read_stages())
    assert stages_before == 13
    resumed = search(tmp_path / "cut", LocalExecutor(problem, score))
    key = lambda r: (r["generation"], r["candidate"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, reference))  # nothing lost, nothing twice
    ref_by, cut_by = {key(r): r for r in reference}, {key(r): r for r in resumed}
    for k, r in ref_by.items():
        assert cut_by[k]["genome"] == r["genome"]
        assert cut_by[k]["fitness"] == r["fitness"]
        assert cut_by[k]["racing"] == r["racing"]
    stages = RunDir(tmp_path / "cut").read_stages()
    assert len({(s.generation, s.candidate, s.stage) for s in stages}) == len(stages)
    assert len(stages) == len(RunDir(tmp_path / "ref").read_stages())
