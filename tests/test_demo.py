"""`mergekit-evo demo` on the zoo: every row of the miniature Table 1, seeds aggregated, files written."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

ROWS = [
    "source: base",
    "source: script",
    "source: math",
    "uniform merge (linear)",
    "TIES untuned",
    "DARE-TIES untuned",
    "frankenmerge (no search)",
    "Ours PS",
]


def test_demo_writes_the_table_with_every_row_and_seed(zoo, demo_out):
    out = demo_out  # `demo --space ps --max-evals 6 --seeds 2` (tests/conftest.py)
    report = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in report["rows"]] == ROWS
    ours = report["rows"][-1]
    assert ours["run_dirs"] == ["ps-seed0", "ps-seed1"] and len(ours["heldout"]["script_math"]) == 2
    for row in report["rows"]:
        assert set(row["heldout"]) == {"script_math", "script", "math"}
        assert all(0.0 <= v <= 1.0 for values in row["heldout"].values() for v in values)
    # The script expert reads the script; the math expert does the arithmetic; neither does both.
    by_name = {r["name"]: r for r in report["rows"]}
    assert by_name["source: script"]["heldout"]["script"][0] > 0.9 > by_name["source: math"]["heldout"]["script"][0]
    assert by_name["source: math"]["heldout"]["math"][0] > 0.3 > by_name["source: script"]["heldout"]["math"][0]
    table = (out / "RESULTS.md").read_text()
    assert all(f"| {name} |" in table for name in ROWS)
    # Intervals come from the per-item results: 155 held-out items of the target, one string per seed.
    assert [len(items) for items in ours["items"]["heldout"]["script_math"]] == [155, 155]
    assert "held-out 95% interval" in table and "| Ours PS - source: math |" in table
    # The frankenmerge stacks 3 + 3 layers of the two 4-layer experts.
    franken = load_file(out / "frankenmerge" / "model.safetensors")
    assert sum(k.endswith("self_attn.q_proj.weight") for k in franken) == 6
    script = load_file(zoo.models["script"] / "model.safetensors")
    assert torch.equal(
        franken["model.layers.0.self_attn.q_proj.weight"], script["model.layers.0.self_attn.q_proj.weight"]
    )


def test_fixed_rows_equal_the_published_table(demo_out):
    """On the shipped zoo the sources and baselines are what docs/results.json publishes, item by item
    (greedy decoding on the same weights): a new user's demo prints the README's fixed rows."""
    from pathlib import Path

    published = json.loads((Path(__file__).parent.parent / "docs" / "results.json").read_text())
    ours = json.loads((demo_out / "results.json").read_text())
    fixed = [r["name"] for r in ours["rows"] if not r["name"].startswith("Ours")]
    by_name = {r["name"]: r for r in published["rows"]}
    for row in ours["rows"]:
        if row["name"] in fixed:
            for key in ("fitness", "heldout", "items"):
                assert row[key] == by_name[row["name"]][key], (row["name"], key)


def test_bootstrap_intervals_cover_the_mean_and_pair_the_items():
    from mergekit_evolve.demo import bootstrap_interval, difference, resolved

    items = [1.0] * 30 + [0.0] * 120  # accuracy 0.2 on 150 items: standard error ~0.033
    low, high = bootstrap_interval(items)
    assert 0.13 < low < 0.2 < high < 0.27
    a = {"items": {"heldout": {"t": ["1" * 30 + "0" * 120]}}}
    same = difference(a, a, "t")
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0} and not resolved(same)
    better = {"items": {"heldout": {"t": ["1" * 45 + "0" * 105]}}}  # 15 more items right, none lost
    diff = difference(better, a, "t")
    assert diff["difference"] == 0.1 and resolved(diff) and diff["low"] > 0.04
