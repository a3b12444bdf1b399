"""End-to-end PS runs on random tiny models: run directory, best recipe, resume, failures, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from safetensors.torch import load_file

from mergekit_evolve import runner
from mergekit_evolve.config import load_config, parse_config

TESTS = Path(__file__).parent


def write_rows(path: Path, n: int = 12) -> Path:
    rows = [{"prompt": f"{i}+{i % 5}=", "answer": str(i + i % 5)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_dict(family, data: Path, function: str = "fitness_fns:loglik", **optimizer) -> dict:
    return {
        "genome": {
            "models": [str(family["expert0"]), str(family["expert1"])],
            "merge_method": "linear",
            "layer_granularity": 2,
        },
        "fitness": {
            "tasks": [{"name": "ll", "kind": "callable", "function": function, "data": str(data), "heldout": str(data)}]
        },
        "optimizer": {"max_evals": 16, "seed": 3, **optimizer},
        "dtype": "float32",
    }


@pytest.fixture(autouse=True)
def tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture(scope="module")
def finished_run(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    config = parse_config(config_dict(family, write_rows(root / "rows.jsonl")))
    summary = runner.start(config, root / "out", device="cpu", progress=False)
    return root / "out", summary


def read_evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]


def test_run_directory_holds_every_artifact(finished_run):
    out, summary = finished_run
    evals = read_evals(out)
    assert len(evals) == summary.evaluations >= 16
    assert {"genome", "key", "fitness", "scores", "seconds", "generation"} <= set(evals[0])
    best_fitness = max(e["fitness"] for e in evals if e["fitness"] is not None)
    assert summary.best.fitness == best_fitness
    # config.yaml is accepted by `run` as is
    assert load_config(out / "config.yaml").optimizer.max_evals == 16
    # best.yaml is a plain mergekit recipe
    MergeConfiguration.model_validate(yaml.safe_load((out / "best.yaml").read_text()))
    assert (out / "optimizer.pkl").is_file() and (out / "model" / "config.json").is_file()
    assert summary.best.heldout["ll"] == pytest.approx(summary.best.scores["ll"])


def test_fitness_improves_over_the_initial_genome(finished_run):
    out, summary = finished_run
    evals = read_evals(out)
    first_generation = [e["fitness"] for e in evals if e["generation"] == 1]
    assert summary.best.fitness > sum(first_generation) / len(first_generation)


def test_mergekit_yaml_on_best_yaml_reproduces_the_saved_model(finished_run, tmp_path):
    out, _ = finished_run
    subprocess.run(["mergekit-yaml", str(out / "best.yaml"), str(tmp_path / "m")], check=True, capture_output=True)
    ours = load_file(out / "model" / "model.safetensors")
    theirs = load_file(tmp_path / "m" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_interrupted_run_resumes_to_the_same_result(family, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "rows.jsonl")
    reference = runner.start(
        parse_config(config_dict(family, data, max_evals=20)),
        tmp_path / "ref",
        device="cpu",
        progress=False,
        save_model=False,
    )
    import fitness_fns

    fitness_fns.CALLS["n"] = 0
    monkeypatch.setenv("MKE_INTERRUPT_AT", "9")  # mid-generation (population 6 for 3 genes + pad)
    config = parse_config(config_dict(family, data, function="fitness_fns:interrupting", max_evals=20))
    with pytest.raises(KeyboardInterrupt):
        runner.start(config, tmp_path / "cut", device="cpu", progress=False, save_model=False)
    done_before = len(read_evals(tmp_path / "cut"))
    assert 0 < done_before < 20
    monkeypatch.delenv("MKE_INTERRUPT_AT")
    resumed = runner.resume(tmp_path / "cut", progress=False)
    ref_evals, cut_evals = read_evals(tmp_path / "ref"), read_evals(tmp_path / "cut")
    assert [e["genome"] for e in cut_evals] == [e["genome"] for e in ref_evals]  # nothing lost, nothing twice
    assert [e["fitness"] for e in cut_evals] == [e["fitness"] for e in ref_evals]
    assert resumed.best.fitness == reference.best.fitness
    assert (tmp_path / "cut" / "best.yaml").read_text() == (tmp_path / "ref" / "best.yaml").read_text()


def test_failing_candidates_are_recorded_and_the_run_goes_on(family, tmp_path):
    config = parse_config(
        config_dict(
            family, write_rows(tmp_path / "r.jsonl"), function="fitness_fns:flaky", max_evals=12, max_failures=12
        )
    )
    summary = runner.start(config, tmp_path / "out", device="cpu", progress=False, save_model=False)
    evals = read_evals(tmp_path / "out")
    failed = [e for e in evals if e["error"]]
    assert failed and all(e["fitness"] is None and "injected" in e["error"] for e in failed)
    assert summary.failures == len(failed) and summary.best.fitness is not None


def test_too_many_failures_end_the_run_with_a_clear_message(family, tmp_path):
    from mergekit_evolve.errors import RunFailedError

    config = parse_config(
        config_dict(family, write_rows(tmp_path / "r.jsonl"), function="fitness_fns:flaky", max_failures=0)
    )
    with pytest.raises(RunFailedError, match=r"candidates failed \(max_failures=0\).*injected evaluation failure"):
        runner.start(config, tmp_path / "out", device="cpu", progress=False, save_model=False)


def test_too_many_failures_reach_cli_users_as_one_line_and_exit_code_1(family, tmp_path):
    from click.testing import CliRunner

    from mergekit_evolve.cli import main

    cfg = tmp_path / "evo.yaml"
    data = config_dict(family, write_rows(tmp_path / "r.jsonl"), function="fitness_fns:flaky", max_failures=0)
    cfg.write_text(yaml.safe_dump(data))
    done = CliRunner().invoke(main, ["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet", "--no-save-model"])
    assert done.exit_code == 1, done.output
    assert done.output.startswith("error: ") and done.output.count("\n") == 1 and "Traceback" not in done.output
    assert "max_failures=0" in done.output and (tmp_path / "out" / "evaluations.jsonl").is_file()


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ["PYTHONPATH"]]),
        "PATH": __import__("os").environ["PATH"],
        "HF_HUB_OFFLINE": "1",
        "HOME": str(cwd or TESTS),
    }
    return subprocess.run(
        [sys.executable, "-m", "mergekit_evolve.cli", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_cli_run_then_recipe_for_the_best_genome(family, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mergekit_evolve.cli import main

    cfg = tmp_path / "evo.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(family, write_rows(tmp_path / "rows.jsonl"))))
    # The run in its own process, as a user starts it; the follow-up commands in this one (same code,
    # without paying the ~8 s import of torch/transformers/mergekit again).
    done = cli(
        "run", str(cfg), "--out", str(tmp_path / "out"), "--max-evals", "6", "--no-save-model", "--quiet", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "best fitness" in done.stdout and not (tmp_path / "out" / "model").exists()
    monkeypatch.chdir(tmp_path)
    printed = CliRunner().invoke(main, ["recipe", str(cfg), "--genome", str(tmp_path / "out" / "best.json")])
    assert printed.exit_code == 0, printed.output
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert yaml.safe_load(printed.stdout) == best
    again = CliRunner().invoke(main, ["run", str(cfg), "--out", str(tmp_path / "out")])
    assert again.exit_code == 2 and "not empty" in again.stderr and "resume" in again.stderr


def test_mergekit_evolve_config_format_is_accepted_unchanged(family, tmp_path):
    """A config written for mergekit's own mergekit-evolve validates as is."""
    original = {
        "genome": {
            "models": [str(family["expert0"]), str(family["expert1"])],
            "merge_method": "dare_ties",
            "base_model": str(family["base"]),
            "tokenizer_source": None,
            "layer_granularity": 2,
            "normalize": False,
            "allow_negative_weights": False,
            "smooth": False,
            "filters": ["self_attn", "mlp"],
        },
        "tasks": [{"name": "my_task", "weight": 1.0, "metric": "acc,none"}],
        "limit": 50,
        "num_fewshot": 0,
        "shuffle": False,
        "random_init": True,
    }
    config = parse_config(original)
    assert config.tasks[0].name == "my_task" and config.optimizer.init == "random"
    from mergekit_evolve.search.problems import PSProblem

    problem = PSProblem(config)
    # mergekit-evolve's genotype: (groups=2) x (models=2) x (filters+1=3) x (weight, density)
    assert problem.dim == 2 * 2 * 3 * 2


def test_a_run_whose_state_keeps_the_best_as_a_dict_resumes(family, tmp_path):
    """Runs started before the typed records pickled the best as a dict; resuming them still works."""
    from mergekit_evolve.search.rundir import RunDir

    config = parse_config(config_dict(family, write_rows(tmp_path / "r.jsonl"), max_evals=8))
    done = runner.start(config, tmp_path / "out", device="cpu", progress=False, save_model=False)
    run = RunDir(tmp_path / "out")
    state = run.load_state()
    state.best = state.best.model_dump()
    run.save_state(state)
    resumed = runner.resume(tmp_path / "out", progress=False)
    assert resumed.best == done.best and resumed.evaluations == 8
