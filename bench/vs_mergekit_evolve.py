"""Side by side with the real mergekit-evolve: one config in its format, the same zoo models and budget.

Three runs, each a fresh process timed from outside, on the same rows (the zoo's script_math
fitness rows, 8 new tokens):
  * ``mergekit-evo run`` with the config's lm-eval task (a local generate_until task over the rows);
  * ``mergekit-evo run`` with the built-in ``generate`` evaluator on the same rows, same seed;
  * mergekit-evolve 0.1.5 itself (``bench/mergekit_evolve_cpu.py``: its CPU patches applied at run
    time), when it can run here; otherwise the report says why not.
Start-up (process start to the first candidate) is reported apart from the steady per-candidate
time; evaluations per hour are given both ways. mergekit-evolve does not seed CMA-ES, so its search
path differs: compare its best fitness at equal evaluations as a sanity check, not as a race.

    python bench/vs_mergekit_evolve.py [--max-evals 50] [--limit 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def write_inputs(root: Path, limit: int) -> dict[str, Path]:
    from mergekit_evolve.zoo import build_zoo

    zoo = build_zoo()
    rows = zoo.tasks[zoo.target].fitness
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "zoo_script_math.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "zoo_script_math",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(rows)}},
                "test_split": "test",
                "output_type": "generate_until",
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    genome = {
        "models": [str(zoo.models[m]) for m in zoo.experts],
        "merge_method": "dare_ties",
        "base_model": str(zoo.models[zoo.base]),
        "layer_granularity": 2,
    }
    evolve = {
        "genome": genome,
        "tasks": [{"name": "zoo_script_math", "metric": "exact_match,none"}],
        "limit": limit,
        "apply_chat_template": False,
        "fewshot_as_multiturn": False,
    }
    builtin = {
        "genome": genome,
        "fitness": {
            "tasks": [{"name": "script_math", "data": str(rows), "limit": limit, "max_new_tokens": 8, "stop": ["\n"]}],
            "batch_size": 32,
        },
    }
    paths = {
        "tasks": tasks,
        "evolve": root / "evolve.yaml",
        "ours_lm_eval": root / "ours_lm_eval.yaml",
        "ours_builtin": root / "ours_builtin.yaml",
    }
    paths["evolve"].write_text(yaml.safe_dump(evolve))  # exactly what mergekit-evolve is given
    paths["ours_lm_eval"].write_text(yaml.safe_dump({**evolve, "task_search_path": [str(tasks)]}))
    paths["ours_builtin"].write_text(yaml.safe_dump(builtin))
    return paths


def run_ours(config: Path, out: Path, max_evals: int, seed: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [
        sys.executable,
        "-m",
        "mergekit_evolve.cli",
        "run",
        str(config),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        "--no-save-model",
        "--max-evals",
        str(max_evals),
        "--seed",
        str(seed),
    ]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.time() - started
    if done.returncode:
        raise RuntimeError(f"mergekit-evo run failed: {done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    records.sort(key=lambda r: r["index"])
    first = min(r["time"] for r in records)
    span = max(r["time"] + r["seconds"] for r in records) - first
    return _figures(
        wall,
        first - started,
        span,
        [r["fitness"] for r in records],
        stderr=done.stderr,
        merge_s=sum(r.get("merge_seconds", 0.0) for r in records) / len(records),
    )


def run_peer(paths: dict[str, Path], storage: Path, max_evals: int, seed: int) -> dict:
    log = storage.parent / "peer_log.jsonl"
    command = [
        sys.executable,
        str(HERE / "mergekit_evolve_cpu.py"),
        str(log),
        str(paths["evolve"]),
        "--storage-path",
        str(storage),
        "--max-fevals",
        str(max_evals - 1),
        "--num-gpus",
        "1",
        "--no-merge-cuda",
        "--task-search-path",
        str(paths["tasks"]),
        "--batch-size",
        "32",
        "--no-save-final-model",
        "--random-seed",
        str(seed),
    ]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=storage.parent)
    wall = time.time() - started
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    evals = [e for e in lines if "score" in e]
    if done.returncode or not evals:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    # Its pool returns a generation at once: the steady rate comes from the generations after the first.
    first_gen = sum(1 for e in evals if e["time"] == evals[0]["time"])
    per_candidate = (evals[-1]["time"] - evals[0]["time"]) / max(len(evals) - first_gen, 1)
    startup = evals[0]["time"] - lines[0]["process_start"] - first_gen * per_candidate
    return _figures(wall, startup, per_candidate * len(evals), [e["score"] for e in evals])


def interleaved_fitness(paths: dict[str, Path], repeats: int) -> dict:
    """Scoring time alone (no merge), lm-eval task vs built-in evaluator, on one model in one process,
    alternating: robust to a shared machine whose load changes between whole runs."""
    import statistics

    import transformers

    from mergekit_evolve.config import load_config
    from mergekit_evolve.fitness.factory import make_fitness
    from mergekit_evolve.zoo import build_zoo

    model_path = build_zoo().models["math"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype="float32").eval()
    fitness = {name: make_fitness(load_config(paths[name]), tokenizer) for name in ("ours_lm_eval", "ours_builtin")}
    seconds: dict[str, list[float]] = {name: [] for name in fitness}
    scores = {name: f.score(model) for name, f in fitness.items()}  # also warms both paths
    for _ in range(repeats):
        for name, f in fitness.items():
            started = time.perf_counter()
            f.evaluate(model)
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "median_s": medians,
        "ratio": medians["ours_lm_eval"] / medians["ours_builtin"],
        "scores": {name: list(v.values())[0] for name, v in scores.items()},
    }


def _figures(
    wall: float, startup: float, span: float, fitness: list[float], stderr: str = "", merge_s: float | None = None
) -> dict:
    """``startup``: process start to the first candidate; ``span``: first candidate to the last one's end."""
    per_candidate = span / len(fitness)
    out = {
        "evals": len(fitness),
        "wall_s": wall,
        "startup_s": startup,
        "per_candidate_s": per_candidate,
        "evals_per_hour_steady": 3600 / per_candidate,
        "evals_per_hour_with_startup": 3600 * len(fitness) / wall,
        "fitness": fitness,
        "stderr_lines": stderr.splitlines(),
    }
    if merge_s is not None:
        out["merge_s"] = merge_s
    return out


