"""Side by side with the peer's per-candidate path, same zoo, task, CMA-ES budget and seed.

mergekit's own `mergekit-evolve` does not run on a CPU as shipped (its Ray actors request a GPU,
`mergekit.evo.actors` imports vLLM through lm-eval, it calls `torch.cpu.empty_cache`, and its
`--in-memory` mode hits mergekit 0.1.5's `plan_in_memory` TypeError; see ../shared/peer-notes.md).
So this benchmark re-runs its on-disk per-candidate path faithfully inside our loop: every
candidate is merged to disk with mergekit's `run_merge`, reloaded with transformers, then scored,
which is what mergekit-evolve's `OnDiskMergeEvaluator` does per candidate. Ours merges in memory
into one resident model. Both see the same genomes (same CMA-ES seed), so the best fitness at equal
evaluations must be identical; the difference is time.

    python bench/vs_mergekit_evolve.py [--max-evals 40]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mergekit_evolve.config import parse_config
from mergekit_evolve.search import runner
from mergekit_evolve.search.problems import PSProblem


class OnDiskProblem(PSProblem):
    """The peer's per-candidate path: run_merge to a fresh folder, reload, evaluate."""

    def build(self, candidate):
        import transformers

        from mergekit_evolve.merge import merge_to_disk
        from mergekit_evolve.recipe.ps import to_merge_config

        scratch = Path(tempfile.mkdtemp(prefix="mke-peer-"))
        try:
            merge_to_disk(to_merge_config(candidate.recipe), scratch / "m", device=self.device,
                          random_seed=self.config.merge_seed, write_model_card=False)
            return transformers.AutoModelForCausalLM.from_pretrained(str(scratch / "m"), dtype=self.dtype).eval()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def zoo_config(max_evals: int, seed: int) -> dict:
    from mergekit_evolve.demo import demo_config
    from mergekit_evolve.zoo import build_zoo

    return demo_config(build_zoo(), "ps", max_evals, seed)


def timed_run(problem_cls, config, out: Path) -> dict:
    problem = problem_cls(config, "cpu")
    started = time.perf_counter()
    summary = runner.run_stage(problem, config, _fresh(out), save_model=False, progress=False)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "evals": summary["evaluations"], "best": summary["best"]["fitness"],
            "evals_per_hour": 3600 * summary["evaluations"] / wall}


def _fresh(path: Path):
    from mergekit_evolve.search.rundir import RunDir

    shutil.rmtree(path, ignore_errors=True)
    run_dir = RunDir(path)
    run_dir.prepare(fresh=True)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-evals", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = parse_config(zoo_config(args.max_evals, args.seed))
    root = Path(tempfile.mkdtemp(prefix="mke-vs-"))
    try:
        # Warm both paths first (imports, file cache, mergekit's lazy set-up), so the one timed
        # first does not pay the process's cold start.
        warm = parse_config(zoo_config(4, args.seed))
        timed_run(PSProblem, warm, root / "warm-ours")
        timed_run(OnDiskProblem, warm, root / "warm-peer")
        ours = timed_run(PSProblem, config, root / "ours")
        peer = timed_run(OnDiskProblem, config, root / "peer")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = ours["evals_per_hour"] / peer["evals_per_hour"]
    print(f"{'path':34s} {'evals':>6s} {'wall s':>8s} {'evals/hour':>11s} {'best fitness':>13s}")
    print(f"{'ours (in-memory, resident model)':34s} {ours['evals']:6d} {ours['wall_s']:8.1f} {ours['evals_per_hour']:11.0f} {ours['best']:13.4f}")
    print(f"{'peer path (run_merge+reload)':34s} {peer['evals']:6d} {peer['wall_s']:8.1f} {peer['evals_per_hour']:11.0f} {peer['best']:13.4f}")
    print(f"ratio ours/peer: {ratio:.1f}x evaluations per hour; same best at equal evaluations: {ours['best'] == peer['best']}")
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "peer_path": peer, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
