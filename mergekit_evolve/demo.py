"""``mergekit-evo demo``: the paper's experiment in miniature on the embedded zoo, on CPU.

Sources: the zoo's base model and its experts (a "script" = language expert and a "math" expert).
Target: math written in the script, which needs both skills. Evolution selects on the target's
fitness split only; the table reports the held-out split of every task.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from mergekit_evolve.atomic import atomic_write
from mergekit_evolve.config import parse_config
from mergekit_evolve.progress import note, step
from mergekit_evolve.search.rundir import RunDir

# Whole generations of cma's default population (4 + 3 ln n): PS 28 x 11 (12 genes); DFS 18 x 17 (80 genes:
# 4 generations of block paths, then CMA-ES). PS+DFS builds on the PS row's search (same budget and seed, so
# the same PS model, as the paper's PS+DFS builds on its PS model), then DFS 11 x 19 (168 genes).
DEFAULT_EVALS = {"ps": 308, "dfs": 306, "ps+dfs": 308}
PS_DFS_DFS_EVALS = 209


def demo_config(zoo, space: str, max_evals: int, seed: int) -> dict[str, Any]:
    """The demo's run config (also shipped as recipes/zoo-*.yaml with the cache path filled in)."""
    target = zoo.tasks[zoo.target]
    experts = [str(zoo.models[name]) for name in zoo.experts]
    config: dict[str, Any] = {
        "space": space,
        "genome": {
            "models": experts,
            "merge_method": "dare_ties",
            "base_model": str(zoo.models[zoo.base]),
            "layer_granularity": 2,
            # As the paper: embeddings, final norm and lm_head tuned as their own group; density starts at 0.5.
            "tune_embeddings": True,
            "parameters": {"density": {"bounds": [0.0, 1.0], "init": 0.5}},
        },
        "fitness": {
            "tasks": [
                {
                    "name": zoo.target,
                    "data": str(target.fitness),
                    "heldout": str(target.heldout),
                    "max_new_tokens": target.max_new_tokens,
                }
            ],
            "batch_size": 64,
        },
        "optimizer": {"max_evals": max_evals, "seed": seed},
        "dtype": "float32",
    }
    if space in ("dfs", "ps+dfs"):
        config["dfs"] = {"repeats": 2}
    if space == "ps+dfs":
        config["dfs"]["max_evals"] = min(PS_DFS_DFS_EVALS, max_evals)  # a smaller --max-evals caps both stages
    return config


def evaluate_all(model, fitness_all) -> dict[str, dict]:
    """Scores per split and task, and under "items" each task's per-item results (a string of 0/1 in
    row order: compact in results.json), from which the tables draw bootstrap intervals."""
    out: dict[str, dict] = {"items": {}}
    for split in ("fitness", "heldout"):
        results = fitness_all.evaluate(model, split)
        out[split] = {task: r.score for task, r in results.items()}
        out["items"][split] = {task: "".join(str(int(v)) for v in r.correct) for task, r in results.items()}
    return out


def baseline_rows(zoo, fitness_all, out: Path, dtype: str = "float32") -> list[dict[str, Any]]:
    """Each source, the uniform merge, untuned TIES and DARE-TIES (mergekit's usual density 0.5), and
    a plain frankenmerge (layers stacked without search)."""
    import transformers

    from mergekit_evolve.merge import InMemoryMerger, merge_to_disk
    from mergekit_evolve.recipe.ps import to_merge_config

    rows = []
    for name in [zoo.base, *zoo.experts]:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(zoo.models[name]), dtype="float32")
        rows.append(_row(f"source: {name}", evaluate_all(model.eval(), fitness_all)))
    for name, recipe in untuned_recipes(zoo, dtype).items():
        merge_config = to_merge_config(recipe)
        merger = InMemoryMerger(merge_config, device="cpu", dtype=dtype, random_seed=0)
        rows.append(_row(name, evaluate_all(merger.merge(merge_config), fitness_all), recipe=recipe))
    recipe = frankenmerge_recipe(zoo, dtype)
    folder = out / "frankenmerge"
    merge_to_disk(to_merge_config(recipe), folder, random_seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32").eval()
    rows.append(_row("frankenmerge (no search)", evaluate_all(model, fitness_all), recipe=recipe))
    return rows


def untuned_recipes(zoo, dtype: str) -> dict[str, dict]:
    experts = [str(zoo.models[n]) for n in zoo.experts]
    base = str(zoo.models[zoo.base])

    def with_base(method: str) -> dict:
        return {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in experts],
            "parameters": {"normalize": True, "int8_mask": True},
            "dtype": dtype,
        }

    uniform = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts],
        "dtype": dtype,
    }
    return {
        "uniform merge (linear)": uniform,
        "TIES untuned": with_base("ties"),
        "DARE-TIES untuned": with_base("dare_ties"),
    }


