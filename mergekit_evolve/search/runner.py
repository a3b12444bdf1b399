"""A whole run: config -> problem + fitness -> CMA-ES -> held-out scores, best recipe, final model.

``start`` creates the run directory and writes ``config.yaml`` (overrides applied) and ``run.json``;
``resume`` reads them back, so a resumed run is the same run. ``space: ps+dfs`` runs two stages in
``DIR/ps`` and ``DIR/dfs`` (each a complete, resumable run directory); the PS model joins the DFS
collection as model A.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from mergekit_evolve.config import EvolveConfig, load_config, parse_config, source_models
from mergekit_evolve.errors import InputError, TokenizerRequired
from mergekit_evolve.fitness.evaluator import Subsample
from mergekit_evolve.progress import step
from mergekit_evolve.search.economy import Economy, describe, item_results, tokens_of
from mergekit_evolve.search.loop import LocalExecutor, Racing, run_search
from mergekit_evolve.search.problems import make_problem, resolve_device
from mergekit_evolve.search.rundir import RunDir, atomic_write
from mergekit_evolve.search.validation import describe_decision, make_validation_gate, ps_dfs_validation


def start(
    config: EvolveConfig,
    out: str | Path,
    *,
    device: str = "auto",
    force: bool = False,
    save_model: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    run_dir = RunDir(out)
    device = resolve_device(device)
    # every input problem surfaces here, before anything is written
    fitness = validate(config, device, progress=progress)
    run_dir.prepare(fresh=True, force=force)
    try:
        # run.json first: config.yaml is what makes the folder a resumable run, so a resume never
        # sees a run without its settings.
        run_dir.write_json(run_dir.path / "run.json", {"device": device, "save_model": save_model, "version": _version()})
        atomic_write(run_dir.config, config.to_yaml())
        return _execute(config, run_dir, device, save_model, progress, fitness)
    finally:
        run_dir.unlock()


def validate(config: EvolveConfig, device: str = "cpu", progress: bool = False):
    """Read model configs, build the search space and load the fitness data; load no weights.

    Returns the fitness, so a run that follows need not load its data (or lm-eval's tasks) again."""
    _check_fitness_available(config)
    from mergekit_evolve.fitness.guard import check_selection_tasks

    check_selection_tasks(config)
    problem = make_problem(config, device)
    if config.space == "ps+dfs":  # the PS model will share the source models' shape
        from mergekit_evolve.search.dfs_problem import check_dfs_collection

        check_dfs_collection(list(config.dfs.models or source_models(config)), 0)
    fitness = make_fitness(config, problem.tokenizer, problem.tokenizer_ref, progress)
    if config.optimizer.racing is not None:
        from mergekit_evolve.search.racing import check_racing

        check_racing(config.optimizer.racing, fitness)
    if config.optimizer.economy in ("subsample", "auto"):
        from mergekit_evolve.search.economy import check_economy

        check_economy(config.optimizer.economy, fitness)
    return fitness


def resume(out: str | Path, *, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    run_dir = RunDir(out)
    if not run_dir.config.is_file():
        raise InputError(f"{run_dir.path}: not a mergekit-evo run directory (no config.yaml); start it with mergekit-evo run")
    config = load_config(run_dir.config)
    meta = json.loads((run_dir.path / "run.json").read_text()) if (run_dir.path / "run.json").exists() else {}
    device = resolve_device(device or meta.get("device", "auto"))
    run_dir.prepare(fresh=False)
    try:
        return _execute(config, run_dir, device, meta.get("save_model", True), progress)
    finally:
        run_dir.unlock()


def _execute(config: EvolveConfig, run_dir: RunDir, device: str, save_model: bool, progress: bool, fitness=None) -> dict[str, Any]:
    if config.space in ("ps", "dfs"):
        return run_stage(make_problem(config, device), config, run_dir, save_model, progress, fitness)
    return _run_ps_then_dfs(config, run_dir, device, save_model, progress, fitness)


def _run_ps_then_dfs(config, run_dir: RunDir, device, save_model, progress, fitness=None) -> dict[str, Any]:
    from mergekit_evolve.search.dfs_problem import DFSProblem

    ps_dir, dfs_dir = RunDir(run_dir.path / "ps"), RunDir(run_dir.path / "dfs")
    ps_dir.path.mkdir(exist_ok=True)
    dfs_dir.path.mkdir(exist_ok=True)
    ps_summary = _summary_if_done(ps_dir)
    if ps_summary is None:
        ps_config = config.model_copy(update={"space": "ps"})
        atomic_write(ps_dir.config, ps_config.to_yaml())
        ps_summary = run_stage(make_problem(ps_config, device), ps_config, ps_dir, True, progress, fitness)
    collection = [str(ps_dir.model), *(config.dfs.models or source_models(config))]
    dfs_budget = config.dfs.max_evals or config.optimizer.max_evals
    dfs_settings = {"models": collection, "base_index": 0, "validation": ps_dfs_validation(config, dfs_dir.config)}
    dfs_config = config.model_copy(
        update={"space": "dfs", "dfs": config.dfs.model_copy(update=dfs_settings),
                "optimizer": config.optimizer.model_copy(update={"max_evals": dfs_budget})}
    )
    atomic_write(dfs_dir.config, dfs_config.to_yaml())
    dfs_summary = run_stage(DFSProblem(dfs_config, device), dfs_config, dfs_dir, save_model, progress)
    for name in ("best.yaml", "best.json"):
        if (dfs_dir.path / name).exists():
            shutil.copyfile(dfs_dir.path / name, run_dir.path / name)
    summary = {**dfs_summary, "stages": {"ps": ps_summary, "dfs": dfs_summary}}
    run_dir.write_json(run_dir.summary, summary)
    return summary


def _summary_if_done(run_dir: RunDir) -> dict | None:
    if run_dir.summary.exists() and run_dir.model.exists():
        return json.loads(run_dir.summary.read_text())
    return None


def run_stage(problem, config: EvolveConfig, run_dir: RunDir, save_model: bool, progress: bool, fitness=None) -> dict[str, Any]:
    """Search, then score the winner on the held-out split and save it (``fitness``: one already
    built for this config and the problem's tokenizer, e.g. by ``validate``)."""
    started = time.time()
    if fitness is None:
        fitness = make_fitness(config, problem.tokenizer, problem.tokenizer_ref, progress)
    gate = make_validation_gate(config)  # dfs.validation: rows held back from the search
    if gate is not None:
        fitness = gate.search_fitness(fitness)
    executor = make_executor(config, problem, make_score(fitness))
    logger = _wandb_logger(config, run_dir)
    try:
        state = run_search(
            problem, executor, run_dir, config.optimizer, progress=progress,
            on_record=logger.log_evaluation if logger else None, racing=make_racing(config, fitness),
            economy=make_economy(config, fitness),
        )
    finally:
        executor.close()
    if state.best is None:
        raise InputError(f"{run_dir.path}: every candidate failed; see evaluations.jsonl for the errors")
    validation = gate.confirm(problem, fitness, run_dir, state) if gate is not None else None
    if validation is not None and progress:
        click.echo(f"[mergekit-evo] {describe_decision(validation)}", err=True)
    best = problem.decode(np.asarray(state.best["genome"]))
    with step("scoring the best candidate on the held-out split", progress):
        heldout = fitness.score(problem.build(best), "heldout")
    summary = {
        "space": config.space,
        "best": {**state.best, "heldout": heldout, "heldout_total": fitness.total(heldout) if heldout else None},
        "evaluations": state.n_evals,
        "generations": state.generation,
        "failures": state.n_failures,
        "wall_seconds": round(time.time() - started, 2),
        "selected_on": selection_data(config),
        "history": state.history,
        **economy_summary(config, run_dir, state, has_heldout=bool(heldout)),
        **({"validation": validation} if validation is not None else {}),
    }
    if save_model and not run_dir.model.exists():
        with step(f"saving the best model to {run_dir.model}", progress):
            problem.save_model(best, run_dir.model)
    run_dir.write_json(run_dir.summary, summary)
    if logger:
        logger.log_summary(summary)
        logger.finish()
    return summary


def make_score(fitness):
    """The executor's score function: (model, part=None) -> fitness, per-task scores, tokens spent."""

    def score(model, part=None) -> dict:
        results = fitness.evaluate(model, "fitness", part)
        scores = {name: r.score for name, r in results.items()}
        out = {"fitness": fitness.total(scores), "scores": scores, "tokens": sum(r.tokens for r in results.values())}
        if isinstance(part, Subsample):
            out["subsample"] = item_results(part, fitness.num_rows("fitness"), {n: r.correct for n, r in results.items()})
        elif part is not None:
            out["rows"] = {name: r.rows for name, r in results.items()}
        return out

    return score


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
        "fitness_source": {"best.fitness": describe(state.best),
                           "best.heldout": "full held-out split" if has_heldout else "no held-out split"},
        "tokens": spent,
        "stop_reason": "max_evals",
    }
    if state.economy is not None:
        out["stop_reason"] = state.economy.stop_reason or "max_evals"
        out["economy"] = {
            "mode": config.optimizer.economy,
            "fractions": state.economy.fractions,
            "finalists": [{"index": r["index"], "fitness": r["fitness"], "source": "full",
                           "estimate": r.get("estimate"), "estimate_source": r.get("estimate_source")} for r in rescored],
            "rescored_tokens": tokens_of(rescored),
        }
    return out


def _wandb_logger(config: EvolveConfig, run_dir: RunDir):
    if config.wandb is None:
        return None
    from mergekit_evolve.export.wandb_log import WandbLogger

    w = config.wandb
    return WandbLogger(w.project, entity=w.entity, name=w.name or run_dir.path.name, mode=w.mode,
                       config=config.model_dump(mode="json"))


def make_executor(config: EvolveConfig, problem, score):
    if config.executor.kind == "ray":
        from mergekit_evolve.search.ray_executor import RayExecutor

        ex = config.executor
        return RayExecutor(config, problem.device, workers=ex.workers, address=ex.address, threads_per_worker=ex.threads_per_worker)
    return LocalExecutor(problem, score)


def make_fitness(config: EvolveConfig, tokenizer, tokenizer_ref: str | None = None, progress: bool = False):
    """The fitness of a config. ``tokenizer`` is None when the model ``tokenizer_ref`` has no tokenizer
    files: fine for callables and perplexity on token ids, an input error naming the folder otherwise."""
    try:
        if config.fitness is not None:
            from mergekit_evolve.fitness import Fitness

            return Fitness(config.fitness, tokenizer)
        if tokenizer is None:
            raise TokenizerRequired("tasks (lm-eval)")
        from mergekit_evolve.fitness.lm_eval_tasks import LmEvalFitness

        return LmEvalFitness(config, tokenizer, progress=progress)
    except TokenizerRequired as err:
        folder = tokenizer_ref or "the model"
        raise InputError(
            f"{err.what} needs a tokenizer, but {folder} has no tokenizer files (tokenizer.json, "
            f"tokenizer_config.json, ...); set tokenizer_source to a model folder that has them, or copy them "
            f"into {folder}"
        ) from None


def _check_fitness_available(config: EvolveConfig) -> None:
    if config.wandb is not None:
        from mergekit_evolve.export.wandb_log import require_wandb

        require_wandb()
    if config.executor.kind == "ray":
        from mergekit_evolve.search.ray_executor import import_ray

        import_ray()
    if config.fitness is None:
        from mergekit_evolve.fitness.lm_eval_tasks import require_lm_eval

        require_lm_eval()


def selection_data(config: EvolveConfig) -> list[dict]:
    """Which data chose the winner (the held-out splits never do): path and content hash."""
    if config.fitness is None:
        return [{"lm_eval_task": t.name, "metric": t.metric, "limit": config.limit} for t in config.tasks or []]
    out = []
    for task in config.fitness.tasks:
        path = Path(task.data)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
        out.append({"task": task.name, "data": str(path), "sha256": digest, "limit": task.limit})
    return out


def _version() -> str:
    from mergekit_evolve import __version__

    return __version__


def load_any_config(path: str | Path, overrides: dict[str, Any]) -> EvolveConfig:
    """Load a config file and apply CLI overrides (``optimizer.max_evals`` etc.)."""
    config = load_config(path)
    if not overrides:
        return config
    data = config.model_dump(mode="json")
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(data, source=str(path))
