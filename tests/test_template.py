"""Template recipes: a mergekit YAML with {evolve: [lo, hi]} markers is a search space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mergekit.config import MergeConfiguration

from mergekit_evolve import runner
from mergekit_evolve.config import load_config, parse_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.space.template import TemplateSpace

TESTS = Path(__file__).parent


def template(family) -> dict:
    return {
        "merge_method": "dare_ties",
        "base_model": str(family["base"]),
        "models": [
            {
                "model": str(family["expert0"]),
                "parameters": {"weight": {"evolve": [0.0, 1.0]}, "density": {"evolve": [0.1, 1.0], "init": 0.5}},
            },
            {
                "model": str(family["expert1"]),
                "parameters": {
                    "weight": [{"evolve": [0, 1]}, 0.3, {"evolve": [0, 1]}],
                    "density": [{"filter": "self_attn", "value": {"evolve": [0.2, 0.9]}}, {"value": 0.7}],
                },
            },
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }


def test_markers_become_genes_in_document_order(family):
    space = TemplateSpace(template(family))
    assert [m.where for m in space.markers] == [
        "models[0].parameters.weight",
        "models[0].parameters.density",
        "models[1].parameters.weight[0]",
        "models[1].parameters.weight[2]",
        "models[1].parameters.density[0].value",
    ]
    x0_values = space.values(space.x0())
    assert x0_values == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.55])  # init, else the middle of the range
    filled = space.fill(np.array([0.25, 1.0, 0.0, 1.2, 0.5]))
    MergeConfiguration.model_validate(filled)
    assert filled["models"][0]["parameters"] == {"weight": 0.25, "density": 1.0}
    assert filled["models"][1]["parameters"]["weight"] == [0.0, 0.3, pytest.approx(0.8)]  # 1.2 folds back to 0.8
    assert filled["models"][1]["parameters"]["density"][0] == {"filter": "self_attn", "value": pytest.approx(0.55)}
    assert filled["models"][1]["parameters"]["density"][1] == {"value": 0.7}


@pytest.mark.parametrize(
    "marker, message",
    [
        ({"evolve": 1.0}, r"models\[0\]\.parameters\.weight: evolve must be a list \[lo, hi\]"),
        ({"evolve": [1.0, 0.0]}, r"models\[0\]\.parameters\.weight: evolve \[1.0, 0.0\] needs lo < hi"),
        ({"evolve": [0.0, 1.0], "init": 2}, r"models\[0\]\.parameters\.weight: init 2 must be a number within"),
        ({"evolve": [0.0, 1.0], "step": 0.1}, r"models\[0\]\.parameters\.weight: unknown marker key\(s\) \['step'\]"),
        ({"evolve": ["a", 1.0]}, r"evolve must be a list \[lo, hi\] of two numbers"),
    ],
)
def test_malformed_markers_are_named_exactly(family, marker, message):
    data = template(family)
    data["models"][0]["parameters"]["weight"] = marker
    with pytest.raises(InputError, match=message):
        TemplateSpace(data)


def test_markers_outside_parameters_are_refused(family):
    data = template(family)
    data["dtype"] = {"evolve": [0, 1]}
    with pytest.raises(InputError, match=r"^dtype: markers can only stand in a 'parameters:' section"):
        TemplateSpace(data)


def test_template_without_markers_is_refused(family):
    data = template(family)
    data["models"] = [{"model": m["model"], "parameters": {"weight": 0.5, "density": 0.5}} for m in data["models"]]
    with pytest.raises(InputError, match="no numbers are marked to evolve"):
        TemplateSpace(data)


def test_run_on_a_template_fills_in_the_same_yaml(family, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
    file = tmp_path / "template.yaml"
    file.write_text(
        yaml.safe_dump(
            {
                **template(family),
                "fitness": {
                    "tasks": [{"name": "ll", "kind": "callable", "function": "fitness_fns:loglik", "data": str(rows)}]
                },
                "optimizer": {"max_evals": 8, "seed": 1},
            }
        )
    )
    config = load_config(file)
    assert config.template is not None and config.genome is None
    summary = runner.start(config, tmp_path / "out", device="cpu", progress=False, save_model=False)
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    space = TemplateSpace(config.template)  # markers in the file's document order
    assert best == space.fill(np.asarray(summary.best.genome))
    # the same YAML: markers replaced by numbers within their ranges, nothing else changed
    assert best["models"][1]["parameters"]["weight"][1] == 0.3 and best["parameters"] == {"normalize": True}
    assert 0.1 <= best["models"][0]["parameters"]["density"] <= 1.0
    # config.yaml of the run is accepted as is
    assert parse_config(yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())).template is not None
