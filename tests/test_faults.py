"""A full disk ends a run (or an export, a report) in one line, loses nothing, leaves no temp file, and the
run resumes to the same result.

The run directory is a real tmpfs of a few kilobytes (mounted by the test; skipped where mounting is not
allowed): the search fills it first, then, with a little more room, the saved model does. SIGTERM is
tested by the torture run (tests/test_crash_safety.py).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_evolve.cli import main

BENCH = Path(__file__).resolve().parent.parent / "bench" / "torture.py"
spec = importlib.util.spec_from_file_location("torture", BENCH)
torture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torture)


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(folder, kb)``: a tmpfs of that size at ``folder``; ``resize(folder, kb)`` keeps its files."""
    mounted: list[Path] = []

    def mount(folder: Path, kb: int) -> Path:
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    def resize(folder: Path, kb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kb}k", str(folder)], check=True)

    try:
        yield mount, resize
    finally:
        for folder in mounted:
            subprocess.run(["umount", str(folder)], check=False)


def cli(*args: str, quiet: bool = True):
    return CliRunner().invoke(main, [*args, *(["--quiet"] if quiet else [])], catch_exceptions=False)


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name != ".lock")


def test_a_full_disk_stops_in_one_line_and_resume_finishes_the_same_run(tmp_path, tmpfs):
    mount, resize = tmpfs
    disk = mount(tmp_path / "tiny", 24)
    config = torture.write_config(tmp_path, torture.make_models(tmp_path), max_evals=24)
    assert cli("run", str(config), "--out", str(tmp_path / "ref")).exit_code == 0
    out = disk / "run"
    hint = f"error: no space left on the device of {out}; every completed evaluation is kept; free some space "
    hint += f"and continue with: mergekit-evo resume {out}\n"

    full = cli("run", str(config), "--out", str(out))  # the search's records fill 24 KB
    assert (full.exit_code, full.stderr) == (1, hint)
    assert 0 < len((out / "evaluations.jsonl").read_text().splitlines()) < 24 and temp_files(out) == []

    resize(disk, 96)  # room for the search, not for the model
    full = cli("resume", str(out))
    assert (full.exit_code, full.stderr) == (1, hint)
    assert not (out / "model").exists() and temp_files(out) == []
    assert len((out / "evaluations.jsonl").read_text().splitlines()) == 24

    resize(disk, 2048)
    assert cli("resume", str(out)).exit_code == 0
    ours, theirs = (
        [json.loads(x) for x in (d / "evaluations.jsonl").read_text().splitlines()] for d in (out, tmp_path / "ref")
    )
    assert [(r["genome"], r["fitness"]) for r in ours] == [(r["genome"], r["fitness"]) for r in theirs]
    assert (out / "best.yaml").read_text() == (tmp_path / "ref" / "best.yaml").read_text()
    assert (out / "model" / "model.safetensors").is_file() and temp_files(out) == []

    # export and report of that run, into a disk that cannot hold them: one line each, nothing half-written
    small = mount(tmp_path / "small", 24)
    for command, target in (("export", small / "exported"), ("report", small / "report")):
        failed = cli(command, str(out), "--out", str(target), quiet=False)
        assert (failed.exit_code, failed.stderr) == (
            1,
            f"error: no space left on the device of {target}; free some space and run the command again\n",
        )
    assert temp_files(small) == [] and not (small / "report" / "report.md").exists()
