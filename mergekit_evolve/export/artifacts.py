"""What a search's best candidate becomes on disk: best.yaml / best.json, and the merged model.

PS (and templates): the evolved mergekit recipe; the model is what ``mergekit-yaml`` writes for it.
DFS: the path, and when it folds exactly (``recipe.fold.why_not_foldable`` is None) the folded
``passthrough`` recipe and a standard checkpoint; otherwise the custom-code checkpoint of the layer stack.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_evolve.errors import InputError
from mergekit_evolve.recipe.fold import fold_recipe, why_not_foldable
from mergekit_evolve.recipe.ps import recipe_yaml, to_merge_config
from mergekit_evolve.search.dfs_problem import DFSCandidate
from mergekit_evolve.search.problems import PSCandidate, TemplateProblem
from mergekit_evolve.search.records import Best, BestFile
from mergekit_evolve.search.rundir import RunDir


def path_record(problem, candidate: DFSCandidate) -> dict[str, Any]:
    """A DFS path as best.json keeps it: the collection, model A, the hops and their input scales."""
    return {
        "models": problem.models,
        "base_index": problem.base_index,
        "hops": [list(h) for h in candidate.path.hops],
        "scales": list(candidate.path.scales),
    }


def fold_blocker(problem, candidate: DFSCandidate) -> str | None:
    """Why a DFS candidate has no standard checkpoint (None: it folds exactly)."""
    return why_not_foldable(problem.models, candidate.path, problem.base_index)


def recipe_of(problem, candidate) -> dict[str, Any]:
    """The plain mergekit recipe of a candidate (DFS: the folded passthrough recipe, or an
    ``InputError`` saying why the path does not fold)."""
    if isinstance(candidate, PSCandidate):
        return candidate.recipe
    return fold_recipe(problem.models, candidate.path, base_index=problem.base_index, dtype=problem.dtype)


def best_writer(problem, run_dir: RunDir) -> Callable[[Best], None]:
    """The search's ``on_best``: write best.json and best.yaml for each new best candidate."""

    def write(best: Best) -> None:
        write_best(problem, problem.decode(np.asarray(best.genome)), run_dir, best)

    return write


def write_best(problem, candidate, run_dir: RunDir, best: Best) -> None:
    if isinstance(candidate, PSCandidate):
        header = _ps_header(problem, best)
        run_dir.write_best(BestFile(**dict(best), recipe=candidate.recipe), recipe_yaml(candidate.recipe, header))
        return
    record = BestFile(**dict(best), path=path_record(problem, candidate))
    if fold_blocker(problem, candidate):
        run_dir.write_best(record, None)  # best.json keeps the path; export --format custom
        return
    found = f"at evaluation {best.index}" if best.index >= 0 else "(model A's own path, kept by dfs.validation)"
    header = (
        f"Evolved by mergekit-evo (DFS): fitness {best.fitness:.4f} {found}.\n"
        f"{len(candidate.path.hops)} hops; data-flow scales folded into o_proj/down_proj.\n"
        "Build the standard checkpoint: mergekit-yaml best.yaml OUT"
    )
    run_dir.write_best(record, recipe_yaml(recipe_of(problem, candidate), header))


def _ps_header(problem, best: Best) -> str:
    reproduce = f"Reproduce the weights: mergekit-yaml best.yaml OUT --random-seed {problem.config.merge_seed}"
    if isinstance(problem, TemplateProblem):
        found = f"fitness {best.fitness:.4f} at evaluation {best.index}"
        return f"Evolved by mergekit-evo from a template: {found}.\n{reproduce}"
    return (
        f"Evolved by mergekit-evo (PS, {problem.space.genome.merge_method}): fitness {best.fitness:.4f} "
        f"at evaluation {best.index} (generation {best.generation}).\n{reproduce}"
    )


def save_model(problem, candidate, out_dir: str | Path, fmt: str = "standard") -> Path:
    """Write the candidate's model. PS: mergekit's ``run_merge`` on the recipe. DFS ``standard``: the
    folded checkpoint when the fold is exact (an ``InputError`` for ``fmt="standard"`` otherwise, while
    ``fmt="auto"`` falls back to the custom-code checkpoint); ``custom``: the layer-stack checkpoint."""
    if isinstance(candidate, PSCandidate):
        if fmt == "custom":
            raise InputError("--format custom: only DFS runs have a custom-code form; use --format standard")
        from mergekit_evolve.merge import merge_to_disk

        return merge_to_disk(
            to_merge_config(candidate.recipe), out_dir, device=problem.device, random_seed=problem.config.merge_seed
        )
    from mergekit_evolve.export.custom_code import save_custom_checkpoint, save_folded_checkpoint

    reason = fold_blocker(problem, candidate) if fmt != "custom" else None
    if fmt == "standard" and reason:
        raise InputError(f"--format standard: {reason}; export with --format custom instead")
    if fmt == "custom" or reason:
        return save_custom_checkpoint(problem.pool, candidate.path, out_dir)
    # Written from the pool directly: it equals what ``mergekit-yaml best.yaml`` writes tensor for tensor
    # (tested), and also works for Qwen2, whose depth-changing passthrough merges mergekit 0.1.5 cannot save.
    return save_folded_checkpoint(problem.pool, candidate.path, out_dir)
