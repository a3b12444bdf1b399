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

from mergekit_evolve.cli import main
from mergekit_evolve.config import parse_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.search import runner

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
