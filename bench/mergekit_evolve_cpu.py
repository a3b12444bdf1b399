"""Run the real ``mergekit-evolve`` (mergekit 0.1.5) on a CPU, for bench/vs_mergekit_evolve.py.

It does not run on a CPU as shipped; the patches of ../shared/peer-notes.md are applied here at run
time (never to site-packages): in this driver before its ``main()``, and in every Ray worker through
Ray's ``worker_process_setup_hook``. Each evaluation's score and finishing time go to a JSONL log.

    python bench/mergekit_evolve_cpu.py LOG.jsonl CONFIG --storage-path DIR [mergekit-evolve options]
"""

from __future__ import annotations

import json
import sys
import time


def apply_cpu_patches() -> None:
    """1. lm-eval's vLLM module imports vllm unguarded: stub it. 3. ``torch.cpu.empty_cache`` does not
    exist; lm-eval's HFLM defaults to CUDA: a no-op, and device "cpu" forced. (2: a logical GPU, below.)"""
    import types

    import lm_eval.models
    import torch

    if "lm_eval.models.vllm_causallms" not in sys.modules:
        stub = types.ModuleType("lm_eval.models.vllm_causallms")
        stub.VLLM = type("VLLM", (), {})
        sys.modules["lm_eval.models.vllm_causallms"] = stub
        lm_eval.models.vllm_causallms = stub
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None
    from lm_eval.models.huggingface import HFLM

    if not getattr(HFLM.__init__, "forced_cpu", False):
        original = HFLM.__init__

        def on_cpu(self, *args, **kwargs):
            kwargs["device"] = "cpu"
            original(self, *args, **kwargs)

        on_cpu.forced_cpu = True
        HFLM.__init__ = on_cpu


def log_evaluations(path: str) -> None:
    """Append {score, time} per evaluated genome (the pool strategy's results, as they return)."""
    from mergekit.evo.strategy import ActorPoolEvaluationStrategy

    original = ActorPoolEvaluationStrategy.evaluate_genotypes

    def evaluate_genotypes(self, genotypes):
        results = original(self, genotypes)
        returned = time.time()  # a generation's results return together
        with open(path, "a") as log:
            for result in results:
                log.write(json.dumps({"score": result["score"], "time": returned}) + "\n")
        return results

    ActorPoolEvaluationStrategy.evaluate_genotypes = evaluate_genotypes


def main() -> None:
    log_path, args = sys.argv[1], sys.argv[2:]
    started = time.time()
    with open(log_path, "w") as log:
        log.write(json.dumps({"process_start": started}) + "\n")
    apply_cpu_patches()
    import ray

    # 2. Its actors request num_gpus=1: a logical GPU lets Ray schedule them (with --num-gpus 1).
    ray.init(num_gpus=1, runtime_env={"worker_process_setup_hook": apply_cpu_patches}, log_to_driver=False)
    log_evaluations(log_path)
    from mergekit.scripts.evolve import main as evolve_main

    evolve_main(args, standalone_mode=True)


if __name__ == "__main__":
    main()
