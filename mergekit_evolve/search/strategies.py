"""Search strategies behind one ask/tell surface, so one loop (search/loop.py) runs them all.

    ask()                  -> the next generation's genomes
    tell(genomes, values)  values: one loss per genome (cmaes) or one loss vector (como-cmaes, nsga2)
    stop()                 -> a non-empty dict once the strategy has converged (the loop may restart it)
    sigma                  step size for the progress line (None where the strategy has none)
    popsize                the size of one generation

``cmaes``: ``cma.CMAEvolutionStrategy`` itself (the surface is cma's), or for DFS the pre-scan of block
paths in front of it (search/dfs_search.py). ``como-cmaes``: comocma's Sofomore, one CMA-ES kernel per front
point, each kernel's offspring ranked by how much hypervolume they add (Toure et al., GECCO 2019).
``nsga2``: pymoo's NSGA-II in its ask/tell form, in the box ``problem.search_box()``. ``m2n2``: an archive
that competes per item (search/m2n2.py); it is told each candidate's per-item results (``told = "items"``).

The loop pickles the strategy after every ``tell`` (optimizer.pkl) and a resumed run re-asks the generation
it was in, so a strategy must ask exactly the same genomes after a pickle round trip: every random draw
comes from a generator the strategy object owns (cma's default draws from numpy's global generator).
"""

from __future__ import annotations

import numpy as np

from mergekit_evolve.config import OptimizerConfig
from mergekit_evolve.errors import InputError
from mergekit_evolve.search.cmaes import cma_options, default_popsize
from mergekit_evolve.search.objectives import Objectives

DEFAULT_KERNELS = 5


def make_strategy(
    problem, opt: OptimizerConfig, x0: np.ndarray, restart: int, objectives: Objectives | None, items=None
):
    """The strategy ``opt`` names (``optimizer.kind``), started at ``x0`` (restart ``restart``); ``items``: the
    per-item results M2N2 shares (search/m2n2.py's ItemResults)."""
    kind = opt.strategy
    if kind == "cmaes":
        return problem.new_optimizer(x0, opt, restart)
    if kind == "m2n2":
        from mergekit_evolve.search.m2n2 import m2n2_for

        return m2n2_for(problem, opt, items.item_weights)
    require_multi_objective()
    if kind == "como-cmaes":
        extra = problem.cma_options(opt) if hasattr(problem, "cma_options") else {}
        return ComoCMA(x0, opt, objectives.reference, restart, extra)
    lower, upper = problem.search_box()
    padding = len(x0) - len(lower)  # the loop pads 1-gene genomes with a coordinate decode ignores
    lower, upper = np.concatenate([lower, np.zeros(padding)]), np.concatenate([upper, np.ones(padding)])
    return NSGA2(x0, opt, len(objectives.names), lower, upper, restart)


def require_multi_objective() -> None:
    try:
        import comocma  # noqa: F401
        import pymoo  # noqa: F401
    except ImportError:
        raise InputError(
            "optimizer.objectives needs comocma and pymoo: pip install 'mergekit-evolve[pareto]'"
        ) from None


class ComoCMA:
    """COMO-CMA-ES: ``kernels`` CMA-ES kernels whose incumbents form the front. One generation is every
    kernel's incumbent (the kernels' means, which the front is made of) then every kernel's offspring. When
    every kernel has converged, they start again from their incumbents with ``sigma0`` (a run never stalls)."""

    def __init__(self, x0: np.ndarray, opt: OptimizerConfig, reference, restart: int = 0, extra: dict | None = None):
        self.opt, self.reference, self.extra, self.restart = opt, list(reference), extra, restart
        self.kernels = opt.kernels or DEFAULT_KERNELS
        self.kernel_popsize = (opt.popsize or default_popsize(len(x0))) * 2**restart
        self.popsize = self.kernels * (self.kernel_popsize + 1)
        self.revivals = 0
        rng = np.random.default_rng(opt.seed + 1000 * restart)
        # Kernel 0 starts at the configured start; the others a step away, so they do not start as twins.
        starts = [np.asarray(x0, dtype=np.float64)]
        starts += [starts[0] + opt.sigma0 * rng.standard_normal(len(x0)) for _ in range(self.kernels - 1)]
        self.front = self._front(starts)

    def _front(self, starts: list[np.ndarray]):
        import comocma

        seed = self.opt.seed + 1000 * self.restart + 100_000 * self.revivals
        options = []
        for k in range(len(starts)):
            kernel = cma_options(self.opt, self.kernel_popsize, self.extra)
            # numpy's global generator does not travel in a pickle: each kernel draws from its own.
            kernel.update({"seed": np.nan, "randn": np.random.RandomState(seed * 100 + k + 1).randn, "tolx": 0})
            options.append(kernel)
        return comocma.Sofomore(
            comocma.get_cmas([list(map(float, s)) for s in starts], self.opt.sigma0, options),
            reference_point=self.reference,
            opts={"verb_log": 0, "verb_disp": 0, "update_order": comocma.sort_increasing},
        )

    def ask(self) -> list[np.ndarray]:
        if self.front.stop():  # every kernel converged: comocma would have none to ask
            self.revivals += 1
            self.front = self._front([np.asarray(k.incumbent, dtype=np.float64) for k in self.front.kernels])
        return [np.asarray(x, dtype=np.float64) for x in self.front.ask("all")]

    def tell(self, genomes, values) -> None:
        self.front.tell(genomes, [list(map(float, v)) for v in values])

    def stop(self) -> dict:
        return {}  # converged kernels start again in ask; IPOP restarts are CMA-ES's

    @property
    def sigma(self) -> float:
        return float(np.mean([kernel.sigma for kernel in self.front.kernels]))


class NSGA2:
    """NSGA-II (pymoo) in the box ``[lower, upper]``: the first population is the configured start and
    seeded uniform points; later generations are ``popsize`` offspring each."""

    def __init__(self, x0, opt: OptimizerConfig, n_objectives: int, lower, upper, restart: int = 0):
        from pymoo.algorithms.moo.nsga2 import NSGA2 as Algorithm
        from pymoo.core.problem import Problem
        from pymoo.termination.max_gen import MaximumGenerationTermination

        lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
        self.popsize = (opt.popsize or max(20, default_popsize(len(x0)))) * 2**restart
        seed = opt.seed + 1000 * restart
        first = np.random.default_rng(seed).uniform(lower, upper, (self.popsize, len(lower)))
        first[0] = np.clip(x0[: len(lower)], lower, upper)
        self.problem = Problem(n_var=len(lower), n_obj=n_objectives, xl=lower, xu=upper)
        self.algorithm = Algorithm(pop_size=self.popsize, sampling=first)
        self.algorithm.setup(self.problem, seed=seed, termination=MaximumGenerationTermination(10**9))
        self._asked = None
        self.sigma = None

    def ask(self) -> list[np.ndarray]:
        self._asked = self.algorithm.ask()
        return [np.asarray(x, dtype=np.float64) for x in self._asked.get("X")]

    def tell(self, genomes, values) -> None:
        from pymoo.problems.static import StaticProblem

        asked = self._asked
        if asked is None or not np.array_equal(np.asarray(genomes), asked.get("X")):
            raise RuntimeError("internal: NSGA-II was told other genomes than it asked")
        # The evaluator counts evaluations and marks them done; setting F alone would leave them unevaluated.
        self.algorithm.evaluator.eval(StaticProblem(self.problem, F=np.asarray(values, dtype=np.float64)), asked)
        self.algorithm.tell(infills=asked)
        self._asked = None

    def stop(self) -> dict:
        return {}
