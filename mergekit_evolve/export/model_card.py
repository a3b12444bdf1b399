"""The model card (README.md) of an evolved merge, built from its run directory alone.

Front matter: ``base_model`` (the source models), ``tags`` (merge, mergekit, evolutionary-merge, and
dfs when the data-flow space was searched), ``library_name: transformers``. Body: the method, the held-out
scores, the evolved recipe, the search settings, the data the recipe was selected on, the plots.
Local model paths appear as folder names (absolute paths of the uploader's machine mean nothing on
the Hub and would leak its layout); ``base_models`` overrides the front-matter list.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from mergekit_evolve.export.artifacts import PS_STAGE_NAME, rename_models
from mergekit_evolve.export.report import (
    Stage,
    format_score,
    is_local_path,
    load_stages,
    selection_text,
    summary_rows,
)
from mergekit_evolve.search.records import BestFile, FrontPoint

PAPER = "[arXiv:2403.13187](https://arxiv.org/abs/2403.13187)"
TAGS = ["merge", "mergekit", "evolutionary-merge"]


def hub_name(ref: str) -> str:
    """A model reference as it may appear on the Hub: hub IDs as they are; a local path becomes
    ``org/name`` when it lies in the Hugging Face cache, else its folder name."""
    if not is_local_path(ref):
        return ref
    cached = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", ref)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    return Path(ref).name or ref


def source_refs(stages: list[Stage], root: Path) -> list[str]:
    """Every model the run merged or routed through (the PS stage model of ps+dfs excluded)."""
    refs: list[str] = []
    for stage in stages:
        config = stage.config
        if stage.name == "dfs":
            path = (stage.best and stage.best.path) or {}
            refs += list(path.get("models") or config.dfs.models or [])
        if config.genome is not None:
            refs += list(config.genome.models) + ([config.genome.base_model] if config.genome.base_model else [])
        elif config.template is not None:
            from mergekit_evolve.space.template import TemplateSpace

            refs += TemplateSpace(config.template).referenced_models()
    stage_model = str(root / "ps" / "model")
    return [r for r in dict.fromkeys(refs) if r != stage_model]


def card_metadata(stages: list[Stage], root: Path, fmt: str, base_models: list[str] | None = None) -> dict[str, Any]:
    tags = list(TAGS)
    if any(s.name == "dfs" for s in stages):
        tags.append("dfs")
    if fmt == "custom":
        tags.append("custom_code")
    bases = base_models if base_models else list(dict.fromkeys(hub_name(r) for r in source_refs(stages, root)))
    return {"base_model": bases, "library_name": "transformers", "tags": tags}


def build_card(
    run_dir: str | Path,
    *,
    repo_id: str,
    fmt: str = "standard",
    images: list[tuple[str, str]] = (),
    results: list[dict] | None = None,
    base_models: list[str] | None = None,
    pick: FrontPoint | None = None,
) -> str:
    """README.md text. ``images``: (caption, path in the repo); ``results``: rows of a demo's
    results.json ({name, heldout: {task: score}, run_dir?}) for the comparison table; ``pick``: the front
    point published instead of the best (``push --pick``)."""
    root = Path(run_dir).absolute()
    stages = load_stages(root)
    if stages[-1].best is None:
        from mergekit_evolve.errors import InputError

        raise InputError(f"{root}: the run has no successful candidate yet; nothing to publish")
    if pick is not None:
        stages[-1] = _as_picked(stages[-1], pick)
    meta = card_metadata(stages, root, fmt, base_models)
    sections = [
        _title(repo_id, stages, root),
        _method(stages, fmt),
        _front_section(stages[-1]),
        _heldout_section(stages, root, results),
        _recipe_section(stages, root, fmt),
        _settings_section(stages),
        _data_section(stages),
        _plots_section(images),
        _usage_section(repo_id, fmt),
    ]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(s for s in sections if s)


def _title(repo_id: str, stages: list[Stage], root: Path) -> str:
    names = ", ".join(f"`{n}`" for n in dict.fromkeys(hub_name(r) for r in source_refs(stages, root)))
    return (
        f"# {repo_id.split('/')[-1]}\n\nAn evolutionary merge of {names}, made with mergekit-evo (mergekit plugin).\n"
    )


def _method(stages: list[Stage], fmt: str) -> str:
    cite = f"Akiba et al., *Evolutionary Optimization of Model Merging Recipes* (Sakana AI, 2024, {PAPER})"
    kinds = [s.name for s in stages]
    if kinds == ["ps", "dfs"]:
        text = (
            f"The model was found in two searches, as in {cite}. First, {_ps_sentence(stages[0])} Then, "
            f"{_dfs_sentence(stages[1], fmt)}"
        )
    elif kinds == ["dfs"]:
        text = f"The model was found by evolutionary search, as in {cite}: {_dfs_sentence(stages[0], fmt)}"
    else:
        text = f"The model was found by evolutionary search, as in {cite}: {_ps_sentence(stages[0])}"
    text += " Every candidate was scored on the fitness data named below"
    text += "; the held-out data was used only for the scores reported here." if stages[-1].heldout else "."
    return f"## Method\n\n{text}\n"


def _ps_sentence(stage: Stage) -> str:
    config = stage.config
    if config.genome is None:
        return (
            "CMA-ES evolved the numbers marked in a mergekit recipe template (parameter space); each candidate "
            "recipe was merged with mergekit and scored, and the best recipe was kept."
        )
    g = config.genome
    per = "per source model"
    if g.layer_granularity:
        per += f" and per group of {g.layer_granularity} layers"
    if g.filters:
        per += f", separately for tensors matching {', '.join(repr(f) for f in g.filters)} and the rest"
    params = ", ".join(g.search or _default_search(g.merge_method))
    return (
        f"CMA-ES searched the parameter space of a mergekit `{g.merge_method}` merge: the values of {params} "
        f"{per}. Each candidate recipe was merged with mergekit and scored; the best recipe was kept."
    )


def _default_search(method: str) -> list[str]:
    from mergekit_evolve.space.ps import DEFAULT_SEARCH

    return list(DEFAULT_SEARCH.get(method, ("the merge parameters",)))


def _dfs_sentence(stage: Stage, fmt: str) -> str:
    path = (stage.best and stage.best.path) or {}
    n_models = len(path.get("models") or [])
    repeats = stage.config.dfs.repeats
    form = (
        "This repository holds the layer-stack form with its modeling code (load it with `trust_remote_code=True`)."
        if fmt == "custom"
        else "The scales were folded into the layers' output projections (exact for pre-norm decoders), so the result "
        "is a standard checkpoint that loads in plain transformers."
    )
    return (
        f"CMA-ES searched the data-flow space: every layer keeps its weights; the search chose which layers of the "
        f"{n_models} models the hidden state passes through, in which order (the models' layers laid out in "
        f"sequence and repeated {repeats} times), and a scale for the hidden state before each layer. "
        f"The best path has {len(path.get('hops') or [])} hops. {form}"
    )


def _heldout_section(stages: list[Stage], root: Path, results: list[dict] | None) -> str:
    final = stages[-1]
    rows = _result_rows(final, root, results)
    if not rows:
        return "## Held-out scores\n\nNo held-out split was scored for this run.\n"
    tasks = list(dict.fromkeys(t for _, scores in rows for t in scores))
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, scores in rows:
        lines.append(f"| {name} | " + " | ".join(format_score(scores.get(t)) for t in tasks) + " |")
    note = "Scores on the held-out split of each task (higher is better); it was never used to select the recipe."
    return "## Held-out scores\n\n" + note + "\n\n" + "\n".join(lines) + "\n"


def _as_picked(stage: Stage, point: FrontPoint) -> Stage:
    """The stage as if the picked front point were its best: its recipe, path and held-out scores."""
    best = BestFile(**dict(point.position), fitness=point.fitness, path=point.path)
    recipe = (stage.path / point.recipe).read_text() if point.recipe else None
    summary = stage.summary
    if summary is not None:
        heldout = {k: v for k, v in (point.heldout or {}).items() if k != "tokens"}
        summary = summary.model_copy(
            update={"best": summary.best.model_copy(update={**dict(point.position), "heldout": heldout})}
        )
    return replace(stage, best=best, best_yaml=recipe, summary=summary)


def _front_section(stage: Stage) -> str:
    """Where this model sits on the run's Pareto front (runs with optimizer.objectives)."""
    front = stage.front
    if front is None or stage.best is None:
        return ""
    mine = next((n for n, p in enumerate(front.points) if p.index == stage.best.index), None)
    names = front.objectives
    lines = [
        "| point | " + " | ".join(names) + " | " + " | ".join(f"{n} (held-out)" for n in names) + " |",
        "|---|" + "---|" * (2 * len(names)),
    ]
    for n, p in enumerate(front.points):
        held = [format_score(p.heldout[k]) if p.heldout else "-" for k in names]
        label = f"**{n} (this model)**" if n == mine else str(n)
        lines.append(
            f"| {label} | " + " | ".join(format_score(p.values[k]) for k in names) + " | " + " | ".join(held) + " |"
        )
    better = ", ".join(f"{n} ({'higher' if b else 'lower'} is better)" for n, b in zip(names, front.higher_is_better))
    where = (
        f"This model is point {mine} of the {len(front.points)} points"
        if mine is not None
        else f"This model is not one of the {len(front.points)} points"
    )
    return (
        f"## Where this model sits on the Pareto front\n\nThe search traded off {better}. {where} of its Pareto "
        "front (non-dominated on the fitness split; held-out scored after the search):\n\n" + "\n".join(lines) + "\n"
    )


