"""optimizer.economy on the zoo: a generation shares one subsample, the best is scored in full before
it is written, the stop reason is reported, and a run interrupted mid-generation and mid-rescoring
resumes to identical records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from interrupting import StopAfter

from mergekit_evolve import runner
from mergekit_evolve.config import parse_config
from mergekit_evolve.demo import demo_config
from mergekit_evolve.export.artifacts import best_writer
from mergekit_evolve.search import economy
from mergekit_evolve.search.executors import LocalExecutor, evaluate_candidate
from mergekit_evolve.search.loop import run_search
from mergekit_evolve.search.problems import make_problem
from mergekit_evolve.search.records import Best, Evaluation
from mergekit_evolve.search.rundir import RunDir


def zoo_config(zoo, mode: str, max_evals: int = 12) -> dict:
    config = demo_config(zoo, "ps", max_evals, seed=2)
    script = zoo.tasks["script"]  # 150 rows, accuracies spread over the space: candidates disagree
    config["genome"]["merge_method"] = "linear"  # the cheapest merge: this test is about the search
    del config["genome"]["base_model"]
    del config["genome"]["parameters"]  # the demo's density range: linear has no density
    config["fitness"]["tasks"] = [{"name": "script", "data": str(script.fitness), "limit": 40, "max_new_tokens": 8}]
    config["optimizer"].update(popsize=4, sigma0=0.3, economy=mode)
    return config


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_interrupted_economy_run_resumes_to_identical_records(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(economy, "PATIENCE", 1)  # let the stagnation rule act within a short run
    config = parse_config(zoo_config(zoo, "auto", max_evals=20))
    summary = runner.start(config, tmp_path / "ref", device="cpu", progress=False, save_model=False)
    problem = make_problem(config, "cpu")
    fitness = runner.make_fitness(config, problem.tokenizer)
    score = runner.make_score(fitness)

    def search(out: Path, executor):
        run_dir = RunDir(out)
        run_dir.prepare(fresh=not out.exists())
        try:
            return run_search(
                problem,
                executor,
                run_dir,
                config.optimizer,
                progress=False,
                on_best=best_writer(problem, run_dir),
                economy=runner.make_economy(config, fitness),
            )
        finally:
            run_dir.unlock()

    ref_evals, ref_rescored = read(tmp_path / "ref" / "evaluations.jsonl"), read(tmp_path / "ref" / "rescored.jsonl")
    fresh = sum(not r["cached"] for r in ref_evals) + len(ref_rescored)
    # Killed in generation 2, then before the last finalist's full score, then let finish.
    for stop_after in (6, fresh - 6 - 1):
        with pytest.raises(KeyboardInterrupt):
            search(tmp_path / "cut", StopAfter(problem, score, stop_after))
    resumed = search(tmp_path / "cut", LocalExecutor(problem, score))
    cut_evals, cut_rescored = read(tmp_path / "cut" / "evaluations.jsonl"), read(tmp_path / "cut" / "rescored.jsonl")

    key = lambda r: (r["generation"], r["candidate"])  # noqa: E731
    assert sorted(map(key, cut_evals)) == sorted(map(key, ref_evals))  # nothing lost, nothing twice
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time", "seconds", "merge_seconds")}  # noqa: E731
    assert sorted(map(strip, cut_evals), key=key) == sorted(map(strip, ref_evals), key=key)
    assert sorted(map(strip, cut_rescored), key=key) == sorted(map(strip, ref_rescored), key=key)
    assert len(ref_rescored) == economy.FINALISTS
    assert resumed.best == Best(**{k: getattr(summary.best, k) for k in Best.model_fields})
    assert resumed.economy.stop_reason == summary.stop_reason
    assert (tmp_path / "cut" / "best.yaml").read_text() == (tmp_path / "ref" / "best.yaml").read_text()

    # The search stopped itself, said why and how its numbers were obtained.
    assert summary.stop_reason.startswith("no better candidate in 1 generations")
    assert summary.evaluations == 16  # of 20
    assert summary.fitness_source == {"best.fitness": "full", "best.heldout": "no held-out split"}
    assert summary.tokens == sum(r["tokens"] for r in ref_evals + ref_rescored)
    # One subsample per generation, smaller than the split; the best's fitness is a full evaluation.
    by_generation: dict[int, set] = {}
    for r in ref_evals:
        assert r["subsample"]["of"] == {"script": 40}
        by_generation.setdefault(r["generation"], set()).add(tuple(r["subsample"]["items"]["script"]["rows"]))
    assert all(len(rows) == 1 for rows in by_generation.values())
    assert len(next(iter(by_generation[1]))) == 12  # 20% of 40, at least 12, to start
    full = evaluate_candidate(problem, score, summary.best.genome)
    assert summary.best.fitness == full.fitness == max(r["fitness"] for r in ref_rescored)
    assert full.subsample is None


def test_rasch_estimate_ranks_full_candidates_like_their_accuracy_and_shrinks_small_samples():
    rng = np.random.default_rng(0)
    ability = np.linspace(-1, 1, 6)
    difficulty = rng.normal(0, 1, 40)
    truth = 1 / (1 + np.exp(-(ability[:, None] - difficulty[None, :])))
    answers = rng.random(truth.shape) < truth

    def record(index: int, rows: list[int], correct: str) -> Evaluation:
        sample = {"of": {"t": 40}, "items": {"t": {"rows": rows, "correct": correct}}}
        return Evaluation(index=index, generation=1, candidate=index, genome=[0.5], fitness=0.0, subsample=sample)

    records = [record(i, list(range(40)), "".join("1" if a else "0" for a in row)) for i, row in enumerate(answers)]
    # A candidate that answered its 3 rows right: a lucky small sample, not the best.
    records.append(record(6, [0, 1, 2], "111"))
    predicted = economy.rasch_accuracy(records, "t", 40)
    observed = answers.mean(axis=1)
    assert np.argsort(predicted[:6]).tolist() == np.argsort(observed, kind="stable").tolist()
    assert predicted[6] < max(predicted[:6])
