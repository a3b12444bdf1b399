"""Models and recipes as mergekit users bring them (issue 17): each test is one case that used to fail.

Models are built the way mergekit's own tests build them (random tiny checkpoints, often without
tokenizer files); every run is real (mergekit merges, transformers models, CMA-ES).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_evolve import runner
from mergekit_evolve.cli import main
from mergekit_evolve.config import parse_config
from mergekit_evolve.errors import InputError

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def write_rows(path: Path, n: int = 6) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(n)))
    return path


def callable_config(models: list[Path], rows: Path, function: str = "fitness_fns:loglik", **extra) -> dict:
    config = {
        "genome": {"models": [str(m) for m in models], "merge_method": "linear"},
        "fitness": {"tasks": [{"name": "ll", "kind": "callable", "function": function, "data": str(rows)}]},
        "optimizer": {"max_evals": 4, "seed": 1},
        "dtype": "float32",
    }
    config.update(extra)
    return config


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# -- 6. emitted YAML numbers -----------------------------------------------------------------------
def test_recipe_prints_init_033_as_033(family, tmp_path):
    config = callable_config([family["expert0"], family["expert1"]], write_rows(tmp_path / "r.jsonl"))
    config["genome"]["parameters"] = {"weight": {"bounds": [0.1, 0.9], "init": 0.33}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    printed = invoke("recipe", tmp_path / "cfg.yaml")
    assert printed.exit_code == 0, printed.output
    weights = [m["parameters"]["weight"] for m in yaml.safe_load(printed.stdout)["models"]]
    assert weights == [0.33, 0.33] and "weight: 0.33\n" in printed.stdout


# -- 5. the budget is a promise --------------------------------------------------------------------
def read_evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]


def test_max_evals_8_evaluates_8_also_after_resume(family, tmp_path, monkeypatch):
    """Population 6 (2 genes): generation 2 is cut to 2 candidates, uninterrupted and resumed alike."""
    rows = write_rows(tmp_path / "r.jsonl")
    models = [family["expert0"], family["expert1"]]
    done = invoke(
        "run",
        write_config(tmp_path / "a.yaml", callable_config(models, rows)),
        "--out",
        tmp_path / "a",
        "--max-evals",
        "8",
        "--no-save-model",
        "--quiet",
    )
    assert done.exit_code == 0, done.output
    whole = read_evals(tmp_path / "a")
    assert len(whole) == 8 and [e["generation"] for e in whole] == [1] * 6 + [2] * 2
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["evaluations"] == 8

    import fitness_fns

    fitness_fns.CALLS["n"] = 0
    monkeypatch.setenv("MKE_INTERRUPT_AT", "8")  # the last candidate of the cut generation
    config = parse_config(
        callable_config(models, rows, "fitness_fns:interrupting", optimizer={"max_evals": 8, "seed": 1})
    )
    with pytest.raises(KeyboardInterrupt):
        runner.start(config, tmp_path / "b", device="cpu", progress=False, save_model=False)
    assert len(read_evals(tmp_path / "b")) == 7
    monkeypatch.delenv("MKE_INTERRUPT_AT")
    resumed = runner.resume(tmp_path / "b", progress=False)
    assert resumed.evaluations == 8
    assert [e["genome"] for e in read_evals(tmp_path / "b")] == [e["genome"] for e in whole]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# -- 1. models without tokenizer files -------------------------------------------------------------
@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> list[Path]:
    """Two random Llama checkpoints without tokenizer files, as mergekit's own tests build them."""
    from mergekit_evolve.zoo.random_models import make_random_model

    root = tmp_path_factory.mktemp("bare")
    return [make_random_model(root / f"m{i}", seed=i, tokenizer=False, num_layers=2) for i in range(2)]


def id_rows(path: Path, key: str) -> Path:
    path.write_text("".join(json.dumps({key: [4 + i, 5 + i, 6 + i, 7 + i]}) + "\n" for i in range(5)))
    return path


def test_models_without_tokenizer_files_run_with_a_callable_fitness(bare, tmp_path):
    config = callable_config(bare, id_rows(tmp_path / "ids.jsonl", "ids"), "fitness_fns:ids_loglik")
    summary = runner.start(parse_config(config), tmp_path / "out", device="cpu", progress=False)
    assert summary.evaluations == 4 and summary.failures == 0 and summary.best.fitness < 0
    assert not (tmp_path / "out" / "model" / "tokenizer.json").exists()  # mergekit copies none: there is none


