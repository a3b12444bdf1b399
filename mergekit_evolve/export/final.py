"""``mergekit-evo export``: the best model of a finished (or running) run, in one of two forms.

standard: an ordinary checkpoint written by mergekit (PS: the evolved recipe; DFS: the folded
          passthrough recipe). Loads in vanilla transformers, vLLM, llama.cpp.
custom:   DFS only: the layer-stack model with its modeling code (``trust_remote_code=True``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mergekit_evolve.config import load_config
from mergekit_evolve.errors import InputError
from mergekit_evolve.search.rundir import RunDir


def final_stage(run_dir: Path) -> Path:
    """The run directory whose best is the run's result (``dfs/`` for PS+DFS runs)."""
    return run_dir / "dfs" if (run_dir / "dfs" / "config.yaml").exists() else run_dir


def export_run(run_dir: str | Path, *, fmt: str, out: str | Path, force: bool = False, device: str = "cpu") -> Path:
    from mergekit_evolve.search.problems import make_problem, resolve_device

    stage = RunDir(final_stage(Path(run_dir).absolute()))
    out = Path(out).absolute()
    if not stage.config.is_file() or not stage.best_json.is_file():
        raise InputError(f"{run_dir}: no best candidate yet (config.yaml / best.json missing); run or resume it first")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise InputError(f"--out: {out} exists and is not empty; choose another folder or pass --force")
        shutil.rmtree(out)
    config = load_config(stage.config)
    device = resolve_device(device)
    genome = np.asarray(json.loads(stage.best_json.read_text())["genome"])
    if config.space == "ps":
        if fmt == "custom":
            raise InputError("--format custom: only DFS runs have a custom-code form; use --format standard")
        problem = make_problem(config, device)
        return problem.save_model(problem.decode(genome), out)
    from mergekit_evolve.search.dfs_problem import DFSProblem

    problem = DFSProblem(config, device)
    candidate = problem.decode(genome)
    if fmt == "custom":
        from mergekit_evolve.export.custom_code import save_custom_checkpoint

        return save_custom_checkpoint(problem.pool, candidate.path, out)
    try:
        problem.recipe_dict(candidate)
    except InputError as err:
        raise InputError(f"--format standard: {err}; export with --format custom instead") from None
    from mergekit_evolve.export.custom_code import save_folded_checkpoint

    return save_folded_checkpoint(problem.pool, candidate.path, out)