def row_runs(row: dict) -> set[Path]:
    """The run folders a results row was measured on (``run_dir``, or a demo row's ``run_dirs``)."""
    refs = [row["run_dir"]] if row.get("run_dir") else list(row.get("run_dirs") or [])
    return {Path(ref).absolute() for ref in refs}


def _result_rows(final: Stage, root: Path, results: list[dict] | None) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = []
    mine_found = False
    for row in results or []:
        heldout = row.get("heldout") or {}
        if not heldout:
            continue
        mine = row_runs(row) == {root}  # a mean over several seeds is not this model's own score
        mine_found = mine_found or bool(mine)
        rows.append((f"**{row.get('name', '?')} (this model)**" if mine else str(row.get("name", "?")), heldout))
    if not mine_found and final.heldout:
        rows.insert(0, ("**this model (evolved)**", final.heldout))
    return rows


def _recipe_section(stages: list[Stage], root: Path, fmt: str) -> str:
    renames = _renames(stages, root)
    parts = ["## Evolved recipe\n"]
    for stage in stages:
        label = {"ps": "Parameter-space merge", "dfs": "Data-flow path"}.get(stage.name, stage.name)
        if len(stages) > 1:
            parts.append(f"### {label}\n")
        path = stage.best.path if stage.best is not None else None
        if path is not None:
            from mergekit_evolve.space.dfs import DFSPath

            letters = ", ".join(f"{chr(65 + i)} = `{renames.get(m, m)}`" for i, m in enumerate(path["models"]))
            summary = DFSPath(hops=path["hops"], scales=path["scales"]).summary()
            parts.append(
                f"Path ({letters}; model letter + layer index, `*scale` where not 1):\n\n```\n{summary}\n```\n"
            )
        if stage.best_yaml and stage.whole_run_recipe:
            documents = [rename_models(doc, renames) for doc in yaml.safe_load_all(stage.best_yaml)]
            build = (
                "`mergekit-multi best.yaml --intermediate-dir TMP --out-path OUT` builds the weights from both stages"
                if len(documents) > 1
                else "the data-flow search kept the parameter-space model; `mergekit-yaml` builds it"
            )
            text = "---\n".join(_yaml(doc) for doc in documents).rstrip()
            parts.append(f"mergekit YAML of the whole run ({build}):\n\n```yaml\n{text}\n```\n")
        elif stage.best_yaml:
            recipe = rename_models(yaml.safe_load(stage.best_yaml), renames)
            what = "the folded passthrough recipe" if stage.name == "dfs" else "the merge recipe"
            parts.append(
                f"mergekit YAML ({what}; `mergekit-yaml` builds the weights from it):\n\n"
                f"```yaml\n{_yaml(recipe).rstrip()}\n```\n"
            )
    notes = ["Local model paths are shown as folder names."] if any(is_local_path(r) for r in renames) else []
    if len(stages) > 1:
        notes.append(f"`{PS_STAGE_NAME}` is the parameter-space merge (the first recipe).")
    if notes:
        parts.append(" ".join(notes) + "\n")
    return "\n".join(parts)


