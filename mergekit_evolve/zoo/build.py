"""The zoo: a base model and two experts fine-tuned from it, plus task data.

The seed-0 zoo ships inside the package (``shipped/``, with a SHA256SUMS manifest): float32 training
is deterministic on one host but not across CPUs, so the shipped files are the reference every table
is measured on. ``build_zoo(force=True)`` / ``mergekit-evo zoo build`` still train it from the seed
with the same code, into the user cache, and ``compare_with_shipped`` says whether the rebuild matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from mergekit_evolve.atomic import staged_folder
from mergekit_evolve.zoo.data import Skills

if TYPE_CHECKING:
    import torch

ZOO_VERSION = 2
SHIPPED_SEED = 0
SHIPPED_DIR = Path(__file__).parent / "shipped"
MANIFEST = "SHA256SUMS"
RECIPE = {
    "hidden": 128,
    "layers": 4,
    "base_steps": 600,
    "base_lr": 3e-3,
    "expert_steps": 300,
    "expert_lr": 3e-4,
    "replay": 0.3,
    "batch_size": 64,
}
TASKS = {
    "script_math": ("target: arithmetic facts with the digits written in the script (needs both skills)", None),
    "script": ("read the script: letters -> digits", "script"),
    "math": ("single-digit arithmetic facts in plain digits", "math"),
}


class ZooTask(BaseModel):
    name: str
    description: str
    fitness: Path
    heldout: Path
    max_new_tokens: int
    skill_of: str | None = None


class Zoo(BaseModel):
    root: Path
    models: dict[str, Path]
    base: str = "base"
    experts: list[str]
    tasks: dict[str, ZooTask]
    target: str
    seed: int
    build_seconds: float

    @classmethod
    def load(cls, root: str | Path) -> Zoo:
        root = Path(root).absolute()
        data = json.loads((root / "zoo.json").read_text())
        data["root"] = root
        data["models"] = {k: root / v for k, v in data["models"].items()}
        for task in data["tasks"].values():
            task["fitness"], task["heldout"] = root / task["fitness"], root / task["heldout"]
        return cls.model_validate(data)


def default_zoo_dir(seed: int = 0) -> Path:
    cache = os.environ.get("MERGEKIT_EVOLVE_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "mergekit_evolve"
    return base / f"zoo-v{ZOO_VERSION}-seed{seed}"


def shipped_zoo() -> Zoo:
    """The seed-0 zoo that ships with the package (no training, read-only)."""
    return Zoo.load(SHIPPED_DIR)


def build_zoo(out: str | Path | None = None, seed: int = 0, force: bool = False) -> Zoo:
    """The zoo for ``seed``: the shipped one for seed 0, else (or with ``out`` / ``force``) trained
    from the seed into ``out`` or the user cache (about 5 minutes on 2 CPU cores) and reused after."""
    if out is None and seed == SHIPPED_SEED and not force and (SHIPPED_DIR / "zoo.json").exists():
        return shipped_zoo()
    root = Path(out).absolute() if out else default_zoo_dir(seed)
    manifest = root / "zoo.json"
    if manifest.exists() and not force:
        zoo = Zoo.load(root)
        if zoo.seed == seed:
            return zoo
    started = time.time()
    with staged_folder(root) as tmp:
        _build_into(tmp, seed)
        data = json.loads((tmp / "zoo.json").read_text())
        data["build_seconds"] = round(time.time() - started, 1)
        (tmp / "zoo.json").write_text(json.dumps(data, indent=2))
    return Zoo.load(root)


def file_digests(root: str | Path) -> dict[str, str]:
    """sha256 of every model and data file of a zoo folder, by path relative to it."""
    root = Path(root)
    files = sorted(p for sub in ("models", "data") for p in (root / sub).rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def shipped_digests() -> dict[str, str]:
    lines = (SHIPPED_DIR / MANIFEST).read_text().splitlines()
    return {path: digest for digest, path in (line.split(maxsplit=1) for line in lines if line.strip())}


def compare_with_shipped(zoo: Zoo) -> list[str]:
    """Files of ``zoo`` that differ from (or are missing in) the shipped zoo; empty when identical."""
    ours, shipped = file_digests(zoo.root), shipped_digests()
    return sorted(p for p in ours.keys() | shipped.keys() if ours.get(p) != shipped.get(p))


def ship(zoo: Zoo) -> Path:
    """Maintainers: make ``zoo`` the package's shipped zoo (files copied, manifest rewritten)."""
    with staged_folder(SHIPPED_DIR) as tmp:
        for sub in ("models", "data"):
            shutil.copytree(zoo.root / sub, tmp / sub)
        shutil.copy2(zoo.root / "zoo.json", tmp / "zoo.json")
        digests = file_digests(tmp)
        (tmp / MANIFEST).write_text("".join(f"{d}  {p}\n" for p, d in digests.items()))
    return SHIPPED_DIR


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _deterministic_torch():
    """Deterministic kernels and seeded RNGs while training; the caller's global torch settings (the
    deterministic flag, the RNG state, the thread count) come back after."""
    import torch

    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)


