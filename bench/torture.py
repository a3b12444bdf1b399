"""Crash-safety torture: SIGKILL a real `mergekit-evo` run at random moments, resume, repeat.

At the end the run must equal an uninterrupted run with the same seed: the same candidates in the
same order with the same fitness (no completed evaluation lost or evaluated twice), the same
best.yaml and the same best fitness.

    python bench/torture.py --kills 24          # the long form (a few minutes on 2 cores)

tests/test_crash_safety.py runs the short form (a few kills).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def make_models(root: Path) -> list[str]:
    from mergekit_evolve.zoo.random_models import make_random_model

    return [str(make_random_model(root / f"m{i}", seed=i, num_layers=4, hidden_size=32)) for i in range(3)]


def write_config(root: Path, models: list[str], max_evals: int) -> Path:
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(24)))
    config = {
        "genome": {"models": models[1:], "base_model": models[0], "merge_method": "dare_ties", "layer_granularity": 2},
        "fitness": {"tasks": [{"name": "ppl", "kind": "perplexity", "data": str(rows)}]},
        "optimizer": {"max_evals": max_evals, "seed": 7},
        "dtype": "float32",
    }
    path = root / "evo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mergekit_evolve.cli", *args, "--quiet"]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def records(out: Path) -> list[dict]:
    lines = (out / "evaluations.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: (r["generation"], r["candidate"]))


def torture(root: Path, kills: int, max_evals: int = 40, seed: int = 0, log=print) -> dict:
    rng = random.Random(seed)
    models = make_models(root)
    config = write_config(root, models, max_evals)
    ref, out = root / "ref", root / "out"
    started = time.time()
    subprocess.run(cli("run", str(config), "--out", str(ref), "--no-save-model"), check=True, env=env(), capture_output=True)
    reference_seconds = time.time() - started
    log(f"uninterrupted run: {reference_seconds:.1f} s")
    done_kills, finished = 0, False
    while not finished:
        # Killed before config.yaml existed, the run never started: start it again.
        started_before = (out / "config.yaml").exists()
        command = cli("resume", str(out)) if started_before else cli("run", str(config), "--out", str(out), "--no-save-model")
        proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done_kills < kills:
            # Anywhere from late start-up to the end of a whole run: merging, evaluating, writing state.
            # Work done before each kill persists, so the run advances across kills.
            delay = rng.uniform(0.4, 1.0) * reference_seconds
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                done_kills += 1
                n = len(records(out)) if (out / "evaluations.jsonl").exists() else 0
                log(f"kill {done_kills:2d} after {delay:.1f} s: {n} evaluations on disk")
                continue
        rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"run failed (exit {rc}): {proc.stderr.read().decode()[-2000:]}")
        finished = True
    ours, theirs = records(out), records(ref)
    keys = [(r["generation"], r["candidate"]) for r in ours]
    result = {
        "kills": done_kills,
        "evaluations": len(ours),
        "duplicates": len(keys) - len(set(keys)),
        "same_candidates": [r["genome"] for r in ours] == [r["genome"] for r in theirs],
        "same_fitness": [r["fitness"] for r in ours] == [r["fitness"] for r in theirs],
        "same_best_yaml": (out / "best.yaml").read_text() == (ref / "best.yaml").read_text(),
        "same_best_fitness": json.loads((out / "summary.json").read_text())["best"]["fitness"]
        == json.loads((ref / "summary.json").read_text())["best"]["fitness"],
        "stray_temp_files": sorted(p.name for p in out.iterdir() if ".tmp" in p.name),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--max-evals", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mke-torture-"))
    try:
        result = torture(root, args.kills, args.max_evals, args.seed)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    ok = result["duplicates"] == 0 and all(result[k] for k in ("same_candidates", "same_fitness", "same_best_yaml", "same_best_fitness"))
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