def _renames(stages: list[Stage], root: Path) -> dict[str, str]:
    refs = source_refs(stages, root)
    names = {r: hub_name(r) for r in refs}
    names[str(root / "ps" / "model")] = PS_STAGE_NAME
    return names


def _yaml(data: Any) -> str:
    from mergekit_evolve.recipe.ps import recipe_yaml

    return recipe_yaml(data)


def _settings_section(stages: list[Stage]) -> str:
    lines = ["## Search settings\n"]
    for stage in stages:
        if len(stages) > 1:
            lines.append(f"Stage **{stage.name}**:\n")
        rows = _settings_rows(stage) + [(k, v) for k, v in summary_rows(stage) if k in _RUN_ROWS]
        lines.append("| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n")
    return "\n".join(lines)


_RUN_ROWS = {
    "evaluations",
    "failed evaluations",
    "wall time",
    "evaluations per hour",
    "best fitness (selection data)",
    "DFS result confirmed on held-back rows",  # dfs.validation: whether the DFS stage changed the PS model
}


def _settings_rows(stage: Stage) -> list[tuple[str, str]]:
    config, opt = stage.config, stage.config.optimizer
    rows = [("space", stage.name)]
    if stage.name == "ps" and config.genome is not None:
        g = config.genome
        rows += [
            ("merge method", f"`{g.merge_method}`" + (f" (base: `{hub_name(g.base_model)}`)" if g.base_model else "")),
            ("evolved parameters", ", ".join(g.search or _default_search(g.merge_method))),
            (
                "layer granularity",
                f"{g.layer_granularity} layers per group" if g.layer_granularity else "one set for all layers",
            ),
        ]
        if g.filters:
            rows.append(("filters", ", ".join(g.filters) + ", rest"))
    elif stage.name == "ps":
        rows.append(("merge method", f"`{config.template.get('merge_method')}` (template recipe)"))
    if stage.name == "dfs":
        rows.append(("DFS", f"repeats {config.dfs.repeats}, scales: {config.dfs.scales}"))
    rows.append(
        (
            "optimizer",
            f"CMA-ES, sigma0 {opt.sigma0:.4g}, population {_popsize(stage)}, seed {opt.seed}, "
            f"budget {opt.max_evals} evaluations"
            + (", diagonal" if opt.diagonal else "")
            + (f", {opt.restarts} IPOP restarts" if opt.restarts else ""),
        )
    )
    return rows


