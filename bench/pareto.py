"""Trade-offs as a result: the held-out front of COMO-CMA-ES, NSGA-II and five weighted-sum CMA-ES runs.

On the zoo's PS problem (the demo's recipe space: DARE-TIES over the script and math experts), objectives
(script_math, script), one run per method and seed at an equal budget of evaluations: COMO-CMA-ES and
NSGA-II spend ``--budget`` each; the weighted sum spends it over five CMA-ES runs (``--budget / 5`` each)
with fitness weights script_math : script = 0.05:0.95, 0.25:0.75, 0.5:0.5, 0.75:0.25, 0.95:0.05.

Each method's front: the non-dominated candidates (fitness split) of everything it evaluated (for the
weighted sum: the union of its five runs). Every front point is then scored on the held-out split (script_math
155 items, script 150) and the held-out hypervolume (reference: score 0 on both) is that of those scores.
Intervals: 95% bootstrap over the held-out items (the same resample for every method: paired), seeds averaged.

    python bench/pareto.py --seeds 3 --budget 480 --json bench/out/pareto.json --plot docs/pareto_front.png \
        --results docs/RESULTS.md

Finished runs in ``--work`` are reused (same config), so an interrupted benchmark continues. ``--results``
writes the table into its own section of docs/RESULTS.md (``--render-only``: from the JSON, no runs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from runs import finished_run, write_section

from mergekit_evolve.config import parse_config
from mergekit_evolve.demo import demo_config
from mergekit_evolve.search.objectives import Objectives, nondominated, pareto_front
from mergekit_evolve.search.rundir import RunDir
from mergekit_evolve.zoo import build_zoo

OBJECTIVES = ("script_math", "script")
WEIGHTS = (0.05, 0.25, 0.5, 0.75, 0.95)  # script_math's share of the weighted sum
BOOTSTRAP = 2000


def config_for(zoo, seed: int, budget: int, kind: str, weight: float | None = None) -> dict:
    config = demo_config(zoo, "ps", budget, seed)
    tasks = config["fitness"]["tasks"]
    script = zoo.tasks["script"]
    tasks.append({"name": "script", "data": str(script.fitness), "heldout": str(script.heldout), "max_new_tokens": 8})
    if weight is None:
        config["optimizer"].update({"objectives": list(OBJECTIVES), "kind": kind})
    else:
        tasks[0]["weight"], tasks[1]["weight"] = weight, 1.0 - weight
    return config


def method_runs(zoo, work: Path, seed: int, budget: int) -> dict[str, list[Path]]:
    runs = {
        "COMO-CMA-ES": [finished_run(config_for(zoo, seed, budget, "como-cmaes"), work / f"como-seed{seed}")],
        "NSGA-II": [finished_run(config_for(zoo, seed, budget, "nsga2"), work / f"nsga2-seed{seed}")],
    }
    share = budget // len(WEIGHTS)
    runs["weighted sum (5 CMA-ES)"] = [
        finished_run(config_for(zoo, seed, share, "cmaes", w), work / f"ws{w}-seed{seed}") for w in WEIGHTS
    ]
    return runs


def front_genomes(run_dirs: list[Path], objectives: Objectives) -> list[tuple[list[float], dict]]:
    """The non-dominated candidates of every evaluation of these runs (fitness split): (genome, values)."""
    records = [r for d in run_dirs for r in RunDir(d).read_evaluations()]
    # indices restart per run: renumber so pareto_front's "first scored" is well defined
    records = [r.model_copy(update={"index": i}) for i, r in enumerate(records)]
    return [(r.genome, objectives.values(r.scores, r.generated)) for r in pareto_front(records, objectives)]


def heldout_items(problem, fitness, genome) -> dict[str, np.ndarray]:
    results = fitness.evaluate(problem.build(problem.decode(np.asarray(genome))), "heldout")
    return {name: np.array(results[name].correct, dtype=np.float64) for name in OBJECTIVES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=360)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/out/pareto.json"))
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None, help="write the table into this markdown file")
    parser.add_argument("--render-only", action="store_true", help="only rewrite --results from --json")
    args = parser.parse_args()
    if args.render_only:
        write_section(args.results, "pareto", markdown(json.loads(args.json.read_text())))
        return
    import torch

    torch.set_num_threads(2)
    from mergekit_evolve.fitness.factory import make_fitness
    from mergekit_evolve.search.problems import make_problem

    zoo = build_zoo()
    work = args.work or Path(tempfile.mkdtemp(prefix="pareto-bench-"))
    started = time.time()
    base = parse_config(config_for(zoo, 0, args.budget, "como-cmaes"))
    objectives = Objectives.of(base)
    problem = make_problem(base, "cpu")
    fitness = make_fitness(base, problem.tokenizer, problem.tokenizer_ref, False)

    items: dict[str, list[list[dict[str, np.ndarray]]]] = {}  # method -> seed -> front point -> task items
    fronts: dict[str, list[list[dict]]] = {}
    walls: dict[str, float] = {}
    for seed in range(args.seeds):
        t0 = time.time()
        for method, dirs in method_runs(zoo, work, seed, args.budget).items():
            points = front_genomes(dirs, objectives)
            items.setdefault(method, []).append([heldout_items(problem, fitness, g) for g, _ in points])
            fronts.setdefault(method, []).append([v for _, v in points])
            walls[method] = walls.get(method, 0.0) + sum(
                json.loads((d / "summary.json").read_text())["wall_seconds"] for d in dirs
            )
        print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)

    rng = np.random.default_rng(0)
    n_items = {name: len(items["NSGA-II"][0][0][name]) for name in OBJECTIVES}
    draws = [{name: rng.integers(0, n, n) for name, n in n_items.items()} for _ in range(BOOTSTRAP)]

    def seed_mean_hv(method: str, draw: dict | None) -> float:
        values = []
        for seed_points in items[method]:
            pts = [{n: float(p[n][draw[n]].mean() if draw else p[n].mean()) for n in OBJECTIVES} for p in seed_points]
            values.append(objectives.hypervolume(pts))
        return float(np.mean(values))

    rows = {}
    boot = {method: np.array([seed_mean_hv(method, d) for d in draws]) for method in items}
    for method in items:
        per_seed = []
        for seed_points in items[method]:
            pts = [{n: float(p[n].mean()) for n in OBJECTIVES} for p in seed_points]
            per_seed.append(objectives.hypervolume(pts))
        fitness_hv = [objectives.hypervolume(f) for f in fronts[method]]
        rows[method] = {
            "heldout_hv": float(np.mean(per_seed)),
            "heldout_hv_per_seed": per_seed,
            "interval": [float(np.percentile(boot[method], 2.5)), float(np.percentile(boot[method], 97.5))],
            "fitness_hv": float(np.mean(fitness_hv)),
            "front_points": float(np.mean([len(f) for f in fronts[method]])),
            "wall_seconds": walls[method],
        }
    ws = "weighted sum (5 CMA-ES)"
    differences = {}
    for method in ("COMO-CMA-ES", "NSGA-II"):
        diff = boot[method] - boot[ws]
        differences[f"{method} - {ws}"] = {
            "difference": rows[method]["heldout_hv"] - rows[ws]["heldout_hv"],
            "interval": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
        }
    dominance = _dominance(items, objectives)
    result = {
        "budget": args.budget,
        "seeds": args.seeds,
        "objectives": list(OBJECTIVES),
        "rows": rows,
        "differences": differences,
        "dominance": dominance,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.plot:
        _plot(items, args.plot)
    if args.results:
        write_section(args.results, "pareto", markdown(result))


def markdown(result: dict) -> str:
    """The RESULTS.md section: held-out hypervolume per method with intervals, the paired differences."""
    lines = [
        "## Trade-offs: held-out fronts of COMO-CMA-ES, NSGA-II and a weighted sum (issue #34)",
        "",
        f"Generated by `python bench/pareto.py --seeds {result['seeds']} --budget {result['budget']} --results "
        "docs/RESULTS.md` on the zoo's PS problem (the demo's DARE-TIES space), objectives (script_math, script), "
        f"{result['budget']} evaluations per method and seed (the weighted sum: five CMA-ES runs of "
        f"{result['budget'] // len(WEIGHTS)}, script_math weights {', '.join(map(str, WEIGHTS))}). A method's front: "
        "the non-dominated candidates on the fitness split of everything it evaluated, then scored on held-out "
        "(script_math 155 items, script 150). Hypervolume reference: score 0 on both. Interval: 95% bootstrap "
        "over held-out items (paired across methods), seeds averaged.",
        "",
        "| method | held-out hypervolume | 95% interval | per seed | fitness-split hypervolume | front points "
        "| wall s (all seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in result["rows"].items():
        per_seed = ", ".join(f"{v:.3f}" for v in row["heldout_hv_per_seed"])
        lines.append(
            f"| {method} | {row['heldout_hv']:.3f} | [{row['interval'][0]:.3f}, {row['interval'][1]:.3f}] | "
            f"{per_seed} | {row['fitness_hv']:.3f} | {row['front_points']:.1f} | {row['wall_seconds']:.0f} |"
        )
    lines += [
        "",
        "| comparison (held-out hypervolume) | difference | 95% interval | beyond the interval? |",
        "|---|---|---|---|",
    ]
    for name, d in result["differences"].items():
        lo, hi = d["interval"]
        beyond = "yes" if lo > 0 or hi < 0 else "no (not resolved)"
        lines.append(f"| {name} | {d['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {beyond} |")
    lines += [
        "",
        "Held-out front points of the weighted-sum union that each method's front dominates or equals, per seed:",
        "",
    ]
    for method, counts in result["dominance"].items():
        text = "; ".join(f"{c['covered_by_method']} of {c['ws_front_points']}" for c in counts)
        lines.append(f"- {method}: {text}")
    lines += ["", "![Held-out fronts, seed 0](pareto_front.png)", ""]
    return "\n".join(lines)


def _dominance(items, objectives: Objectives) -> dict:
    """Per seed: how many of the weighted-sum union's held-out front points each multi-objective front
    dominates or equals (held-out scores), and how many of its own points the union dominates."""
    ws = "weighted sum (5 CMA-ES)"
    out = {}
    for method in ("COMO-CMA-ES", "NSGA-II"):
        counts = []
        for mine, theirs in zip(items[method], items[ws]):
            a = [objectives.to_losses({n: p[n].mean() for n in OBJECTIVES}) for p in mine]
            b = [objectives.to_losses({n: p[n].mean() for n in OBJECTIVES}) for p in theirs]
            b_front = [b[i] for i in nondominated(b)]
            covered = sum(any(all(x <= y for x, y in zip(p, q)) for p in a) for q in b_front)
            counts.append({"ws_front_points": len(b_front), "covered_by_method": covered})
        out[method] = counts
    return out


def _plot(items, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.0), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    styles = {"COMO-CMA-ES": "o-", "NSGA-II": "s-", "weighted sum (5 CMA-ES)": "^--"}
    for method, seeds in items.items():
        pts = sorted((p["script_math"].mean(), p["script"].mean()) for p in seeds[0])
        front = [pts[i] for i in nondominated([[-x, -y] for x, y in pts])]
        front.sort()
        ax.plot([x for x, _ in front], [y for _, y in front], styles[method], label=method)
    ax.set_xlabel("script_math held-out accuracy")
    ax.set_ylabel("script held-out accuracy")
    ax.set_title("Held-out fronts on the zoo (seed 0, equal budgets)")
    ax.legend(loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