def test_perplexity_on_token_ids_needs_no_tokenizer(bare, tmp_path):
    config = callable_config(bare, tmp_path / "unused")
    config["fitness"] = {
        "tasks": [
            {
                "name": "ppl",
                "kind": "perplexity",
                "prompt_field": None,
                "data": str(id_rows(tmp_path / "ids.jsonl", "answer")),
            }
        ]
    }
    summary = runner.start(parse_config(config), tmp_path / "out", device="cpu", progress=False, save_model=False)
    assert summary.failures == 0 and 0 < summary.best.fitness < 1  # 1 / perplexity


# -- 2. one failure for every candidate; an honest empty-prompt message ----------------------------
def test_the_same_failure_for_the_whole_first_generation_is_an_input_error(family, tmp_path):
    config = callable_config(
        [family["expert0"], family["expert1"]],
        write_rows(tmp_path / "r.jsonl"),
        "fitness_fns:always_fails",
        optimizer={"max_evals": 20, "seed": 1},
    )
    done = invoke("run", write_config(tmp_path / "cfg.yaml", config), "--out", tmp_path / "out", "--quiet")
    assert done.exit_code == 2, done.output
    line = done.stderr.strip()
    assert (
        "\n" not in line
        and "every candidate of the first generation (6) failed the same way: RuntimeError: injected failure" in line
    )
    assert len(read_evals(tmp_path / "out")) == 6  # stopped after generation 1, not at max_failures (10)


def test_a_prompt_that_encodes_to_no_tokens_is_named_as_such(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from mergekit_evolve.fitness import Fitness

    knows_only_x = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"x": 0}, merges=[])))
    rows = tmp_path / "r.jsonl"
    rows.write_text(json.dumps({"prompt": "l*c=", "answer": "4"}) + "\n")
    with pytest.raises(InputError, match=r"the tokenizer produced no tokens for the prompt 'l\*c='"):
        Fitness({"tasks": [{"name": "t", "data": str(rows)}]}, knows_only_x)


# -- 4. template markers are checked against the method's parameters -------------------------------
def marked(family, method: str, marker_on: str, param: str = "weight") -> dict:
    base, a = str(family["base"]), str(family["expert0"])
    models = [{"model": base}, {"model": a}]
    target = models[0] if marker_on == "base" else models[1]
    target["parameters"] = {param: {"evolve": [0.0, 1.0]}}
    return {"merge_method": method, "base_model": base, "models": models, "dtype": "float32"}


@pytest.mark.parametrize(
    "method, marker_on, param, message",
    [
        (
            "arcee_fusion",
            "a",
            "weight",
            r"models\[1\].parameters.weight: arcee_fusion has no parameter 'weight'; it has no parameter to evolve",
        ),
        ("ties", "base", "weight", r"models\[0\].parameters.weight: ties ignores weight of the base model"),
        ("ties", "a", "int8_mask", r"models\[1\].parameters.int8_mask: ties.int8_mask is not a number"),
    ],
)
def test_template_markers_mergekit_would_ignore_are_refused(family, method, marker_on, param, message):
    from mergekit_evolve.space.template import TemplateSpace

    with pytest.raises(InputError, match=message):
        TemplateSpace(marked(family, method, marker_on, param))
    TemplateSpace(marked(family, "ties", "a"))  # a marker mergekit reads is fine


# -- 9. mergekit-evolve's command line ---------------------------------------------------------------
def test_mergekit_evolve_options_carry_over(family, tmp_path):
    cfg = write_config(
        tmp_path / "cfg.yaml", callable_config([family["expert0"], family["expert1"]], write_rows(tmp_path / "r.jsonl"))
    )
    (tmp_path / "tasks").mkdir()
    done = invoke(
        "run",
        cfg,
        "--storage-path",
        tmp_path / "store",
        "--max-fevals",
        "3",
        "--random-seed",
        "7",
        "--task-search-path",
        tmp_path / "tasks",
        "--sigma0",
        "0.25",
        "--force-population-size",
        "3",
        "--batch-size",
        "4",
        "--num-gpus",
        "1",
        "--no-save-final-model",
        "--in-memory",
        "--no-vllm",
        "--quiet",
    )
    assert done.exit_code == 0, done.output
    saved = yaml.safe_load((tmp_path / "store" / "config.yaml").read_text())
    assert saved["merge_seed"] == 7 and saved["task_search_path"] == [str(tmp_path / "tasks")]
    assert saved["optimizer"]["sigma0"] == 0.25 and saved["optimizer"]["popsize"] == 3
    assert saved["optimizer"]["max_evals"] == 3 and saved["fitness"]["batch_size"] == 4
    assert saved["executor"]["kind"] == "local" and not (tmp_path / "store" / "model").exists()
    assert saved["fitness"]["backend"] == "hf"  # --no-vllm
    assert len(read_evals(tmp_path / "store")) == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--strategy", "pool"],
            "--strategy: mergekit-evolve's option has no equivalent here: candidates run one after another here or "
            "on Ray workers; use --executor",
        ),
        (
            ["--no-merge-cuda"],
            "--no-merge-cuda: mergekit-evolve's option has no equivalent here: merging and evaluation share one "
            "device; use --device cpu",
        ),
        (
            ["--timeout", "60"],
            "--timeout: mergekit-evolve's option has no equivalent here: there is no wall-clock limit; bound the run "
            "with --max-evals",
        ),
        (["--load-in-4bit"], "--load-in-4bit: mergekit-evolve's option has no equivalent here: quantized evaluation"),
        (["--allow-crimes"], "--allow-crimes: "),
        (["--trust-remote-code"], "--trust-remote-code: "),
        (
            ["--max-evals", "3", "--max-fevals", "3"],
            "--max-fevals: is mergekit-evolve's name for --max-evals; give only one of them",
        ),
    ],
)
def test_mergekit_evolve_options_without_equivalent_are_refused_in_one_line(tmp_path, flags, message):
    (tmp_path / "cfg.yaml").write_text("genome: {}\n")
    done = invoke("run", tmp_path / "cfg.yaml", "--storage-path", tmp_path / "out", *flags)
    assert done.exit_code == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.output
    assert not (tmp_path / "out").exists()


