"""How DFS searches its genome: a block-path pre-scan, then CMA-ES with an indicator step of its own.

Why not plain CMA-ES from model A's path. The indicators are binary in effect (slot on when > 0); with
them at +/-0.5 and the scales' step sigma0 = 1/6, flipping one slot is a 3-sigma event, so CMA-ES keeps
re-asking the start path and tunes its scales (measured: 10-22 distinct paths in ~300 evaluations on the
zoo), while the paths that compose the skills lie 9-11 flips away.

What this module does instead (each part can be switched off in ``dfs:``):

* ``prescan`` generations of *block paths*: paths made of runs of consecutive layers (``Bi..Bj``), at
  most one run per (model, repetition) segment, all scales 1. Each model's own full stack comes first,
  then seeded random block paths, all distinct. They are whole generations of the same population size,
  recorded like any other evaluation (``evaluations.jsonl``), so a run resumes inside the pre-scan too.
* CMA-ES then starts from the pre-scan's best path (ties: the earlier one).
* ``indicator_flips``: the indicators get their own step (cma's ``CMA_stds``), set so that a sample
  from the start distribution flips that many slots on average; the scales keep ``sigma0``. This is
  scale-free: the same setting suits T = 16 slots (the zoo) and T = 192 (the paper).

``DFSStrategy`` has the ask/tell surface of ``cma.CMAEvolutionStrategy`` that ``search.loop`` uses, so
the loop, its records and its exact resume (the strategy is pickled after each generation) are shared
with PS.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np

from mergekit_evolve.space.dfs import DFSSpace


def block_path_genome(space: DFSSpace, runs: dict[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """The genome of a block path: ``runs[(model, repetition)] = (first, end)`` (layers first..end-1
    of that model in that repetition's slots); every other slot off; all scales 1."""
    genome = space.x0()
    genome[: space.num_slots] = -space.indicator_init
    for (model, rep), (first, end) in runs.items():
        offset = rep * space.num_layers + sum(space.layer_counts[:model])
        genome[offset + first : offset + end] = space.indicator_init
    return genome


def block_paths(space: DFSSpace, count: int, seed: int) -> list[np.ndarray]:
    """``count`` distinct block-path genomes: each model's own stack first, then seeded random ones.

    A random block path includes each (model, repetition) segment with probability 1/2 (at least one),
    with a run drawn uniformly from that model's ``n (n + 1) / 2`` runs of consecutive layers.
    """
    rng = np.random.default_rng(seed)
    segments = [(m, rep) for rep in range(space.repeats) for m in range(len(space.layer_counts))]
    runs_of = {m: [(a, b) for a in range(n) for b in range(a + 1, n + 1)] for m, n in enumerate(space.layer_counts)}
    chosen: list[dict] = [{(m, 0): (0, n)} for m, n in enumerate(space.layer_counts)]
    seen = {_path_key(space, c) for c in chosen}
    budget = 100 * count  # small spaces hold fewer distinct block paths than asked for: stop trying
    while len(chosen) < count and budget > 0:
        budget -= 1
        picked = [s for s in segments if rng.random() < 0.5] or [segments[rng.integers(len(segments))]]
        candidate = {s: runs_of[s[0]][rng.integers(len(runs_of[s[0]]))] for s in picked}
        key = _path_key(space, candidate)
        if key not in seen:
            seen.add(key)
            chosen.append(candidate)
    return [block_path_genome(space, c) for c in chosen[:count]]


def _path_key(space: DFSSpace, runs: dict) -> tuple:
    # the hop sequence: the same layers from another repetition's slots make the same path
    return space.decode(block_path_genome(space, runs)).hops


def indicator_stds(space: DFSSpace, sigma0: float, flips: float | None) -> list[float] | None:
    """cma ``CMA_stds`` (multipliers of sigma0 per coordinate) so that a sample flips ``flips`` slots on
    average: P(flip) = flips / T per slot, i.e. indicator_init / std = z with P(N(0,1) > z) = flips / T."""
    if flips is None:
        return None
    p = min(flips / space.num_slots, 0.5)
    z = NormalDist().inv_cdf(1.0 - p)
    std = space.indicator_init / max(z, 1e-3)
    return [std / sigma0] * space.num_slots + [1.0] * space.scale_dim


class DFSStrategy:
    """Pre-scan generations of block paths, then CMA-ES (``make_cma(x0)``) from the best of them."""

    def __init__(self, make_cma, x0: np.ndarray, generations: int, block_paths_of):
        self._make_cma = make_cma
        self.es = make_cma(x0)  # also gives the population size and the ``sp`` racing reads
        size = self.es.popsize
        paths = block_paths_of(generations * size)
        whole = len(paths) - len(paths) % size  # only whole generations (small spaces have few paths)
        self._pending = [paths[i : i + size] for i in range(0, whole, size)]
        self._best: tuple[float, int, np.ndarray] | None = None
        self._seen = 0

    def ask(self) -> list[np.ndarray]:
        return [g.copy() for g in self._pending[0]] if self._pending else self.es.ask()

    def tell(self, genomes, losses) -> None:
        if not self._pending:
            self.es.tell(genomes, losses)
            return
        for genome, loss in zip(genomes, losses):
            if self._best is None or loss < self._best[0]:  # strict: ties keep the earlier path
                self._best = (float(loss), self._seen, np.asarray(genome, dtype=np.float64))
            self._seen += 1
        self._pending.pop(0)
        if not self._pending:
            self.es = self._make_cma(self._best[2])

    def stop(self) -> dict:
        return {} if self._pending else self.es.stop()

    @property
    def sigma(self) -> float:
        return self.es.sigma

    @property
    def sp(self) -> Any:
        return self.es.sp

    @property
    def popsize(self) -> int:
        return self.es.popsize
