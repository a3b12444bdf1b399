"""Per-candidate merge cost: InMemoryMerger vs the mergekit-yaml round trip, side by side.

    python bench/merge_speed.py            # ~100M-parameter Llama family, fp32 (minutes)
    python bench/merge_speed.py --small    # tiny family, seconds (CI sanity)

Builds a random Llama-shaped family (a base and two "fine-tunes" = base + seeded noise) in a temp
dir, no downloads. For each merge method it times one candidate through ``InMemoryMerger.merge``
(median of --repeats, after one warm-up; split into plan / schedule / execute / copy;
the timed candidates alternate between two value sets of the recipe, as a search's do) and through
``mergekit-yaml CONFIG OUT`` in a subprocess plus loading OUT with transformers (what an on-disk
search pays per candidate). It also measures this machine's memory bandwidth with a large torch
add and prints the bandwidth bound of a linear merge (read every input once, write the output
once) and the in-memory linear time as a multiple of it.
"""

from __future__ import annotations

import os
import sys

# torch reads THP_MEM_ALLOC_ENABLE once, at its first CPU allocation: set it before importing it.
if "--thp" in sys.argv:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mergekit_evolve.merge import InMemoryMerger  # noqa: E402
from mergekit_evolve.zoo.random_models import make_random_model  # noqa: E402

SEED = 17
FULL_SHAPE = dict(num_layers=12, hidden_size=768, intermediate_size=1024, num_heads=12, vocab_size=32000)
SMALL_SHAPE = dict(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4, vocab_size=512)
SPARSIFYING = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
)
# sce sparsifies by select_topk (0.6 here, like the other methods' densities); "sce_all" is sce
# with select_topk 1 (mergekit's default: no sparsification), the row earlier tables measured.
SCE_TOPK = 0.6
METHODS = ("linear", *SPARSIFYING, "sce_all", "slerp", "nuslerp", "multislerp", "nearswap", "model_stock", "karcher")


def build_family(root: Path, shape: dict, dtype: torch.dtype) -> dict[str, Path]:
    base = make_random_model(root / "base", seed=0, dtype=dtype, **shape)
    family = {"base": base}
    tensors = load_file(base / "model.safetensors")
    for index, name in enumerate(("e1", "e2")):
        generator = torch.Generator().manual_seed(100 + index)
        noisy = {
            key: (t.float() + 0.02 * torch.randn(t.shape, generator=generator)).to(dtype) for key, t in tensors.items()
        }
        out = root / name
        out.mkdir()
        for item in base.iterdir():
            if item.name != "model.safetensors":
                (out / item.name).write_bytes(item.read_bytes())
        save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
        family[name] = out
    return family


def recipe(method: str, family: dict[str, Path], dtype: str) -> dict:
    base, e1, e2 = (str(family[k]) for k in ("base", "e1", "e2"))
    experts = [
        {"model": e1, "parameters": {"weight": [0.3, 0.7], "density": 0.6}},
        {"model": e2, "parameters": {"weight": 0.5, "density": 0.7}},
    ]
    strip = lambda keep: [  # noqa: E731 - methods take different per-model parameters
        {"model": m["model"], "parameters": {k: v for k, v in m["parameters"].items() if k in keep}} for m in experts
    ]
    config: dict = {"merge_method": method, "base_model": base, "dtype": dtype, "parameters": {}}
    if method.startswith("sce"):
        config["merge_method"] = "sce"
        config["parameters"] = {"select_topk": SCE_TOPK if method == "sce" else 1.0}
    if method == "linear":
        config.pop("base_model")
        config["models"] = [{"model": base, "parameters": {"weight": 0.2}}] + strip({"weight"})
    elif method in SPARSIFYING and method != "sce":
        config["models"] = [{"model": base}] + experts
        if method.startswith("della"):
            for expert in experts:
                expert["parameters"]["epsilon"] = 0.1
    elif method in ("slerp", "nearswap"):
        config["models"] = [{"model": base}, {"model": e1}]
        config["parameters"] = {"t": 0.4 if method == "slerp" else 0.02}
    elif method in ("nuslerp", "multislerp"):
        config["models"] = [{"model": base}] + strip({"weight"})
    elif method in ("sce", "sce_all", "model_stock"):
        config["models"] = [{"model": base}] + strip(set())
    elif method == "karcher":
        config.pop("base_model")
        config["models"] = [{"model": base}] + strip(set())
    else:
        raise ValueError(method)
    return config


