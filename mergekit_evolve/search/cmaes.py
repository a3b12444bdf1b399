"""CMA-ES as the search uses it (``cma``'s ask/tell object; its whole state is one picklable object)."""

from __future__ import annotations

import math

import cma
import numpy as np

from mergekit_evolve.config import OptimizerConfig


def default_popsize(dim: int) -> int:
    return 4 + int(3 * math.log(dim))  # cma's default population


def cma_options(opt: OptimizerConfig, popsize: int, extra_options: dict | None = None) -> dict:
    """cma's options for one CMA-ES of ``popsize`` (a run's, or one COMO-CMA-ES kernel's)."""
    options = {
        "popsize": popsize,
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
    return options


def new_es(
    x0: np.ndarray, opt: OptimizerConfig, restart: int = 0, extra_options: dict | None = None
) -> cma.CMAEvolutionStrategy:
    popsize = opt.popsize or default_popsize(len(x0))
    options = cma_options(opt, popsize * 2**restart, extra_options)
    # cma treats seed 0 as "use the clock": shift by one so every user seed is reproducible.
    options["seed"] = opt.seed + 1 + 1000 * restart
    if len(x0) == 1:
        # cma needs >= 2 dimensions; a constant dummy coordinate keeps the 1-D case working.
        raise ValueError("internal: pad 1-D genomes before calling new_es")
    return cma.CMAEvolutionStrategy(list(map(float, x0)), opt.sigma0, options)
