"""Transforms from the free genome coordinates that CMA-ES moves to parameter values.

CMA-ES samples genome coordinates ``u`` anywhere on the real line. Every searched merge parameter has
a closed range ``[lo, hi]``; its value is

    value = lo + (hi - lo) * fold(u)

where ``fold`` is the triangle wave with period 2 that is the identity on [0, 1]:
``fold(0.3) = 0.3``, ``fold(1.2) = 0.8``, ``fold(-0.1) = 0.1``.  Unlike clipping, folding has no flat
regions outside the box (where CMA-ES would drift with no signal), every ``u`` maps to a valid value,
and the map is continuous. ``sigma0 = 1/6`` (the paper's setting) is therefore one sixth of each
parameter's range. ``unfold`` gives the ``u`` in [0, 1] for a value (used for initial genomes).

Values are rounded to 12 significant digits (``decimal``) before a recipe is built from them, so the
recipe that is merged, scored and written is the same one, and an ``init: 0.33`` prints as 0.33 rather
than the 0.32999999999999996 the float arithmetic above gives back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def fold(u: np.ndarray | float) -> np.ndarray:
    """Triangle wave of period 2 that is the identity on [0, 1]."""
    r = np.mod(np.asarray(u, dtype=np.float64), 2.0)
    return np.where(r <= 1.0, r, 2.0 - r)


def to_range(u: np.ndarray | float, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * fold(u)


def unfold(value: float, lo: float, hi: float) -> float:
    """The genome coordinate in [0, 1] that maps to ``value`` (clipped into the range)."""
    if hi == lo:
        return 0.0
    return float(np.clip((value - lo) / (hi - lo), 0.0, 1.0))


SIGNIFICANT_DIGITS = 12  # far below any effect on merged weights (float32 has ~7 digits)


def decimal(value: float) -> float:
    """``value`` rounded to 12 significant digits: its repr (and YAML) is the short decimal."""
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


@dataclass(frozen=True)
class BoundedGene:
    """One evolved number: its range ``[lo, hi]`` and its initial value (PS genes, template markers)."""

    lo: float
    hi: float
    init: float


def initial_genome(genes: Sequence[BoundedGene], random: bool = False, seed: int = 0) -> np.ndarray:
    """Every gene at its initial value, or (``random``) seeded uniform coordinates in [0, 1]."""
    if random:
        return np.random.default_rng(seed).uniform(0.0, 1.0, len(genes))
    return np.array([unfold(g.init, g.lo, g.hi) for g in genes])


def gene_values(genes: Sequence[BoundedGene], genome: np.ndarray, space: str) -> list[float]:
    """The value of each gene for a genome (an input error naming ``space`` when the length is wrong)."""
    from mergekit_evolve.errors import InputError

    genome = np.asarray(genome, dtype=np.float64)
    if genome.shape != (len(genes),):
        raise InputError(f"genome: expected {len(genes)} numbers for {space}, got {genome.size}")
    return [decimal(to_range(u, g.lo, g.hi)) for u, g in zip(genome, genes)]
