"""dfs.validation: rows held back from the DFS search confirm its result; the start path (in PS+DFS the
PS model) stays unless the search's best beats it on those rows beyond their noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from mergekit_evolve import runner
from mergekit_evolve.config import parse_config
from mergekit_evolve.demo import demo_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.fitness import Fitness
from mergekit_evolve.search.records import Best
from mergekit_evolve.search.validation import paired_difference


def zoo_fitness(zoo) -> Fitness:
    target = zoo.tasks[zoo.target]
    tasks = [{"name": target.name, "data": str(target.fitness), "heldout": str(target.heldout), "max_new_tokens": 8}]
    return Fitness({"tasks": tasks}, transformers.AutoTokenizer.from_pretrained(str(zoo.models[zoo.base])))


def prompts(fitness: Fitness, split: str) -> list[str]:
    return [row.values["prompt"] for row in fitness._tasks[0].rows[split]]


def test_hold_back_splits_the_fitness_rows_disjointly_by_seed_and_leaves_heldout_alone(zoo):
    fitness = zoo_fitness(zoo)
    held = fitness.hold_back(0.3, seed=0)
    assert held.num_rows("fitness") == {"script_math": 70} and held.num_rows("validation") == {"script_math": 30}
    assert held.num_rows("heldout") == fitness.num_rows("heldout") == {"script_math": 155}
    search, validation = prompts(held, "fitness"), prompts(held, "validation")
    assert not set(search) & set(validation) and sorted(search + validation) == sorted(prompts(fitness, "fitness"))
    assert prompts(fitness.hold_back(0.3, seed=0), "validation") == validation  # seeded
    assert prompts(fitness.hold_back(0.3, seed=1), "validation") != validation  # a new draw per seed
    assert fitness.num_rows("fitness") == {"script_math": 100}  # the original is untouched


def test_paired_difference_and_its_standard_error():
    diff, se = paired_difference({"t": "1101"}, {"t": "0100"}, {"t": 1.0})  # differences 1, 0, 0, 1
    assert diff == pytest.approx(0.5) and se == pytest.approx((1 / 3) ** 0.5 / 2)
    diff, se = paired_difference({"a": "11", "b": "00"}, {"a": "01", "b": "00"}, {"a": 3.0, "b": 1.0})
    assert diff == pytest.approx(0.75 * 0.5) and se == pytest.approx(0.75 * (0.5**0.5) / 2**0.5)


def small_dfs(zoo, **dfs) -> dict:
    data = demo_config(zoo, "dfs", 24, 0)
    data["optimizer"]["popsize"] = 6
    data["dfs"].update(prescan=2, **dfs)
    return data


def run_dfs(config, out: Path):
    """A run on CPU, no progress bar, no saved model (a dict is parsed first)."""
    config = parse_config(config) if isinstance(config, dict) else config
    return runner.start(config, out, device="cpu", progress=False, save_model=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_search_sees_only_its_rows_and_a_better_search_score_alone_does_not_replace_the_start(zoo, tmp_path):
    """z = 100: no search result can pass, so the run returns model A's own path although the search
    found paths scoring higher on its 70 rows (without the gate the best of those would be returned)."""
    summary = run_dfs(small_dfs(zoo, validation=0.3, validation_z=100), tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "evaluations.jsonl")
    assert {round(r["fitness"] * 70, 6) % 1 for r in records} == {0.0}  # scored on the 70 search rows
    decision = summary.validation
    start, searched = decision.start.record, decision.search_best.record
    assert decision.rows == {"script_math": 30} and decision.kept == "start"
    assert searched.fitness > start.fitness == records[0]["fitness"]  # the pre-scan scores the start first
    assert summary.best.key == start.key and summary.best.index == 0
    path = json.loads((tmp_path / "run" / "best.json").read_text())["path"]
    assert path["hops"] == [[0, i] for i in range(4)] and set(path["scales"]) == {1.0}  # model A's own layers
    assert summary.best.fitness == start.fitness < max(r["fitness"] for r in records)


def test_the_search_best_replaces_the_start_when_it_wins_on_the_validation_rows(zoo, tmp_path):
    summary = run_dfs(small_dfs(zoo, validation=0.3, validation_z=0), tmp_path / "run")
    decision = summary.validation
    assert decision.difference > 0 and decision.kept == "search_best"
    assert Best(**{k: getattr(summary.best, k) for k in Best.model_fields}) == decision.search_best.record
    path = json.loads((tmp_path / "run" / "best.json").read_text())["path"]
    assert path["hops"] != [[0, i] for i in range(4)]  # not model A's own layers
    wins = decision.search_best.validation - decision.start.validation
    assert wins == pytest.approx(decision.difference)


def test_gate_interrupted_between_its_two_scores_resumes_to_the_same_decision(zoo, tmp_path, monkeypatch):
    config = parse_config(small_dfs(zoo, validation=0.3))
    reference = run_dfs(config, tmp_path / "ref")
    calls = {"n": 0}
    evaluate = Fitness.evaluate

    def interrupted(self, model, split="fitness", part=None):
        if split == "validation":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return evaluate(self, model, split, part)

    monkeypatch.setattr(Fitness, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_dfs(config, tmp_path / "cut")
    assert [r["role"] for r in read_jsonl(tmp_path / "cut" / "validation.jsonl")] == ["start"]
    monkeypatch.setattr(Fitness, "evaluate", evaluate)
    resumed = runner.resume(tmp_path / "cut", progress=False)
    assert read_jsonl(tmp_path / "cut" / "validation.jsonl") == read_jsonl(tmp_path / "ref" / "validation.jsonl")
    assert resumed.validation == reference.validation and resumed.best == reference.best
    again = runner.resume(tmp_path / "cut", progress=False)  # a finished gate is read back, not redone
    assert again.best == reference.best and len(read_jsonl(tmp_path / "cut" / "validation.jsonl")) == 3


def test_ps_dfs_holds_back_rows_by_default_and_keeps_the_ps_model_without_evidence(zoo, tmp_path):
    """The demo's PS+DFS, small: the DFS stage holds back 30 rows by default; when its best does not beat
    the PS model on them, the run's model is the PS model (same held-out score); plain DFS holds back none."""
    import yaml

    from mergekit_evolve.search.validation import make_validation_gate

    data = demo_config(zoo, "ps+dfs", 12, 0)
    data["optimizer"]["popsize"] = 6
    summary = run_dfs(data, tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "dfs" / "config.yaml").read_text())["dfs"]["validation"] == 0.3
    decision = summary.stages["dfs"].validation
    assert decision.rows == {"script_math": 30} and decision.z == 1.645
    # ahead on the validation rows, but within their noise: "better on unseen rows" alone would replace it
    assert 0 < decision.difference <= 1.645 * decision.standard_error and decision.kept == "start"
    path = json.loads((tmp_path / "run" / "best.json").read_text())["path"]
    assert path["hops"] == [[0, i] for i in range(4)] and set(path["scales"]) == {1.0}  # the PS model's layers
    assert summary.best.heldout == summary.stages["ps"].best.heldout
    from mergekit_evolve.export.report import write_report

    report = write_report(tmp_path / "run").read_text()  # the decision is in the report
    assert "| DFS result confirmed on held-back rows | validation on 30 script_math rows" in report
    assert "kept the start path" in report
    from mergekit_evolve.export.model_card import build_card

    card = build_card(tmp_path / "run", repo_id="me/evolved")  # and in the model card
    assert "| DFS result confirmed on held-back rows | validation on 30 script_math rows" in card
    assert make_validation_gate(parse_config(demo_config(zoo, "dfs", 20, 0))) is None


