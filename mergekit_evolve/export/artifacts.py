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
import yaml

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
        + (
            _mergekit_cannot_build(problem, candidate, run_dir)
            or "Build the standard checkpoint: mergekit-yaml best.yaml OUT"
        )
    )
    run_dir.write_best(record, recipe_yaml(recipe_of(problem, candidate), header))


def _mergekit_cannot_build(problem, candidate: DFSCandidate, run_dir: RunDir) -> str | None:
    """What to say when mergekit's CLI cannot build a folded recipe: mergekit 0.1.5 copies model A's
    ``layer_types`` (Qwen2, transformers 5) unchanged, which transformers refuses for another depth."""
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(problem.models[problem.base_index])
    layer_types = getattr(base, "layer_types", None)
    if not layer_types or len(layer_types) == len(candidate.path.hops):
        return None
    return (
        f"mergekit-yaml cannot build this recipe: mergekit 0.1.5 keeps model A's layer_types ({len(layer_types)} "
        f"entries) for {len(candidate.path.hops)} layers.\n"
        f"Build the standard checkpoint with: mergekit-evo export {run_dir.path} --format standard --out OUT"
    )


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
        raise InputError(f"--format standard: {reason}")
    if fmt == "custom" or reason:
        return save_custom_checkpoint(problem.pool, candidate.path, out_dir)
    # Written from the pool directly: it equals what ``mergekit-yaml best.yaml`` writes tensor for tensor
    # (tested), and also works for Qwen2, whose depth-changing passthrough merges mergekit 0.1.5 cannot save.
    return save_folded_checkpoint(problem.pool, candidate.path, out_dir)


PS_STAGE_NAME = "ps-stage"  # the PS stage's merge in a ps+dfs recipe (mergekit-multi's intermediate name)


def staged_recipe(ps_dir: RunDir, dfs_dir: RunDir, merge_seed: int | None) -> str | None:
    """The recipe of a ps+dfs run's result from the original sources alone, or None when there is none (a DFS
    path that does not fold: best.json keeps it, ``mergekit-evo export --format custom`` builds it).

    When the DFS stage's result is the PS model itself (model A's own path, unscaled: e.g. kept by
    dfs.validation), that is the PS recipe; otherwise a two-stage mergekit-multi recipe: the PS recipe named
    ``ps-stage``, then the DFS passthrough over it (in place of the run directory's copy of the PS model)."""
    ps_best, dfs_best = ps_dir.read_best(), dfs_dir.read_best()
    seed = f" --random-seed {merge_seed}" if merge_seed is not None else ""
    if ps_best is None or ps_best.recipe is None or dfs_best is None or dfs_best.path is None:
        return None
    hops, scales = dfs_best.path["hops"], dfs_best.path["scales"]
    own = [[0, layer] for layer in range(len(hops))]
    if [list(h) for h in hops] == own and all(s == 1.0 for s in scales) and _num_layers(ps_dir) == len(hops):
        header = (
            "Evolved by mergekit-evo (PS+DFS): the DFS stage kept the PS model's own path, so the result is the\n"
            f"PS stage's model: fitness {ps_best.fitness:.4f} at evaluation {ps_best.index} of the PS stage.\n"
            f"Build it: mergekit-yaml best.yaml OUT{seed}"
        )
        return recipe_yaml(ps_best.recipe, header)
    dfs_text = dfs_dir.read_best_yaml()
    if dfs_text is None:
        return None
    ps_model = str(Path(ps_dir.model).absolute())
    dfs_recipe = rename_models(yaml.safe_load(dfs_text), {ps_model: PS_STAGE_NAME})
    found = f"evaluation {dfs_best.index}" if dfs_best.index >= 0 else "the start path"
    build = f"Build it from the sources alone: mergekit-multi best.yaml --intermediate-dir TMP --out-path OUT{seed}"
    if "mergekit-yaml cannot build this recipe" in dfs_text:  # the DFS stage's header says why (Qwen2 depth)
        build = (
            "mergekit-multi cannot build stage 2 (mergekit 0.1.5 keeps the PS model's layer_types for another "
            f"depth).\nBuild the result with: mergekit-evo export {ps_dir.path.parent} --format standard --out OUT"
        )
    header = (
        f"Evolved by mergekit-evo (PS+DFS): fitness {dfs_best.fitness:.4f} at {found} of the DFS stage.\n"
        f"Stage 1 ({PS_STAGE_NAME}) is the PS recipe over the sources; stage 2 the DFS path over its result.\n"
        f"{build}"
    )
    stages = recipe_yaml({"name": PS_STAGE_NAME, **ps_best.recipe}, header) + "---\n" + recipe_yaml(dfs_recipe)
    return stages


def rename_models(node: Any, names: dict[str, str]) -> Any:
    """Model references to the folders in ``names`` (a path, or mergekit's mapping form) become those names."""
    if isinstance(node, dict):
        inner = node.get("model")
        if set(node) == {"model"} and isinstance(inner, dict) and inner.get("path") in names:
            return names[inner["path"]]
        return {key: rename_models(value, names) for key, value in node.items()}
    if isinstance(node, list):
        return [rename_models(item, names) for item in node]
    return names.get(node, node) if isinstance(node, str) else node


def _num_layers(run_dir: RunDir) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(run_dir.model).num_hidden_layers)
