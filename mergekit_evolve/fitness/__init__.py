"""Fitness of candidate models on local data: generation, multiple choice, perplexity, callables."""

from mergekit_evolve.fitness.evaluator import Fitness, TaskResult
from mergekit_evolve.fitness.tasks import FitnessConfig, TaskConfig, load_fitness_config

__all__ = ["Fitness", "FitnessConfig", "TaskConfig", "TaskResult", "load_fitness_config"]
