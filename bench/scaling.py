"""Evaluations per hour on the zoo: the local executor vs Ray with 1 and 2 workers, side by side.

    python bench/scaling.py [--max-evals 40] [--popsize 8] [--rounds 3] [--json PATH]

The PS search of recipes/zoo-ps.yaml (DARE-TIES of the zoo's script and math experts) with the same seed
and budget under three executors: ``local`` (this process, 1 torch thread), ``ray`` with 1 worker and
``ray`` with 2 workers (``threads_per_worker: 1``), on a real local Ray cluster started here. Each run
builds its executor (Ray: actors start, each builds the problem and fitness), warms every worker with one
candidate (x0; this loads the source models into it), then times ``run_search`` alone; evaluations per
hour and seconds per candidate come from that time only. Start-up (``ray.init``, workers ready, warm-up)
is reported separately. ``--rounds`` repeats the three runs, rotating their order, and reports medians
(other jobs may share the CPU). Every run must reach the same best fitness and the same fitness for
every candidate.
"""

from __future__ import annotations

import os

# One OpenMP thread everywhere, set before torch starts its pools: the local executor runs in this
# process, and Ray workers inherit it (they also get torch.set_num_threads(1) from threads_per_worker).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from mergekit_evolve.config import load_any_config  # noqa: E402
from mergekit_evolve.fitness.factory import make_fitness  # noqa: E402
from mergekit_evolve.search.executors import Job, make_executor, make_score  # noqa: E402
from mergekit_evolve.search.loop import run_search  # noqa: E402
from mergekit_evolve.search.problems import make_problem  # noqa: E402
from mergekit_evolve.search.rundir import RunDir  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "zoo-ps.yaml"
SETUPS = {"local": ("local", None), "ray_1": ("ray", 1), "ray_2": ("ray", 2)}  # name -> (executor kind, workers)


def zoo_config(args, kind: str, workers: int | None):
    return load_any_config(
        RECIPE,
        {
            "optimizer.max_evals": args.max_evals,
            "optimizer.popsize": args.popsize,
            "optimizer.seed": args.seed,
            "executor.kind": kind,
            "executor.workers": workers,
            "executor.threads_per_worker": 1,
        },
    )


