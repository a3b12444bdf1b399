"""Where candidates are built and scored: in this process (``LocalExecutor``) or on Ray workers (``RayExecutor``).

Both take a generation's jobs and yield ``(job, Outcome)`` as each finishes; a failing candidate becomes an
``Outcome`` with an ``error`` (the run goes on). The loop never depends on the completion order.

Ray workers build the problem and fitness from the run's config themselves (loading the source models
from their local path or hub ID once, keeping one resident model), so no shared filesystem is needed.
A worker that dies loses only its in-flight candidate, which goes to another worker; a replacement
worker is started. Ray is an optional extra (``pip install 'mergekit-evolve[ray]'``), imported only here.
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mergekit_evolve.errors import CandidateError, InputError
from mergekit_evolve.search.records import Outcome, Position

ScoreFn = Callable[..., dict]  # (model, part=None) -> {"fitness": float, "scores": {task: float}, "tokens": int, ...}
MAX_RETRIES = 3  # per candidate, across dead Ray workers


@dataclass(frozen=True)
class Job:
    """One candidate to evaluate: where it sits in the run, its genome and recipe key, and (racing,
    economy) which part of the fitness rows to score at which stage."""

    generation: int
    candidate: int
    index: int
    genome: list
    key: str | None = None
    part: Any = None  # None: all rows; (lo, hi): a racing part; a fitness Subsample: economy
    stage: int | None = None

    @property
    def position(self) -> Position:
        return Position(
            index=self.index, generation=self.generation, candidate=self.candidate, genome=self.genome, key=self.key
        )


class Executor(Protocol):
    def map(self, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]: ...
    def close(self) -> None: ...


def make_score(fitness, items: bool = False) -> ScoreFn:
    """The executors' score function: (model, part=None) -> fitness, per-task scores, tokens spent (``items``:
    and each row's result, for M2N2)."""
    from mergekit_evolve.fitness.evaluator import Subsample
    from mergekit_evolve.search.economy import item_results

    def score(model, part=None) -> dict:
        results = fitness.evaluate(model, "fitness", part)
        scores = {name: r.score for name, r in results.items()}
        out = {"fitness": fitness.total(scores), "scores": scores, "tokens": sum(r.tokens for r in results.values())}
        generated = {name: r.generated / r.rows for name, r in results.items() if r.generated is not None}
        if generated:
            out["generated"] = generated
        if items and part is None:
            out["items"] = {n: "".join("1" if c else "0" for c in r.correct or []) for n, r in results.items()}
        if isinstance(part, Subsample):
            out["subsample"] = item_results(
                part, fitness.num_rows("fitness"), {n: r.correct for n, r in results.items()}
            )
        elif part is not None:
            out["rows"] = {name: r.rows for name, r in results.items()}
        return out

    return score


