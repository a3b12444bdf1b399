"""A whole run: config -> problem + fitness -> search -> held-out scores -> best recipe and model.

The one place where the pipeline's stages meet: ``search/`` finds the best candidate, ``fitness/`` scores
it, ``export/`` writes what it becomes. ``start`` creates the run directory and writes ``config.yaml``
(overrides applied) and ``run.json``; ``resume`` reads them back, so a resumed run is the same run.
``space: ps+dfs`` runs two stages (each a complete, resumable run directory: ``RunDir.stage``); the PS
model joins the DFS collection as model A.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_evolve.config import EvolveConfig, load_config, source_models
from mergekit_evolve.errors import InputError
from mergekit_evolve.export.artifacts import best_writer, staged_recipe
from mergekit_evolve.export.artifacts import save_model as save_best_model
from mergekit_evolve.export.front import write_front
from mergekit_evolve.fitness.factory import make_fitness
from mergekit_evolve.progress import note, step
from mergekit_evolve.resources import resolve_device
from mergekit_evolve.search.economy import Economy, tokens_of
from mergekit_evolve.search.executors import make_executor, make_score
from mergekit_evolve.search.loop import Racing, SearchState, run_search
from mergekit_evolve.search.m2n2 import ItemResults
from mergekit_evolve.search.objectives import Objectives
from mergekit_evolve.search.problems import make_problem
from mergekit_evolve.search.records import BestResult, RunInfo, Summary
from mergekit_evolve.search.rundir import RunDir
from mergekit_evolve.search.validation import describe_decision, make_validation_gate, ps_dfs_validation


def start(
    config: EvolveConfig,
    out: str | Path,
    *,
    device: str = "auto",
    force: bool = False,
    save_model: bool = True,
    progress: bool = True,
) -> Summary:
    run_dir = RunDir(out)
    run_dir.check_fresh(force)  # before any model or task is read
    device = resolve_device(device)
    # every input problem surfaces here, before anything is written
    fitness = validate(config, device, progress=progress)
    run_dir.prepare(fresh=True, force=force)
    try:
        # run.json first: config.yaml is what makes the folder a resumable run, so a resume never
        # sees a run without its settings.
        run_dir.write_info(RunInfo(device=device, save_model=save_model, version=_version()))
        run_dir.write_config(config.to_yaml())
        return _execute(config, run_dir, device, save_model, progress, fitness)
    finally:
        run_dir.unlock()


def validate(config: EvolveConfig, device: str = "cpu", progress: bool = False):
    """Read model configs, build the search space and load the fitness data; load no weights.

    Returns the fitness, so a run that follows need not load its data (or lm-eval's tasks) again."""
    _check_fitness_available(config)
    if config.executor.kind == "ray":
        from mergekit_evolve.search.executors import prepare_cluster

        prepare_cluster(config, device)  # a cluster to join: reachable, joined, big enough, nodes ready
    from mergekit_evolve.fitness.guard import check_selection_tasks

    check_selection_tasks(config)
    problem = make_problem(config, device)
    if config.space == "ps+dfs":  # the PS model will share the source models' shape
        from mergekit_evolve.search.dfs_problem import check_dfs_collection

        check_dfs_collection(list(config.dfs.models or source_models(config)), 0)
    fitness = make_fitness(config, problem.tokenizer, problem.tokenizer_ref, progress)
    if config.backend == "vllm":
        check_vllm_backend(config, problem, fitness)
    if config.optimizer.strategy == "m2n2":
        from mergekit_evolve.search.m2n2 import check_m2n2

        check_m2n2(config, problem)
    if config.optimizer.racing is not None:
        from mergekit_evolve.search.racing import check_racing

        check_racing(config.optimizer.racing, fitness)
    if config.optimizer.economy in ("subsample", "auto"):
        from mergekit_evolve.search.economy import check_economy

        check_economy(config.optimizer.economy, fitness)
    return fitness


def check_vllm_backend(config: EvolveConfig, problem, fitness) -> None:
    """vLLM installed, the architecture one it implements, every request within the engine's context; for
    DFS (and the DFS stage of ps+dfs) a pool whose layers one vLLM engine can hold, and KV cache for its
    longest path."""
    from transformers import AutoConfig

    from mergekit_evolve.fitness.vllm_engine import check_architecture, check_request_lengths, max_model_len

    hf_config = AutoConfig.from_pretrained(problem.first_source)
    check_architecture(hf_config)
    limit = max_model_len(config.fitness.vllm, hf_config)
    check_request_lengths(fitness.longest_request(), limit)
    if config.space != "ps":
        check_vllm_pool(config, problem.dtype, limit, problem.device)


def check_vllm_pool(config: EvolveConfig, dtype, context: int, device: str) -> None:
    from transformers import AutoConfig

    from mergekit_evolve.fitness.vllm_engine import check_kv_cache_fits, check_pool_layers

    models = list(config.dfs.models or source_models(config))
    base_index = config.dfs.base_index if config.space == "dfs" else 0
    configs = [AutoConfig.from_pretrained(model) for model in models]
    if config.space == "ps+dfs":  # the PS model (model A) has the sources' shape
        configs.insert(0, configs[0])
    check_pool_layers(configs, base_index)
    slots = sum(c.num_hidden_layers for c in configs) * config.dfs.repeats
    check_kv_cache_fits(config.fitness.vllm, configs[base_index], slots, context, dtype, device)


def resume(out: str | Path, *, device: str | None = None, progress: bool = True) -> Summary:
    run_dir = RunDir(out)
    if not run_dir.is_run():
        raise InputError(
            f"{run_dir.path}: not a mergekit-evo run directory (no config.yaml); start it with mergekit-evo run"
        )
    config = load_config(run_dir.config)
    info = run_dir.read_info()
    device = resolve_device(device or info.device)
    run_dir.prepare(fresh=False)
    try:
        return _execute(config, run_dir, device, info.save_model, progress)
    finally:
        run_dir.unlock()


def _execute(
    config: EvolveConfig, run_dir: RunDir, device: str, save_model: bool, progress: bool, fitness=None
) -> Summary:
    if config.space in ("ps", "dfs"):
        return run_stage(make_problem(config, device), config, run_dir, save_model, progress, fitness)
    return _run_ps_then_dfs(config, run_dir, device, save_model, progress, fitness)


def _run_ps_then_dfs(config, run_dir: RunDir, device, save_model, progress, fitness=None) -> Summary:
    ps_dir, dfs_dir = run_dir.stage("ps"), run_dir.stage("dfs")
    ps_summary = ps_dir.read_summary() if ps_dir.model.exists() else None
    if ps_summary is None:
        ps_config = config.model_copy(update={"space": "ps"})
        ps_dir.write_config(ps_config.to_yaml())
        ps_summary = run_stage(make_problem(ps_config, device), ps_config, ps_dir, True, progress, fitness, "PS")
    dfs_config = dfs_stage_config(config, ps_dir.model, dfs_dir.config)
    dfs_dir.write_config(dfs_config.to_yaml())
    dfs_summary = run_stage(make_problem(dfs_config, device), dfs_config, dfs_dir, save_model, progress, stage="DFS")
    summary = staged_summary(ps_summary, dfs_summary)
    run_dir.publish_final(summary, staged_recipe(ps_dir, dfs_dir, config.merge_seed))
    return summary


def staged_summary(ps: Summary, dfs: Summary) -> Summary:
    """A ps+dfs run's summary: the final (DFS) stage's best and held-out, the counts and time of both stages."""
    both = (ps, dfs)
    return dfs.model_copy(
        update={
            "space": "ps+dfs",
            "evaluations": sum(s.evaluations for s in both),
            "generations": sum(s.generations for s in both),
            "failures": sum(s.failures for s in both),
            "wall_seconds": round(sum(s.wall_seconds for s in both), 2),
            "tokens": sum(s.tokens for s in both),
            "history": [],  # per stage, in stages
            "stages": {"ps": ps, "dfs": dfs},
        }
    )


def dfs_stage_config(config: EvolveConfig, ps_model: Path, stage_config: Path) -> EvolveConfig:
    """The DFS stage of a ps+dfs run: the PS model as model A, then the sources; its own budget; rows held
    back to confirm the result (``dfs.validation``; a resumed stage keeps what its ``stage_config`` says)."""
    collection = [str(ps_model), *(config.dfs.models or source_models(config))]
    budget = config.dfs.max_evals or config.optimizer.max_evals
    dfs = {"models": collection, "base_index": 0, "validation": ps_dfs_validation(config, stage_config)}
    return config.model_copy(
        update={
            "space": "dfs",
            "dfs": config.dfs.model_copy(update=dfs),
            "optimizer": config.optimizer.model_copy(update={"max_evals": budget}),
        }
    )


def run_stage(
    problem, config: EvolveConfig, run_dir: RunDir, save_model: bool, progress: bool, fitness=None, stage: str = ""
) -> Summary:
    """Search, then score the winner on the held-out split and save it (``fitness``: one already
    built for this config and the problem's tokenizer, e.g. by ``validate``)."""
    started = time.time()
    if fitness is None:
        fitness = make_fitness(config, problem.tokenizer, problem.tokenizer_ref, progress)
    gate = make_validation_gate(config)  # dfs.validation: rows held back from the search
    if gate is not None:
        fitness = gate.search_fitness(fitness)
    logger = _wandb_logger(config, run_dir)
    state = _search(problem, config, run_dir, fitness, progress, logger, stage)
    validation = gate.confirm(problem, fitness, run_dir, state, best_writer(problem, run_dir)) if gate else None
    if validation is not None:
        note(describe_decision(validation), progress)
    best = problem.decode(np.asarray(state.best.genome))
    heldout = {}
    if fitness.num_rows("heldout"):  # no line for a step that does not happen
        with step("scoring the best candidate on the held-out split", progress):
            heldout = fitness.score(problem.build(best), "heldout")
    objectives = Objectives.of(config)
    front = write_front(problem, run_dir, fitness, objectives, progress) if objectives else None
    if config.optimizer.strategy == "m2n2":
        from mergekit_evolve.export.archive import write_archive

        write_archive(problem, run_dir, state.es, ItemResults.of(fitness), state.best.index)
    if config.backend == "vllm":
        problem.close()  # the engine's memory goes back before the model is written
    summary = Summary(
        space=config.space,
        best=BestResult(**dict(state.best), heldout=heldout, heldout_total=fitness.total(heldout) if heldout else None),
        evaluations=state.n_evals,
        generations=state.generation,
        failures=state.n_failures,
        wall_seconds=round(time.time() - started, 2),
        selected_on=selection_data(config),
        history=state.history,
        validation=validation,
        front_size=len(front.points) if front else None,
        **economy_summary(config, run_dir, state, has_heldout=bool(heldout)),
    )
    if save_model and not run_dir.model.exists():
        with step(f"saving the best model to {run_dir.model}", progress):
            save_best_model(problem, best, run_dir.model, fmt="auto")
    run_dir.write_summary(summary)
    if logger:
        logger.log_summary(summary)
        logger.finish()
    return summary


def _search(
    problem, config: EvolveConfig, run_dir: RunDir, fitness, progress: bool, logger, stage: str = ""
) -> SearchState:
    m2n2 = config.optimizer.strategy == "m2n2"
    executor = make_executor(config, problem, make_score(fitness, items=m2n2))
    try:
        state = run_search(
            problem,
            executor,
            run_dir,
            config.optimizer,
            progress=progress,
            on_record=logger.log_evaluation if logger else None,
            on_best=best_writer(problem, run_dir),
            racing=make_racing(config, fitness),
            economy=make_economy(config, fitness),
            objectives=Objectives.of(config),
            items=ItemResults.of(fitness) if m2n2 else None,
            stage=stage,
        )
    finally:
        executor.close()
    if state.best is None:
        raise InputError(f"{run_dir.path}: every candidate failed; see evaluations.jsonl for the errors")
    return state


def make_racing(config: EvolveConfig, fitness) -> Racing | None:
    if config.optimizer.racing is None:
        return None
    return Racing(config.optimizer.racing, fitness.weights(), fitness.num_rows("fitness"))


def make_economy(config: EvolveConfig, fitness) -> Economy | None:
    opt = config.optimizer
    if opt.economy == "off":
        return None
    return Economy(opt.economy, fitness.num_rows("fitness"), fitness.weights(), opt.seed)


def economy_summary(config: EvolveConfig, run_dir: RunDir, state, has_heldout: bool) -> dict[str, Any]:
    """How each reported number was obtained, what the search spent and why it stopped."""
    evaluations, rescored = run_dir.read_evaluations(), run_dir.read_rescored()
    spent = tokens_of(evaluations) + tokens_of(rescored)
    out: dict[str, Any] = {
        "fitness_source": {
            "best.fitness": "full",  # the best is always one scored on the whole split
            "best.heldout": "full held-out split" if has_heldout else "no held-out split",
        },
        "tokens": spent,
        "stop_reason": "max_evals",
    }
    if state.economy is not None:
        out["stop_reason"] = state.economy.stop_reason or "max_evals"
        out["economy"] = {
            "mode": config.optimizer.economy,
            "fractions": state.economy.fractions,
            "finalists": [
                {
                    "index": r.index,
                    "fitness": r.fitness,
                    "source": "full",
                    "estimate": r.estimate,
                    "estimate_source": r.estimate_source,
                }
                for r in rescored
            ],
            "rescored_tokens": tokens_of(rescored),
        }
    return out


def _wandb_logger(config: EvolveConfig, run_dir: RunDir):
    if config.wandb is None:
        return None
    from mergekit_evolve.export.wandb_log import WandbLogger

    w = config.wandb
    return WandbLogger(
        w.project, entity=w.entity, name=w.name or run_dir.path.name, mode=w.mode, config=config.model_dump(mode="json")
    )


def _check_fitness_available(config: EvolveConfig) -> None:
    if config.wandb is not None:
        from mergekit_evolve.export.wandb_log import require_wandb

        require_wandb()
    if config.executor.kind == "ray":
        from mergekit_evolve.search.executors import import_ray

        address = config.executor.address or os.environ.get("RAY_ADDRESS")
        import_ray(joining=bool(address), address=address)
    if config.optimizer.objectives:
        from mergekit_evolve.search.strategies import require_multi_objective

        require_multi_objective()  # comocma and pymoo (extra pareto), before anything is written
    if config.builtin_fitness is None:
        from mergekit_evolve.fitness.lm_eval_tasks import require_lm_eval

        require_lm_eval()
    if config.backend == "vllm":
        from mergekit_evolve.fitness.vllm_engine import require_vllm

        require_vllm()


def selection_data(config: EvolveConfig) -> list[dict]:
    """Which data chose the winner (the held-out splits never do): path and content hash."""
    if config.builtin_fitness is None:
        return [{"lm_eval_task": t.name, "metric": t.metric, "limit": config.limit} for t in config.tasks or []]
    out = []
    for task in config.builtin_fitness.tasks:
        path = Path(task.data)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
        out.append({"task": task.name, "data": str(path), "sha256": digest, "limit": task.limit})
    return out


def _version() -> str:
    from mergekit_evolve import __version__

    return __version__
