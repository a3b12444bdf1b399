"""The CMA-ES search loop (``cma`` ask/tell) with exact resume.

Resume contract: ``optimizer.pkl`` holds the whole CMA-ES object after the last completed
generation (``tell``). Unpickled, its next ``ask()`` returns exactly the candidates the original
would have asked, so a resumed run re-asks the interrupted generation and finds the candidates
that were already evaluated in ``evaluations.jsonl`` (matched by generation and position, and
checked by genome). Nothing finished is evaluated twice and the same seed gives the same result.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol

import cma
import numpy as np
from tqdm.auto import tqdm

from mergekit_evolve.config import OptimizerConfig
from mergekit_evolve.errors import CandidateError, InputError
from mergekit_evolve.progress import on_terminal
from mergekit_evolve.search.racing import RacingConfig, is_complete, race
from mergekit_evolve.search.rundir import RunDir

if TYPE_CHECKING:
    from mergekit_evolve.search.economy import Economy

FAILED_LOSS = 1e9  # CMA-ES is rank based: any loss worse than every real one works


class Candidate(Protocol):
    key: str  # hash of the decoded recipe/path: equal keys score equally


class Problem(Protocol):
    """A search space bound to its merge engine (PS or DFS)."""

    dim: int

    def x0(self, random: bool = False, seed: int = 0) -> np.ndarray: ...
    def decode(self, genome: np.ndarray) -> Candidate: ...
    def build(self, candidate: Candidate) -> Any: ...  # a model ready for fitness
    def write_best(self, candidate: Candidate, run_dir: RunDir, info: dict) -> None: ...


class RunFailedError(RuntimeError):
    """Too many candidates failed (``optimizer.max_failures``)."""


@dataclass
class SearchState:
    """Everything needed to continue a run; pickled after every generation."""

    es: Any
    generation: int = 0
    n_evals: int = 0
    n_failures: int = 0
    restarts_done: int = 0
    best: Optional[dict] = None
    history: list = field(default_factory=list)  # (generation, n_evals, best fitness)
    economy: Any = None  # search/economy.py's EconomyState when optimizer.economy is on


ScoreFn = Callable[..., dict]  # (model, part=None) -> {"fitness": float, "scores": {task: float}, ...}


@dataclass
class Racing:
    """What racing needs from the fitness: its config, task weights and fitness rows per task."""

    config: RacingConfig
    weights: dict[str, float]
    total_rows: dict[str, int]


def new_es(x0: np.ndarray, opt: OptimizerConfig, restart: int = 0, extra_options: dict | None = None) -> cma.CMAEvolutionStrategy:
    popsize = opt.popsize or (4 + int(3 * math.log(len(x0))))
    options = {
        # cma treats seed 0 as "use the clock": shift by one so every user seed is reproducible.
        "seed": opt.seed + 1 + 1000 * restart,
        "popsize": popsize * 2**restart,
        "verbose": -9,
        "verb_log": 0,  # no outcmaes/ files in the working directory
        "verb_disp": 0,
        # Accuracy fitness is discrete: flat generations are normal, not convergence.
        "tolflatfitness": 10**9,
        "tolfun": 0,
        "tolfunhist": 0,
        "tolstagnation": 10**9,
    }
    if opt.diagonal:
        options["CMA_diagonal"] = True
    options.update(extra_options or {})
    if len(x0) == 1:
        # cma needs >= 2 dimensions; a constant dummy coordinate keeps the 1-D case working.
        raise ValueError("internal: pad 1-D genomes before calling new_es")
    return cma.CMAEvolutionStrategy(list(map(float, x0)), opt.sigma0, options)


def run_search(
    problem: Problem,
    executor: "Executor",
    run_dir: RunDir,
    opt: OptimizerConfig,
    *,
    progress: bool = True,
    on_generation: Callable[[SearchState], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
    racing: Racing | None = None,
    economy: "Economy | None" = None,
) -> SearchState:
    """Run (or continue) CMA-ES until exactly ``opt.max_evals`` candidates have been evaluated (the
    last generation is cut short when a whole one would overshoot; a resumed run cuts it the same way).

    Candidates are decoded here (cheap, no weights); the executor builds and scores them, in this
    process or on Ray workers, and reports each as it finishes. Records are appended in completion
    order; everything that decides the result (CMA-ES ``tell`` order, ties for the best) uses the
    candidate's position, so the result does not depend on which worker finished first.
    """
    state: SearchState | None = run_dir.load_state()
    if state is None:
        state = SearchState(es=_new_optimizer(problem, _pad(problem.x0(opt.init == "random", opt.seed)), opt))
    if economy is not None and state.economy is None:
        state.economy = economy.initial_state()
    recorded = {(r["generation"], r["candidate"]): r for r in run_dir.read_evaluations()}
    by_key = {r["key"]: r for r in recorded.values() if _reusable(r)}
    # Racing stages scored before an interruption (read once: only a resumed generation needs them).
    stage_results = {(r["generation"], r["candidate"], r["stage"]): r["result"] for r in run_dir.read_stages()} if racing else {}
    max_failures = opt.max_failures if opt.max_failures is not None else max(3, opt.max_evals // 2)

    # A live bar only on a terminal: in a log it would be hundreds of carriage-return redraws.
    bar = tqdm(total=opt.max_evals, initial=state.n_evals, disable=not (progress and on_terminal()), unit="eval",
               dynamic_ncols=True)
    try:
        while state.n_evals < opt.max_evals and not (economy and economy.should_stop(state.economy)):
            generation = state.generation + 1
            part = economy.part(state.economy, generation, recorded.values()) if economy else None
            genomes = state.es.ask()
            # The budget is a promise: a generation that would overshoot it becomes a last, smaller one
            # (its first candidates, in CMA-ES's order). It is not told to CMA-ES: the search ends there.
            left = opt.max_evals - state.n_evals
            last_partial = len(genomes) > left
            genomes = genomes[:left]
            bar.set_description(f"gen {generation}")
            records: dict[int, dict] = {}

            def accept(j: int, record: dict, new: bool = True) -> None:
                records[j] = record
                if new and on_record:
                    on_record(record)
                if _reusable(record):
                    by_key.setdefault(record["key"], record)
                _update_best(problem, record, state, run_dir)
                if record.get("error"):
                    state.n_failures += 1
                    if state.n_failures > max_failures and generation > 1:  # generation 1: see below
                        raise _too_many_failures(state, max_failures, record, run_dir)
                bar.update(1)
                bar.set_postfix(best=_fmt(state.best and state.best["fitness"]))

            jobs, duplicates = [], {}
            for j, x in enumerate(genomes):
                previous = recorded.get((generation, j))
                if previous is not None:  # evaluated before an interruption
                    _check_same_genome(previous, x, generation, j)
                    accept(j, previous, new=False)
                    continue
                job = Job(generation=generation, candidate=j, index=state.n_evals + j, genome=[float(v) for v in x[: problem.dim]], part=part)
                job.key = _decode_key(problem, job)
                if job.key in by_key:
                    _append(run_dir, recorded, accept, job, _cached_result(by_key[job.key]))
                elif job.key is not None and any(other.key == job.key for other in jobs):
                    duplicates.setdefault(job.key, []).append(job)  # same recipe twice in one generation
                else:
                    jobs.append(job)
            for job, result in _evaluate_generation(jobs, executor, run_dir, racing, state.es.sp.weights.mu, stage_results):
                _append(run_dir, recorded, accept, job, result)
                for twin in duplicates.pop(job.key, []):
                    result_twin = _cached_result(result) if result.get("error") is None else result
                    _append(run_dir, recorded, accept, twin, result_twin)
            if generation == 1:
                _check_first_generation(list(records.values()), state, max_failures, run_dir)
            losses = [FAILED_LOSS if records[j]["fitness"] is None else -records[j]["fitness"] for j in range(len(genomes))]
            if not last_partial:
                state.es.tell(genomes, losses)
            state.generation = generation
            state.n_evals += len(genomes)
            state.history.append((generation, state.n_evals, state.best and state.best["fitness"]))
            if economy:
                economy.after_generation(state.economy, generation, list(records.values()), recorded.values())
            if not last_partial:
                _maybe_restart(state, problem, opt)
            run_dir.save_state(state)  # the generation is now complete and durable
            if progress:
                gen_fit = [-v for v in losses if v != FAILED_LOSS]
                tqdm.write(
                    f"gen {generation:3d}  evals {state.n_evals:4d}  gen best {_fmt(max(gen_fit, default=None))}"
                    f"  mean {_fmt(np.mean(gen_fit) if gen_fit else None)}  best {_fmt(state.best and state.best['fitness'])}"
                    f"  sigma {state.es.sigma:.3g}"
                )
            if on_generation:
                on_generation(state)
        if economy:
            _score_finalists(problem, executor, run_dir, economy, recorded.values(), state)
    finally:
        bar.close()
    return state


@dataclass
class Job:
    """One candidate to evaluate: where it sits in the run and its genome (and, when racing, which
    part of the fitness rows to score at which stage)."""

    generation: int
    candidate: int
    index: int
    genome: list
    key: Optional[str] = None
    part: Optional[tuple[float, float]] = None
    stage: Optional[int] = None


def _evaluate_generation(jobs: list[Job], executor: "Executor", run_dir: RunDir, racing: Racing | None, mu: int,
                         done: dict):
    if racing is None:
        return executor.map(jobs)

    def evaluate_stage(staged: list[Job]):
        todo = []
        for job in staged:
            previous = done.get((job.generation, job.candidate, job.stage))
            if previous is not None:  # scored before an interruption
                yield job, previous
            else:
                todo.append(job)
        for job, result in executor.map(todo):
            run_dir.append_stage({"generation": job.generation, "candidate": job.candidate, "stage": job.stage, "result": result})
            yield job, result

    return race(jobs, evaluate_stage, racing.config, mu, racing.weights, racing.total_rows)


class Executor(Protocol):
    def map(self, jobs: list[Job]) -> "Iterator[tuple[Job, dict]]": ...


class LocalExecutor:
    """Evaluates candidates one after another in this process (the default)."""

    def __init__(self, problem: Problem, score: ScoreFn):
        self.problem, self.score = problem, score

    def map(self, jobs):
        for job in jobs:
            yield job, evaluate_candidate(self.problem, self.score, job.genome, job.part)

    def close(self) -> None:
        pass


def evaluate_candidate(problem: Problem, score: ScoreFn, genome: list, part: Optional[tuple] = None) -> dict:
    """Build and score one candidate (on a ``part`` of the fitness rows when racing); any failure
    becomes an ``error`` (the run goes on)."""
    result: dict[str, Any] = {"time": time.time()}
    start = time.perf_counter()
    try:
        candidate = problem.decode(np.asarray(genome))
        model = problem.build(candidate)
        result["merge_seconds"] = round(time.perf_counter() - start, 4)
        scored = score(model) if part is None else score(model, part)
        if not math.isfinite(scored["fitness"]):
            raise CandidateError(f"fitness is {scored['fitness']}")
        result.update(scored, fitness=float(scored["fitness"]), cached=False, error=None)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # a failing candidate never kills the run
        kind = "out of memory" if _is_oom(err) else type(err).__name__
        result.update(fitness=None, scores={}, cached=False, error=f"{kind}: {err}\n{traceback.format_exc(limit=3)}")
        _free_memory()
    result["seconds"] = round(time.perf_counter() - start, 4)
    return result


def _error_line(record: dict) -> str:
    return record["error"].splitlines()[0][:300]


def _too_many_failures(state: SearchState, max_failures: int, record: dict, run_dir: RunDir) -> RunFailedError:
    return RunFailedError(
        f"{state.n_failures} candidates failed (max_failures={max_failures}); last error: "
        f"{_error_line(record)}; see {run_dir.evaluations}"
    )


def _check_first_generation(records: list[dict], state: SearchState, max_failures: int, run_dir: RunDir) -> None:
    """After the whole first generation: one error shared by every candidate is the input's fault
    (a model our fitness cannot run, a fitness function that always raises), not bad luck of the
    candidates, so it ends the run as an input error; else ``max_failures`` applies as usual."""
    failed = [r for r in records if r.get("error")]
    if failed and len(failed) == len(records) and len({_error_line(r) for r in failed}) == 1:
        raise InputError(
            f"every candidate of the first generation ({len(records)}) failed the same way: {_error_line(failed[0])}; "
            f"this is a problem of the models, recipe or fitness, not of the candidates; fix it and run again "
            f"(details in {run_dir.evaluations})"
        )
    if state.n_failures > max_failures:
        raise _too_many_failures(state, max_failures, failed[-1], run_dir)


def _decode_key(problem: Problem, job: Job) -> Optional[str]:
    try:
        return problem.decode(np.asarray(job.genome)).key
    except Exception:  # decoding errors surface (and are recorded) when the candidate is evaluated
        return None


def _cached_result(source: dict) -> dict:
    result = {"fitness": source["fitness"], "scores": source["scores"], "cached": True, "error": None,
              "time": time.time(), "seconds": 0.0, "tokens": 0}
    for partial in ("racing", "subsample"):  # a twin in the same generation shares the partial score
        if source.get(partial) is not None:
            result[partial] = source[partial]
    return result


def _reusable(record: dict) -> bool:
    """A result that equal recipes can share: no error, and scored on all rows."""
    return record.get("error") is None and bool(record.get("key")) and is_complete(record)


def _append(run_dir: RunDir, recorded: dict, accept, job: Job, result: dict) -> None:
    record = {"index": job.index, "generation": job.generation, "candidate": job.candidate,
              "genome": job.genome, "key": job.key, **result}
    run_dir.append_evaluation(record)
    recorded[(job.generation, job.candidate)] = record
    accept(job.candidate, record)


def _update_best(problem, record, state: SearchState, run_dir: RunDir) -> None:
    fitness = record["fitness"]
    if fitness is None or not is_complete(record):  # a raced-out estimate never becomes the best
        return
    if state.best is not None:
        # Ties go to the earlier candidate, whatever order the workers finished in.
        if (fitness, -record["index"]) <= (state.best["fitness"], -state.best["index"]):
            return
    state.best = {k: record[k] for k in ("index", "generation", "candidate", "genome", "key", "fitness", "scores")}
    candidate = problem.decode(np.asarray(record["genome"]))
    problem.write_best(candidate, run_dir, state.best)


def _score_finalists(problem, executor, run_dir: RunDir, economy, records, state: SearchState) -> None:
    """Economy: score the best estimated candidates on the full split; the best of them becomes the
    run's best. Full scores go to rescored.jsonl, so a resumed run does not score them again."""
    done = {r["index"]: r for r in run_dir.read_rescored()}
    finalists = {r["index"]: r for r in economy.finalists(records)}
    jobs = [Job(generation=r["generation"], candidate=r["candidate"], index=r["index"], genome=r["genome"], key=r["key"])
            for r in finalists.values() if r["index"] not in done]
    for job, result in executor.map(jobs):
        estimate = {k: finalists[job.index][k] for k in ("estimate", "estimate_source")}
        rescored = {"index": job.index, "generation": job.generation, "candidate": job.candidate,
                    "genome": job.genome, "key": job.key, **result, **estimate}
        run_dir.append_rescored(rescored)
        done[job.index] = rescored
    for record in sorted(done.values(), key=lambda r: r["index"]):
        _update_best(problem, record, state, run_dir)
    run_dir.save_state(state)


