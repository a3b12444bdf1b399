"""The search loop (one ask/tell surface for every strategy: search/strategies.py) with exact resume.

One generation is ``ask`` -> ``evaluate`` -> ``tell`` -> ``record``, each a method of ``Search``. A
single-objective strategy (CMA-ES) is told each candidate's loss (``-fitness``); a multi-objective one
(``optimizer.objectives``) each candidate's loss vector (search/objectives.py).

Resume contract: ``optimizer.pkl`` holds the whole strategy object after the last completed
generation (``tell``). Unpickled, its next ``ask()`` returns exactly the candidates the original
would have asked, so a resumed run re-asks the interrupted generation and finds the candidates
that were already evaluated in ``evaluations.jsonl`` (matched by generation and position, and
checked by genome). Nothing finished is evaluated twice and the same seed gives the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from mergekit_evolve.config import OptimizerConfig, RacingConfig
from mergekit_evolve.errors import InputError, RunFailedError
from mergekit_evolve.progress import on_terminal
from mergekit_evolve.search.executors import Executor, Job
from mergekit_evolve.search.m2n2 import ItemResults
from mergekit_evolve.search.objectives import Objectives
from mergekit_evolve.search.problems import Problem
from mergekit_evolve.search.racing import race
from mergekit_evolve.search.records import Best, Evaluation, Outcome, StageResult
from mergekit_evolve.search.rundir import RunDir
from mergekit_evolve.search.strategies import make_strategy

if TYPE_CHECKING:
    from mergekit_evolve.search.economy import Economy

FAILED_LOSS = 1e9  # CMA-ES is rank based: any loss worse than every real one works


@dataclass
class SearchState:
    """Everything needed to continue a run; pickled after every generation."""

    es: Any  # the strategy (search/strategies.py); named es as in run directories of 0.1.0
    generation: int = 0
    n_evals: int = 0
    n_failures: int = 0
    restarts_done: int = 0
    best: Best | None = None
    history: list = field(default_factory=list)  # (generation, n_evals, best fitness)
    economy: Any = None  # search/economy.py's EconomyState when optimizer.economy is on


@dataclass
class Racing:
    """What racing needs from the fitness: its config, task weights and fitness rows per task."""

    config: RacingConfig
    weights: dict[str, float]
    total_rows: dict[str, int]


def run_search(problem: Problem, executor: Executor, run_dir: RunDir, opt: OptimizerConfig, **options) -> SearchState:
    """Run (or continue) CMA-ES until exactly ``opt.max_evals`` candidates have been evaluated; see ``Search``."""
    return Search(problem, executor, run_dir, opt, **options).run()


@dataclass
class Generation:
    """The generation being evaluated: its genomes, the records it has so far, and what to tell CMA-ES."""

    number: int
    genomes: list
    last_partial: bool  # cut short by the budget: the search ends here and CMA-ES is not told
    part: Any = None  # economy: the rows it is scored on
    records: dict[int, Evaluation] = field(default_factory=dict)

    def losses(
        self, objectives: Objectives | None = None, items: ItemResults | None = None, told: str = "loss"
    ) -> list:
        """What the strategy is told per candidate: its loss, with ``objectives`` its loss vector, or for a
        strategy told ``items`` (M2N2) its per-item results (None when it failed)."""
        records = [self.records[j] for j in range(len(self.genomes))]
        if told == "items":
            return [items.scores(r) for r in records]
        if objectives is not None:
            return [objectives.losses(r) for r in records]
        return [FAILED_LOSS if r.fitness is None else -r.fitness for r in records]


class Search:
    """Run (or continue) CMA-ES until exactly ``opt.max_evals`` candidates have been evaluated (the
    last generation is cut short when a whole one would overshoot; a resumed run cuts it the same way).

    Candidates are decoded here (cheap, no weights); the executor builds and scores them, in this
    process or on Ray workers, and reports each as it finishes. Records are appended in completion
    order; everything that decides the result (CMA-ES ``tell`` order, ties for the best) uses the
    candidate's position, so the result does not depend on which worker finished first.
    """

    def __init__(
        self,
        problem: Problem,
        executor: Executor,
        run_dir: RunDir,
        opt: OptimizerConfig,
        *,
        progress: bool = True,
        on_generation: Callable[[SearchState], None] | None = None,
        on_record: Callable[[Evaluation], None] | None = None,
        on_best: Callable[[Best], None] | None = None,
        racing: Racing | None = None,
        economy: Economy | None = None,
        objectives: Objectives | None = None,
        items: ItemResults | None = None,
        stage: str = "",
    ):
        self.problem, self.executor, self.run_dir, self.opt = problem, executor, run_dir, opt
        self.label = f"{stage} " if stage else ""  # a ps+dfs run says which stage a line belongs to
        self.progress, self.racing, self.economy, self.objectives = progress, racing, economy, objectives
        self.items = items  # M2N2: how a record's per-row results become its score vector
        self.on_generation, self.on_record, self.on_best = on_generation, on_record, on_best
        run_dir.repair()
        self.state: SearchState = run_dir.load_state() or SearchState(es=self._new_optimizer(restart=0))
        if isinstance(self.state.best, dict):  # a run started by 0.1.0, which kept the best as a dict
            self.state.best = Best(**self.state.best)
        if economy is not None and self.state.economy is None:
            self.state.economy = economy.initial_state()
        self.recorded = {(r.generation, r.candidate): r for r in run_dir.read_evaluations()}
        self.by_key = {r.key: r for r in self.recorded.values() if _reusable(r)}
        # Racing stages scored before an interruption (read once: only a resumed generation needs them).
        self.stage_results = (
            {(r.generation, r.candidate, r.stage): r.result for r in run_dir.read_stages()} if racing else {}
        )
        self.max_failures = opt.max_failures if opt.max_failures is not None else max(3, opt.max_evals // 2)
        self.bar = None

    def run(self) -> SearchState:
        # A live bar only on a terminal: in a log it would be hundreds of carriage-return redraws.
        self.bar = tqdm(
            total=self.opt.max_evals,
            initial=self.state.n_evals,
            unit="eval",
            dynamic_ncols=True,
            disable=not (self.progress and on_terminal()),
        )
        try:
            while not self.finished():
                generation = self.ask()
                self.evaluate(generation)
                self.tell(generation)
            if self.economy:
                self.score_finalists()
        finally:
            self.bar.close()
        return self.state

    def finished(self) -> bool:
        stopped = self.economy is not None and self.economy.should_stop(self.state.economy)
        return self.state.n_evals >= self.opt.max_evals or stopped

    # -- ask -----------------------------------------------------------------------------------------
    def ask(self) -> Generation:
        number = self.state.generation + 1
        part = self.economy.part(self.state.economy, number, self.recorded.values()) if self.economy else None
        genomes = self.state.es.ask()
        # The budget is a promise: a generation that would overshoot it becomes a last, smaller one
        # (its first candidates, in CMA-ES's order). It is not told to CMA-ES: the search ends there.
        left = self.opt.max_evals - self.state.n_evals
        self.bar.set_description(f"{self.label}gen {number}")
        return Generation(number, genomes[:left], last_partial=len(genomes) > left, part=part)

    # -- evaluate ------------------------------------------------------------------------------------
    def evaluate(self, generation: Generation) -> None:
        """Score every candidate of the generation: replayed from the run files after an interruption,
        shared with an equal recipe scored before, or built and scored by the executor."""
        jobs: list[Job] = []
        twins: dict[str, list[Job]] = {}
        for j, x in enumerate(generation.genomes):
            previous = self.recorded.get((generation.number, j))
            if previous is not None:  # evaluated before an interruption
                _check_same_genome(previous, x, generation.number, j)
                self.record(generation, previous, new=False)
                continue
            job = self._job(generation, j, x)
            if job.key in self.by_key:
                self.record(generation, Evaluation.of(job.position, _cached(self.by_key[job.key])))
            elif job.key is not None and any(other.key == job.key for other in jobs):
                twins.setdefault(job.key, []).append(job)  # same recipe twice in one generation
            else:
                jobs.append(job)
        for job, outcome in self._scored(jobs):
            self.record(generation, Evaluation.of(job.position, outcome))
            for twin in twins.pop(job.key, []):
                self.record(generation, Evaluation.of(twin.position, outcome if outcome.failed else _cached(outcome)))
        if generation.number == 1:
            self._check_first_generation(list(generation.records.values()))

    def _job(self, generation: Generation, j: int, genome: np.ndarray) -> Job:
        genome = [float(v) for v in genome[: self.problem.dim]]
        return Job(
            generation=generation.number,
            candidate=j,
            index=self.state.n_evals + j,
            genome=genome,
            key=_decode_key(self.problem, genome),
            part=generation.part,
        )

    def _scored(self, jobs: list[Job]):
        if self.racing is None:
            return self.executor.map(jobs)
        mu = self.state.es.sp.weights.mu
        racing = self.racing
        return race(jobs, self._race_stage, racing.config, mu, racing.weights, racing.total_rows)

    def _race_stage(self, staged: list[Job]):
        todo = []
        for job in staged:
            previous = self.stage_results.get((job.generation, job.candidate, job.stage))
            if previous is not None:  # scored before an interruption
                yield job, previous
            else:
                todo.append(job)
        for job, outcome in self.executor.map(todo):
            self.run_dir.append_stage(
                StageResult(generation=job.generation, candidate=job.candidate, stage=job.stage, result=outcome)
            )
            yield job, outcome

    # -- record --------------------------------------------------------------------------------------
    def record(self, generation: Generation, evaluation: Evaluation, new: bool = True) -> None:
        """Keep one evaluated candidate: in the run file, the caches, the best and the failure count."""
        generation.records[evaluation.candidate] = evaluation
        if new:
            self.run_dir.append_evaluation(evaluation)
            self.recorded[(evaluation.generation, evaluation.candidate)] = evaluation
            if self.on_record:
                self.on_record(evaluation)
        if _reusable(evaluation):
            self.by_key.setdefault(evaluation.key, evaluation)
        self._offer_best(evaluation)
        if evaluation.failed:
            self.state.n_failures += 1
            if self.state.n_failures > self.max_failures and generation.number > 1:  # generation 1: see below
                raise self._too_many_failures(evaluation)
        self.bar.update(1)
        self.bar.set_postfix(best=_fmt(self.state.best and self.state.best.fitness))

    def _offer_best(self, evaluation: Evaluation) -> None:
        if evaluation.beats(self.state.best):
            self.state.best = Best.of(evaluation)
            if self.on_best:
                self.on_best(self.state.best)

    # -- tell ----------------------------------------------------------------------------------------
    def tell(self, generation: Generation) -> None:
        """Tell the strategy the generation's losses, then make the generation durable."""
        state = self.state
        if not generation.last_partial:
            told = getattr(state.es, "told", "loss")
            state.es.tell(generation.genomes, generation.losses(self.objectives, self.items, told))
        state.generation = generation.number
        state.n_evals += len(generation.genomes)
        state.history.append((generation.number, state.n_evals, state.best and state.best.fitness))
        if self.economy:
            records = list(generation.records.values())
            self.economy.after_generation(state.economy, generation.number, records, self.recorded.values())
        if not generation.last_partial:
            self._maybe_restart()
        self.run_dir.save_state(state)  # the generation is now complete and durable
        self._report(generation)
        if self.on_generation:
            self.on_generation(state)

    def _report(self, generation: Generation) -> None:
        if not self.progress:
            return
        fitness = [r.fitness for r in generation.records.values() if r.fitness is not None]
        best = self.state.best and self.state.best.fitness
        sigma = getattr(self.state.es, "sigma", None)
        tqdm.write(
            f"{self.label}gen {generation.number:3d}  evals {self.state.n_evals:4d}  "
            f"gen best {_fmt(max(fitness, default=None))}  mean {_fmt(np.mean(fitness) if fitness else None)}  "
            f"best {_fmt(best)}" + (f"  sigma {sigma:.3g}" if sigma is not None else "")
        )

    def _maybe_restart(self) -> None:
        """IPOP-style restart: when the strategy has converged, start again with twice the population."""
        stop = {k: v for k, v in self.state.es.stop().items() if k not in ("maxfevals", "maxiter")}
        if stop and self.state.restarts_done < self.opt.restarts:
            self.state.restarts_done += 1
            self.state.es = self._new_optimizer(restart=self.state.restarts_done)

    def _new_optimizer(self, restart: int):
        """The configured strategy (search/strategies.py); a restart starts from a random point."""
        opt = self.opt
        x0 = self.problem.x0(random=opt.init == "random" or restart > 0, seed=opt.seed + restart)
        return make_strategy(self.problem, opt, _pad(x0), restart, self.objectives, self.items)

    # -- failures and the economy's finalists ----------------------------------------------------------
    def _check_first_generation(self, records: list[Evaluation]) -> None:
        """After the whole first generation: one error shared by every candidate is the input's fault
        (a model our fitness cannot run, a fitness function that always raises), not bad luck of the
        candidates, so it ends the run as an input error; else ``max_failures`` applies as usual."""
        failed = [r for r in records if r.failed]
        if failed and len(failed) == len(records) and len({_error_line(r) for r in failed}) == 1:
            raise InputError(
                f"every candidate of the first generation ({len(records)}) failed the same way: "
                f"{_error_line(failed[0])}; "
                f"this is a problem of the models, recipe or fitness, not of the candidates; fix it and run again "
                f"(details in {self.run_dir.evaluations})"
            )
        if self.state.n_failures > self.max_failures:
            raise self._too_many_failures(failed[-1])

    def _too_many_failures(self, record: Evaluation) -> RunFailedError:
        return RunFailedError(
            f"{self.state.n_failures} candidates failed (max_failures={self.max_failures}); last error: "
            f"{_error_line(record)}; see {self.run_dir.evaluations}"
        )

    def score_finalists(self) -> None:
        """Economy: score the best estimated candidates on the full split; the best of them becomes the
        run's best. Full scores go to rescored.jsonl, so a resumed run does not score them again."""
        done = {r.index: r for r in self.run_dir.read_rescored()}
        finalists = {r.index: r for r in self.economy.finalists(self.recorded.values())}
        jobs = [_job_of(r) for r in finalists.values() if r.index not in done]
        for job, outcome in self.executor.map(jobs):
            estimate = finalists[job.index]
            rescored = Evaluation.of(
                job.position, outcome, estimate=estimate.estimate, estimate_source=estimate.estimate_source
            )
            self.run_dir.append_rescored(rescored)
            done[job.index] = rescored
        for record in sorted(done.values(), key=lambda r: r.index):
            self._offer_best(record)
        self.run_dir.save_state(self.state)


