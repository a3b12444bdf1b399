"""mergekit-evolve's command-line options on ``mergekit-evo run``, for users who bring its command lines.

Each option of ``mergekit-evolve`` (mergekit/scripts/evolve.py, mergekit 0.1.5) is either accepted with
the same meaning, as a spelling of one of ours, or refused with one line that names what to use instead:

    --storage-path DIR        --out DIR (the run directory)
    --max-fevals N            --max-evals N (here exactly N evaluations; see the README)
    --random-seed S           merge_seed: the seed of random merge methods (DARE, DELLA), as there
    --num-gpus N              one worker per GPU: --executor ray --workers N (N = 1: in this process)
    --task-search-path DIR    task_search_path: folders of local lm-eval task YAMLs (repeatable)
    --sigma0 X                optimizer.sigma0
    --force-population-size N optimizer.popsize
    --batch-size N            fitness.batch_size
    --[no-]save-final-model   --no-save-model
    --i-understand-the-depths-of-the-evils-i-am-unleashing   --allow-benchmark-tasks
    --wandb, --wandb-project, --wandb-entity                 the wandb: section
    --vllm / --no-vllm        fitness.backend: vllm / hf (one vLLM engine per worker, weights swapped in place)
    --[no-]in-memory, --[no-]reshard, --merge-cuda   accepted: candidates are always merged in memory from
                              sources read once, on --device
    refused: --strategy, --no-merge-cuda, --trust-remote-code, --allow-crimes, --timeout,
             --load-in-8bit, --load-in-4bit
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_evolve.errors import InputError

# option name -> (when it is refused, what to do instead)
REFUSED = {
    "strategy": (
        None,
        "candidates run one after another here or on Ray workers; use --executor local|ray and --workers N",
    ),
    "merge_cuda": (False, "merging and evaluation share one device; use --device cpu (or --device cuda)"),
    "trust_remote_code": (
        True,
        "models are loaded without custom code; use a model family transformers supports natively",
    ),
    "allow_crimes": (True, "models of different architectures cannot be merged; merge models of one architecture"),
    "timeout": (
        None,
        "there is no wall-clock limit; bound the run with --max-evals (Ctrl-C, then mergekit-evo resume, continues it)",
    ),
    "load_in_8bit": (True, "quantized evaluation is not supported; set dtype: bfloat16 in the config to halve memory"),
    "load_in_4bit": (True, "quantized evaluation is not supported; set dtype: bfloat16 in the config to halve memory"),
}


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Translated:
    """Our settings after mergekit-evolve's options are applied."""

    out: Path | None
    max_evals: int | None
    workers: int | None
    executor: str | None
    allow_benchmark_tasks: bool = False
    no_save_model: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys
    task_search_path: list[str] = field(default_factory=list)
    batch_size: int | None = None

    def apply_to(self, config):
        """Settings that add to or depend on the loaded config."""
        if self.task_search_path:
            config = config.model_copy(
                update={"task_search_path": [*(config.task_search_path or []), *self.task_search_path]}
            )
        if self.batch_size is not None:
            if config.builtin_fitness is None:
                raise InputError(
                    "--batch-size: sets fitness.batch_size of the built-in fitness; this config scores lm-eval "
                    "tasks, which run at their own batch size; drop --batch-size"
                )
            config = config.model_copy(
                update={"fitness": config.fitness.model_copy(update={"batch_size": self.batch_size})}
            )
        return config


def translate(given: dict[str, Any], *, out, max_evals, workers, executor) -> Translated:
    """mergekit-evolve's options (``given``, as click passes them) -> our settings, or one InputError line."""
    for name, (refused_value, instead) in REFUSED.items():
        value = given.get(name)
        if value is not None and (refused_value is None or value == refused_value):
            flag = _flag_name(name) if value is not False else _flag_name("no_" + name)
            raise InputError(f"{flag}: mergekit-evolve's option has no equivalent here: {instead}")
    t = Translated(
        out=_one_of("--out", out, "--storage-path", given.get("storage_path")),
        max_evals=_one_of("--max-evals", max_evals, "--max-fevals", given.get("max_fevals")),
        workers=workers,
        executor=executor,
        allow_benchmark_tasks=bool(given.get("evils")),
        no_save_model=given.get("save_final_model") is False,
    )
    if t.out is None:
        raise InputError("--out: missing; give the run directory with --out DIR (mergekit-evolve's --storage-path DIR)")
    _positive("--max-fevals", given.get("max_fevals"))
    if given.get("random_seed") is not None:
        if given["random_seed"] < 0:
            raise InputError(f"--random-seed: {given['random_seed']} is out of range; use 0 or more")
        t.overrides["merge_seed"] = given["random_seed"]
    gpus = given.get("num_gpus")
    if gpus is not None:
        _positive("--num-gpus", gpus)
        if workers is not None or executor is not None:
            raise InputError("--num-gpus: give either --num-gpus or --executor/--workers, not both")
        t.executor, t.workers = ("ray", gpus) if gpus > 1 else ("local", None)
    if given.get("vllm") is not None:
        t.overrides["fitness.backend"] = "vllm" if given["vllm"] else "hf"
    for name, key in (("sigma0", "optimizer.sigma0"), ("force_population_size", "optimizer.popsize")):
        if given.get(name) is not None:
            t.overrides[key] = given[name]
    t.task_search_path = [str(Path(p).absolute()) for p in given.get("task_search_path") or ()]
    if given.get("batch_size") is not None:
        t.batch_size = _positive("--batch-size", given["batch_size"])
    if given.get("use_wandb"):
        t.overrides["wandb"] = {
            "project": given.get("wandb_project") or "mergekit-evolve",
            "entity": given.get("wandb_entity"),
        }
    return t


def _one_of(ours: str, our_value, theirs: str, their_value):
    if our_value is not None and their_value is not None:
        raise InputError(f"{theirs}: is mergekit-evolve's name for {ours}; give only one of them")
    return our_value if our_value is not None else their_value


def _positive(flag: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise InputError(f"{flag}: {value} is out of range; use a positive number")
    return value
