"""Regenerate bench/RESULTS.md: ``python -m bench`` (all) or ``python -m bench --only fitness_cost,scaling``.

Each benchmark runs as its own process and leaves its printed report and its figures in
``bench/out/NAME.txt`` and ``NAME.json``; RESULTS.md is then rebuilt from everything in bench/out/
(benchmarks not rerun keep their last output). ``--rebuild`` only rebuilds the file.
The paper table is separate: ``python bench/paper_table.py`` writes docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

# name -> (arguments, what it measures). The order is the order of RESULTS.md.
BENCHES = {
    # Linear and every sparsifying method; the script alone (no flag) runs every method.
    "merge_speed": (
        ["--sparsifying"],
        "in-memory candidate merge vs `mergekit-yaml` + reload (106M-param Llama, fp32)",
    ),
    "merge_scaling": (
        [],
        "per-candidate merge cost and peak RSS vs family size (10M-100M, bf16), ours vs `mergekit-yaml` + reload",
    ),
    "dfs_memory": ([], "layer-stack memory and path switch (2 x Llama 8 x 512, T = 3M hops)"),
    "fitness_cost": ([], "forward tokens vs rank agreement: full, subsample, racing; generation throughput"),
    "vs_mergekit_evolve": (
        [],
        "ours (lm-eval task and built-in fitness) vs the real mergekit-evolve (zoo, one config, same budget)",
    ),
    "scaling": ([], "evaluations per hour: local vs Ray with 1 and 2 workers (zoo)"),
    "gpu": (["--small"], "GPU figures (7B-shaped pool); on a CPU-only machine: --small shapes, CPU"),
    "torture": ([], "SIGKILL torture: kills, resumes, equality with an uninterrupted run"),
    "time_to_quality": (
        ["--seeds", "3"],
        "time to quality: forward tokens and held-out per optimizer.economy mode (zoo PS, DFS)",
    ),
    "torture_economy": (["--economy", "auto"], "SIGKILL torture with optimizer.economy: auto (zoo models and task)"),
    "dfs_search": ([], "DFS search variants: distinct paths, best fitness and held-out per budget (zoo, 3 seeds)"),
    "pareto": (
        ["--seeds", "3", "--budget", "480", "--plot", "docs/pareto_front.png", "--results", "docs/RESULTS.md"],
        "held-out Pareto fronts: COMO-CMA-ES, NSGA-II, weighted-sum CMA-ES at equal budgets (zoo, 3 seeds)",
    ),
    "m2n2": (
        ["--seeds", "3", "--budget", "308", "--results", "docs/RESULTS.md"],
        "M2N2 vs CMA-ES PS at equal budgets: held-out script_math, what the archive keeps (zoo, 3 seeds)",
    ),
}
SCRIPTS = {"torture_economy": "torture"}  # entries that run another benchmark's script with other arguments
# issue #31's floor: these stay >= 10x faster than mergekit-yaml + reload at 106M
FLOOR_METHODS = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")


def _gpu_rows(gpu: dict | None) -> list[tuple[str, str, str]]:
    """The fast path against mergekit's kernel on a GPU, when bench/gpu.py ran on one."""
    if not gpu or not str(gpu.get("device", "")).startswith("cuda"):
        return []
    rows = []
    for method, numbers in gpu.get("ps", {}).get("methods", {}).items():
        ref = numbers.get("reference")
        if ref:
            where = f"{gpu['gpu']}, {gpu['params'] / 1e9:.1f}B bf16"
            times = f"{ref['mergekit_kernel_s']:.2f} s -> {ref['fast_s']:.2f} s"
            rows.append(
                (
                    f"{method} candidate on {where}: mergekit's kernel -> fast path",
                    f"{times}, {ref['differ']} of {ref['tensors']} tensors differ",
                    "0 differ",
                )
            )
    return rows


def run(name: str) -> None:
    args, _ = BENCHES[name]
    OUT.mkdir(exist_ok=True)
    started = time.perf_counter()
    script = SCRIPTS.get(name, name)
    command = [sys.executable, str(HERE / f"{script}.py"), *args]
    if script != "torture":
        command += ["--json", str(OUT / f"{name}.json")]
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    text = _without_noise(done.stdout) + (
        f"\n[exit code {done.returncode}]\n{done.stderr[-2000:]}" if done.returncode else ""
    )
    header = f"$ python bench/{script}.py {' '.join(args)}   # {time.strftime('%Y-%m-%d')}, {wall:.0f} s\n"
    (OUT / f"{name}.txt").write_text(header + text)
    print(f"{name}: exit {done.returncode} in {wall:.0f} s")


def _without_noise(text: str) -> str:
    noise = ("Loading weights", "torch_dtype", "Warning", "warn(")
    return "\n".join(line for line in text.splitlines() if not any(n in line for n in noise)) + "\n"


