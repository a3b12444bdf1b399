"""GPU benchmark on a 7B-shaped pool: PS candidate merge per method, DFS path switch, fitness tokens/s, peak memory.

    python bench/gpu.py                           # Mistral-7B shapes, bf16, --device auto (minutes on one GPU)
    python bench/gpu.py --small --device cpu      # tiny shapes, same code path (seconds on a CPU)
    python bench/gpu.py --json figures.json

Builds a random Mistral-shaped pool in a temp dir, no downloads: a base and two experts = base + small
seeded noise, bf16 sharded safetensors (hidden 4096, 32 layers, intermediate 14336, vocab 32000, 32 heads,
8 KV heads: 7.24B parameters each; --small: hidden 256, 4 layers, vocab 1000). Weights are drawn on the
device, so building a 7B pool costs the disk writes only. Then, the way the searches use them:

* PS: one ``PSProblem`` per method (genome over the experts, base as base model, a parameter set per
  8 layers); every candidate is ``problem.decode(genome)`` -> ``InMemoryMerger.merge`` of one resident
  merger that loaded the three sources once (``PSProblem.build`` with a shared merger). Median of
  ``--repeats`` distinct candidates after one warm-up, split into plan / schedule / execute / copy.
* Fitness: ``greedy_generate`` (the ``generate`` task kind's batched greedy decoding) on the merged
  model, ``--batch`` prompts of random tokens, ``--new-tokens`` new tokens each, no stop strings.
* DFS: a ``DFSProblem`` over the two experts (pool loaded once, r = 3); path switch = ``problem.build`` of
  a decoded candidate (as bench/dfs_memory.py times ``pool.model(path)``); genome decode; tokens/s of
  the same generation through the layer stack on model A's own path.
* Peak memory: ``torch.cuda.max_memory_allocated`` per phase (CUDA only); process peak RSS always.

The dtype is the search's default (part of issue #5): bfloat16 on CUDA, the sources' dtype (bf16) on CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from mergekit_evolve.config import parse_config
from mergekit_evolve.fitness.generate import greedy_generate
from mergekit_evolve.fitness.runtime import ModelRunner, evaluation_mode
from mergekit_evolve.recipe.ps import to_merge_config
from mergekit_evolve.resources import resolve_device
from mergekit_evolve.search.dfs_problem import DFSProblem
from mergekit_evolve.search.problems import PSProblem
from mergekit_evolve.zoo.random_models import random_config
from mergekit_evolve.zoo.tokenizer import save_tokenizer

FULL = dict(num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=32000)
SMALL = dict(num_layers=4, hidden_size=256, intermediate_size=896, num_heads=4, num_kv_heads=2, vocab_size=1000)
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "sce", "slerp")
# Methods also timed with the fast path off (mergekit's own kernels on the same resident merger),
# their fast result checked bit for bit against mergekit's at full size.
REFERENCE_METHODS = ("ties",)
NOISE = 0.002  # expert = base + NOISE * N(0, 1): a tenth of the weights' 0.02 init std
# Per-run counts (flags left unset take these); --small does less work so a loaded 2-core CPU finishes quickly.
RUN = dict(repeats=3, new_tokens=64, gen_repeats=2, switches=2000)
SMALL_RUN = dict(repeats=2, new_tokens=16, gen_repeats=1, switches=500)
SIGMA = 0.2  # spread of the benchmark's candidates around x0 (CMA-ES's sigma0 is 1/6)


# ----------------------------------------------------------------------------------------- the pool
def shard_plan(shapes: dict[str, torch.Size], max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if shards[-1] and size + nbytes > max_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    return shards


def draw(name: str, shape: torch.Size, seed: int, device: str) -> list[torch.Tensor]:
    """The base tensor and the two experts' (bf16, on the CPU), drawn on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = lambda: torch.randn(shape, generator=gen, device=device)  # noqa: E731
    base = 1 + 0.1 * noise() if "norm" in name else 0.02 * noise()
    return [(base + NOISE * noise() * k).to(torch.bfloat16).cpu() for k in (0, 1, 1)]


def write_pool(root: Path, shape: dict, device: str, shard_mb: int) -> dict[str, Path]:
    config = random_config("mistral", **shape)
    config.dtype, config.architectures = torch.bfloat16, ["MistralForCausalLM"]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    dirs = {name: root / name for name in ("base", "e1", "e2")}
    for path in dirs.values():
        config.save_pretrained(path)
        save_tokenizer(path)
    plan, weight_map, seed = shard_plan(shapes, shard_mb << 20), {}, 0
    for index, names in enumerate(plan):
        file = f"model-{index + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {path: {} for path in dirs.values()}
        for name in names:
            seed += 1
            for path, tensor in zip(dirs.values(), draw(name, shapes[name], seed, device)):
                tensors[path][name] = tensor
            weight_map[name] = file
        for path, part in tensors.items():
            save_file(part, str(path / file), metadata={"format": "pt"})
    total = sum(2 * s.numel() for s in shapes.values())
    for path in dirs.values():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return dirs


