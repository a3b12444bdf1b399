"""Build (once) and cache the zoo: a base model and two experts fine-tuned from it, plus task data."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel

from mergekit_evolve.zoo.data import Skills
from mergekit_evolve.zoo.tokenizer import save_tokenizer
from mergekit_evolve.zoo.train import mixed, new_model, train

ZOO_VERSION = 2
RECIPE = {"hidden": 128, "layers": 4, "base_steps": 600, "base_lr": 3e-3, "expert_steps": 300,
          "expert_lr": 3e-4, "replay": 0.3, "batch_size": 64}
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
    skill_of: Optional[str] = None


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
    def load(cls, root: str | Path) -> "Zoo":
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


def build_zoo(out: str | Path | None = None, seed: int = 0, force: bool = False) -> Zoo:
    """The cached zoo, built on first use (about 1-2 minutes on 2 CPU cores)."""
    root = Path(out).absolute() if out else default_zoo_dir(seed)
    manifest = root / "zoo.json"
    if manifest.exists() and not force:
        zoo = Zoo.load(root)
        if zoo.seed == seed:
            return zoo
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.building{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.time()
    _build_into(tmp, seed)
    data = json.loads((tmp / "zoo.json").read_text())
    data["build_seconds"] = round(time.time() - started, 1)
    (tmp / "zoo.json").write_text(json.dumps(data, indent=2))
    if force:
        shutil.rmtree(root, ignore_errors=True)
    try:
        os.rename(tmp, root)  # atomic; if another process won the race, use its zoo
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return Zoo.load(root)


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", file=sys.stderr, flush=True)


def _build_into(root: Path, seed: int) -> None:
    torch.use_deterministic_algorithms(True)
    skills = Skills(seed)
    r = RECIPE
    root.mkdir(parents=True)
    t0 = time.time()
    base = train(new_model(seed, r["hidden"], r["layers"]), skills.base_row, r["base_steps"], r["base_lr"],
                 seed=seed, batch_size=r["batch_size"], warmup=50)
    _log(f"base trained in {time.time() - t0:.0f} s")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    models = {"base": base}
    for i, (name, sampler) in enumerate((("script", skills.script_row), ("math", skills.math_row))):
        t1 = time.time()
        expert = new_model(seed, r["hidden"], r["layers"])
        expert.load_state_dict(base_state)
        models[name] = train(expert, mixed(sampler, skills.base_row, r["replay"]), r["expert_steps"], r["expert_lr"],
                             seed=seed + 1 + i, batch_size=r["batch_size"])
        _log(f"{name} expert trained in {time.time() - t1:.0f} s")
    for name, model in models.items():
        model.save_pretrained(str(root / "models" / name), safe_serialization=True)
        save_tokenizer(root / "models" / name)
    tasks = {}
    for task, (description, skill) in TASKS.items():
        folder = root / "data" / task
        folder.mkdir(parents=True)
        for split in ("fitness", "heldout"):
            rows = skills.task_rows(task, split)
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        tasks[task] = {"name": task, "description": description, "fitness": f"data/{task}/fitness.jsonl",
                       "heldout": f"data/{task}/heldout.jsonl", "max_new_tokens": 8, "skill_of": skill}
    manifest = {"models": {n: f"models/{n}" for n in models}, "base": "base", "experts": ["script", "math"],
                "tasks": tasks, "target": "script_math", "seed": seed, "build_seconds": 0.0,
                "script": skills.map, "recipe": r, "version": ZOO_VERSION}
    (root / "zoo.json").write_text(json.dumps(manifest, indent=2))