def summary_rows() -> list[tuple[str, str, str]]:
    """(figure, measured, target) from the benchmarks' JSON files that exist."""
    rows = []
    figures = {
        name: json.loads((OUT / f"{name}.json").read_text()) for name in BENCHES if (OUT / f"{name}.json").exists()
    }
    if "merge_speed" in figures:
        m = figures["merge_speed"]["methods"]
        labels = {"sce": "sce (select_topk 0.6)", "sce_all": "sce with select_topk 1 (no sparsification)"}
        for method, numbers in m.items():
            if "speedup" in numbers:
                rows.append(
                    (
                        f"{labels.get(method, method)} merge: in-memory vs mergekit-yaml + reload (106M)",
                        f"{numbers['speedup']:.1f}x",
                        ">= 10x" if method in FLOOR_METHODS else "-",
                    )
                )
        if "linear_x_bandwidth_bound" in figures["merge_speed"]:
            rows.append(
                (
                    "linear merge (mergekit's kernel) vs memory-bandwidth bound",
                    f"{figures['merge_speed']['linear_x_bandwidth_bound']:.1f}x",
                    "-",
                )
            )
    if "merge_scaling" in figures:
        for rung, block in figures["merge_scaling"]["rungs"].items():
            ours = {method: numbers["ours"] for method, numbers in block["methods"].items()}
            linear = ours.get("linear", {}).get("candidate_s")
            for method in ("ties", "dare_ties"):
                if linear and "candidate_s" in ours.get(method, {}):
                    # a method kept from an earlier run is compared with that run's linear
                    same_run_linear = ours[method].get("linear_candidate_s", linear)
                    earlier = f" (code of {ours[method]['from_commit']})" if "from_commit" in ours[method] else ""
                    rows.append(
                        (
                            f"{method} candidate vs linear candidate, {rung} bf16 family (fast path){earlier}",
                            f"{ours[method]['candidate_s'] / same_run_linear:.1f}x",
                            "-",
                        )
                    )
    rows += _gpu_rows(figures.get("gpu"))
    if "dfs_memory" in figures:
        d = figures["dfs_memory"]
        rows.append((f"DFS layer stack RSS, T = {d['hops']} hops", f"{d['stack_rss_x_pool']:.2f}x pool", "~1x pool"))
        rows.append(("DFS path switch", f"{d['switch_us']:.0f} us", "-"))
    if "fitness_cost" in figures:
        f = figures["fitness_cost"]
        for set_name, block in f["sets"].items():
            best = max((r for r in block["rows"].values() if r["rho"] >= 0.9), key=lambda r: r["saving"])
            rows.append(
                (
                    f"fitness: largest token saving at rho >= 0.9 ({set_name} candidates)",
                    f"{best['saving']:.1f}x",
                    ">= 5x",
                )
            )
        rows.append(("batched generation vs transformers generate", f"{f['generation']['ratio']:.2f}x", ">= 0.8x"))
    if "vs_mergekit_evolve" in figures:
        v = figures["vs_mergekit_evolve"]
        if "lm_eval_vs_builtin_per_candidate" in v:
            rows.append(
                (
                    "lm-eval task vs built-in evaluator, time per candidate (zoo)",
                    f"{v['lm_eval_vs_builtin_per_candidate']:.2f}x",
                    "<= 1.5x",
                )
            )
            rows.append(
                (
                    "lm-eval task start-up minus built-in start-up",
                    f"{v['lm_eval_startup_minus_builtin_s']:+.1f} s",
                    "a few s",
                )
            )
        if v.get("interleaved"):
            rows.append(
                (
                    "lm-eval task vs built-in, scoring alone, interleaved in one process",
                    f"{v['interleaved']['ratio']:.2f}x",
                    "<= 1.5x",
                )
            )
        rows.append(
            (
                "evaluations/hour with lm-eval tasks vs mergekit-evolve (zoo)",
                f"{v['ratio']:.1f}x" if "ratio" in v else "not measured",
                ">= 10x",
            )
        )
    if "scaling" in figures:
        s = figures["scaling"]
        ratio = s.get("ratio_2_vs_1") or s.get("speedup_2_vs_1")
        if ratio is not None:
            rows.append(("Ray: 2 workers vs 1 (evaluations/hour)", f"{ratio:.2f}x", "~2x on 2 cores"))
    if "time_to_quality" in figures:
        rows += time_to_quality_rows(figures["time_to_quality"])
    return rows


def time_to_quality_rows(runs: list[dict]) -> list[tuple[str, str, str]]:
    """Per economy mode on PS: whole-run tokens against off's, and the held-out difference."""

    def mean(mode: str, key: str) -> float | None:
        values = [r[key] for r in runs if r["space"] == "ps" and r["mode"] == mode]
        return sum(values) / len(values) if values else None

    rows = []
    for mode in ("stop", "subsample", "auto"):
        if mean(mode, "tokens_total") and mean("off", "tokens_total"):
            rows.append(
                (
                    f"economy {mode} (PS): forward tokens vs off; held-out mode - off",
                    f"1/{mean('off', 'tokens_total') / mean(mode, 'tokens_total'):.1f}; "
                    f"{mean(mode, 'heldout') - mean('off', 'heldout'):+.3f}",
                    "<= 1/5; not significantly < 0",
                )
            )
    return rows


def rebuild() -> None:
    lines = [
        "# Measured results",
        "",
        "Regenerated by `python -m bench` from bench/out/ (each benchmark's printed report and JSON).",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; other jobs may share the "
        "CPU.",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in summary_rows()),
        "",
        "The paper's table in miniature: [docs/RESULTS.md](../docs/RESULTS.md) (`python bench/paper_table.py`).",
    ]
    for name, (_, what) in BENCHES.items():
        report = OUT / f"{name}.txt"
        lines += ["", f"## bench/{SCRIPTS.get(name, name)}.py — {what}", ""]
        lines += ["```", report.read_text().rstrip(), "```"] if report.exists() else ["Not run yet."]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmark names: " + ",".join(BENCHES))
    parser.add_argument("--rebuild", action="store_true", help="rebuild RESULTS.md from bench/out/ without running")
    args = parser.parse_args()
    names = list(BENCHES) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"--only: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    if not args.rebuild:
        for name in names:
            run(name)
    rebuild()


if __name__ == "__main__":
    main()