def _popsize(stage: Stage) -> str:
    popsize = stage.config.optimizer.popsize
    if popsize:
        return str(popsize)
    if stage.best is None:
        return "default"
    n = max(2, len(stage.best.genome))  # 1-gene genomes are padded to 2 for cma
    return f"{4 + int(3 * math.log(n))} (4 + 3 ln {n})"


def _data_section(stages: list[Stage]) -> str:
    final = stages[-1]
    text = f"The recipe was selected on: {selection_text(final)}."
    heldout = [
        f"`{t.name}`: {Path(t.heldout).name}"
        for t in (final.config.builtin_fitness.tasks if final.config.builtin_fitness else [])
        if t.heldout
    ]
    if heldout:
        text += f" Held-out scores come from {', '.join(heldout)}, which took no part in the selection."
    if final.config.builtin_fitness is not None:
        weights = [f"`{t.name}` {t.weight:g}" for t in final.config.builtin_fitness.tasks]
        if len(weights) > 1:
            text += f" Fitness = weighted mean of the task scores ({', '.join(weights)})."
    return f"## Fitness data\n\n{text}\n"


def _plots_section(images: list[tuple[str, str]]) -> str:
    if not images:
        return ""
    return "## Search plots\n\n" + "\n".join(f"![{caption}]({path})\n" for caption, path in images)


def _usage_section(repo_id: str, fmt: str) -> str:
    remote = ", trust_remote_code=True" if fmt == "custom" else ""
    return (
        "## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{remote})\n```\n'
    )