def _build_into(root: Path, seed: int) -> None:
    with _deterministic_torch():
        _train_and_save(root, seed)


def _train_and_save(root: Path, seed: int) -> None:
    from mergekit_evolve.zoo.tokenizer import save_tokenizer  # transformers: only when training

    skills = Skills(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, model in _train_models(skills, seed).items():
        model.save_pretrained(str(root / "models" / name), safe_serialization=True)
        save_tokenizer(root / "models" / name)
    manifest = {
        "models": {n: f"models/{n}" for n in ("base", "script", "math")},
        "base": "base",
        "experts": ["script", "math"],
        "tasks": _write_tasks(root, skills),
        "target": "script_math",
        "seed": seed,
        "build_seconds": 0.0,
        "script": skills.map,
        "recipe": RECIPE,
        "version": ZOO_VERSION,
    }
    (root / "zoo.json").write_text(json.dumps(manifest, indent=2))


def _train_models(skills: Skills, seed: int) -> dict[str, torch.nn.Module]:
    from mergekit_evolve.zoo.train import mixed, new_model, train  # torch: only when training

    """The base on copying + the arithmetic format, then each expert fine-tuned from it with replay."""
    r = RECIPE
    t0 = time.time()
    _log(f"training the base ({r['base_steps']} steps), then two experts ({r['expert_steps']} steps each)")
    base = train(
        new_model(seed, r["hidden"], r["layers"]),
        skills.base_row,
        r["base_steps"],
        r["base_lr"],
        seed=seed,
        batch_size=r["batch_size"],
        warmup=50,
        log=lambda m: _log(f"base: {m}"),
    )
    _log(f"base trained in {time.time() - t0:.0f} s")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    models = {"base": base}
    for i, (name, sampler) in enumerate((("script", skills.script_row), ("math", skills.math_row))):
        t1 = time.time()
        expert = new_model(seed, r["hidden"], r["layers"])
        expert.load_state_dict(base_state)
        models[name] = train(
            expert,
            mixed(sampler, skills.base_row, r["replay"]),
            r["expert_steps"],
            r["expert_lr"],
            seed=seed + 1 + i,
            batch_size=r["batch_size"],
            log=lambda m, n=name: _log(f"{n}: {m}"),
        )
        _log(f"{name} expert trained in {time.time() - t1:.0f} s")
    return models


def _write_tasks(root: Path, skills: Skills) -> dict[str, dict]:
    tasks = {}
    for task, (description, skill) in TASKS.items():
        folder = root / "data" / task
        folder.mkdir(parents=True)
        for split in ("fitness", "heldout"):
            rows = skills.task_rows(task, split)
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        tasks[task] = {
            "name": task,
            "description": description,
            "fitness": f"data/{task}/fitness.jsonl",
            "heldout": f"data/{task}/heldout.jsonl",
            "max_new_tokens": 8,
            "skill_of": skill,
        }
    return tasks