def start_ray(workers: int) -> float:
    """A local cluster with a CPU slot per worker, as RayExecutor starts one; returns its start-up seconds."""
    import ray

    started = time.perf_counter()
    ray.init(
        num_cpus=max(2, workers),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    return time.perf_counter() - started


def workers_ready(executor) -> None:
    """Block until every Ray actor has built its problem and fitness (the local executor has none)."""
    if hasattr(executor, "workers"):
        executor.ray.get([worker.pid.remote() for worker in executor.workers])


def warm_up(executor, problem, n_workers: int) -> None:
    """One x0 candidate per worker (idle workers take queued jobs in turn): sources loaded, model built."""
    genome = [float(v) for v in problem.x0()]
    jobs = [Job(generation=0, candidate=i, index=-1 - i, genome=genome) for i in range(n_workers)]
    errors = [result["error"] for _, result in executor.map(jobs) if result.get("error")]
    if errors:
        raise RuntimeError(f"warm-up candidate failed: {errors[0]}")


def timed_run(name: str, args, root: Path) -> dict:
    kind, workers = SETUPS[name]
    config = zoo_config(args, kind, workers)
    started = time.perf_counter()
    problem = make_problem(config, "cpu")
    executor = make_executor(config, problem, make_score(make_fitness(config, problem.tokenizer)))
    workers_ready(executor)
    ready = time.perf_counter()
    warm_up(executor, problem, workers or 1)
    warm = time.perf_counter()
    run_dir = RunDir(root / name)
    run_dir.prepare(fresh=True)
    try:
        state = run_search(problem, executor, run_dir, config.optimizer, progress=False)
    finally:
        executor.close()
        run_dir.unlock()
    wall = time.perf_counter() - warm
    records = sorted(run_dir.read_evaluations(), key=lambda r: r.index)
    return {
        "evals": state.n_evals,
        "search_s": wall,
        "evals_per_hour": 3600 * state.n_evals / wall,
        "s_per_candidate": wall / state.n_evals,
        "ready_s": ready - started,
        "warm_up_s": warm - ready,
        "worker_s_per_candidate": statistics.mean(r.seconds for r in records),
        "best": state.best.fitness,
        "fitness": [r.fitness for r in records],
    }


def summarise(rounds: list[dict], ray_init_s: float, args) -> dict:
    out = {
        "config": {
            "recipe": "recipes/zoo-ps.yaml",
            "max_evals": args.max_evals,
            "popsize": args.popsize,
            "seed": args.seed,
            "rounds": len(rounds),
            "threads_per_worker": 1,
            "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        },
        "ray_init_s": ray_init_s,
        "rounds": rounds,
    }
    for name in SETUPS:
        runs = [r[name] for r in rounds]
        out[name] = {
            key: statistics.median(run[key] for run in runs)
            for key in (
                "evals_per_hour",
                "s_per_candidate",
                "search_s",
                "ready_s",
                "warm_up_s",
                "worker_s_per_candidate",
            )
        }
        out[name]["evals"] = runs[0]["evals"]
        out[name]["best"] = runs[0]["best"]
    runs = [r[name] for r in rounds for name in SETUPS]
    out["same_best"] = len({run["best"] for run in runs}) == 1
    out["same_fitness_per_candidate"] = all(run["fitness"] == runs[0]["fitness"] for run in runs)
    out["ratio_2_vs_1"] = out["ray_2"]["evals_per_hour"] / out["ray_1"]["evals_per_hour"]
    out["ray_overhead_s_per_candidate"] = out["ray_1"]["s_per_candidate"] - out["local"]["s_per_candidate"]
    # Driver seconds per candidate beyond the evaluation itself (CMA-ES, records; for Ray also the round trip).
    dispatch = {name: out[name]["s_per_candidate"] - out[name]["worker_s_per_candidate"] for name in ("local", "ray_1")}
    out["ray_dispatch_s_per_candidate"] = dispatch["ray_1"] - dispatch["local"]
    return out


def report(s: dict) -> str:
    lines = [
        f"zoo PS (recipes/zoo-ps.yaml): {s['config']['max_evals']} evaluations, popsize {s['config']['popsize']}, "
        f"seed {s['config']['seed']}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, 1 torch thread per worker; "
        f"median of {s['config']['rounds']} rounds",
        "",
        "| executor | evals | search s | evals/hour | s/candidate | worker s/candidate | ready s | warm-up s | best "
        "fitness |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SETUPS:
        r = s[name]
        lines.append(
            f"| {name} | {r['evals']} | {r['search_s']:.1f} | {r['evals_per_hour']:,.0f} | "
            f"{r['s_per_candidate']:.3f} | "
            f"{r['worker_s_per_candidate']:.3f} | {r['ready_s']:.1f} | {r['warm_up_s']:.1f} | {r['best']:.4f} |"
        )
    lines += [
        "",
        f"Ray 2 workers vs 1 worker: {s['ratio_2_vs_1']:.2f}x evaluations/hour",
        f"Ray overhead per candidate, 1 worker minus local: {s['ray_overhead_s_per_candidate'] * 1e3:+.1f} ms "
        f"in seconds per candidate (negative: the worker evaluated faster than this process); in the round "
        f"trip alone (driver minus worker seconds per candidate): {s['ray_dispatch_s_per_candidate'] * 1e3:+.1f} ms",
        f"Ray start-up: ray.init {s['ray_init_s']:.1f} s (once), then per run workers ready "
        f"{s['ray_1']['ready_s']:.1f} s (1) / {s['ray_2']['ready_s']:.1f} s (2) and warm-up "
        f"{s['ray_1']['warm_up_s']:.1f} s / {s['ray_2']['warm_up_s']:.1f} s (local: {s['local']['ready_s']:.1f} s + "
        f"{s['local']['warm_up_s']:.1f} s)",
        f"same best fitness in every run: {s['same_best']}; same fitness for every candidate: "
        f"{s['same_fitness_per_candidate']}",
        f"load average (1 min) before / after: {s['loadavg'][0]:.1f} / {s['loadavg'][1]:.1f} on {os.cpu_count()} CPUs",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-evals", type=int, default=40)
    parser.add_argument("--popsize", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the local executor evaluates in this process: one thread, like each worker
    from mergekit_evolve.zoo import build_zoo

    build_zoo(seed=0)  # cached after the first build
    load_before = os.getloadavg()[0]
    ray_init_s = start_ray(max(w or 1 for _, w in SETUPS.values()))
    root = Path(tempfile.mkdtemp(prefix="mke-scaling-"))
    rounds = []
    try:
        for index in range(args.rounds):
            names = list(SETUPS)[index % len(SETUPS) :] + list(SETUPS)[: index % len(SETUPS)]  # rotate the order
            rounds.append({name: timed_run(name, args, root / f"round{index}") for name in names})
            print(
                f"round {index + 1}: " + ", ".join(f"{n} {rounds[-1][n]['evals_per_hour']:,.0f}/h" for n in names),
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        import ray

        ray.shutdown()
    summary = summarise(rounds, ray_init_s, args)
    summary["loadavg"] = [load_before, os.getloadavg()[0]]
    print(report(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
