"""fitness.backend hf vs vllm: seconds per candidate and peak memory, same candidates, outputs compared.

    python bench/vllm_backend.py                                  # zoo and ~85M, {8, 64, 256} new tokens
    python bench/vllm_backend.py --sizes zoo,85m,600m --tokens 8,64,256 --candidates 3
    python bench/vllm_backend.py --space dfs --sizes zoo,50m --tokens 8,64   # DFS: layer paths over 2 models

Each (model size, backend) runs in a process of its own, so its peak RSS is its own. A candidate is a PS
linear merge of two sources (a base and a seeded perturbation of it; the zoo: its script and math experts)
built as a run builds it (``Problem.build``: hf merges into its resident model, vllm streams the merged
tensors into its engine), then 100 prompts of the zoo's target task are decoded greedily for each count
of new tokens (no stop string; a row ends at the model's EOS id, as in a run, on both backends alike;
the table gives the mean tokens generated per prompt). Per candidate and
token count: build seconds + generation seconds. Engine start-up (once per worker) is reported apart.
The generated ids are compared prompt by prompt between the backends: random weights give near-tied
logits, so a few prompts may differ in float32 rounding; the zoo's trained models must agree on all.
Both backends get the same threads (``OMP_NUM_THREADS``, default: every core).

``--space dfs``: the candidate is a layer path over the pool of both sources (r = 2 repeats: T = 2 x the
pool's layers slots), decoded from seeded genomes around model A's path (so paths differ in depth and repeat
layers); "build" is pointing the hf layer stack or the vLLM engine at it. The pool is loaded once per
worker; the table adds how much the worker's RSS grew while it loaded the pool (vLLM: the engine, its KV
cache included) next to the sum of the two sources' weight files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {  # name -> random Llama shape (hidden, layers, heads); "zoo": the shipped experts
    "zoo": None,
    "50m": (640, 12, 10),
    "85m": (768, 12, 12),
    "600m": (1536, 16, 16),
}


def make_sources(size: str, root: Path) -> list[str]:
    from mergekit_evolve.zoo import build_zoo

    if SIZES[size] is None:
        zoo = build_zoo()
        return [str(zoo.models["script"]), str(zoo.models["math"])]
    import torch
    from safetensors.torch import load_file, save_file

    from mergekit_evolve.zoo.random_models import make_random_model

    hidden, layers, heads = SIZES[size]
    base = root / f"{size}-a"
    if not (base / "config.json").exists():
        make_random_model(base, seed=0, hidden_size=hidden, num_layers=layers, num_heads=heads)
        config = json.loads((base / "config.json").read_text())
        config["max_position_embeddings"] = 512  # room for 256 new tokens
        (base / "config.json").write_text(json.dumps(config))
    other = root / f"{size}-b"
    if not (other / "config.json").exists():
        import shutil

        shutil.copytree(base, other)
        weights = load_file(other / "model.safetensors")
        gen = torch.Generator().manual_seed(1)
        save_file(
            {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
            other / "model.safetensors",
            metadata={"format": "pt"},
        )
    return [str(base), str(other)]


def bench_config(space: str, sources: list[str], backend: str, data: str, kv_cache_gb: float | None) -> dict:
    fitness = {"backend": backend, "tasks": [{"name": "t", "data": data}]}
    if backend == "vllm" and kv_cache_gb is not None:
        fitness["vllm"] = {"kv_cache_gb": kv_cache_gb}
    if space == "dfs":
        genome = {"models": sources, "merge_method": "linear"}
        return {"space": "dfs", "genome": genome, "dfs": {"repeats": 2}, "fitness": fitness, "dtype": "float32"}
    genome = {"models": sources, "merge_method": "linear", "layer_granularity": 4}
    return {"genome": genome, "fitness": fitness, "dtype": "float32"}


def rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


def load(problem, space: str, backend: str) -> dict:
    """Sources (PS: the merger; DFS hf: the layer pool) then, for vLLM, the engine; seconds and RSS growth."""
    out, before, start = {}, rss_gb(), time.perf_counter()
    if space == "ps":
        problem.merger  # noqa: B018
    elif backend == "hf":
        problem.pool  # noqa: B018
    out["sources_s"] = time.perf_counter() - start
    out["engine_s"] = None
    if backend == "vllm":
        start = time.perf_counter()
        problem.engine  # noqa: B018  (DFS: the pool is loaded into it)
        out["engine_s"] = time.perf_counter() - start
    out["loaded_gb"] = rss_gb() - before
    return out


def worker(space: str, size: str, backend: str, tokens: list[int], args, root: Path) -> dict:
    import numpy as np
    import torch

    from mergekit_evolve.config import parse_config
    from mergekit_evolve.fitness.generate import greedy_token_ids
    from mergekit_evolve.fitness.runtime import evaluation_mode, runner_for
    from mergekit_evolve.search.problems import make_problem
    from mergekit_evolve.zoo import build_zoo

    zoo = build_zoo()
    sources = make_sources(size, root)
    data = str(zoo.tasks["script_math"].fitness)
    problem = make_problem(parse_config(bench_config(space, sources, backend, data, args.kv_cache_gb)))
    rows = [json.loads(line) for line in Path(zoo.tasks["script_math"].fitness).read_text().splitlines()][:100]
    prompts = [problem.tokenizer(r["prompt"])["input_ids"] for r in rows]
    tokenizer = problem.tokenizer
    no_eos = type("NoEos", (), {"eos_token_id": None, "pad_token_id": tokenizer.pad_token_id})()
    no_eos.batch_decode = tokenizer.batch_decode
    out = {**load(problem, space, backend), "params": None, "rows": {}, "paths": []}
    rng = np.random.default_rng(0)
    spread = 0.6 if space == "dfs" else 0.2  # DFS: paths of other depths, with repeated layers
    genomes = [problem.x0() + rng.normal(0, spread, problem.dim) for _ in range(args.candidates)]
    for n in tokens:
        build, generate, ids = [], [], []
        for genome in genomes:
            start = time.perf_counter()
            candidate = problem.decode(genome)
            model = problem.build(candidate)
            built = time.perf_counter()
            with evaluation_mode(model):
                generated = greedy_token_ids(runner_for(model), prompts, no_eos, n, [], args.batch)
            build.append(built - start)
            generate.append(time.perf_counter() - built)
            ids.append(generated)
            if n == tokens[0] and space == "dfs":
                out["paths"].append(len(candidate.path.hops))
        out["rows"][n] = {"build_s": build, "generate_s": generate, "ids": ids}
    if backend == "hf":
        weights = problem.pool.parameters() if space == "dfs" else problem.merger.model.state_dict().values()
        out["params"] = sum(t.numel() for t in weights)
    out["sources_gb"] = sum(f.stat().st_size for s in sources for f in Path(s).glob("*.safetensors")) / 1024**3
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    out["threads"] = torch.get_num_threads()
    return out


def run_worker(size: str, backend: str, args, root: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"{args.space}:{size}:{backend}",
        "--tokens",
        args.tokens,
        "--candidates",
        str(args.candidates),
        "--batch",
        str(args.batch),
        "--root",
        str(root),
        *(["--kv-cache-gb", str(args.kv_cache_gb)] if args.kv_cache_gb is not None else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{size}/{backend} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(a: list, b: list) -> tuple[int, int]:
    pairs = [(x, y) for ca, cb in zip(a, b) for x, y in zip(ca, cb)]
    return sum(x == y for x, y in pairs), len(pairs)


def report(size: str, hf: dict, vllm: dict) -> list[str]:
    lines = []
    for n in hf["rows"]:
        h, v = hf["rows"][n], vllm["rows"][n]
        per_h = sum(h["build_s"] + h["generate_s"]) / len(h["build_s"])
        per_v = sum(v["build_s"] + v["generate_s"]) / len(v["build_s"])
        same, total = agreement(h["ids"], v["ids"])
        mean_new = sum(len(g) for c in h["ids"] for g in c) / total
        model = size if not hf["paths"] else f"{size} (paths of {min(hf['paths'])}-{max(hf['paths'])} hops)"
        lines.append(
            f"| {model} | {hf['params'] / 1e6:.1f}M | {n} ({mean_new:.0f}) | "
            f"{per_h:.2f} ({sum(h['build_s']) / len(h['build_s']):.2f}) | "
            f"{per_v:.2f} ({sum(v['build_s']) / len(v['build_s']):.2f}) | {per_h / per_v:.2f}x | {same}/{total} | "
            f"{hf['peak_rss_gb']:.2f} / {vllm['peak_rss_gb']:.2f} | {vllm['engine_s']:.1f} | "
            f"{hf['loaded_gb']:.2f} / {vllm['loaded_gb']:.2f} ({hf['sources_gb']:.2f}) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="ps", choices=("ps", "dfs"))
    parser.add_argument("--sizes", default="zoo,85m")
    parser.add_argument("--tokens", default="8,64,256")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100, help="hf batch size (vLLM batches itself)")
    parser.add_argument("--root", default=None, help="where the random sources are kept")
    parser.add_argument("--kv-cache-gb", type=float, default=None, help="fitness.vllm.kv_cache_gb (default: 1 on CPU)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root or Path(tempfile.gettempdir()) / "mergekit-evo-bench-vllm")
    root.mkdir(parents=True, exist_ok=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.worker:
        space, size, backend = args.worker.split(":")
        wanted = [t for t in tokens if size != "zoo" or t <= 48]  # the zoo's context is 64 positions
        print(json.dumps(worker(space, size, backend, wanted, args, root)))
        return
    print(
        "| model | params | max new tokens (mean) | hf s/candidate (build) | vllm s/candidate (build) | "
        "vllm speed-up | equal generations | peak RSS GB hf / vllm | vllm engine start s | "
        "RSS growth loading GB hf / vllm (source files) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for size in args.sizes.split(","):
        results[size] = {backend: run_worker(size, backend, args, root) for backend in ("hf", "vllm")}
        for line in report(size, results[size]["hf"], results[size]["vllm"]):
            print(line, flush=True)
    threads = results[next(iter(results))]["hf"]["threads"]
    print(
        f"\n{args.space}: {args.candidates} candidates x 100 prompts per row; {threads} threads; "
        f"hf batch {args.batch}; vLLM KV cache {args.kv_cache_gb or 'default'} GB."
    )


if __name__ == "__main__":
    main()
