"""Fitness of candidate models on local data: generation, multiple choice, perplexity, callables.

The evaluator (torch, transformers) is imported on first use, so reading a config stays light.
"""

from mergekit_evolve.fitness.tasks import FitnessConfig, TaskConfig, load_fitness_config

__all__ = ["Fitness", "FitnessConfig", "TaskConfig", "TaskResult", "load_fitness_config"]


def __getattr__(name: str):
    if name in ("Fitness", "TaskResult"):
        from mergekit_evolve.fitness import evaluator

        return getattr(evaluator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
