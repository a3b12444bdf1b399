"""M2N2 vs CMA-ES PS on the zoo at equal budgets: held-out script_math of each run's best, and what the archive keeps.

For each seed: CMA-ES PS is the demo's PS search (DARE-TIES over the script and math experts with the base,
embeddings tuned, ``--budget`` evaluations); M2N2 (``optimizer.kind: m2n2``, archive 15, one child per step)
breeds linear recipes over the two experts (layer groups of one layer, embeddings their own place) with the
same budget. Both select on the target's fitness split (script_math, 100 rows) only.

Reported: each run's best (by fitness) on held-out script_math (155 items), with a 95% bootstrap interval over
items (seeds averaged) and the paired difference M2N2 - CMA-ES; and for M2N2's final archive, the best held-out
score any member reaches on script and on math next to the sources' (does the archive keep specialists?), and
the best member's own script and math.

    python bench/m2n2.py --seeds 3 --budget 308 --json bench/out/m2n2.json --results docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from runs import finished_run, write_section

from mergekit_evolve.config import load_config
from mergekit_evolve.demo import _fitness_of_every_task, demo_config
from mergekit_evolve.search.problems import make_problem
from mergekit_evolve.search.rundir import RunDir
from mergekit_evolve.zoo import build_zoo

BOOTSTRAP = 10_000


def configs(zoo, seed: int, budget: int) -> dict[str, dict]:
    cmaes = demo_config(zoo, "ps", budget, seed)
    m2n2 = demo_config(zoo, "ps", budget, seed)
    m2n2["genome"] = {
        "models": [str(zoo.models[name]) for name in zoo.experts],
        "merge_method": "linear",
        "layer_granularity": 1,
        "tune_embeddings": True,
    }
    m2n2["optimizer"]["kind"] = "m2n2"
    return {"CMA-ES PS": cmaes, "M2N2": m2n2}


def heldout(problem, fitness_all, genome) -> dict[str, np.ndarray]:
    results = fitness_all.evaluate(problem.build(problem.decode(np.asarray(genome))), "heldout")
    return {name: np.array(r.correct, dtype=np.float64) for name, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=308)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/out/m2n2.json"))
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.render_only:
        write_section(args.results, "m2n2", markdown(json.loads(args.json.read_text())))
        return
    import torch

    torch.set_num_threads(2)
    import transformers

    zoo = build_zoo()
    work = args.work or Path(tempfile.mkdtemp(prefix="m2n2-bench-"))
    fitness_all = _fitness_of_every_task(zoo)
    started = time.time()
    best_items: dict[str, list[np.ndarray]] = {}
    per_seed: dict[str, list[dict]] = {}
    archive_rows = []
    for seed in range(args.seeds):
        for method, config_dict in configs(zoo, seed, args.budget).items():
            out = finished_run(config_dict, work / f"{method.split()[0].lower()}-seed{seed}")
            summary = json.loads((out / "summary.json").read_text())
            problem = make_problem(load_config(out / "config.yaml"), "cpu")
            items = heldout(problem, fitness_all, summary["best"]["genome"])
            best_items.setdefault(method, []).append(items["script_math"])
            per_seed.setdefault(method, []).append(
                {
                    "seed": seed,
                    "fitness": summary["best"]["fitness"],
                    "heldout": {k: float(v.mean()) for k, v in items.items()},
                    "wall_seconds": summary["wall_seconds"],
                }
            )
            if method == "M2N2":
                archive = RunDir(out).read_archive()
                members = [heldout(problem, fitness_all, m.genome) for m in archive.members]
                best_member = max(archive.members, key=lambda m: (m.fitness, -m.index))
                best_scores = members[archive.members.index(best_member)]
                archive_rows.append(
                    {
                        "seed": seed,
                        "members": len(members),
                        "max_script": max(float(m["script"].mean()) for m in members),
                        "max_math": max(float(m["math"].mean()) for m in members),
                        "max_script_math": max(float(m["script_math"].mean()) for m in members),
                        "best_member_script": float(best_scores["script"].mean()),
                        "best_member_math": float(best_scores["math"].mean()),
                        "covered_fitness": archive.covered,
                    }
                )
        print(f"seed {seed} done at {time.time() - started:.0f} s", flush=True)
    sources = {}
    for name in zoo.experts:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(zoo.models[name]), dtype=torch.float32)
        sources[name] = {t: r.score for t, r in fitness_all.evaluate(model.eval(), "heldout").items()}

    rng = np.random.default_rng(0)
    n = len(best_items["M2N2"][0])
    draws = rng.integers(0, n, (BOOTSTRAP, n))
    means = {m: np.mean([v[draws].mean(axis=1) for v in seeds], axis=0) for m, seeds in best_items.items()}
    rows = {
        m: {
            "heldout_script_math": float(np.mean([v.mean() for v in seeds])),
            "interval": [float(np.percentile(means[m], 2.5)), float(np.percentile(means[m], 97.5))],
            "per_seed": per_seed[m],
        }
        for m, seeds in best_items.items()
    }
    diff = means["M2N2"] - means["CMA-ES PS"]
    result = {
        "budget": args.budget,
        "seeds": args.seeds,
        "rows": rows,
        "difference": {
            "value": rows["M2N2"]["heldout_script_math"] - rows["CMA-ES PS"]["heldout_script_math"],
            "interval": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
        },
        "archive": archive_rows,
        "sources": sources,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.results:
        write_section(args.results, "m2n2", markdown(result))


def markdown(result: dict) -> str:
    rows, d = result["rows"], result["difference"]
    lines = [
        "## M2N2 vs CMA-ES PS at equal budgets (issue #35)",
        "",
        f"Generated by `python bench/m2n2.py --seeds {result['seeds']} --budget {result['budget']} --results "
        "docs/RESULTS.md` on the zoo: CMA-ES PS is the demo's PS search (DARE-TIES over the script and math "
        "experts with the base, embeddings tuned); M2N2 breeds linear recipes over the two experts (archive 15, "
        "one child per step, split points between layers). Both select on script_math's fitness split only, "
        f"{result['budget']} evaluations per run. Held-out script_math: 155 items; interval: 95% bootstrap over "
        "items, seeds averaged.",
        "",
        "| method | best's held-out script_math | 95% interval | per seed | best's fitness per seed | wall s per run |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in rows.items():
        seeds = row["per_seed"]
        heldouts = ", ".join(f"{s['heldout']['script_math']:.3f}" for s in seeds)
        fitnesses = ", ".join(f"{s['fitness']:.2f}" for s in seeds)
        lines.append(
            f"| {method} | {row['heldout_script_math']:.3f} | [{row['interval'][0]:.3f}, {row['interval'][1]:.3f}] "
            f"| {heldouts} | {fitnesses} | {np.mean([s['wall_seconds'] for s in seeds]):.0f} |"
        )
    lo, hi = d["interval"]
    beyond = "yes" if lo > 0 or hi < 0 else "no (not resolved)"
    lines += [
        "",
        f"M2N2 - CMA-ES PS on held-out script_math: {d['value']:+.3f}, 95% interval [{lo:+.3f}, {hi:+.3f}] "
        f"(beyond the interval: {beyond}).",
        "",
        "What M2N2's final archive keeps (held-out; the sources: "
        + ", ".join(f"{n} script {s['script']:.3f} / math {s['math']:.3f}" for n, s in result["sources"].items())
        + "):",
        "",
        "| seed | members | best member: script | best member: math | any member, max script | any member, max math "
        "| any member, max script_math | fitness rows the archive answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in result["archive"]:
        covered = ", ".join(f"{t} {v}" for t, v in a["covered_fitness"].items())
        lines.append(
            f"| {a['seed']} | {a['members']} | {a['best_member_script']:.3f} | {a['best_member_math']:.3f} | "
            f"{a['max_script']:.3f} | {a['max_math']:.3f} | {a['max_script_math']:.3f} | {covered} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