def measure_bandwidth(num_bytes: int) -> float:
    """Best-of-5 bytes/s of a torch add (read 2 tensors, write 1), as a merge streams data."""
    numel = num_bytes // 4
    a, b, c = torch.rand(numel), torch.rand(numel), torch.empty(numel)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.add(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    return 3 * num_bytes / best


def other_values(config: MergeConfiguration) -> MergeConfiguration:
    """The same recipe with every per-model float parameter (weights, densities, epsilons) 10%
    smaller: a search's next candidate (same structure, new values). Global parameters stay
    (sce's select_topk decides which of its code paths runs: its rows keep theirs)."""

    def smaller(setting):
        if isinstance(setting, float):
            return setting * 0.9
        if isinstance(setting, list):
            return [smaller(item) for item in setting]
        return setting

    other = config.model_copy(deep=True)
    for block in other.models or []:
        if block.parameters:
            block.parameters = {name: smaller(value) for name, value in block.parameters.items()}
    return other


def time_in_memory(merger: InMemoryMerger, config: MergeConfiguration, repeats: int):
    """Median seconds per candidate (and its split), after a first candidate whose time is
    returned too: it builds the fast path's precomputed state for the method. The timed
    candidates alternate between ``config`` and ``other_values(config)``."""
    start = time.perf_counter()
    merger.merge(config)  # warm-up; builds the method's precomputed state
    first = time.perf_counter() - start
    candidates = [other_values(config), config]
    totals, splits = [], []
    for index in range(repeats):
        start = time.perf_counter()
        merger.merge(candidates[index % 2])
        totals.append(time.perf_counter() - start)
        splits.append(merger.last_timings)
    median = statistics.median(totals)
    split = min(splits, key=lambda t: abs(t.total_s - median))
    return median, split, first


def time_cli_round_trip(config_path: Path, out: Path, dtype: torch.dtype) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run(
        ["mergekit-yaml", str(config_path), str(out), "--random-seed", str(SEED), "--quiet", "--no-write-model-card"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"mergekit-yaml failed for {config_path}:\n{done.stderr[-2000:]}")
    merged = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    loaded = time.perf_counter()
    del model
    shutil.rmtree(out)  # 0.4 GB per round trip at 106M fp32
    return merged - start, loaded - merged


def model_bytes(path: Path) -> int:
    return (path / "model.safetensors").stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny models, runs in seconds")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated merge methods")
    parser.add_argument("--sparsifying", action="store_true", help="linear + every sparsifying method")
    parser.add_argument("--no-fast-path", action="store_true", help="InMemoryMerger(fast_path=False)")
    parser.add_argument("--repeats", type=int, default=3, help="timed in-memory merges per method")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-cli", action="store_true", help="skip the mergekit-yaml round trips")
    parser.add_argument(
        "--cli-repeats",
        type=int,
        default=1,
        help="mergekit-yaml round trips per method; the fastest counts (its time varies run to run)",
    )
    parser.add_argument(
        "--thp",
        action="store_true",
        help="THP_MEM_ALLOC_ENABLE=1 (huge pages for torch CPU tensors; the CLI inherits it too)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.small and args.methods == parser.get_default("methods"):
        args.methods = "linear,dare_ties"  # two CLI round trips' worth of seconds
    if args.sparsifying:
        args.methods = ",".join(("linear", *SPARSIFYING, "sce_all"))
    methods = [m for m in args.methods.split(",") if m]
    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    shape = SMALL_SHAPE if args.small else FULL_SHAPE

    with tempfile.TemporaryDirectory(prefix="merge-speed-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        family = build_family(root, shape, dtype)
        params = sum(t.numel() for t in load_file(family["base"] / "model.safetensors").values())
        print(
            f"family: base + 2 experts, Llama {shape}, {params / 1e6:.1f}M params each, "
            f"{args.dtype}, built in {time.perf_counter() - started:.1f}s; "
            f"torch threads {torch.get_num_threads()}; "
            f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        bandwidth = measure_bandwidth(max(model_bytes(family["base"]), 64 << 20))
        print(f"memory bandwidth (torch add, best of 5): {bandwidth / 1e9:.1f} GB/s")

        templates = {m: MergeConfiguration.model_validate(recipe(m, family, args.dtype)) for m in methods}
        started = time.perf_counter()
        merger = InMemoryMerger(
            MergeConfiguration.model_validate(recipe("ties", family, args.dtype)),
            random_seed=SEED,
            fast_path=not args.no_fast_path,
        )
        print(f"InMemoryMerger set-up (load 3 sources, build model): {time.perf_counter() - started:.1f}s\n")

        print(
            f"fast path: {'off' if args.no_fast_path else 'on'}; 'first s' = the first candidate of a "
            "method, which builds its precomputed state (once per search)"
        )
        header = (
            f"{'method':<16}{'first s':>8}{'in-memory s':>12}{'plan':>7}{'sched':>7}{'exec':>7}{'copy':>7}"
            f"{'cli merge s':>12}{'load s':>8}{'cli total':>10}{'speed-up':>9}"
        )
        print(header)
        print("-" * len(header))
        linear_time = None
        figures: dict = {
            "params_millions": params / 1e6,
            "dtype": args.dtype,
            "bandwidth_gb_s": bandwidth / 1e9,
            "methods": {},
        }
        for method in methods:
            in_memory, split, first = time_in_memory(merger, templates[method], args.repeats)
            if method == "linear":
                linear_time = in_memory
            row = (
                f"{method:<16}{first:>8.2f}{in_memory:>12.3f}{split.plan_s:>7.3f}{split.schedule_s:>7.3f}"
                f"{split.execute_s:>7.3f}{split.copy_s:>7.3f}"
            )
            if not args.no_cli:
                config_path = root / f"{method}.yaml"
                config_path.write_text(templates[method].to_yaml())
                outs = [root / f"out-{method}-{i}" for i in range(args.cli_repeats)]
                trips = [time_cli_round_trip(config_path, out, dtype) for out in outs]
                merge_s, load_s = min(trips, key=sum)
                total = merge_s + load_s
                row += f"{merge_s:>12.2f}{load_s:>8.2f}{total:>10.2f}{total / in_memory:>8.1f}x"
                figures["methods"][method] = {
                    "in_memory_s": in_memory,
                    "first_s": first,
                    "cli_total_s": total,
                    "speedup": total / in_memory,
                }
            else:
                figures["methods"][method] = {"in_memory_s": in_memory, "first_s": first}
            print(row, flush=True)

        if linear_time is not None:
            touched = 4 * model_bytes(family["base"])  # read 3 inputs + write 1 output
            bound = touched / bandwidth
            print(
                f"\nlinear bandwidth bound: {touched / 1e9:.2f} GB / {bandwidth / 1e9:.1f} GB/s = "
                f"{bound:.3f}s; in-memory linear {linear_time:.3f}s = {linear_time / bound:.1f}x the bound"
            )
            figures["linear_x_bandwidth_bound"] = linear_time / bound
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
