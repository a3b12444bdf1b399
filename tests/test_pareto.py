"""Multi-objective search (optimizer.objectives): COMO-CMA-ES and NSGA-II on the zoo, the front on disk, picking
a point, exact resume, bad input. Real merges, real models, real comocma and pymoo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from interrupting import StopAfter
from safetensors.torch import load_file
from searching import refused_line, search_in

from mergekit_evolve import runner
from mergekit_evolve.cli import main
from mergekit_evolve.config import parse_config
from mergekit_evolve.demo import demo_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.search.executors import LocalExecutor
from mergekit_evolve.search.objectives import Objectives
from mergekit_evolve.search.problems import make_problem

pytest.importorskip("comocma")
pytest.importorskip("pymoo")


def zoo_config(zoo, space="ps", max_evals=30, limit=40, **optimizer) -> dict:
    """The demo's search space, selected on the target (script_math) and the script skill."""
    config = demo_config(zoo, space, max_evals, seed=0)
    config["fitness"]["tasks"][0]["limit"] = limit
    script = zoo.tasks["script"]
    config["fitness"]["tasks"].append(
        {
            "name": "script",
            "data": str(script.fitness),
            "heldout": str(script.heldout),
            "max_new_tokens": 8,
            "limit": limit,
        }
    )
    config["optimizer"].update({"objectives": ["script_math", "script"], **optimizer})
    return config


def evaluations(out: Path) -> list[dict]:
    return sorted(
        (json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()), key=lambda r: r["index"]
    )


def dominated(a: list[float], b: list[float]) -> bool:
    """``a`` is dominated by ``b`` (scores: higher is better)."""
    return all(y >= x for x, y in zip(a, b)) and any(y > x for x, y in zip(a, b))


