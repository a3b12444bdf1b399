"""``mergekit-evo export``: the best model of a finished (or running) run, in one of two forms.

standard: an ordinary checkpoint written by mergekit (PS: the evolved recipe; DFS: the folded
          passthrough recipe). Loads in vanilla transformers, vLLM, llama.cpp.
custom:   DFS only: the layer-stack model with its modeling code (``trust_remote_code=True``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mergekit_evolve.config import load_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.export.artifacts import save_model
from mergekit_evolve.resources import resolve_device
from mergekit_evolve.search.problems import make_problem
from mergekit_evolve.search.rundir import RunDir


def export_run(
    run_dir: str | Path,
    *,
    fmt: str,
    out: str | Path,
    force: bool = False,
    device: str = "cpu",
    pick: str | None = None,
) -> Path:
    """Write the run's best model, or with ``pick`` ("task_a=0.7,task_b=0.3") the front point those
    weights choose (export/front.py's ``pick``)."""
    stage = RunDir(run_dir).final_stage()
    out = Path(out).absolute()
    best = stage.read_best() if stage.is_run() else None
    if best is None:
        raise InputError(f"{run_dir}: no best candidate yet (config.yaml / best.json missing); run or resume it first")
    if pick is not None:
        best = picked_point(stage, pick)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise InputError(f"--out: {out} exists and is not empty; choose another folder or pass --force")
        shutil.rmtree(out)
    config = load_config(stage.config)
    if fmt == "custom" and config.space != "dfs":
        raise InputError("--format custom: only DFS runs have a custom-code form; use --format standard")
    problem = make_problem(config, resolve_device(device))
    return save_model(problem, problem.decode(np.asarray(best.genome)), out, fmt)


def picked_point(stage: RunDir, weights: str, announce: bool = True):
    """The front point that ``weights`` choose (an input error when the run has no front)."""
    from mergekit_evolve.export.front import parse_weights, pick

    front = stage.read_front()
    if front is None:
        raise InputError(
            f"--pick: {stage.path} has no front.json (a run with optimizer.objectives writes one when it ends); "
            "leave out --pick to export the best"
        )
    point = pick(front, parse_weights(weights, front.objectives))
    values = ", ".join(f"{name} {value:.4g}" for name, value in point.values.items())
    if announce:
        print(
            f"[mergekit-evo] --pick chose front point {front.points.index(point)} ({values}; evaluation {point.index})"
        )
    return point