def frankenmerge_recipe(zoo, dtype: str) -> dict:
    """The first three layers of the language expert, then the last three of the math expert."""
    import transformers

    script, math = (str(zoo.models[n]) for n in zoo.experts)
    n = transformers.AutoConfig.from_pretrained(script).num_hidden_layers
    cut = n - n // 4
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": script, "layer_range": [0, cut]}]},
            {"sources": [{"model": math, "layer_range": [n - cut, n]}]},
        ],
        "dtype": dtype,
    }


def _row(name: str, scores: dict, **extra) -> dict[str, Any]:
    """A table row; scores (and items) are lists, one entry per seed, so searched and fixed rows look alike."""
    row: dict[str, Any] = {"name": name, "fitness": {}, "heldout": {}, "items": {"fitness": {}, "heldout": {}}, **extra}
    _add_seed(row, scores)
    return row


def _add_seed(row: dict, scores: dict) -> None:
    for split in ("fitness", "heldout"):
        for task, value in scores[split].items():
            row[split].setdefault(task, []).append(value)
        for task, items in scores["items"][split].items():
            row["items"][split].setdefault(task, []).append(items)


def run_demo(
    out: Path,
    *,
    space: str = "ps",
    max_evals: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    seeds: int = 1,
) -> list[dict[str, Any]]:
    """Baselines, then each search space once per seed; writes results.json and RESULTS.md in ``out``."""
    from mergekit_evolve.zoo import build_zoo

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    zoo = build_zoo(seed=0)
    fitness_all = _fitness_of_every_task(zoo)
    with step(f"scoring the sources and baselines on {len(zoo.tasks)} tasks (fitness and held-out)", progress):
        rows = baseline_rows(zoo, fitness_all, out)
    spaces = ["ps", "dfs", "ps+dfs"] if space == "all" else [space]
    for sp in spaces:
        budget = max_evals or DEFAULT_EVALS.get(sp, 120)
        seeds_run = range(seed, seed + seeds)
        rows.append(_searched_row(zoo, fitness_all, out, sp, budget, seeds_run, device=device, progress=progress))
    final_best = RunDir(out / _run_name(spaces[-1], seed, seeds)).read_best_yaml()
    if final_best is not None:
        atomic_write(out / "best.yaml", final_best)
    report = {
        "rows": rows,
        "seeds": list(range(seed, seed + seeds)),
        "target": zoo.target,
        "tasks": list(zoo.tasks),
        "wall_seconds": round(time.time() - started, 1),
    }
    atomic_write(out / "results.json", _portable(json.dumps(report, indent=2), zoo) + "\n")
    atomic_write(out / "RESULTS.md", markdown_table(report))
    click.echo(format_table(rows, zoo))
    click.echo(verdict(rows, zoo.target))
    click.echo(
        f"demo finished in {time.time() - started:.0f} s; table in {out / 'RESULTS.md'}, recipe in {out / 'best.yaml'}"
    )
    return rows


def _searched_row(zoo, fitness_all, out: Path, space: str, budget: int, seeds: range, *, device, progress) -> dict:
    """One searched row of the table: the search once per seed (finished ones are kept), each winner scored."""
    from mergekit_evolve import runner

    evaluations = f"{budget} + {min(PS_DFS_DFS_EVALS, budget)}" if space == "ps+dfs" else budget
    row = {
        "name": LABELS[space],
        "fitness": {},
        "heldout": {},
        "items": {"fitness": {}, "heldout": {}},
        "evaluations": evaluations,
        "wall_seconds": [],
        "run_dirs": [],
        "distinct": [],
    }
    for s in seeds:
        run_dir = out / _run_name(space, s, len(seeds))
        config = parse_config(demo_config(zoo, space, budget, s))
        if not _finished(run_dir, config):  # a rerun after an interruption keeps finished searches
            note(f"{LABELS[space]} search, seed {s}: {budget} evaluations into {run_dir}", progress)
            runner.start(config, run_dir, device=device, force=True, progress=progress)
        with step(f"scoring the {LABELS[space]} winner (seed {s}) on every task", progress):
            _add_seed(row, evaluate_all(_load_best(run_dir, space), fitness_all))
        row["wall_seconds"].append(_search_seconds(run_dir))
        row["distinct"].append(_distinct_candidates(run_dir, space))
        row["run_dirs"].append(run_dir.name)
    return row


