"""What the search tests share: a search in a run directory (resumed when it exists), and a config that the
CLI must refuse in one line."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from mergekit_evolve.cli import main
from mergekit_evolve.search.loop import SearchState, run_search
from mergekit_evolve.search.rundir import RunDir


def search_in(out: Path, problem, executor, optimizer, **options) -> SearchState:
    """``run_search`` in ``out``: a new run, or the continuation of the one there (as ``resume``)."""
    run_dir = RunDir(out)
    run_dir.prepare(fresh=not out.exists())
    try:
        return run_search(problem, executor, run_dir, optimizer, progress=False, **options)
    finally:
        run_dir.unlock()


def refused_line(config: dict, tmp_path: Path) -> str:
    """`mergekit-evo run` on ``config``: asserts exit code 2, one line and nothing written; returns the line."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert not (tmp_path / "out").exists()
    return lines[0]
