"""Crash safety: SIGKILL and SIGTERM at random moments + resume equals an uninterrupted run; one process per run dir."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "torture.py"
spec = importlib.util.spec_from_file_location("torture", BENCH)
torture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torture)


def test_sigkill_and_resume_lose_nothing_and_change_nothing(tmp_path):
    result = torture.torture(tmp_path, kills=3, max_evals=40, seed=1, log=lambda *_: None)
    # Every requested kill lands (aimed at merging, writing state, final; bench/torture.py is the long form).
    assert result["kills"] == 3 and len(result["kill_log"]) == 3
    assert len(result["phases"]) >= 2, result["kill_log"]
    assert result["duplicates"] == 0
    assert result["evaluations"] == result["reference_evaluations"] >= 40
    assert result["same_candidates"] and result["same_fitness"]
    assert result["same_best_yaml"] and result["same_best_fitness"] and result["same_heldout"]
    assert result["stray_temp_files"] == []
    # The second kill is a SIGTERM: the process ends as with Ctrl-C (exit 143, one line naming the resume).
    assert result["sigterms"] == 1 and result["sigterm_not_like_ctrl_c"] == [], result["kill_log"]


# The first process holds the run directory as `mergekit-evo run` does (RunDir.prepare takes the lock),
# without the seconds a real run spends importing and loading models before it gets there.
HOLDER = r"""
import shutil, sys, time
from mergekit_evolve.search.rundir import RunDir
run = RunDir(sys.argv[1])
run.prepare(fresh=True)
shutil.copyfile(sys.argv[2], run.config)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    models = torture.make_models(tmp_path)
    config = torture.write_config(tmp_path, models, max_evals=500)
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), str(config)], env=torture.env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "locked"
        second = subprocess.run(torture.cli("resume", str(out)), env=torture.env(), capture_output=True, text=True)
        assert second.returncode == 2
        assert second.stderr.startswith("error: ") and second.stderr.count("\n") == 1
        assert "another mergekit-evo process is running in this run directory" in second.stderr
    finally:
        first.kill()
        first.wait()
