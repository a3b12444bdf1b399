"""``mergekit-evo report``: plots and report.md of finished runs (real searches on random tiny models)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_evolve import runner
from mergekit_evolve.cli import main
from mergekit_evolve.config import GenomeConfig, parse_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.export.report import plot_dfs_path, plot_fitness, ps_parameter_table, write_report
from mergekit_evolve.search.records import Evaluation

TESTS = Path(__file__).parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (and proof that it is a PNG)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def write_rows(path: Path, n: int = 10) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{i}*2=", "answer": str(2 * i)}) + "\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def ps_run(family, tmp_path_factory):
    """dare_ties with a filter, 2 layer groups; the flaky fitness makes some candidates fail."""
    sys.path.insert(0, str(TESTS))  # fitness_fns
    root = tmp_path_factory.mktemp("reportrun")
    data = write_rows(root / "rows.jsonl")
    config = {
        "genome": {
            "models": [str(family["expert0"]), str(family["expert1"])],
            "merge_method": "dare_ties",
            "base_model": str(family["base"]),
            "layer_granularity": 2,
            "filters": ["self_attn"],
        },
        "fitness": {
            "tasks": [
                {
                    "name": "ll",
                    "kind": "callable",
                    "function": "fitness_fns:flaky",
                    "data": str(data),
                    "heldout": str(data),
                }
            ]
        },
        "optimizer": {"max_evals": 20, "seed": 2, "max_failures": 20},
        "dtype": "float32",
    }
    runner.start(parse_config(config), root / "run", device="cpu", progress=False, save_model=False)
    return root / "run"


def read_evals(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]


def test_report_writes_plots_and_markdown(ps_run, tmp_path):
    result = CliRunner().invoke(main, ["report", str(ps_run), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "rep"
    assert sorted(p.name for p in out.glob("*.png")) == ["fitness.png", "ps_parameters.png"]
    for png in out.glob("*.png"):
        width, height = png_size(png)
        assert width >= 600 and height >= 300 and png.stat().st_size > 15_000

    text = (out / "report.md").read_text()
    best = json.loads((ps_run / "best.json").read_text())
    summary = json.loads((ps_run / "summary.json").read_text())
    evals = read_evals(ps_run)
    failed = sum(e["fitness"] is None for e in evals)
    assert failed > 0  # the flaky fitness did fail some: the plot has crosses to draw
    assert f"| best fitness (selection data) | {best['fitness']:.4f} (evaluation {best['index']}" in text
    assert f"| held-out score per task | ll {summary['best']['heldout']['ll']:.4f} |" in text
    assert f"| evaluations | {len(evals)} in " in text and f"| failed evaluations | {failed} |" in text
    assert "evaluations per hour" in text and "| selected on | `ll`: rows.jsonl |" in text
    assert "![Fitness of every evaluation](fitness.png)" in text and "(ps_parameters.png)" in text
    recipe_block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block) == yaml.safe_load((ps_run / "best.yaml").read_text())


def test_report_defaults_to_run_dir_report_folder(ps_run):
    path = write_report(ps_run)
    assert path == ps_run / "report" / "report.md" and (ps_run / "report" / "fitness.png").is_file()


def test_heatmap_numbers_are_the_best_recipe_values(ps_run):
    """Each cell is the value the best recipe gives that model, layer group and filter set."""
    best = json.loads((ps_run / "best.json").read_text())
    config = yaml.safe_load((ps_run / "config.yaml").read_text())
    panels = ps_parameter_table(GenomeConfig.model_validate(config["genome"]), 4, best["genome"])
    assert [(p["param"], p["filter"]) for p in panels] == [
        ("weight", "tensors matching 'self_attn'"),
        ("density", "tensors matching 'self_attn'"),
        ("weight", "all other tensors"),
        ("density", "all other tensors"),
    ]
    checked = 0
    for panel in panels:
        fset = 0 if "self_attn" in panel["filter"] else 1
        assert panel["values"].shape == (2, 2) and panel["groups"] == ["layers 0-1", "layers 2-3"]
        for group, sl in enumerate(best["recipe"]["slices"]):
            for model, source in enumerate(sl["sources"][:2]):
                expected = source["parameters"][panel["param"]][fset]["value"]
                assert panel["values"][model, group] == pytest.approx(expected, abs=1e-12)
                checked += 1
    assert checked == 16


def test_dfs_path_diagram_from_a_hand_made_path(tmp_path):
    path = {
        "models": ["/m/alpha", "/m/beta"],
        "base_index": 0,
        "hops": [[0, 0], [0, 1], [1, 1], [1, 2], [0, 2], [0, 3]],
        "scales": [1.0, 0.8, 1.25, 1.0, 0.6, 1.1],
    }
    out = plot_dfs_path(path, tmp_path / "path.png", "hand-made path")
    width, height = png_size(out)
    assert width >= 600 and height >= 400 and out.stat().st_size > 15_000
    longer = plot_dfs_path({**path, "hops": path["hops"] * 10, "scales": path["scales"] * 10}, tmp_path / "long.png")
    assert png_size(longer)[0] > width  # the figure grows with the path
    png_size(plot_dfs_path({"models": ["/m/a"], "hops": [], "scales": []}, tmp_path / "empty.png"))


def test_fitness_plot_copes_with_all_failed_and_empty_runs(tmp_path):
    failed = [Evaluation(index=i, generation=1, candidate=i, genome=[0.5], error="boom") for i in range(5)]
    png_size(plot_fitness(failed, tmp_path / "failed.png"))
    png_size(plot_fitness([], tmp_path / "empty.png"))


def test_report_of_a_ps_plus_dfs_run_covers_both_stages(family, tmp_path):
    sys.path.insert(0, str(TESTS))
    data = write_rows(tmp_path / "rows.jsonl")
    config = {
        "space": "ps+dfs",
        "genome": {"models": [str(family["expert0"]), str(family["expert1"])], "merge_method": "linear"},
        "dfs": {"repeats": 1},
        "fitness": {"tasks": [{"name": "ll", "kind": "callable", "function": "fitness_fns:loglik", "data": str(data)}]},
        "optimizer": {"max_evals": 6, "seed": 0},
        "dtype": "float32",
    }
    runner.start(parse_config(config), tmp_path / "run", device="cpu", progress=False, save_model=False)
    report = write_report(tmp_path / "run")
    names = sorted(p.name for p in report.parent.glob("*.png"))
    assert names == ["dfs_fitness.png", "dfs_path.png", "ps_fitness.png", "ps_parameters.png"]
    text = report.read_text()
    assert "## Stage: parameter space (PS)" in text and "## Stage: data-flow space (DFS)" in text
    for stage in ("ps", "dfs"):
        best = json.loads((tmp_path / "run" / stage / "best.json").read_text())
        assert f"{best['fitness']:.4f} (evaluation {best['index']}" in text
    assert "Path (model letter + layer" in text
    # the recipe shown is the run's, built from the sources: nothing points into the run folder
    assert "### Best recipe (the run's `best.yaml`: both stages, from the sources" in text
    recipe = text.split("### Best recipe (the run's")[1]
    assert str(tmp_path / "run") not in recipe
    from mergekit_evolve.export.model_card import build_card

    card = build_card(tmp_path / "run", repo_id="me/evo")
    assert "mergekit YAML of the whole run" in card and str(tmp_path / "run") not in card


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "has no config.yaml" in result.output and len(result.output.strip().splitlines()) == 1


def test_wandb_logging_without_wandb_is_an_input_error():
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here; the missing-extra message cannot be shown")
    from mergekit_evolve.export.wandb_log import WandbLogger

    with pytest.raises(InputError, match=r"wandb: .*pip install 'mergekit-evolve\[wandb\]'"):
        WandbLogger("mergekit-evo-test")