def _portable(text: str, zoo) -> str:
    """Zoo model paths (under the user's cache) as ``zoo:NAME`` references, which configs accept too."""
    for name, path in zoo.models.items():
        text = text.replace(str(path), f"zoo:{name}")
    return text


def _run_name(space: str, seed: int, seeds: int) -> str:
    return space.replace("+", "_") + (f"-seed{seed}" if seeds > 1 else "")


def _search_seconds(run_dir: Path) -> float:
    """Wall time of the search(es), from the run's summary (both stages for PS+DFS)."""
    summary = RunDir(run_dir).read_summary()
    stages = summary.stages or {"": summary}
    return round(sum(stage.wall_seconds for stage in stages.values()), 1)


def _distinct_candidates(run_dir: Path, space: str) -> int:
    """Distinct candidates the search scored: DFS counts paths (hop sequences, whatever the scales),
    PS counts recipes."""
    from mergekit_evolve.config import load_config

    stage = RunDir(run_dir).final_stage()
    records = stage.read_evaluations()
    if space == "ps":
        return len({r.key for r in records})
    from mergekit_evolve.search.dfs_problem import DFSProblem

    space = DFSProblem(load_config(stage.config)).space
    return len({space.decode(r.genome).hops for r in records})


def _finished(run_dir: Path, config) -> bool:
    """The same search already ran to the end in ``run_dir``."""
    run = RunDir(run_dir)
    return run.summary.exists() and run.config.read_text() == config.to_yaml()


LABELS = {"ps": "Ours PS", "dfs": "Ours DFS", "ps+dfs": "Ours PS+DFS"}


def _fitness_of_every_task(zoo):
    from mergekit_evolve.fitness import Fitness, FitnessConfig
    from mergekit_evolve.resources import load_tokenizer

    tasks = [
        {"name": t.name, "data": str(t.fitness), "heldout": str(t.heldout), "max_new_tokens": t.max_new_tokens}
        for t in zoo.tasks.values()
    ]
    return Fitness(FitnessConfig(tasks=tasks, batch_size=64), load_tokenizer(str(zoo.models[zoo.base])))


