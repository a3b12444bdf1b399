"""lm-eval tasks on the resident model equal what lm_eval itself reports for the saved model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml

pytest.importorskip("lm_eval")

from mergekit_evolve.config import parse_config  # noqa: E402
from mergekit_evolve.errors import InputError  # noqa: E402
from mergekit_evolve.fitness.lm_eval_tasks import LmEvalFitness  # noqa: E402
from mergekit_evolve.search import runner  # noqa: E402


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A local multiple-choice lm-eval task over a local JSONL file (no downloads)."""
    root = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "label": 0}
            for a in range(1, 6) for b in range(1, 5)]
    (root / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tiny_sums.yaml").write_text(yaml.safe_dump({
        "task": "tiny_sums",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(root / "sums.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))
    return root


def lm_eval_config(family, task_dir, **extra) -> dict:
    return {
        "genome": {"models": [str(family["expert0"]), str(family["expert1"])], "merge_method": "linear"},
        "tasks": [{"name": "tiny_sums", "metric": "acc,none"}],
        "task_search_path": [str(task_dir)],
        "optimizer": {"max_evals": 4},
        "dtype": "float32",
        **extra,
    }


def test_score_on_the_resident_model_equals_the_lm_eval_cli(family, task_dir, tmp_path):
    config = parse_config(lm_eval_config(family, task_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(family["expert0"])
    model = transformers.AutoModelForCausalLM.from_pretrained(family["expert0"], dtype="float32").eval()
    ours = LmEvalFitness(config, tokenizer).score(model)["tiny_sums"]
    out = tmp_path / "lm_eval_out"
    subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={family['expert0']},dtype=float32",
         "--tasks", "tiny_sums", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "4",
         "--output_path", str(out)],
        check=True, capture_output=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    reported = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["tiny_sums"]["acc,none"]
    assert ours == pytest.approx(reported, abs=1e-12)


def test_a_search_with_lm_eval_tasks_runs_in_memory(family, task_dir, tmp_path):
    summary = runner.start(parse_config(lm_eval_config(family, task_dir)), tmp_path / "out", device="cpu",
                           progress=False, save_model=False)
    assert summary["evaluations"] >= 4 and 0.0 <= summary["best"]["fitness"] <= 1.0
    assert summary["selected_on"] == [{"lm_eval_task": "tiny_sums", "metric": "acc,none", "limit": None}]


def test_unknown_lm_eval_task_is_a_clear_error(family, task_dir):
    config = parse_config({**lm_eval_config(family, task_dir), "tasks": [{"name": "no_such_task"}]})
    with pytest.raises(InputError, match="unknown lm-eval task 'no_such_task'"):
        LmEvalFitness(config, None)


def test_benchmark_named_selection_tasks_are_refused_unless_allowed(family, task_dir, tmp_path):
    config = parse_config({**lm_eval_config(family, task_dir), "tasks": [{"name": "gsm8k"}]})
    with pytest.raises(InputError, match="looks like the gsm8k benchmark"):
        runner.validate(config)
    allowed = parse_config({**lm_eval_config(family, task_dir), "tasks": [{"name": "tiny_sums"}], "allow_benchmark_tasks": True,
                            "fitness": {"tasks": [{"name": "mmlu_copy", "data": str(task_dir / "sums.jsonl"), "answer_field": "question"}]}})
    from mergekit_evolve.fitness.guard import check_selection_tasks

    check_selection_tasks(allowed)  # the explicit flag lets it through
