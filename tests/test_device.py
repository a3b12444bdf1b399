"""The device and dtype rule: bfloat16 by default on CUDA, the sources' dtype on CPU, an explicit dtype wins.

No GPU needed: building a problem reads model configs only, never weights or the device.
"""

from __future__ import annotations

import json

import pytest
import torch

from mergekit_evolve.config import parse_config
from mergekit_evolve.resources import default_dtype, resolve_device
from mergekit_evolve.search.dfs_problem import DFSProblem
from mergekit_evolve.search.problems import PSProblem, TemplateProblem


@pytest.mark.parametrize(
    "config_dtype, source_dtype, device, expected",
    [
        (None, "float32", "cuda", "bfloat16"),
        (None, "float16", "cuda:1", "bfloat16"),
        (None, None, "cuda", "bfloat16"),
        (None, "float32", "cpu", "float32"),
        (None, "float16", "cpu", "float16"),
        (None, "bfloat16", "cpu", "bfloat16"),
        (None, None, "cpu", "float32"),
        ("float32", "bfloat16", "cuda", "float32"),
        ("float16", "float32", "cuda:0", "float16"),
        ("bfloat16", "float32", "cpu", "bfloat16"),
    ],
)
def test_default_dtype_rule(config_dtype, source_dtype, device, expected):
    assert default_dtype(config_dtype, source_dtype, device) == expected


def _config(family, tmp_path, dtype=None, **extra) -> dict:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    config = {
        "genome": {"models": [str(family["expert0"]), str(family["expert1"])], "merge_method": "linear"},
        "fitness": {"tasks": [{"name": "ll", "kind": "callable", "function": "fitness_fns:loglik", "data": str(rows)}]},
        **extra,
    }
    if dtype:
        config["dtype"] = dtype
    return config


@pytest.mark.parametrize(
    "device, dtype, expected", [("cuda", None, "bfloat16"), ("cpu", None, "float32"), ("cuda", "float32", "float32")]
)
def test_every_problem_uses_the_rule(family, tmp_path, device, dtype, expected):
    ps = PSProblem(parse_config(_config(family, tmp_path, dtype)), device)
    assert ps.dtype == expected
    assert ps.decode(ps.x0()).recipe["dtype"] == expected  # what the candidates merge in (and best.yaml says)
    dfs = DFSProblem(parse_config(_config(family, tmp_path, dtype, space="dfs")), device)
    assert dfs.dtype == expected
    template = {
        "merge_method": "linear",
        "models": [
            {"model": str(family[k]), "parameters": {"weight": {"evolve": [0, 1]}}} for k in ("expert0", "expert1")
        ],
        **({"dtype": dtype} if dtype else {}),
    }
    config = _config(family, tmp_path)
    config.pop("genome")
    problem = TemplateProblem(parse_config({**config, "template": template}), device)
    assert problem.dtype == expected
    # The filled recipe says the dtype it is evaluated in (the sources here are float32).
    assert problem.decode(problem.x0()).recipe.get("dtype", "float32") == expected


def test_auto_picks_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