def evaluate_candidate(problem, score: ScoreFn, genome: list, part: Any = None) -> Outcome:
    """Build and score one candidate (on a ``part`` of the fitness rows when racing or subsampling);
    any failure becomes an ``error`` (the run goes on)."""
    started_at, start = time.time(), time.perf_counter()
    merge_seconds = None
    try:
        model = problem.build(problem.decode(np.asarray(genome)))
        merge_seconds = round(time.perf_counter() - start, 4)
        scored = score(model) if part is None else score(model, part)
        if not math.isfinite(scored["fitness"]):
            raise CandidateError(f"fitness is {scored['fitness']}")
        return Outcome(
            **{**scored, "fitness": float(scored["fitness"])},
            time=started_at,
            merge_seconds=merge_seconds,
            seconds=round(time.perf_counter() - start, 4),
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # a failing candidate never kills the run
        kind = "out of memory" if _is_oom(err) else type(err).__name__
        _free_memory()
        return Outcome.failure(
            f"{kind}: {err}\n{traceback.format_exc(limit=3)}",
            time=started_at,
            merge_seconds=merge_seconds,
            seconds=round(time.perf_counter() - start, 4),
        )


class LocalExecutor:
    """Evaluates candidates one after another in this process (the default)."""

    def __init__(self, problem, score: ScoreFn):
        self.problem, self.score = problem, score

    def map(self, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
        for job in jobs:
            yield job, evaluate_candidate(self.problem, self.score, job.genome, job.part)

    def close(self) -> None:
        pass


def make_executor(config, problem, score: ScoreFn) -> Executor:
    if config.executor.kind == "ray":
        ex = config.executor
        return RayExecutor(
            config, problem.device, workers=ex.workers, address=ex.address, threads_per_worker=ex.threads_per_worker
        )
    return LocalExecutor(problem, score)


# -- Ray ------------------------------------------------------------------------------------------------
def import_ray(joining: bool = False, address: str | None = None):
    """Ray, or one line saying how to install it; ``joining`` an existing cluster: token auth first, and for a
    cluster on this machine's loopback ``address`` a driver that stays on loopback."""
    if joining:
        prefer_token_auth()  # before ray is imported: it reads RAY_AUTH_MODE once
    if address and _is_loopback(address):
        stay_on_loopback()
    try:
        import ray
    except ImportError:
        raise InputError(
            "executor: ray is not installed; run pip install 'mergekit-evolve[ray]' or use executor: local"
        ) from None
    return ray


class _Worker:
    """Ray actor body: a problem + fitness built once, then one candidate per call."""

    def __init__(self, config_yaml: str, device: str, threads: int | None):
        import torch
        import yaml

        from mergekit_evolve.config import parse_config
        from mergekit_evolve.fitness.factory import make_fitness
        from mergekit_evolve.search.problems import make_problem
        from mergekit_evolve.search.validation import fitness_for_search

        if threads:
            torch.set_num_threads(threads)
        config = parse_config(yaml.safe_load(config_yaml))
        self.problem = make_problem(config, device)
        fitness = make_fitness(config, self.problem.tokenizer, self.problem.tokenizer_ref)
        # the rows the search sees (and M2N2's per-row results)
        self.score = make_score(fitness_for_search(config, fitness), items=config.optimizer.strategy == "m2n2")

    def evaluate(self, genome: list, part: Any = None) -> Outcome:
        return evaluate_candidate(self.problem, self.score, genome, part).model_copy(update={"worker": os.getpid()})

    def pid(self) -> int:
        return os.getpid()


def join_cluster(ray, address: str) -> None:
    """Connect to a running cluster (``ray start``, KubeRay), or fail in one line. Ray >= 2.59 starts clusters
    with token authentication, and a driver joining one must say so (``prefer_token_auth``)."""
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as err:
        raise InputError(
            f"executor.address: cannot join the Ray cluster at {address} ({str(err).strip().splitlines()[-1]}); "
            "a cluster with token authentication needs its token here: RAY_AUTH_TOKEN (or the file ray start "
            "wrote, ~/.ray/auth_token) and RAY_AUTH_MODE=token"
        ) from None


def check_cluster_resources(ray, workers: int | None, gpu: bool) -> None:
    """Actors the cluster cannot place would wait forever: say so before the first candidate."""
    kind = "GPU" if gpu else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if workers is not None and workers > have:
        raise InputError(
            f"executor.workers: {workers} workers need {workers} {kind}s (one each) but the Ray cluster has "
            f"{have}; use workers: {max(have, 1)} or add nodes"
        )


def prepare_cluster(config, device: str) -> None:
    """``executor.address`` (or $RAY_ADDRESS): join the cluster and check it can hold the workers and that
    every node has the package, the models and the data, before the run directory is written (the executor
    then uses this connection)."""
    executor = config.executor
    address = executor.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray = import_ray(joining=True, address=address)
        if not ray.is_initialized():
            join_cluster(ray, address)
        check_cluster_resources(ray, executor.workers, device.startswith("cuda"))
        check_nodes(ray, local_paths(config), device.startswith("cuda"))


def local_paths(config) -> list[str]:
    """The local files and folders a worker reads: model folders, fitness data, lm-eval task folders."""
    from mergekit_evolve.config import source_models

    refs = [*source_models(config), *(config.dfs.models or [])]
    if config.genome is not None and config.genome.base_model:
        refs.append(config.genome.base_model)
    if config.builtin_fitness is not None:
        for task in config.builtin_fitness.tasks:
            refs += [str(p) for p in (task.data, task.heldout, task.fewshot_data) if p]
    refs += list(config.task_search_path or [])
    return sorted({str(Path(r).absolute()) for r in refs if Path(r).exists()})


def check_nodes(ray, paths: list[str], gpu: bool) -> None:
    """Every node that can host a worker has this mergekit-evolve and these paths (one line for the first that
    does not): a worker on a node without them would fail every candidate it gets."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    kind = "GPU" if gpu else "CPU"
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(kind, 0) > 0]
    probe = ray.remote(num_cpus=0)(_node_facts)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
        for n in nodes
    ]
    ours = _node_facts([])[0]
    for node, (version, missing) in zip(nodes, ray.get(refs, timeout=120)):
        where = node.get("NodeManagerAddress", node["NodeID"])
        if version != ours:
            raise InputError(
                f"executor: the Ray node {where} has mergekit-evolve {version}, this run {ours}; install the same "
                "version on every node"
            )
        if missing:
            raise InputError(
                f"executor: the Ray node {where} lacks {missing[0]}; put the models and data at the same path on "
                "every node (shared storage), or use Hub ids for models"
            )


def _node_facts(paths: list[str]) -> tuple[str, list[str]]:
    """Run on a node: its mergekit-evolve version and which of ``paths`` it does not have."""
    from importlib.metadata import version

    return version("mergekit-evolve"), [p for p in paths if not os.path.exists(p)]


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rpartition(":")[0] or address
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def stay_on_loopback() -> None:
    """Ray rewrites a loopback cluster address to the machine's outward IP before connecting
    (``services.resolve_ip_for_localhost``), so a cluster started on 127.0.0.1 (``ray start --head
    --node-ip-address 127.0.0.1``, a laptop, a sandbox) cannot be joined by its own address. Ray's switch for
    single-machine clusters keeps the driver on loopback; it is read once, when ray is imported."""
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def prefer_token_auth() -> None:
    """Joining a cluster with a token at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or the
    ``~/.ray/auth_token`` that ``ray start`` writes) and no ``RAY_AUTH_MODE``: use token authentication."""
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file)):
        os.environ["RAY_AUTH_MODE"] = "token"


def check_reachable(address: str) -> None:
    """A cluster address that nothing answers at is one line (Ray itself retries for half a minute)."""
    if address.startswith("ray://") or address == "auto":
        return
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "6379")
    try:
        socket.create_connection((host or address, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise InputError(
            f"executor.address: nothing answers at {address} ({getattr(err, 'strerror', None) or err}); start the "
            "cluster first (ray start --head) or fix executor.address / RAY_ADDRESS"
        ) from None


class RayExecutor:
    """One long-lived worker actor per GPU (or CPU slot); candidates go to idle workers."""

    def __init__(
        self,
        config,
        device: str,
        workers: int | None = None,
        address: str | None = None,
        threads_per_worker: int | None = None,
    ):
        address = address or os.environ.get("RAY_ADDRESS")
        ray = import_ray(joining=bool(address), address=address)
        self.ray = ray
        if not ray.is_initialized():
            if address:
                join_cluster(ray, address)
            else:
                local = {"num_cpus": max(2, workers or 2), "include_dashboard": False, "_node_ip_address": "127.0.0.1"}
                ray.init(ignore_reinit_error=True, log_to_driver=False, configure_logging=False, **local)
        self.gpu = device.startswith("cuda")
        self.n_workers = workers or self._default_workers()
        self._check_resources()
        self.config_yaml = config.to_yaml()
        self.device = "cuda" if self.gpu else device
        self.threads = threads_per_worker
        # SPREAD: workers go to different nodes where they can, so losing one node loses few of them.
        self.actor_cls = ray.remote(num_gpus=1 if self.gpu else 0, num_cpus=1, max_restarts=0)(_Worker).options(
            scheduling_strategy="SPREAD"
        )
        self.workers = [self._start_worker() for _ in range(self.n_workers)]

    def _check_resources(self) -> None:
        check_cluster_resources(self.ray, self.n_workers, self.gpu)

    def _default_workers(self) -> int:
        resources = self.ray.cluster_resources()
        return max(1, int(resources.get("GPU", 0)) if self.gpu else int(resources.get("CPU", 1)))

    def _start_worker(self):
        return self.actor_cls.remote(self.config_yaml, self.device, self.threads)

    def map(self, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
        queue = deque((job, 0) for job in jobs)
        idle = deque(self.workers)
        running: dict = {}  # object ref -> (worker, job, attempts)
        while queue or running:
            while queue and idle:
                job, attempts = queue.popleft()
                worker = idle.popleft()
                running[worker.evaluate.remote(job.genome, job.part)] = (worker, job, attempts)
            done, _ = self.ray.wait(list(running), num_returns=1)
            worker, job, attempts = running.pop(done[0])
            try:
                outcome = self.ray.get(done[0])
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as err:
                idle.append(self._replace(worker))
                if attempts + 1 >= MAX_RETRIES:
                    yield job, _worker_lost(err, attempts + 1)
                else:
                    queue.append((job, attempts + 1))  # retried on another worker
                continue
            idle.append(worker)
            yield job, outcome

    def _replace(self, dead):
        self.workers = [w for w in self.workers if w is not dead]
        self.workers.append(self._start_worker())
        return self.workers[-1]

    def close(self) -> None:
        for worker in self.workers:
            try:
                self.ray.kill(worker)
            except Exception:
                pass
        self.workers = []


def _worker_lost(err: Exception, attempts: int) -> Outcome:
    return Outcome.failure(
        f"WorkerLost: the candidate's worker died {attempts} times ({type(err).__name__}{_cause(err)})",
        time=time.time(),
    )


def _cause(err: Exception) -> str:
    """The error a worker died of, when Ray's message carries it (e.g. raised while the worker started)."""
    lines = [line.strip() for line in str(err).splitlines()]
    raised = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line)]
    return f": {raised[-1][:300]}" if raised else ""


def _is_oom(err: Exception) -> bool:
    return isinstance(err, MemoryError) or "out of memory" in str(err).lower()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