def _job_of(record: Evaluation) -> Job:
    return Job(
        generation=record.generation,
        candidate=record.candidate,
        index=record.index,
        genome=record.genome,
        key=record.key,
    )


def _error_line(record: Evaluation) -> str:
    return record.error.splitlines()[0][:300]


def _decode_key(problem: Problem, genome: list) -> str | None:
    try:
        return problem.decode(np.asarray(genome)).key
    except Exception:  # decoding errors surface (and are recorded) when the candidate is evaluated
        return None


def _cached(source: Outcome) -> Outcome:
    """The result an equal recipe shares: its scores (and partial-score details), no new work."""
    return Outcome(
        fitness=source.fitness,
        scores=source.scores,
        generated=source.generated,
        items=source.items,
        cached=True,
        racing=source.racing,
        subsample=source.subsample,
        time=time.time(),
    )


def _reusable(record: Evaluation) -> bool:
    """A result that equal recipes can share: no error, and scored on all rows."""
    return not record.failed and bool(record.key) and record.complete


def _check_same_genome(record: Evaluation, x, generation: int, j: int) -> None:
    if not np.allclose(np.asarray(record.genome), np.asarray(x)[: len(record.genome)], rtol=0, atol=1e-12):
        raise RuntimeError(
            f"evaluations.jsonl does not match the optimiser state at generation {generation}, candidate {j}; "
            "the run directory was modified by hand or by another version"
        )


def _pad(x0: np.ndarray) -> np.ndarray:
    # cma needs at least 2 dimensions; a dummy coordinate (ignored by decode) covers 1-gene spaces.
    return np.concatenate([x0, [0.5]]) if len(x0) == 1 else x0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
