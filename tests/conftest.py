"""Shared fixtures: a seeded family of random tiny models, and the embedded zoo (shipped with the package)."""

from __future__ import annotations

import os

# No hub at test time. huggingface_hub reads these once, when it is first imported (below, through
# transformers), so they must be set before any import that pulls it in.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Child processes (CLI runs, Ray workers) import this checkout's code, whatever is installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mergekit_evolve.zoo.random_models import make_random_model  # noqa: E402

# The suite runs in two pytest-xdist workers (pyproject addopts): each worker, and the processes it starts,
# uses one core's share of threads, so the two never oversubscribe the machine.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def make_family(root: Path, n_experts: int = 2, noise: float = 0.02, **kwargs) -> dict[str, Path]:
    """A random 'base' and experts = base + seeded noise (they look like fine-tunes of one base)."""
    base = make_random_model(root / "base", seed=0, **kwargs)
    family = {"base": base}
    for i in range(n_experts):
        expert = root / f"expert{i}"
        shutil.copytree(base, expert)
        weights = load_file(expert / "model.safetensors")
        gen = torch.Generator().manual_seed(100 + i)
        noisy = {k: v + noise * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in weights.items()}
        save_file(noisy, expert / "model.safetensors", metadata={"format": "pt"})
        family[f"expert{i}"] = expert
    return family


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def zoo():
    from mergekit_evolve.zoo import build_zoo

    return build_zoo(seed=0)


@pytest.fixture(scope="session")
def demo_out(zoo, tmp_path_factory) -> Path:
    """One `mergekit-evo demo` (PS, 6 evaluations, seeds 0 and 1) shared by the tests of its output."""
    from click.testing import CliRunner

    from mergekit_evolve.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(
        main,
        ["demo", "--space", "ps", "--max-evals", "6", "--seeds", "2", "--out", str(out), "--device", "cpu", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    return out


# The longest files first: with two workers taking whole files (--dist loadfile, in collection order), a long
# file that starts last leaves the other worker idle at the end. Measured with --durations (seconds per file).
LONGEST_FIRST = [
    "test_ray_cluster.py",
    "test_crash_safety.py",
    "test_vllm_backend.py",
    "test_vllm_dfs.py",
    "test_merge_engine.py",
    "test_lm_eval.py",
    "test_ray.py",
    "test_pareto.py",
    "test_search.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