def merge_line(lm: dict, builtin: dict) -> str:
    """The merge is the same work in both runs: its time ratio shows how the load changed between them."""
    return (
        f"merge per candidate (same work in both runs): lm-eval run {lm['merge_s']:.3f} s, built-in run "
        f"{builtin['merge_s']:.3f} s ({lm['merge_s'] / builtin['merge_s']:.2f}x: the machine's load between the runs); "
        "scoring alone per candidate: "
        f"{(lm['per_candidate_s'] - lm['merge_s']) / (builtin['per_candidate_s'] - builtin['merge_s']):.2f}x"
    )


def best_at(run: dict, n: int) -> float:
    return max(f for f in run["fitness"][:n] if f is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-evals", type=int, default=50)
    parser.add_argument("--limit", type=int, default=100, help="rows of the task (lm-eval's limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peer", action="store_true", help="do not run mergekit-evolve")
    parser.add_argument(
        "--interleaved",
        type=int,
        default=10,
        metavar="N",
        help="also time scoring alone, N alternations in one process (0: skip)",
    )
    parser.add_argument("--interleaved-only", action="store_true", help="only that measurement")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mke-vs-"))
    paths = write_inputs(root, args.limit)
    if args.interleaved or args.interleaved_only:
        inter = interleaved_fitness(paths, args.interleaved or 10)
        print(
            f"scoring alone, same model and process, {args.interleaved or 10} alternations: lm-eval task "
            f"{inter['median_s']['ours_lm_eval']:.3f} s, built-in {inter['median_s']['ours_builtin']:.3f} s (medians): "
            f"{inter['ratio']:.2f}x; scores {inter['scores']['ours_lm_eval']:.4f} / "
            f"{inter['scores']['ours_builtin']:.4f}"
        )
        if args.interleaved_only:
            if args.json:
                args.json.write_text(json.dumps({"interleaved": inter}, indent=2))
            return
    # A throwaway process first: the first process to import torch, transformers, mergekit and lm-eval
    # reads them from disk; without this, whichever run goes first pays that in its start-up.
    subprocess.run(
        [sys.executable, "-c", "import mergekit_evolve.runner, lm_eval.tasks"], cwd=HERE.parent, capture_output=True
    )
    runs: dict[str, dict] = {}
    runs["ours, lm-eval task"] = run_ours(paths["ours_lm_eval"], root / "lm", args.max_evals, args.seed)
    runs["ours, built-in evaluator"] = run_ours(paths["ours_builtin"], root / "builtin", args.max_evals, args.seed)
    peer_note = "not run (--skip-peer)"
    if not args.skip_peer:
        try:
            runs["mergekit-evolve 0.1.5 (on-disk)"] = run_peer(paths, root / "storage", args.max_evals, args.seed)
            peer_note = "ran with its CPU patches applied at run time (bench/mergekit_evolve_cpu.py)"
        except Exception as err:  # it needs ray, lm-eval and its patches to hold: say why it did not run
            peer_note = f"could not run here: {err}"
    n = min(r["evals"] for r in runs.values())
    print(
        f"{args.max_evals} evaluations requested, {args.limit} rows, 8 new tokens, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}; machine shared with other jobs (ratios are side by side)"
    )
    print(
        f"{'run':34s} {'evals':>5s} {'start-up s':>10s} {'per cand. s':>11s} {'evals/h steady':>14s} "
        f"{'evals/h incl. start':>19s} {f'best @{n}':>8s}"
    )
    for name, r in runs.items():
        print(
            f"{name:34s} {r['evals']:5d} {r['startup_s']:10.1f} {r['per_candidate_s']:11.3f} "
            f"{r['evals_per_hour_steady']:14.0f} {r['evals_per_hour_with_startup']:19.0f} {best_at(r, n):8.4f}"
        )
    lm, builtin = runs["ours, lm-eval task"], runs["ours, built-in evaluator"]
    figures = {
        "runs": runs,
        "peer": peer_note,
        "equal_evals": n,
        "interleaved": inter if args.interleaved else None,
        "lm_eval_vs_builtin_per_candidate": lm["per_candidate_s"] / builtin["per_candidate_s"],
        "lm_eval_startup_minus_builtin_s": lm["startup_s"] - builtin["startup_s"],
        "same_fitness_per_candidate": lm["fitness"][:n] == builtin["fitness"][:n],
    }
    print(
        f"lm-eval task vs built-in: {figures['lm_eval_vs_builtin_per_candidate']:.2f}x per candidate (target <= 1.5x); "
        f"start-up {figures['lm_eval_startup_minus_builtin_s']:+.1f} s; same fitness for every candidate: "
        f"{figures['same_fitness_per_candidate']}; lm-eval run's stderr with --quiet: {lm['stderr_lines'] or 'empty'}"
    )
    print(merge_line(lm, builtin))
    peer = runs.get("mergekit-evolve 0.1.5 (on-disk)")
    if peer:
        figures["ratio"] = lm["evals_per_hour_steady"] / peer["evals_per_hour_steady"]
        figures["ratio_with_startup"] = lm["evals_per_hour_with_startup"] / peer["evals_per_hour_with_startup"]
        print(
            f"ours (lm-eval task) vs mergekit-evolve: {figures['ratio']:.1f}x evaluations per hour steady, "
            f"{figures['ratio_with_startup']:.1f}x including start-up (target >= 10x)"
        )
    print(f"mergekit-evolve: {peer_note}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