@pytest.fixture(scope="module")
def como_run(zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pareto") / "como"
    config = parse_config(zoo_config(zoo, max_evals=30, popsize=4, kernels=3))
    runner.start(config, out, device="cpu", progress=False, save_model=False)
    return out


def test_the_front_holds_exactly_the_non_dominated_candidates(como_run):
    front = json.loads((como_run / "front.json").read_text())
    records = [r for r in evaluations(como_run) if r["error"] is None]
    assert len(records) == 30
    vectors = {r["index"]: [r["scores"]["script_math"], r["scores"]["script"]] for r in records}
    points = {p["index"]: [p["values"]["script_math"], p["values"]["script"]] for p in front["points"]}
    assert points and all(points[i] == vectors[i] for i in points)  # the values are the search's own scores
    for i, v in vectors.items():  # every candidate off the front is dominated by, or equal to, a front point
        on_front = i in points
        covered = any(dominated(v, p) or (v == p and j <= i) for j, p in points.items() if j != i)
        assert on_front != covered, (i, v)
    assert front["objectives"] == ["script_math", "script"] and front["reference"] == [0.0, 0.0]
    expected = Objectives.in_units(front["objectives"], front["reference"]).hypervolume(
        {"script_math": v[0], "script": v[1]} for v in points.values()
    )
    assert front["hypervolume"] == pytest.approx(expected) and expected > 0


def test_best_yaml_stays_the_weighted_best_and_every_point_has_held_out_scores(como_run):
    summary = json.loads((como_run / "summary.json").read_text())
    records = [r for r in evaluations(como_run) if r["error"] is None]
    weighted = max(records, key=lambda r: (r["fitness"], -r["index"]))
    assert summary["best"]["index"] == weighted["index"] and summary["front_size"] >= 1
    assert "fitness" in (como_run / "best.yaml").read_text() and (como_run / "best.yaml").is_file()
    front = json.loads((como_run / "front.json").read_text())
    for point in front["points"]:
        assert set(point["heldout"]) == {"script_math", "script"}
        assert all(0.0 <= v <= 1.0 for v in point["heldout"].values())
        assert (como_run / point["recipe"]).is_file()
    assert any(p["heldout_front"] for p in front["points"])
    labels = [r["label"] for r in front["references"]]
    assert labels[0] == "start" and {"script", "math", "base"} <= set(labels)
    script = next(r for r in front["references"] if r["label"] == "script")
    assert script["values"]["script"] > 0.9  # the script expert reads the script: the reference is really scored


def test_a_front_recipe_built_by_mergekit_yaml_scores_what_the_search_saw(como_run, zoo, tmp_path):
    """front/NN.yaml through mergekit's own CLI: the model scores exactly the point's values; and
    export --pick of that point writes the same weights."""
    front = json.loads((como_run / "front.json").read_text())
    best_script = max(range(len(front["points"])), key=lambda n: (front["points"][n]["values"]["script"], -n))
    point = front["points"][best_script]
    built = tmp_path / "built"
    subprocess.run(
        ["mergekit-yaml", str(como_run / point["recipe"]), str(built), "--random-seed", "0"],
        check=True,
        capture_output=True,
    )
    import transformers

    from mergekit_evolve.fitness.factory import make_fitness
    from mergekit_evolve.resources import load_tokenizer

    config = parse_config(zoo_config(zoo, max_evals=30, popsize=4, kernels=3))
    tokenizer = load_tokenizer(str(zoo.models[zoo.base]))
    fitness = make_fitness(config, tokenizer, str(zoo.models[zoo.base]), False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(built), dtype=torch.float32)
    assert fitness.score(model) == point["values"]

    picked = tmp_path / "picked"
    result = CliRunner().invoke(main, ["export", str(como_run), "--pick", "script=1", "--out", str(picked)])
    assert result.exit_code == 0, result.output
    assert f"chose front point {best_script} " in result.output
    ours, theirs = load_file(picked / "model.safetensors"), load_file(built / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_pick_weighs_objectives_scaled_over_the_front(como_run):
    from mergekit_evolve.export.front import pick
    from mergekit_evolve.search.records import Front

    front = Front(**json.loads((como_run / "front.json").read_text()))
    assert len(front.points) >= 2  # the seeded run's front has several points to choose from
    top_math = max(front.points, key=lambda p: (p.values["script_math"], -p.index))
    top_script = max(front.points, key=lambda p: (p.values["script"], -p.index))
    assert pick(front, {"script_math": 1.0}).index == top_math.index
    assert pick(front, {"script": 2.0}).index == top_script.index
    assert top_math.index != top_script.index


@pytest.mark.parametrize(
    "pick, message",
    [
        ("math=1", "--pick: 'math=1' is not OBJECTIVE=WEIGHT over this run's objectives (script_math, script)"),
        ("script=x", "--pick: weight 'x' of script is not a number"),
        ("script=0", "--pick: give at least one positive weight"),
    ],
)
def test_a_bad_pick_is_one_line_and_exit_2(como_run, tmp_path, pick, message):
    result = CliRunner().invoke(main, ["export", str(como_run), "--pick", pick, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_report_draws_the_front_and_the_card_says_where_a_pushed_point_sits(como_run, tmp_path):
    result = CliRunner().invoke(main, ["report", str(como_run), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "front.png" in text and "### Pareto front" in text
    assert (tmp_path / "report" / "front.png").stat().st_size > 10_000
    front = json.loads((como_run / "front.json").read_text())
    top_math = max(range(len(front["points"])), key=lambda n: (front["points"][n]["values"]["script_math"], -n))
    dry = tmp_path / "dry"
    pushed = CliRunner().invoke(
        main, ["push", str(como_run), "--repo", "me/front", "--dry-run", str(dry), "--pick", "script_math=1"]
    )
    assert pushed.exit_code == 0, pushed.output
    card = (dry / "README.md").read_text()
    assert f"This model is point {top_math} of the {len(front['points'])} points" in card
    assert f"| **{top_math} (this model)** |" in card
    recipe = (como_run / front["points"][top_math]["recipe"]).read_text()  # the card shows the point's recipe
    density = [line for line in recipe.splitlines() if "value:" in line][0].split("value:")[1].strip()
    assert density in card


@pytest.mark.parametrize(
    "kind, options, stop_after", [("como-cmaes", {"popsize": 4, "kernels": 2}, 14), ("nsga2", {"popsize": 6}, 9)]
)
def test_an_interrupted_multi_objective_run_resumes_to_the_same_result(zoo, tmp_path, kind, options, stop_after):
    config = parse_config(zoo_config(zoo, max_evals=24, limit=20, kind=kind, **options))
    problem = make_problem(config, "cpu")
    fitness = runner.make_fitness(config, problem.tokenizer)
    score = runner.make_score(fitness)
    objectives = Objectives.of(config)

    def search(out: Path, executor) -> list[dict]:
        search_in(out, problem, executor, config.optimizer, objectives=objectives)
        return evaluations(out)

    reference = search(tmp_path / "ref", LocalExecutor(problem, score))
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "cut", StopAfter(problem, score, stop_after))
    assert len(evaluations(tmp_path / "cut")) == stop_after  # cut inside the second generation
    resumed = search(tmp_path / "cut", LocalExecutor(problem, score))
    assert [r["genome"] for r in resumed] == [r["genome"] for r in reference]  # nothing lost, nothing twice
    assert [r["scores"] for r in resumed] == [r["scores"] for r in reference]
    assert len({r["generation"] for r in reference}) >= 3


def test_dfs_searches_a_front_of_paths(zoo, tmp_path):
    config = parse_config(zoo_config(zoo, space="dfs", max_evals=24, limit=20, kind="nsga2", popsize=8))
    runner.start(config, tmp_path / "dfs", device="cpu", progress=False, save_model=False)
    front = json.loads((tmp_path / "dfs" / "front.json").read_text())
    assert front["points"] and all(p["path"]["hops"] for p in front["points"])
    for point in front["points"]:
        if point["recipe"]:
            assert "merge_method: passthrough" in (tmp_path / "dfs" / point["recipe"]).read_text()
    records = {r["index"]: r for r in evaluations(tmp_path / "dfs")}
    assert all(records[p["index"]]["scores"] == p["values"] for p in front["points"])


def test_tokens_trades_accuracy_against_answer_length(zoo, tmp_path):
    config = zoo_config(zoo, max_evals=20, limit=20, kind="nsga2", popsize=10)
    config["optimizer"]["objectives"] = ["script_math", "tokens"]
    runner.start(parse_config(config), tmp_path / "tok", device="cpu", progress=False, save_model=False)
    front = json.loads((tmp_path / "tok" / "front.json").read_text())
    assert front["higher_is_better"] == [True, False] and front["reference"] == [0.0, 8.0]
    records = {r["index"]: r for r in evaluations(tmp_path / "tok")}
    for point in front["points"]:
        generated = records[point["index"]]["generated"]
        assert point["values"]["tokens"] == pytest.approx(np.mean(list(generated.values())))
        assert 1.0 <= point["values"]["tokens"] <= 8.0  # at least EOS or the stop token, at most max_new_tokens


def test_generated_tokens_count_the_answers(zoo):
    """TaskResult.generated = the tokens greedy decoding produced for every row (EOS included)."""
    import transformers

    from mergekit_evolve.fitness.factory import make_fitness
    from mergekit_evolve.fitness.generate import greedy_token_ids
    from mergekit_evolve.fitness.runtime import runner_for
    from mergekit_evolve.resources import load_tokenizer

    config = parse_config(zoo_config(zoo, limit=12))
    tokenizer = load_tokenizer(str(zoo.models[zoo.base]))
    fitness = make_fitness(config, tokenizer, str(zoo.models[zoo.base]), False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(zoo.models["script"]), dtype=torch.float32)
    result = fitness.evaluate(model)["script"]
    task = config.fitness.tasks[1]
    prompts = fitness._tasks[1].examples["fitness"].prompt_ids
    ids = greedy_token_ids(runner_for(model), prompts, tokenizer, task.max_new_tokens, task.stop, 4)
    assert result.generated == sum(len(g) for g in ids) and result.generated > len(prompts)


@pytest.mark.parametrize(
    "optimizer, message",
    [
        ({"objectives": ["script_math", "scrip"]}, "unknown objective 'scrip' (did you mean script?)"),
        ({"objectives": ["script_math"]}, "objectives: 1 given; give two or three"),
        ({"objectives": ["script", "script"]}, "'script' appears twice"),
        ({"objectives": ["script_math", "script"], "racing": True}, "racing ranks candidates by one number"),
        ({"objectives": ["script_math", "script"], "economy": "auto"}, "economy: auto ranks candidates by one number"),
        ({"objectives": None, "kind": "nsga2"}, "kind: nsga2 is multi-objective; add objectives"),
        ({"kind": "cmaes"}, "kind: cmaes optimizes one weighted fitness"),
        ({"kernels": 4, "kind": "nsga2"}, "kernels: only como-cmaes has kernels"),
        ({"reference": {"math": 0.1}}, "reference: 'math' is not one of the objectives"),
    ],
)
def test_bad_objectives_are_one_line_and_exit_2_before_anything_runs(zoo, tmp_path, optimizer, message):
    config = zoo_config(zoo)
    config["optimizer"].update(optimizer)
    if config["optimizer"]["objectives"] is None:
        del config["optimizer"]["objectives"]
    assert message in refused_line(config, tmp_path)


def test_objectives_that_cannot_be_served_are_refused(zoo):
    config = zoo_config(zoo)
    config["space"] = "ps+dfs"
    with pytest.raises(InputError, match="space ps\\+dfs builds its DFS stage on one PS model"):
        parse_config(config)
    config = zoo_config(zoo)
    config["fitness"]["tasks"] = [
        {**task, "kind": "choice"} for task in config["fitness"]["tasks"]
    ]  # no generate task: nothing to count tokens on
    config["optimizer"]["objectives"] = ["script_math", "tokens"]
    with pytest.raises(InputError, match="tokens counts the tokens a generate task's answers take"):
        parse_config(config)
