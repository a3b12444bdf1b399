"""DFS memory and path-switch benchmark: shared layer pool vs a materialised stack.

Builds a pool of two random Llama models (default 8 layers x 512 hidden each), then measures
  * the pool alone,
  * the layer-stack model for a T = 3M-hop path (every slot of the paper's r = 3 layout used),
  * a materialised stack of the same path (every hop's layer deep-copied, as a frankenmerge would hold it),
both as tensor storage (unique storages by data_ptr) and as resident-memory (RSS) deltas, and times a path
switch (``pool.model(new_path)``) and a genome decode.

    python bench/dfs_memory.py [--layers 8] [--hidden 512] [--switches 2000]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

from mergekit_evolve.merge.layer_pool import LayerPool
from mergekit_evolve.space.dfs import DFSSpace
from mergekit_evolve.zoo.random_models import make_random_model


def rss_mb() -> float:
    """Resident set size after returning freed heap pages to the OS (so deltas show live memory)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS deltas may include freed-but-kept pages
        pass
    return psutil.Process().memory_info().rss / 2**20


def storage_mb(tensors) -> float:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--switches", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            make_random_model(
                Path(tmp) / f"m{seed}",
                arch="llama",
                seed=seed,
                num_layers=args.layers,
                hidden_size=args.hidden,
                num_heads=8,
            )
            for seed in (0, 1)
        ]
        before = rss_mb()
        pool = LayerPool.from_pretrained(paths)
        # safetensors weights may be memory-mapped: touch every page so RSS counts them
        with torch.no_grad():
            for tensor in pool.parameters():
                tensor.sum()
        pool_rss = rss_mb() - before
    pool_storage = storage_mb(pool.parameters())

    space = DFSSpace(pool.layer_counts, repeats=3)
    genome = space.x0()
    genome[: space.num_slots] = 1.0  # every slot: T = 3M hops
    long_path = space.decode(genome)

    before = rss_mb()
    stack = pool.model(long_path)
    stack_rss = rss_mb() - before
    stack_storage = storage_mb(module_tensors(stack))
    shared = set(t.untyped_storage().data_ptr() for t in module_tensors(stack)) <= set(
        t.untyped_storage().data_ptr() for t in pool.parameters()
    )

    before = rss_mb()
    materialised = nn.ModuleList(copy.deepcopy(pool.layer(m, layer)) for m, layer in long_path.hops)
    copies_rss = materialised_rss = rss_mb() - before
    # its layers plus model A's embeddings, norm and head (a standalone model needs those too)
    head_storage = pool_storage - storage_mb(pool.layers.parameters())
    materialised_storage = storage_mb(module_tensors(materialised)) + head_storage
    materialised_rss += pool_rss * head_storage / pool_storage

    ids = torch.randint(4, 50, (1, 32))
    with torch.no_grad():
        start = time.perf_counter()
        stack(ids, use_cache=False)
        forward_s = time.perf_counter() - start

    rng = np.random.default_rng(0)
    candidates = [space.decode(space.x0() + rng.normal(0, 0.5, space.dim)) for _ in range(50)]
    start = time.perf_counter()
    for i in range(args.switches):
        pool.model(candidates[i % len(candidates)])
    switch_us = (time.perf_counter() - start) / args.switches * 1e6
    start = time.perf_counter()
    for _ in range(200):
        space.decode(genome)
    decode_ms = (time.perf_counter() - start) / 200 * 1e3

    n_params = sum(t.numel() for t in pool.parameters())
    print(f"pool: 2 x Llama {args.layers} layers x {args.hidden} hidden, {n_params / 1e6:.1f}M parameters (float32)")
    print(f"path: T = 3M = {len(long_path)} hops (M = {space.num_layers}, r = 3), shared: {shared}")
    print(f"{'':44s}{'storage MB':>11s}{'x pool':>8s}{'RSS MB':>9s}{'x pool':>8s}")
    rows = [
        ("pool (layers of both + A's embed/head)", pool_storage, pool_rss),
        (f"pool + layer stack, T={len(long_path)} (shared)", stack_storage, pool_rss + stack_rss),
        (f"materialised stack, T={len(long_path)} (deep copies)", materialised_storage, materialised_rss),
    ]
    for name, storage, rss in rows:
        print(f"{name:44s}{storage:11.1f}{storage / pool_storage:8.2f}{rss:9.1f}{rss / pool_rss:8.2f}")
    print(f"(building the layer stack added {stack_rss:.1f} MB RSS; the deep-copied layers {copies_rss:.1f} MB)")
    print(f"path switch: {switch_us:.1f} us per pool.model(path) (mean of {args.switches})")
    print(f"genome decode (T={space.num_slots}, dim {space.dim}): {decode_ms:.2f} ms")
    print(f"forward, 32 tokens through {len(long_path)} hops: {forward_s * 1e3:.0f} ms")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "hops": len(long_path),
                    "stack_rss_x_pool": (pool_rss + stack_rss) / pool_rss,
                    "materialised_rss_x_pool": materialised_rss / pool_rss,
                    "switch_us": switch_us,
                    "decode_ms": decode_ms,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