def test_a_resumed_ps_dfs_stage_keeps_the_rows_it_started_with(zoo, tmp_path):
    from mergekit_evolve.search.validation import ps_dfs_validation

    config = parse_config(demo_config(zoo, "ps+dfs", 20, 0))
    stage = tmp_path / "config.yaml"
    assert ps_dfs_validation(config, stage) == 0.3  # a new stage: the default
    stage.write_text("space: dfs\ndfs: {repeats: 2, validation: 0.5}\n")
    assert ps_dfs_validation(config, stage) == 0.5
    stage.write_text("space: dfs\ndfs: {repeats: 2}\n")  # written before dfs.validation existed
    assert ps_dfs_validation(config, stage) == 0.0


def test_validation_needs_accuracy_tasks(tmp_path):
    base = {
        "space": "dfs",
        "genome": {"models": ["a", "b"]},
        "dfs": {"validation": 0.3},
        "fitness": {"tasks": [{"name": "t", "kind": "perplexity", "data": "d.jsonl"}]},
    }
    with pytest.raises(
        InputError, match=r"dfs.validation: 0.3 .* needs built-in accuracy tasks .*set dfs.validation: 0"
    ):
        parse_config(base, base_dir=tmp_path)
    config = parse_config({**base, "dfs": {}}, base_dir=tmp_path)  # the default: off where it cannot apply
    from mergekit_evolve.search.validation import ps_dfs_validation

    assert ps_dfs_validation(config.model_copy(update={"space": "ps+dfs"})) == 0.0