def _load_best(run_dir: Path, space: str):
    """The winner as saved on disk (what users get), loaded with plain transformers when possible."""
    import transformers

    model_dir = RunDir(run_dir).final_stage().model
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype="float32", trust_remote_code=False
    ).eval()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _cell(values: list[float]) -> str:
    """mean, with the spread (min-max over seeds) when there are several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{_mean(values):.3f} ({min(values):.2f}-{max(values):.2f})"


def _count_cell(counts: list[int]) -> str:
    return str(counts[0]) if len(counts) == 1 else f"{_mean(counts):.0f} ({min(counts)}-{max(counts)})"


# -- intervals: bootstrap over items -----------------------------------------------------------------
BOOTSTRAP_SAMPLES = 10_000


def item_scores(row: dict, split: str, task: str):
    """Per-item score of a row, averaged over its seeds (the row's value is the mean of this)."""
    import numpy as np

    return np.mean([[float(c) for c in items] for items in row["items"][split][task]], axis=0)


def bootstrap_interval(per_item, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean when the items are resampled (the test set is a sample of the
    task; seeds are averaged first, so this is the items' share of the uncertainty, not the seeds')."""
    import numpy as np

    per_item = np.asarray(per_item, dtype=float)
    rng = np.random.default_rng(seed)
    means = per_item[rng.integers(0, len(per_item), (BOOTSTRAP_SAMPLES, len(per_item)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def difference(a: dict, b: dict, task: str, split: str = "heldout") -> dict[str, float]:
    """Row a minus row b on the same items: mean and paired 95% bootstrap interval."""
    d = item_scores(a, split, task) - item_scores(b, split, task)
    low, high = bootstrap_interval(d)
    return {"difference": float(d.mean()), "low": low, "high": high}


def _interval(row: dict, split: str, task: str) -> str:
    low, high = bootstrap_interval(item_scores(row, split, task))
    return f"[{low:.2f}, {high:.2f}]"


def comparisons(rows: list[dict[str, Any]], target: str) -> list[tuple[str, dict[str, float]]]:
    """The differences the tables discuss: each searched row against the best source and the plain
    frankenmerge (held-out), and PS+DFS against PS."""
    by_name = {r["name"]: r for r in rows}
    sources = [r for r in rows if r["name"].startswith("source:")]
    best_source = max(sources, key=lambda r: _mean(r["heldout"][target]))
    out = []
    for row in (r for r in rows if r["name"].startswith("Ours")):
        out.append((f"{row['name']} - {best_source['name']}", difference(row, best_source, target)))
        if "frankenmerge (no search)" in by_name:
            out.append((f"{row['name']} - frankenmerge", difference(row, by_name["frankenmerge (no search)"], target)))
    if "Ours PS+DFS" in by_name and "Ours PS" in by_name:
        out.append(("Ours PS+DFS - Ours PS", difference(by_name["Ours PS+DFS"], by_name["Ours PS"], target)))
    return out


def resolved(diff: dict[str, float]) -> bool:
    """The 95% interval of the difference excludes zero."""
    return diff["low"] > 0 or diff["high"] < 0


# -- tables ------------------------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]], zoo) -> str:
    tasks = [zoo.target, *[t for t in zoo.tasks if t != zoo.target]]
    header = f"{'model':26s} {'target(fit)':>11s} {'target(ho) 95% int.':>20s} " + " ".join(
        f"{t + '(ho)':>14s}" for t in tasks[1:]
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = " ".join(f"{_mean(row['heldout'][t]):14.3f}" for t in tasks[1:])
        target_cell = f"{_mean(row['heldout'][zoo.target]):.3f} {_interval(row, 'heldout', zoo.target)}"
        lines.append(f"{row['name']:26s} {_mean(row['fitness'][zoo.target]):11.3f} {target_cell:>20s} {cells}")
    return "\n".join(lines)


def markdown_table(report: dict) -> str:
    target, rows = report["target"], report["rows"]
    others = [t for t in report["tasks"] if t != target]
    seeds = report["seeds"]
    lines = [
        f"| model | {target} fitness split | {target} held-out | held-out 95% interval | "
        + " | ".join(f"{t} held-out" for t in others)
        + " | CMA-ES evaluations | distinct candidates | wall s per run |",
        "|---" * (7 + len(others)) + "|",
    ]
    for row in rows:
        cells = [
            _cell(row["fitness"][target]),
            _cell(row["heldout"][target]),
            _interval(row, "heldout", target),
            *(_cell(row["heldout"][t]) for t in others),
        ]
        budget = str(row.get("evaluations", "-"))
        distinct = _count_cell(row["distinct"]) if row.get("distinct") else "-"
        wall = f"{_mean(row['wall_seconds']):.0f}" if row.get("wall_seconds") else "-"
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {budget} | {distinct} | {wall} |")
    n_items = len(rows[0]["items"]["heldout"][target][0])
    note = (
        f"Exact-match accuracy; searched rows: mean over seeds {seeds} with (min-max); fixed rows do not depend "
        f"on the seed. Held-out 95% interval: bootstrap over the {n_items} held-out items of {target} (seeds "
        "averaged first). Distinct candidates: DFS paths (hop sequences) or PS recipes the search scored. "
        f"Total wall time {report['wall_seconds']:.0f} s."
    )
    diff_lines = [
        "",
        f"Differences on held-out {target} (paired bootstrap over items, 95%):",
        "",
        "| comparison | difference | 95% interval | beyond the interval? |",
        "|---|---|---|---|",
    ]
    for name, diff in comparisons(rows, target):
        word = "yes" if resolved(diff) else "no (not resolved)"
        diff_lines.append(
            f"| {name} | {diff['difference']:+.3f} | [{diff['low']:+.3f}, {diff['high']:+.3f}] | {word} |"
        )
    return "\n".join(lines) + "\n\n" + note + "\n" + "\n".join(diff_lines) + "\n"


def verdict(rows: list[dict[str, Any]], target: str) -> str:
    ours = [r for r in rows if r["name"].startswith("Ours")]
    others = [r for r in rows if not r["name"].startswith("Ours")]
    best_other = max(others, key=lambda r: _mean(r["heldout"][target]))
    best_value = _mean(best_other["heldout"][target])
    lines = []
    for row in ours:
        value = _mean(row["heldout"][target])
        diff = difference(row, best_other, target)
        if value <= best_value:
            word = "does NOT beat"
        elif resolved(diff):
            word = "beats"
        else:
            word = "is above (within the 95% interval, not resolved)"
        lines.append(
            f"{row['name']} {word} every source and baseline on held-out {target}: {value:.3f} vs best other "
            f"{best_value:.3f} ({best_other['name']}); difference {diff['difference']:+.3f}, 95% interval "
            f"[{diff['low']:+.3f}, {diff['high']:+.3f}]"
        )
    return "\n".join(lines)