# ------------------------------------------------------------------------------------------ helpers
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def search_config(pool: dict[str, Path], rows: Path, genome: dict, space: str = "ps") -> dict:
    return {
        "space": space,
        "genome": genome,
        "dfs": {"repeats": 3},
        "fitness": {"tasks": [{"name": "t", "data": str(rows)}]},
        "optimizer": {"seed": 0},
    }


def method_genome(method: str, pool: dict[str, Path], granularity: int) -> dict:
    base, e1, e2 = (str(pool[k]) for k in ("base", "e1", "e2"))
    genome = {"merge_method": method, "layer_granularity": granularity, "models": [e1, e2], "base_model": base}
    if method == "linear":  # no base model: three weighted inputs
        genome.update(models=[base, e1, e2], base_model=None)
    if method == "slerp":  # two inputs: the base and one expert
        genome["models"] = [e1]
    return genome


def genomes(problem, n: int, seed: int, sigma: float = SIGMA) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [problem.x0() + rng.normal(0.0, sigma, problem.dim) for _ in range(n)]


def candidates(problem, n: int, seed: int) -> list:
    return [problem.decode(g) for g in genomes(problem, n, seed)]


# ------------------------------------------------------------------------------------------- phases
def bench_ps(pool, rows, methods, args, device) -> tuple[dict, object, object]:
    """Time each method's candidates on one resident merger; returns the figures, merger, tokenizer."""
    granularity = max(1, args.layers // 4)
    problems = {
        m: PSProblem(parse_config(search_config(pool, rows, method_genome(m, pool, granularity))), device)
        for m in methods
    }
    loader = PSProblem(parse_config(search_config(pool, rows, method_genome("dare_ties", pool, granularity))), device)
    merger, setup_s = timed(lambda: loader.merger, device)  # loads base + both experts once, builds the model
    log(f"PS merger set up in {setup_s:.1f} s (sources resident on {device}, dtype {loader.dtype})")
    out = {"dtype": loader.dtype, "setup_s": setup_s, "methods": {}}
    for method, problem in problems.items():
        figures = guarded(out, f"ps {method}", lambda p=problem: bench_method(merger, p, args, device))
        if figures is not None:
            out["methods"][method] = figures
            log(f"PS merge {method}: {figures['merge_s']:.3f} s per candidate")
    last = "dare_ties" if "dare_ties" in problems else methods[-1]
    merger.merge(to_merge_config(candidates(problems[last], 1, seed=2)[0].recipe))
    out["generation_model"] = last
    return out, merger, loader.tokenizer


def bench_method(merger, problem, args, device: str) -> dict:
    """Median of ``args.repeats`` distinct candidates after a warm-up (which builds any state)."""
    method = problem.config.genome.merge_method
    configs = [to_merge_config(c.recipe) for c in candidates(problem, args.repeats + 1, seed=1)]
    merger.merge(configs[0])  # warm-up
    runs = [(timed(lambda c=c: merger.merge(c), device)[1], merger.last_timings) for c in configs[1:]]
    median = statistics.median_low(s for s, _ in runs)  # an actual run: its split adds up
    split = next(t for s, t in runs if s == median)
    state = merger.fast_path.nbytes() if merger.fast_path is not None else {}
    figures = {"merge_s": median, **split.model_dump(), "fast_path_state_gb": _gb(state)}
    if method in args.reference.split(","):
        figures["reference"] = versus_mergekit_kernel(merger, configs[-1], device)
    return figures


def _gb(sizes: dict[str, int]) -> dict[str, float]:
    return {kind: round(n / 2**30, 2) for kind, n in sizes.items()}


def versus_mergekit_kernel(merger, config, device: str) -> dict:
    """One candidate with the fast path off (mergekit's kernels, same merger and seed), its
    tensors kept on the CPU, then the same candidate on the fast path: time of each and whether
    every tensor has the same bits."""
    fast_path, merger.fast_path = merger.fast_path, None
    try:
        _, mergekit_s = timed(lambda: merger.merge(config), device)
        expected = {name: t.detach().cpu() for name, t in merger.model.state_dict().items()}
    finally:
        merger.fast_path = fast_path
    _, fast_s = timed(lambda: merger.merge(config), device)
    state = merger.model.state_dict()
    bits = lambda t: t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])  # noqa: E731
    differ = [name for name, t in expected.items() if not torch.equal(bits(state[name].cpu()), bits(t))]
    result = {"mergekit_kernel_s": mergekit_s, "fast_s": fast_s, "tensors": len(expected), "differ": len(differ)}
    log(f"  vs mergekit's kernel: {mergekit_s:.3f} s -> {fast_s:.3f} s; {len(differ)}/{len(expected)} tensors differ")
    return result


