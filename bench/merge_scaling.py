"""Per-candidate merge cost as the family grows: InMemoryMerger (fast path) vs mergekit-yaml + reload.

    python bench/merge_scaling.py                     # 10M, 30M and 100M rungs, bf16 (minutes)
    python bench/merge_scaling.py --rungs 10M,30M,100M,1B   # + the 1B rung (needs ~20 GB RAM)
    python bench/merge_scaling.py --small             # tiny rung only (seconds, CI sanity)

Each rung is a random Llama-shaped family (base + 2 "fine-tunes" = base + seeded noise), written
in a temp dir. For each method (linear, ties, dare_ties) one worker process builds an
``InMemoryMerger`` with the fast path, merges a first candidate (this pays the one-time
precomputation: ties' sorts, dare's uniform draws), then times --repeats further candidates that
alternate between two parameter sets (median), and reports its peak RSS. Another worker runs
``mergekit-yaml --random-seed`` on the same recipe and loads the output with transformers (what
an on-disk search pays per candidate), with the peak RSS of the two. Workers run one at a time,
so each peak RSS is that path's alone. The last columns say how the per-candidate cost grows
from rung to rung (x per x parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SEED = 17
RUNGS = {
    "small": dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, vocab_size=512),
    "10M": dict(num_layers=8, hidden_size=256, intermediate_size=704, num_heads=4, vocab_size=8000),
    "30M": dict(num_layers=8, hidden_size=512, intermediate_size=1024, num_heads=8, vocab_size=16000),
    "100M": dict(num_layers=12, hidden_size=768, intermediate_size=1024, num_heads=12, vocab_size=32000),
    "1B": dict(num_layers=18, hidden_size=2048, intermediate_size=5632, num_heads=32, vocab_size=32000),
}
METHODS = ("linear", "ties", "dare_ties")


def recipe(method: str, family: dict[str, str], dtype: str, variant: int) -> dict:
    """Candidate ``variant`` (0 or 1) of ``method``: two parameter sets a search would alternate."""
    weights, densities = ((0.6, 0.4), (0.6, 0.7)) if variant == 0 else ((0.3, 0.8), (0.5, 0.4))
    experts = [
        {"model": family[name], "parameters": {"weight": w, "density": d}}
        for name, w, d in zip(("e1", "e2"), weights, densities)
    ]
    if method == "linear":
        for expert in experts:
            del expert["parameters"]["density"]
        return {
            "merge_method": "linear",
            "models": [{"model": family["base"], "parameters": {"weight": 0.2}}] + experts,
            "dtype": dtype,
        }
    return {
        "merge_method": method,
        "base_model": family["base"],
        "models": [{"model": family["base"]}] + experts,
        "dtype": dtype,
    }


def peak_rss_gb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


# ------------------------------------------------------------------ workers (own processes)


def worker_in_memory(family: dict[str, str], method: str, dtype: str, repeats: int) -> dict:
    from mergekit.config import MergeConfiguration

    from mergekit_evolve.merge import InMemoryMerger

    configs = [MergeConfiguration.model_validate(recipe(method, family, dtype, v)) for v in (0, 1)]
    started = time.perf_counter()
    merger = InMemoryMerger(configs[0], random_seed=SEED)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    merger.merge(configs[0])  # first candidate: builds the precomputed state
    first_s = time.perf_counter() - started
    times = []
    for index in range(repeats):
        started = time.perf_counter()
        merger.merge(configs[(index + 1) % 2])
        times.append(time.perf_counter() - started)
    state = sum(merger.fast_path.nbytes().values()) if merger.fast_path else 0
    return {
        "load_s": load_s,
        "first_s": first_s,
        "candidate_s": statistics.median(times),
        "state_gb": state / 1e9,
        "peak_rss_gb": peak_rss_gb(),
    }


def worker_cli(family: dict[str, str], method: str, dtype: str, out: str) -> dict:
    import torch
    import transformers
    import yaml

    config_path = Path(out + ".yaml")
    config_path.write_text(yaml.safe_dump(recipe(method, family, dtype, 0)))
    started = time.perf_counter()
    done = subprocess.run(
        ["mergekit-yaml", str(config_path), out, "--random-seed", str(SEED), "--quiet", "--no-write-model-card"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"mergekit-yaml failed:\n{done.stderr[-2000:]}")
    merged = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype))
    loaded = time.perf_counter()
    del model
    return {
        "merge_s": merged - started,
        "load_s": loaded - merged,
        "total_s": loaded - started,
        "peak_rss_gb": max(peak_rss_gb(), peak_rss_gb(resource.RUSAGE_CHILDREN)),
    }


# ------------------------------------------------------------------ driver


def build_family(root: Path, shape: dict, dtype) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file, save_file

    from mergekit_evolve.zoo.random_models import make_random_model

    base = make_random_model(root / "base", seed=0, dtype=dtype, **shape)
    family = {"base": str(base)}
    tensors = load_file(base / "model.safetensors")
    for index, name in enumerate(("e1", "e2")):
        generator = torch.Generator().manual_seed(100 + index)
        out = root / name
        out.mkdir()
        for item in base.iterdir():
            if item.name != "model.safetensors":
                (out / item.name).write_bytes(item.read_bytes())
        noisy = {}
        for key, t in tensors.items():  # one tensor at a time: the 1B rung must not hold fp32 copies
            noisy[key] = (t.float() + 0.02 * torch.randn(t.shape, generator=generator)).to(dtype)
        save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
        del noisy
        family[name] = str(out)
    return family


def run_worker(kind: str, family: dict, method: str, dtype: str, extra: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--family",
        json.dumps(family),
        "--method",
        method,
        "--dtype",
        dtype,
        "--extra",
        extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rungs", default="10M,30M,100M", help=f"comma-separated, from {','.join(RUNGS)}")
    parser.add_argument("--small", action="store_true", help="the tiny rung only")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="timed in-memory candidates after the first")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--no-cli", action="store_true", help="skip mergekit-yaml + reload")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--extra", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        family = json.loads(args.family)
        if args.worker == "memory":
            result = worker_in_memory(family, args.method, args.dtype, int(args.extra))
        else:
            result = worker_cli(family, args.method, args.dtype, args.extra)
        print(json.dumps(result))
        return

    import torch

    rungs = ["small"] if args.small else args.rungs.split(",")
    methods = args.methods.split(",")
    load = os.getloadavg()[0]
    print(
        f"dtype {args.dtype}; torch threads {torch.get_num_threads()}; base + 2 experts per rung; "
        f"load average {load:.1f} on {os.cpu_count()} CPUs" + (" (a loaded machine)" if load > 1.5 else " (quiet)")
    )
    header = (
        f"{'rung':<6}{'params':>8}{'method':>11}{'set-up s':>10}{'first s':>9}{'cand s':>9}"
        f"{'x linear':>9}{'state GB':>9}{'RSS GB':>8}{'cli+load s':>11}{'cli RSS':>8}{'speed-up':>9}"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    figures: dict = {"dtype": args.dtype, "rungs": {}}
    for rung in rungs:
        with tempfile.TemporaryDirectory(prefix=f"merge-scaling-{rung}-") as tmp:
            family = build_family(Path(tmp), RUNGS[rung], getattr(torch, args.dtype))
            from safetensors import safe_open

            with safe_open(Path(family["base"]) / "model.safetensors", "pt") as handle:
                params = sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())
            rows = figures["rungs"][rung] = {"params": params, "methods": {}}
            for method in methods:
                ours = run_worker("memory", family, method, args.dtype, str(args.repeats))
                cli = (
                    {}
                    if args.no_cli
                    else run_worker("cli", family, method, args.dtype, str(Path(tmp) / f"out-{method}"))
                )
                rows["methods"][method] = {"ours": ours, "cli": cli}
                print(_row(rung, params, method, ours, cli, rows["methods"]), flush=True)
    _print_growth(figures, methods)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _row(rung: str, params: int, method: str, ours: dict, cli: dict, done: dict) -> str:
    if "error" in ours:
        return f"{rung:<6}{params / 1e6:>7.0f}M{method:>11}  in-memory failed: {ours['error']}"
    linear = done.get("linear", {}).get("ours", {}).get("candidate_s")
    ratio = f"{ours['candidate_s'] / linear:>8.1f}x" if linear else f"{'-':>9}"
    row = (
        f"{rung:<6}{params / 1e6:>7.0f}M{method:>11}{ours['load_s']:>10.1f}{ours['first_s']:>9.2f}"
        f"{ours['candidate_s']:>9.3f}{ratio}{ours['state_gb']:>9.2f}{ours['peak_rss_gb']:>8.2f}"
    )
    if cli.get("total_s"):
        row += f"{cli['total_s']:>11.1f}{cli['peak_rss_gb']:>8.2f}{cli['total_s'] / ours['candidate_s']:>8.1f}x"
    elif cli:
        row += f"  cli failed: {cli.get('error')}"
    return row


def _print_growth(figures: dict, methods: list[str]) -> None:
    rungs = list(figures["rungs"].items())
    if len(rungs) < 2:
        return
    print("\ngrowth of the per-candidate cost between rungs (cost ratio / parameter ratio; 1.0 = linear in size):")
    for (low, a), (high, b) in zip(rungs, rungs[1:]):
        size = b["params"] / a["params"]
        parts = []
        for method in methods:
            ours_a, ours_b = a["methods"][method]["ours"], b["methods"][method]["ours"]
            if "candidate_s" in ours_a and "candidate_s" in ours_b:
                part = f"{method} ours {ours_b['candidate_s'] / ours_a['candidate_s'] / size:.2f}"
                cli_a, cli_b = a["methods"][method]["cli"], b["methods"][method]["cli"]
                if cli_a.get("total_s") and cli_b.get("total_s"):
                    part += f", cli {cli_b['total_s'] / cli_a['total_s'] / size:.2f}"
                parts.append(part)
        print(f"  {low} -> {high} ({size:.1f}x params): " + "; ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1:])
