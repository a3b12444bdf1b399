"""Time to quality: what each ``optimizer.economy`` mode spends, and the held-out score it ends with.

For today's default (``off``) and each mode, on the zoo's PS and DFS problems (the demo's configs,
``mergekit_evolve.demo.demo_config``; 300 evaluations each unless ``--max-evals``), one run per seed:
forward tokens, evaluations and wall time until the run's final best was found (for subsampling
modes the final best is known only after the finalists' full scoring, so that is the whole run),
the whole run's totals, and the final best's held-out score on the target (155 facts, never seen by
selection). The JSON has one row per (mode, space, seed).

Held-out differences (mode - off) come with a 95% bootstrap interval that resamples both the seeds
and the held-out items (paired: the same items and seeds for both). The done-when test: on PS, a mode
whose whole run spends <= 1/5 of off's tokens and whose held-out is not significantly lower (the
interval's upper end >= 0).

    python bench/time_to_quality.py --seeds 3 --json bench/out/time_to_quality.json [--work DIR]

Finished runs in ``--work`` (same config) are reused, so an interrupted benchmark continues, and
several processes (e.g. ``--spaces ps`` and ``--spaces dfs``) can fill one ``--work`` folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mergekit_evolve import runner
from mergekit_evolve.config import load_config, parse_config
from mergekit_evolve.demo import demo_config
from mergekit_evolve.zoo import build_zoo

MODES = ("off", "stop", "subsample", "auto")
BOOTSTRAP = 10_000


def run_one(zoo, work: Path, mode: str, space: str, seed: int, max_evals: int) -> tuple[Path, bool]:
    config_dict = demo_config(zoo, space, max_evals, seed)
    config_dict["optimizer"]["economy"] = mode
    config = parse_config(config_dict)
    out = work / f"{mode}-{space}-seed{seed}"
    done = (out / "summary.json").exists() and load_config(out / "config.yaml").model_dump() == config.model_dump()
    if not done:
        runner.start(config, out, device="cpu", force=True, progress=False)
    return out, done


def heldout_items(zoo, run_dir: Path) -> list[bool]:
    """Per held-out fact: did the saved best model answer it?"""
    import transformers

    from mergekit_evolve.fitness import Fitness

    config = load_config(run_dir / "config.yaml")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(run_dir / "model"), dtype="float32").eval()
    fitness = Fitness(config.fitness, _tokenizer(zoo))
    return fitness.evaluate(model, "heldout")[zoo.target].correct


def _tokenizer(zoo):
    from mergekit_evolve.resources import load_tokenizer

    return load_tokenizer(str(zoo.models[zoo.base]))


def measure(zoo, run_dir: Path, mode: str, space: str, seed: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    rescored_path = run_dir / "rescored.jsonl"
    rescored = [json.loads(line) for line in rescored_path.read_text().splitlines()] if rescored_path.exists() else []
    records.sort(key=lambda r: r["index"])
    start = records[0]["time"]
    best_index = summary["best"]["index"]
    tokens_total = sum(r.get("tokens") or 0 for r in records + rescored)  # = summary["tokens"]
    if rescored:  # the best is known after the finalists' full scores: the whole run
        tokens_to_best = tokens_total
        evals_to_best = len(records) + len(rescored)
        last = max(rescored, key=lambda r: r["time"])
    else:
        upto = [r for r in records if r["index"] <= best_index]
        tokens_to_best, evals_to_best = sum(r.get("tokens") or 0 for r in upto), len(upto)
        last = next(r for r in records if r["index"] == best_index)
    items = heldout_items(zoo, run_dir)
    return {
        "mode": mode,
        "space": space,
        "seed": seed,
        "tokens": int(tokens_to_best),
        "evaluations": evals_to_best,
        "wall_seconds": round(last["time"] + last["seconds"] - start, 1),
        "tokens_total": tokens_total,
        "evaluations_total": len(records) + len(rescored),
        "wall_seconds_total": summary["wall_seconds"],
        "heldout": sum(items) / len(items),
        "heldout_items": "".join("1" if c else "0" for c in items),
        "fitness": summary["best"]["fitness"],
        "fitness_source": summary.get("fitness_source"),
        "stop_reason": summary.get("stop_reason") or "max_evals",
    }


def bootstrap_difference(rows: list[dict], mode: str, space: str, rng: np.random.Generator) -> dict | None:
    """Mean held-out difference (mode - off) and its 95% interval, resampling seeds and items."""
    pairs = {}
    for row in rows:
        if row["space"] == space and row["mode"] in (mode, "off"):
            pairs.setdefault(row["seed"], {})[row["mode"]] = np.array([c == "1" for c in row["heldout_items"]], float)
    seeds = sorted(s for s, p in pairs.items() if len(p) == 2)
    if not seeds:
        return None
    diff = np.stack([pairs[s][mode] - pairs[s]["off"] for s in seeds])  # seeds x items
    n_seeds, n_items = diff.shape
    seed_draws = rng.integers(0, n_seeds, (BOOTSTRAP, n_seeds))
    item_draws = rng.integers(0, n_items, (BOOTSTRAP, n_items))
    means = np.array([diff[s][:, i].mean() for s, i in zip(seed_draws, item_draws)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "lo": float(lo), "hi": float(hi), "seeds": seeds}


def report(rows: list[dict], modes, spaces) -> list[str]:
    rng = np.random.default_rng(0)
    lines = [
        "| space | mode | tokens to best | evals to best | wall s to best | tokens (whole run) | evals (whole run) "
        "| tokens vs off | held-out (mean, min-max) | held-out - off [95% CI] | stop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for space in spaces:
        off = [r for r in rows if r["space"] == space and r["mode"] == "off"]
        off_tokens = np.mean([r["tokens_total"] for r in off]) if off else float("nan")
        for mode in modes:
            group = [r for r in rows if r["space"] == space and r["mode"] == mode]
            if not group:
                continue
            mean = lambda key, group=group: float(np.mean([r[key] for r in group]))  # noqa: E731
            ratio = off_tokens / mean("tokens_total")
            held = [r["heldout"] for r in group]
            diff = bootstrap_difference(rows, mode, space, rng) if mode != "off" else None
            diff_cell = f"{diff['mean']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]" if diff else "-"
            stopped = [r for r in group if (r["stop_reason"] or "max_evals") != "max_evals"]
            reasons = f"{len(stopped)} of {len(group)} stopped early" if stopped else "max_evals"
            lines.append(
                f"| {space} | {mode} | {mean('tokens'):,.0f} | {mean('evaluations'):.0f} | {mean('wall_seconds'):.0f} "
                f"| {mean('tokens_total'):,.0f} | {mean('evaluations_total'):.0f} | 1/{ratio:.1f} "
                f"| {np.mean(held):.3f} ({min(held):.3f}-{max(held):.3f}) | {diff_cell} | {reasons} |"
            )
            if diff and space == "ps":
                ok = ratio >= 5 and diff["hi"] >= 0
                verdicts.append(
                    f"PS {mode}: whole run spends 1/{ratio:.1f} of off's tokens; held-out difference "
                    f"{diff['mean']:+.3f}, "
                    f"95% bootstrap interval [{diff['lo']:+.3f}, {diff['hi']:+.3f}] (seeds {diff['seeds']}, items "
                    "resampled): "
                    + ("MEETS" if ok else "does NOT meet")
                    + " the target (<= 1/5 tokens, interval reaching 0)"
                )
    return lines + [""] + verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--spaces", default="ps,dfs")
    parser.add_argument("--max-evals", type=int, default=300)
    parser.add_argument("--work", type=Path, help="run directories (kept and reused); default: a temporary folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes, spaces = args.modes.split(","), args.spaces.split(",")
    zoo = build_zoo(seed=0)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows, reused = [], 0
        for space in spaces:
            for mode in modes:
                for seed in range(args.seeds):
                    run_dir, done = run_one(zoo, work, mode, space, seed, args.max_evals)
                    reused += done
                    rows.append(measure(zoo, run_dir, mode, space, seed))
                    r = rows[-1]
                    print(
                        f"{space} {mode:9s} seed {seed}: tokens {r['tokens_total']:,} (to best {r['tokens']:,}), "
                        f"evaluations {r['evaluations_total']}, held-out {r['heldout']:.3f}, {r['stop_reason']}",
                        flush=True,
                    )
    print(
        f"\n{args.max_evals} evaluations per run (demo budget), seeds 0-{args.seeds - 1}; "
        f"{time.time() - started:.0f} s "
        f"({reused} of {len(rows)} runs found finished in --work and reused)\n"
    )
    print("\n".join(report(rows, modes, spaces)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
