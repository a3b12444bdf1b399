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

from mergekit_evolve.config import parse_config
from mergekit_evolve.search.rundir import atomic_write

DEFAULT_EVALS = {"ps": 300, "dfs": 300, "ps+dfs": 200}


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
    return config


def evaluate_all(model, fitness_all) -> dict[str, dict[str, float]]:
    return {"fitness": fitness_all.score(model, "fitness"), "heldout": fitness_all.score(model, "heldout")}


def baseline_rows(zoo, fitness_all, dtype: str = "float32") -> list[dict[str, Any]]:
    """Each source, the uniform merge and untuned DARE-TIES (mergekit's usual density 0.5)."""
    import transformers

    from mergekit_evolve.merge import InMemoryMerger
    from mergekit_evolve.recipe.ps import to_merge_config

    rows = []
    for name in [zoo.base, *zoo.experts]:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(zoo.models[name]), dtype="float32")
        rows.append({"name": f"source: {name}", **evaluate_all(model.eval(), fitness_all)})
    experts = [str(zoo.models[n]) for n in zoo.experts]
    base = str(zoo.models[zoo.base])
    recipes = {
        "uniform merge (linear)": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts],
            "dtype": dtype,
        },
        "DARE-TIES untuned": {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in experts],
            "parameters": {"normalize": True, "int8_mask": True},
            "dtype": dtype,
        },
    }
    for name, recipe in recipes.items():
        merger = InMemoryMerger(to_merge_config(recipe), device="cpu", dtype=dtype, random_seed=0)
        rows.append({"name": name, **evaluate_all(merger.merge(to_merge_config(recipe)), fitness_all), "recipe": recipe})
    return rows


def run_demo(out: Path, *, space: str = "ps", max_evals: int | None = None, seed: int = 0, device: str = "auto",
             progress: bool = True) -> list[dict[str, Any]]:
    from mergekit_evolve.fitness import Fitness, FitnessConfig
    from mergekit_evolve.search import runner
    from mergekit_evolve.search.problems import load_tokenizer
    from mergekit_evolve.zoo import build_zoo

    out = Path(out).absolute()
    started = time.time()
    zoo = build_zoo(seed=0)
    tokenizer = load_tokenizer(str(zoo.models[zoo.base]))
    fitness_all = Fitness(
        FitnessConfig(
            tasks=[
                {"name": t.name, "data": str(t.fitness), "heldout": str(t.heldout), "max_new_tokens": t.max_new_tokens}
                for t in zoo.tasks.values()
            ],
            batch_size=64,
        ),
        tokenizer,
    )
    rows = baseline_rows(zoo, fitness_all)
    spaces = ["ps", "dfs", "ps+dfs"] if space == "all" else [space]
    for sp in spaces:
        budget = max_evals or DEFAULT_EVALS.get(sp, 120)
        config = parse_config(demo_config(zoo, sp, budget, seed))
        run_dir = out / sp.replace("+", "_")
        t0 = time.time()
        summary = runner.start(config, run_dir, device=device, force=True, save_model=True, progress=progress)
        model = _load_best(run_dir, sp)
        label = {"ps": "Ours PS", "dfs": "Ours DFS", "ps+dfs": "Ours PS+DFS"}[sp]
        rows.append(
            {
                "name": label,
                **evaluate_all(model, fitness_all),
                "evaluations": summary["evaluations"],
                "wall_seconds": round(time.time() - t0, 1),
                "run_dir": str(run_dir),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(rows, indent=2) + "\n")
    final_best = out / spaces[-1].replace("+", "_") / "best.yaml"
    if final_best.exists():
        atomic_write(out / "best.yaml", final_best.read_text())
    click.echo(format_table(rows, zoo))
    click.echo(verdict(rows, zoo.target))
    click.echo(f"demo finished in {time.time() - started:.0f} s; results in {out / 'results.json'}, recipe in {out / 'best.yaml'}")
    return rows


def _load_best(run_dir: Path, space: str):
    """The winner as saved on disk (what users get), loaded with plain transformers when possible."""
    import transformers

    model_dir = run_dir / "dfs" / "model" if space == "ps+dfs" else run_dir / "model"
    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32", trust_remote_code=False).eval()


def format_table(rows: list[dict[str, Any]], zoo) -> str:
    tasks = [zoo.target, *[t for t in zoo.tasks if t != zoo.target]]
    header = f"{'model':26s} {'target(fit)':>11s} " + " ".join(f"{t + '(ho)':>14s}" for t in tasks)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = " ".join(f"{row['heldout'].get(t, float('nan')):14.3f}" for t in tasks)
        lines.append(f"{row['name']:26s} {row['fitness'].get(zoo.target, float('nan')):11.3f} {cells}")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]], target: str) -> str:
    ours = [r for r in rows if r["name"].startswith("Ours")]
    others = [r for r in rows if not r["name"].startswith("Ours")]
    best_other = max(others, key=lambda r: r["heldout"][target])
    lines = []
    for row in ours:
        gap = row["heldout"][target] - best_other["heldout"][target]
        word = "beats" if gap > 0 else "does NOT beat"
        lines.append(
            f"{row['name']} {word} every source and baseline on held-out {target}: "
            f"{row['heldout'][target]:.3f} vs best other {best_other['heldout'][target]:.3f} ({best_other['name']})"
        )
    return "\n".join(lines)
