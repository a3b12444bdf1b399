"""Kind ``callable``: a user function ``fn(model, tokenizer, rows, split) -> float`` (higher is better).

``rows`` are the task's checked rows as dicts (after shuffle and limit for the fitness split);
``split`` is "fitness" or "heldout". The function is imported when ``Fitness`` is built, with the config
file's folder on ``sys.path``, so a ``my_tasks.py`` next to the config is found.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit_evolve.errors import CandidateError, InputError
from mergekit_evolve.fitness.data import Row
from mergekit_evolve.fitness.outcome import Outcome
from mergekit_evolve.fitness.tasks import TaskConfig

FitnessFunction = Callable[[Any, Any, list[dict[str, Any]], str], float]


def load_function(task: TaskConfig, base_dir: Path) -> FitnessFunction:
    assert task.function is not None
    module_name, _, function_name = task.function.partition(":")
    added = str(base_dir) not in sys.path
    if added:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is a config problem
        raise task.field_error(
            "function",
            f"cannot import {module_name!r} ({type(exc).__name__}: {exc})",
            f"put {module_name}.py next to the config file or on PYTHONPATH",
        ) from None
    finally:
        if added:
            sys.path.remove(str(base_dir))
    function = getattr(module, function_name, None)
    if not callable(function):
        raise task.field_error(
            "function", f"{module_name!r} has no function {function_name!r}", "fix the name after the colon"
        )
    return function


def evaluate_callable(
    function: FitnessFunction, task: TaskConfig, model: Any, tokenizer: Any, rows: list[Row], split: str
) -> Outcome:
    value = function(model, tokenizer, [dict(row.values) for row in rows], split)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise InputError(
            f"tasks.{task.name}.function: {task.function} returned {value!r}; return a float (higher is better)"
        ) from None
    if math.isnan(score):
        raise CandidateError(f"task {task.name}: {task.function} returned NaN")
    return Outcome(score=score, metric="callable")