def _maybe_restart(state: SearchState, problem, opt: OptimizerConfig) -> None:
    """IPOP-style restart: when CMA-ES has converged, start again with twice the population."""
    stop = {k: v for k, v in state.es.stop().items() if k not in ("maxfevals", "maxiter")}
    if stop and state.restarts_done < opt.restarts:
        state.restarts_done += 1
        x0 = problem.x0(True, opt.seed + state.restarts_done)
        state.es = _new_optimizer(problem, _pad(x0), opt, restart=state.restarts_done)


def _new_optimizer(problem, x0: np.ndarray, opt: OptimizerConfig, restart: int = 0):
    """CMA-ES, or the problem's own strategy with the same ask/tell surface (DFS: search/dfs_search.py)."""
    make = getattr(problem, "new_optimizer", None)
    return make(x0, opt, restart) if make else new_es(x0, opt, restart)


def _check_same_genome(record, x, generation, j) -> None:
    if not np.allclose(np.asarray(record["genome"]), np.asarray(x)[: len(record["genome"])], rtol=0, atol=1e-12):
        raise RuntimeError(
            f"evaluations.jsonl does not match the optimiser state at generation {generation}, candidate {j}; "
            "the run directory was modified by hand or by another version"
        )


def _pad(x0: np.ndarray) -> np.ndarray:
    # cma needs at least 2 dimensions; a dummy coordinate (ignored by decode) covers 1-gene spaces.
    return np.concatenate([x0, [0.5]]) if len(x0) == 1 else x0


def _is_oom(err: Exception) -> bool:
    return isinstance(err, MemoryError) or "out of memory" in str(err).lower()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