# -- 8. push and report take what our own commands write -------------------------------------------
def test_push_and_report_take_the_demo_run_and_its_results(demo_out, tmp_path):
    """The demo's own run and results.json (one score per seed, run folders relative to it)."""
    run = demo_out / "ps-seed0"
    pushed = invoke("push", run, "--repo", "me/x", "--dry-run", tmp_path / "a")  # finds the demo's results.json
    assert pushed.exit_code == 0, pushed.output
    card = (tmp_path / "a" / "README.md").read_text()
    assert (
        "| **this model (evolved)** |" in card
        and "| Ours PS (mean of 2 seeds) |" in card
        and "| source: math |" in card
    )
    explicit = invoke(
        "push", run, "--repo", "me/x", "--results", demo_out / "results.json", "--dry-run", tmp_path / "b"
    )
    assert explicit.exit_code == 0, explicit.output
    assert (tmp_path / "b" / "README.md").read_text() == card
    reported = invoke("report", run, "--out", tmp_path / "report")
    assert reported.exit_code == 0 and (tmp_path / "report" / "fitness.png").is_file(), reported.output


def test_push_takes_the_paper_table_and_a_run_summary_as_results(demo_out, tmp_path):
    run = demo_out / "ps-seed0"
    paper = invoke(
        "push", run, "--repo", "me/x", "--results", TESTS.parent / "docs" / "results.json", "--dry-run", tmp_path / "a"
    )
    assert paper.exit_code == 0, paper.output
    assert "| Ours PS (mean of 3 seeds) |" in (tmp_path / "a" / "README.md").read_text()
    summary = invoke("push", run, "--repo", "me/x", "--results", run / "summary.json", "--dry-run", tmp_path / "b")
    assert summary.exit_code == 0, summary.output
    assert "| **ps-seed0 (evolved) (this model)** |" in (tmp_path / "b" / "README.md").read_text()


def test_push_and_report_after_resume_and_of_the_demo_folder(demo_out, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_out / "ps-seed1", run)  # resume rewrites the run: leave the shared demo alone
    resumed = invoke("resume", run, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert invoke("push", run, "--repo", "me/x", "--dry-run", tmp_path / "a").exit_code == 0
    assert invoke("report", run, "--out", tmp_path / "r").exit_code == 0
    whole = invoke("report", demo_out)  # the demo's folder holds runs: say which
    assert (
        whole.exit_code == 2
        and f"(this folder holds 2: {demo_out / 'ps-seed0'}, {demo_out / 'ps-seed1'})" in whole.stderr
    )


def test_ctrl_c_names_the_run_to_resume_however_the_folder_was_given(capsys):
    """run --out DIR and mergekit-evolve's run --storage-path DIR both leave DIR resumable; report does not."""
    from mergekit_evolve.cli import EXIT_INTERRUPTED, friendly_errors

    def interrupted(**options):
        raise KeyboardInterrupt

    run = friendly_errors(interrupted, resumable_from=("out", "storage_path"))
    for options in ({"out": "runs/a", "storage_path": None}, {"out": None, "storage_path": "runs/a"}):
        with pytest.raises(SystemExit) as stopped:
            run(**options)
        assert stopped.value.code == EXIT_INTERRUPTED
        assert capsys.readouterr().err == "\ninterrupted; continue with: mergekit-evo resume runs/a\n"
    with pytest.raises(SystemExit):
        friendly_errors(interrupted)(run_dir="runs/a")
    assert capsys.readouterr().err == "\ninterrupted\n"
