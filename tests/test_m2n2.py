"""M2N2 (optimizer.kind: m2n2): fitness sharing, attraction, split-point mixing and replacement as the paper
defines them, then real runs on the zoo: recipes mergekit-yaml builds, an archive that replays from the run
files, exact resume, the report, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from interrupting import StopAfter
from searching import refused_line, search_in

from mergekit_evolve import runner
from mergekit_evolve.cli import main
from mergekit_evolve.config import parse_config
from mergekit_evolve.demo import demo_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.search.executors import LocalExecutor
from mergekit_evolve.search.m2n2 import M2N2, ItemResults, Member
from mergekit_evolve.search.problems import make_problem
from mergekit_evolve.search.rundir import RunDir


def strategy(archive_scores: list[list[float]], **settings) -> M2N2:
    n_items = len(archive_scores[0])
    m = M2N2(
        seeds=[np.array([1.0, 0.0]), np.array([0.0, 1.0])],
        positions=np.array([0, 1]),
        item_weights=np.ones(n_items),
        archive_size=len(archive_scores),
        **settings,
    )
    m.archive = [Member(i, np.array([0.5, 0.5]), np.array(s, dtype=float)) for i, s in enumerate(archive_scores)]
    m.evaluated = len(archive_scores)
    return m


def test_shared_fitness_divides_each_item_among_the_members_that_answer_it():
    m = strategy([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]])
    # item 0 is shared by two members (1/2 each), items 1, 2, 3 by one (1 each)
    np.testing.assert_allclose(m.shared_fitness(), [1.5, 0.5, 2.0], rtol=1e-6)
    # a plain GA (alpha 0) counts items
    np.testing.assert_allclose(
        strategy([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]], alpha=0).shared_fitness(), [2, 1, 2]
    )
    # with a candidate: item 2 is now shared too
    np.testing.assert_allclose(m.shared_fitness(np.array([0, 0, 1, 0.0])), [1.5, 0.5, 1.5, 0.5], rtol=1e-6)


def test_attraction_favours_the_member_strong_where_the_first_parent_is_weak():
    m = strategy([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1]])
    # z = [2, 2, 2, 1]: for parent 0, member 1 adds item 2 (1/2), member 2 adds items 2 and 3 (1/2 + 1)
    np.testing.assert_allclose(m.attraction_to(0), [0, 0.5, 1.5], rtol=1e-6)


def test_a_child_mixes_its_parents_at_the_split_and_replaces_the_worst_unless_it_is_the_worst():
    m = strategy([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    child = m.mix(np.array([1.0, 1.0]), np.array([0.0, 0.0]), split=1, w=0.25)
    np.testing.assert_allclose(child, [0.25, 0.75])  # position 0: w A + (1 - w) B; position 1: (1 - w) A + w B
    m._asked = [None]
    m.tell([np.array([0.3, 0.7])], [np.array([0.0, 0.0, 0.0])])  # answers nothing: it is the worst, dropped
    assert [x.index for x in m.archive] == [0, 1, 2]
    m._asked = [None]
    m.tell([np.array([0.3, 0.7])], [np.array([0.0, 0.0, 1.0])])  # the only one answering item 2: it stays
    # with it: f = [1/2, 1/2, 1, 1]: member 0 (the first of the lowest) goes
    assert [x.index for x in m.archive] == [4, 1, 2]
    assert m.lineage == {3: None, 4: None}


def m2n2_config(zoo, max_evals=40, limit=40, **optimizer) -> dict:
    config = demo_config(zoo, "ps", max_evals, seed=0)
    config["genome"] = {
        "models": [str(zoo.models["script"]), str(zoo.models["math"])],
        "merge_method": "linear",
        "layer_granularity": 1,
        "tune_embeddings": True,
    }
    config["fitness"]["tasks"][0]["limit"] = limit
    config["optimizer"].update({"kind": "m2n2", "popsize": 2, "m2n2": {"archive_size": 6}, **optimizer})
    return config


def evaluations(out: Path) -> list[dict]:
    lines = (out / "evaluations.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: r["index"])


@pytest.fixture(scope="module")
def m2n2_run(zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("m2n2") / "run"
    runner.start(parse_config(m2n2_config(zoo)), out, device="cpu", progress=False, save_model=False)
    return out


def test_the_archive_replays_from_the_run_files(m2n2_run):
    """An independent replay of the paper's rules over evaluations.jsonl gives the archive the run kept, and
    every child is its parents mixed as its lineage says."""
    records = evaluations(m2n2_run)
    assert len(records) == 40 and records[0]["items"] and all(r["error"] is None for r in records)
    scores = {r["index"]: np.array([c == "1" for c in r["items"]["script_math"]], dtype=float) for r in records}
    archive: list[int] = []
    for r in records:
        i = r["index"]
        if len(archive) < 6:
            archive.append(i)
            continue
        matrix = np.stack([scores[j] for j in archive] + [scores[i]])
        shared = (matrix / (matrix.sum(axis=0) + 1e-8)).sum(axis=1)
        worst = int(np.argmin(shared))
        if worst < len(archive):
            archive[worst] = i
    kept = json.loads((m2n2_run / "archive.json").read_text())
    assert sorted(m["index"] for m in kept["members"]) == sorted(archive)
    genomes = {r["index"]: np.array(r["genome"]) for r in records}
    state = RunDir(m2n2_run).load_state().es
    positions = state.positions
    for index, made in state.lineage.items():
        if made is None:
            assert index in (0, 1)  # the sources, asked first
            continue
        before = positions < made.split
        a, b = genomes[made.a], genomes[made.b]
        expected = np.where(before, made.w * a + (1 - made.w) * b, (1 - made.w) * a + made.w * b)
        np.testing.assert_allclose(genomes[index], expected, rtol=0, atol=1e-12)


def test_archive_members_are_linear_recipes_that_mergekit_yaml_builds(m2n2_run, zoo, tmp_path):
    kept = json.loads((m2n2_run / "archive.json").read_text())
    member = max(kept["members"], key=lambda m: (m["fitness"], -m["index"]))
    recipe = yaml.safe_load((m2n2_run / member["recipe"]).read_text())
    assert recipe["merge_method"] == "linear"
    for piece in recipe["slices"]:  # every layer (and the embeddings): the sources' weights add up to 1
        weights = [s["parameters"]["weight"] for s in piece["sources"]]
        values = [[v["value"] for v in w] if isinstance(w, list) else [w] for w in weights]
        for pair in zip(*values):
            assert sum(pair) == pytest.approx(1, abs=1e-9) and all(0 <= v <= 1 for v in pair)
    subprocess.run(
        ["mergekit-yaml", str(m2n2_run / member["recipe"]), str(tmp_path / "m"), "--random-seed", "0"],
        check=True,
        capture_output=True,
    )
    import transformers

    from mergekit_evolve.fitness.factory import make_fitness

    config = parse_config(m2n2_config(zoo))
    problem = make_problem(config, "cpu")
    fitness = make_fitness(config, problem.tokenizer, problem.tokenizer_ref, False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert fitness.score(model) == member["scores"]  # what mergekit builds scores what the search saw
    assert kept["lineage"][0]["index"] == json.loads((m2n2_run / "summary.json").read_text())["best"]["index"]
    assert {d["source"] for d in kept["lineage"] if d["source"]} <= {str(zoo.models["script"]), str(zoo.models["math"])}


def test_report_shows_the_archive_its_coverage_and_the_lineage(m2n2_run, tmp_path):
    result = CliRunner().invoke(main, ["report", str(m2n2_run), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "### M2N2 archive" in text and "Lineage of the run's best" in text and "archive.png" in text
    kept = json.loads((m2n2_run / "archive.json").read_text())
    assert f"script_math: {kept['covered']['script_math']} of 40" in text
    assert (tmp_path / "r" / "archive.png").stat().st_size > 10_000


def test_an_interrupted_m2n2_run_resumes_to_the_same_archive(zoo, tmp_path):
    config = parse_config(m2n2_config(zoo, max_evals=16, limit=20))
    problem = make_problem(config, "cpu")
    fitness = runner.make_fitness(config, problem.tokenizer)
    score = runner.make_score(fitness, items=True)
    items = ItemResults.of(fitness)

    def search(out: Path, executor):
        return search_in(out, problem, executor, config.optimizer, items=items)

    reference = search(tmp_path / "ref", LocalExecutor(problem, score))
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "cut", StopAfter(problem, score, 7))  # inside the fourth generation (2 + 2 + 2 + 1)
    resumed = search(tmp_path / "cut", LocalExecutor(problem, score))
    ours, theirs = evaluations(tmp_path / "cut"), evaluations(tmp_path / "ref")
    assert [r["genome"] for r in ours] == [r["genome"] for r in theirs]  # nothing lost, nothing twice
    assert [m.index for m in resumed.es.archive] == [m.index for m in reference.es.archive]
    assert resumed.es.lineage == reference.es.lineage


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["genome"].update(merge_method="ties", base_model=c["genome"]["models"][0]),
            "set genome.merge_method: linear (got ties)",
        ),
        (lambda c: c["optimizer"].update(racing=True), "kind: m2n2 keeps an archive scored on every fitness row"),
        (lambda c: c["genome"].update(parameters={"weight": {"bounds": [0, 2]}}), "weight in [0, 1]"),
        (
            lambda c: c["fitness"]["tasks"][0].update(kind="perplexity"),
            "needs built-in accuracy tasks (fitness.tasks of kind generate or choice)",
        ),
    ],
)
def test_what_m2n2_cannot_serve_is_one_line_and_exit_2(zoo, tmp_path, edit, message):
    config = m2n2_config(zoo)
    edit(config)
    assert message in refused_line(config, tmp_path)


def test_one_child_per_step_is_m2n2s_alone(zoo):
    """popsize 1 is the paper's M2N2 (one child, then the archive is updated); any other strategy needs two."""
    assert parse_config(m2n2_config(zoo, popsize=1)).optimizer.popsize == 1
    config = demo_config(zoo, "ps", 10, seed=0)
    config["optimizer"]["popsize"] = 1
    with pytest.raises(InputError, match="popsize: cmaes needs at least 2 candidates per generation"):
        parse_config(config)
