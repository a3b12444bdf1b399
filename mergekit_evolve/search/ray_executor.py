"""Evaluate a generation's candidates on Ray: one long-lived worker actor per GPU (or CPU slot).

Each worker builds the problem and fitness from the run's config itself (loading the source models
from their local path or hub ID once, keeping one resident model), so no shared filesystem is
needed. Candidates go to idle workers and come back as they finish. A worker that dies loses only
its in-flight candidate, which is sent to another worker; a replacement worker is started.

Ray is an optional extra (``pip install 'mergekit-evolve[ray]'``), imported only here.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Iterator, Optional

from mergekit_evolve.errors import InputError
from mergekit_evolve.search.loop import Job

MAX_RETRIES = 3  # per candidate, across dead workers


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(
            "executor: ray is not installed; run pip install 'mergekit-evolve[ray]' or use executor: local"
        ) from None
    return ray


class _Worker:
    """Ray actor body: a problem + fitness built once, then one candidate per call."""

    def __init__(self, config_yaml: str, device: str, threads: Optional[int]):
        import torch
        import yaml

        from mergekit_evolve.config import parse_config
        from mergekit_evolve.search.problems import make_problem
        from mergekit_evolve.search.runner import make_fitness, make_score
        from mergekit_evolve.search.validation import fitness_for_search

        if threads:
            torch.set_num_threads(threads)
        config = parse_config(yaml.safe_load(config_yaml))
        self.problem = make_problem(config, device)
        self.score = make_score(fitness_for_search(config, make_fitness(config, self.problem.tokenizer, self.problem.tokenizer_ref)))

    def evaluate(self, genome: list, part: Optional[tuple] = None) -> dict:
        from mergekit_evolve.search.loop import evaluate_candidate

        result = evaluate_candidate(self.problem, self.score, genome, part)
        result["worker"] = os.getpid()
        return result

    def pid(self) -> int:
        return os.getpid()


class RayExecutor:
    def __init__(self, config, device: str, workers: Optional[int] = None, address: Optional[str] = None,
                 threads_per_worker: Optional[int] = None):
        ray = import_ray()
        self.ray = ray
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kwargs = {"address": address} if address else {
                "num_cpus": max(2, workers or 2), "include_dashboard": False, "_node_ip_address": "127.0.0.1"}
            ray.init(ignore_reinit_error=True, log_to_driver=False, configure_logging=False, **kwargs)
        self.gpu = device.startswith("cuda")
        self.n_workers = workers or self._default_workers()
        self.config_yaml = config.to_yaml()
        self.device = "cuda" if self.gpu else device
        self.threads = threads_per_worker
        self.actor_cls = ray.remote(num_gpus=1 if self.gpu else 0, num_cpus=1, max_restarts=0)(_Worker)
        self.workers = [self._start_worker() for _ in range(self.n_workers)]

    def _default_workers(self) -> int:
        resources = self.ray.cluster_resources()
        return max(1, int(resources.get("GPU", 0)) if self.gpu else int(resources.get("CPU", 1)))

    def _start_worker(self):
        return self.actor_cls.remote(self.config_yaml, self.device, self.threads)

    def map(self, jobs: list[Job]) -> Iterator[tuple[Job, dict]]:
        ray = self.ray
        queue = deque((job, 0) for job in jobs)
        idle = deque(self.workers)
        running: dict = {}  # object ref -> (worker, job, attempts)
        while queue or running:
            while queue and idle:
                job, attempts = queue.popleft()
                worker = idle.popleft()
                running[worker.evaluate.remote(job.genome, job.part)] = (worker, job, attempts)
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            worker, job, attempts = running.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
                self._replace(worker)
                idle.append(self.workers[-1])
                if attempts + 1 >= MAX_RETRIES:
                    yield job, _worker_lost(err, attempts + 1)
                else:
                    queue.append((job, attempts + 1))  # retried on another worker
                continue
            idle.append(worker)
            yield job, result

    def _replace(self, dead) -> None:
        self.workers = [w for w in self.workers if w is not dead]
        self.workers.append(self._start_worker())

    def close(self) -> None:
        for worker in self.workers:
            try:
                self.ray.kill(worker)
            except Exception:
                pass
        self.workers = []


def _worker_lost(err: Exception, attempts: int) -> dict:
    import time

    return {
        "fitness": None,
        "scores": {},
        "cached": False,
        "error": f"WorkerLost: the candidate's worker died {attempts} times ({type(err).__name__})",
        "time": time.time(),
        "seconds": 0.0,
    }
