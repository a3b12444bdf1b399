"""Which values a merge parameter takes, checked before anything runs.

mergekit's method specs give each parameter's type only, so the ranges come from what each parameter means
in mergekit's kernels: a density is the share of a task vector kept, so ``density: -0.38`` is not a merge
mergekit's kernels would refuse, just a nonsense one. Parameters whose every value means something (weights:
negative ones subtract; passthrough's scale) are not listed.
"""

from __future__ import annotations

import math
from typing import Any

from mergekit_evolve.errors import InputError

# parameter -> (lowest, highest, what it is); None: unbounded on that side
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "density": (0.0, 1.0, "the share of each task vector kept"),
    "gamma": (0.0, 1.0, "the share of the largest differences removed"),
    "epsilon": (0.0, 1.0, "della's spread of keep probabilities around the density"),
    "select_topk": (0.0, 1.0, "the share of elements kept"),
    "lambda": (0.0, None, "the scale applied to the merged task vector"),
    "t": (0.0, 1.0, "the interpolation point between the two models"),
}
# (method, parameter) whose meaning differs from the parameter's usual one
METHOD_RANGES: dict[tuple[str, str], tuple[float | None, float | None, str]] = {
    ("nearswap", "t"): (0.0, None, "nearswap's similarity threshold"),
    ("ram", "epsilon"): (0.0, None, "RAM's tolerance"),
    ("ramplus_tl", "epsilon"): (0.0, None, "RAM+'s tolerance"),
    ("ramplus_tl", "r"): (0.0, 1.0, "RAM+'s share of the task vector"),
    ("ramplus_tl", "alpha"): (0.0, 1.0, "RAM+'s mixing factor"),
    ("multislerp", "eps"): (0.0, None, "multislerp's numerical tolerance"),
    ("karcher", "tol"): (0.0, None, "the Karcher mean's tolerance"),
    ("karcher", "max_iter"): (1.0, None, "the Karcher mean's iteration limit"),
}


def valid_range(method: str, param: str) -> tuple[float | None, float | None, str] | None:
    return METHOD_RANGES.get((method, param)) or RANGES.get(param)


def describe(lo: float | None, hi: float | None) -> str:
    if hi is None:
        return f">= {lo:g}"
    return f"[{lo:g}, {hi:g}]"


def _leaves(method: str, param: str, lo: float, hi: float) -> tuple[str, str] | None:
    """(the valid range, what the parameter is) when ``[lo, hi]`` leaves it; None when it stays inside."""
    valid = valid_range(method, param)
    if valid is None:
        return None
    low, high, meaning = valid
    if (low is not None and lo < low) or (high is not None and hi > high):
        return describe(low, high), meaning
    return None


def check_bounds(method: str, param: str, lo: float, hi: float, where: str) -> None:
    """A searched range ``[lo, hi]`` must lie within the values ``param`` takes."""
    left = _leaves(method, param, lo, hi)
    if left:
        valid, meaning = left
        raise InputError(
            f"{where}: [{lo:g}, {hi:g}] leaves {valid}, the values {method}'s {param} takes ({meaning}); use a "
            f"range within {valid}"
        )


def check_value(method: str, param: str, value: Any, where: str) -> None:
    """A fixed number (or each number of a gradient list) must be a value ``param`` takes."""
    values = value if isinstance(value, list) else [value]
    for number in [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]:
        if not math.isfinite(number):
            raise InputError(f"{where}: {number} is not a finite number; give {param} a finite value")
        left = _leaves(method, param, number, number)
        if left:
            valid, meaning = left
            raise InputError(
                f"{where}: {number:g} is outside {valid}, the values {method}'s {param} takes ({meaning}); use a "
                f"value within {valid}"
            )


__all__ = ["RANGES", "METHOD_RANGES", "check_bounds", "check_value", "valid_range"]