def bench_generation(model, tokenizer, args, device) -> dict:
    rng = random.Random(0)
    lengths = [rng.randint(args.prompt_tokens // 2, args.prompt_tokens) for _ in range(args.batch)]
    prompts = [[tokenizer.bos_token_id] + [rng.randrange(4, len(tokenizer)) for _ in range(n - 1)] for n in lengths]
    runner = ModelRunner.wrap(model)
    run = lambda: greedy_generate(runner, prompts, tokenizer, args.new_tokens, [], args.batch)  # noqa: E731
    with evaluation_mode(model):
        run()  # warm-up (kernels, caches)
        times = [timed(run, device) for _ in range(args.gen_repeats)]
    (_, tokens), seconds = times[0][0], statistics.median(s for _, s in times)
    new = tokens - sum(lengths)
    return {
        "batch": args.batch,
        "prompt_tokens": sum(lengths),
        "new_tokens": new,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "new_tokens_per_s": new / seconds,
    }


def bench_dfs(pool, rows, args, device) -> tuple[dict, object, object]:
    genome = {"models": [str(pool["e1"]), str(pool["e2"])], "merge_method": "linear"}
    problem = DFSProblem(parse_config(search_config(pool, rows, genome, space="dfs")), device)
    _, load_s = timed(lambda: problem.pool, device)
    log(f"DFS pool loaded in {load_s:.1f} s")
    drawn = genomes(problem, 200, seed=3, sigma=0.5)  # as bench/dfs_memory.py draws its candidates
    paths, decode_s = timed(lambda: [problem.decode(g) for g in drawn], "cpu")
    problem.build(paths[0])  # the first build makes the resident stack
    _, switch_s = timed(lambda: [problem.build(paths[i % len(paths)]) for i in range(args.switches)], device)
    own = problem.decode(problem.x0())
    out = {
        "dtype": problem.dtype,
        "pool_load_s": load_s,
        "switch_us": 1e6 * switch_s / args.switches,
        "decode_ms": 1e3 * decode_s / len(drawn),
        "slots": problem.space.num_slots,
        "hops": len(own.path.hops),
        "mean_candidate_hops": statistics.mean(len(c.path.hops) for c in paths),
    }
    return out, problem.build(own), problem.tokenizer


# ------------------------------------------------------------------------------------------- report
def table(fig: dict) -> str:
    mem = lambda key: "n/a" if fig["peak_gb"].get(key) is None else f"{fig['peak_gb'][key]:.1f}"  # noqa: E731
    ps, dfs = fig.get("ps") or {}, fig.get("dfs") or {}
    lines = ["| measure | value |", "|---|---|"]
    for m, r in ps.get("methods", {}).items():
        lines.append(
            f"| PS merge {m} (s/candidate; plan/sched/exec/copy) | {r['merge_s']:.3f} "
            f"({r['plan_s']:.3f}/{r['schedule_s']:.3f}/{r['execute_s']:.3f}/{r['copy_s']:.3f}) |"
        )
        if "reference" in r:
            ref = r["reference"]
            lines.append(
                f"| PS merge {m}: mergekit's kernel -> fast path (s), tensors differing | "
                f"{ref['mergekit_kernel_s']:.3f} -> {ref['fast_s']:.3f}, {ref['differ']} of {ref['tensors']} |"
            )
    for key, label in (
        ("ps_generation", f"merged model ({ps.get('generation_model')})"),
        ("dfs_generation", "DFS layer stack"),
    ):
        g = fig.get(key)
        if g:
            lines.append(
                f"| fitness generate, {label}: tokens/s (new tokens/s), batch {g['batch']} | "
                f"{g['tokens_per_s']:,.0f} ({g['new_tokens_per_s']:,.0f}) |"
            )
    if dfs:
        lines.append(
            f"| DFS path switch (us) / genome decode (ms), T = {dfs['slots']} slots | {dfs['switch_us']:.1f} / "
            f"{dfs['decode_ms']:.2f} |"
        )
    lines += [
        f"| set-up: pool write / PS merger load / DFS pool load (s) | {fig['build_s']:.1f} / "
        f"{ps.get('setup_s', float('nan')):.1f} / {dfs.get('pool_load_s', float('nan')):.1f} |",
        f"| peak GPU GiB: PS merges / PS generation / DFS (pool + stack + generation) | {mem('ps')} / "
        f"{mem('generation')} / {mem('dfs')} |",
        f"| peak process RSS GiB | {fig['peak_rss_gb']:.1f} |",
    ]
    for phase, error in {**fig.get("errors", {}), **ps.get("errors", {})}.items():
        lines.append(f"| FAILED: {phase} | {error} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="hidden 256, 4 layers, vocab 1000: seconds on a CPU")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--reference",
        default=",".join(REFERENCE_METHODS),
        help="methods also run on mergekit's kernels (same merger), with a bitwise check",
    )
    parser.add_argument("--repeats", type=int, help="timed candidates per method, after a warm-up (3; --small 2)")
    parser.add_argument("--batch", type=int, default=32, help="prompts per generation batch")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="longest prompt (shortest is half)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per prompt (64; --small 16)")
    parser.add_argument("--gen-repeats", type=int, help="timed generations, median (2; --small 1)")
    parser.add_argument("--switches", type=int, help="DFS path switches timed (2000; --small 500)")
    parser.add_argument("--shard-mb", type=int, default=2048)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default 1 on a CPU device: OpenMP "
        "threads stall on a shared CPU; torch's default with CUDA)",
    )
    parser.add_argument("--workdir", default=None, help="where the temp pool goes (needs ~44 GB without --small)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    for key, value in (SMALL_RUN if args.small else RUN).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run_phases(root: Path, shape: dict, args, device: str, fig: dict) -> None:
    """Each phase in turn; a phase that fails is logged and recorded (``fig["errors"]``) and
    the ones that do not depend on it still run, so one run on a lent GPU yields what it can."""
    rows = root / "rows.jsonl"  # a fitness file for the configs; the benchmark's prompts are random tokens
    rows.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    pool, fig["build_s"] = timed(lambda: write_pool(root, shape, device, args.shard_mb), device)
    log(f"pool written in {fig['build_s']:.1f} s: base + 2 experts, Mistral {shape}, bf16")
    methods = [m for m in args.methods.split(",") if m]
    reset_peak(device)
    ps = guarded(fig, "ps", lambda: bench_ps(pool, rows, methods, args, device))
    if ps is not None:
        fig["ps"], merger, tokenizer = ps
        fig["peak_gb"]["ps"] = peak_gb(device)
        fig["params"] = sum(p.numel() for p in merger.model.parameters())
        reset_peak(device)
        generate = lambda: bench_generation(merger.model, tokenizer, args, device)  # noqa: E731
        fig["ps_generation"] = guarded(fig, "ps_generation", generate)
        fig["peak_gb"]["generation"] = peak_gb(device)
        del merger, ps
    save(fig, args)
    reset_peak(device)
    dfs = guarded(fig, "dfs", lambda: bench_dfs(pool, rows, args, device))
    if dfs is not None:
        fig["dfs"], stack, tokenizer = dfs
        fig["dfs_generation"] = guarded(fig, "dfs_generation", lambda: bench_generation(stack, tokenizer, args, device))
        fig["peak_gb"]["dfs"] = peak_gb(device)
        log(f"DFS: switch {fig['dfs']['switch_us']:.1f} us")
    save(fig, args)


def guarded(fig: dict, phase: str, run):
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - recorded, and the other phases go on
        traceback.print_exc()
        fig.setdefault("errors", {})[phase] = f"{type(error).__name__}: {error}"
        log(f"phase {phase} FAILED: {fig['errors'][phase]}")
        return None


def save(fig: dict, args) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2, default=str))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, shape = resolve_device(args.device), SMALL if args.small else FULL
    args.layers = shape["num_layers"]
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    fig = {
        "device": device,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "shape": shape,
        "small": args.small,
        "torch_threads": torch.get_num_threads(),
        "peak_gb": {},
    }
    with tempfile.TemporaryDirectory(prefix="mke-gpu-", dir=args.workdir) as tmp:
        run_phases(Path(tmp), shape, args, device, fig)
    fig["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    fig["wall_s"] = time.perf_counter() - STARTED
    print(
        f"\n{fig.get('params', 0) / 1e6:,.1f}M parameters per model, dtype {fig.get('ps', {}).get('dtype')}, "
        f"device {device}"
        f"{' (' + fig['gpu'] + ')' if fig['gpu'] else ''}, torch threads {fig['torch_threads']}"
        f"{', --small' if args.small else ''}, {fig['wall_s']:.0f} s after imports\n"
    )
    if not device.startswith("cuda"):
        print(
            f"NOT GPU FIGURES: a {device.upper()} run{' of the --small shapes' if args.small else ''}; no GPU was "
            "used.\n"
        )
    print(table(fig))
    save(fig, args)
    return fig


if __name__ == "__main__":
    main(sys.argv[1:])
