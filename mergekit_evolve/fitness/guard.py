"""Guard against optimising on public benchmark test sets.

Selecting merges on a benchmark's test split and then reporting that benchmark inflates the score
(the paper selected on GSM8K-ja items disjoint from the MGSM-ja test set it reported). Selection
tasks whose names (or data file names) look like common benchmarks are refused unless the user says
``allow_benchmark_tasks: true`` (CLI ``--allow-benchmark-tasks``). Held-out tasks are not guarded:
reporting on benchmarks is the point of them.
"""

from __future__ import annotations

import re
from pathlib import Path

from mergekit_evolve.errors import InputError

BENCHMARKS = (
    "mmlu",
    "gsm8k",
    "mgsm",
    "arc_challenge",
    "arc_easy",
    "arc",
    "hellaswag",
    "truthfulqa",
    "winogrande",
    "piqa",
    "boolq",
    "lambada",
    "humaneval",
    "mbpp",
    "bbh",
    "gpqa",
    "ifeval",
    "minerva_math",
    "hendrycks",
    "openbookqa",
    "siqa",
    "commonsense_qa",
    "triviaqa",
    "naturalqs",
    "jcommonsenseqa",
    "jnli",
    "jsquad",
    "marc_ja",
    "xwinograd",
)
_PATTERN = re.compile(r"(^|[^a-z0-9])(" + "|".join(sorted(BENCHMARKS, key=len, reverse=True)) + r")([^a-z]|$)")


def looks_like_benchmark(name: str) -> str | None:
    match = _PATTERN.search(name.lower())
    return match.group(2) if match else None


def check_selection_tasks(config) -> None:
    if config.allow_benchmark_tasks:
        return
    names: list[tuple[str, str]] = [(f"tasks.{t.name}", t.name) for t in config.tasks or []]
    if config.builtin_fitness is not None:
        for task in config.builtin_fitness.tasks:
            names.append((f"fitness.tasks.{task.name}", task.name))
            names.append((f"fitness.tasks.{task.name}.data", Path(str(task.data)).stem))
    for where, name in names:
        hit = looks_like_benchmark(name)
        if hit:
            raise InputError(
                f"{where}: {name!r} looks like the {hit} benchmark; selecting merges on a benchmark's test data "
                "contaminates it. Use a separate split, or set allow_benchmark_tasks: true (--allow-benchmark-tasks) "
                "if this data is not a test set"
            )
