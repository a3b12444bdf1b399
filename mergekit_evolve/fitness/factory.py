"""The fitness a config asks for: built-in tasks on local data (``fitness:``) or lm-eval tasks (``tasks:``)."""

from __future__ import annotations

from mergekit_evolve.errors import InputError, TokenizerRequired


def make_fitness(config, tokenizer, tokenizer_ref: str | None = None, progress: bool = False):
    """The fitness of an ``EvolveConfig``. ``tokenizer`` is None when the model ``tokenizer_ref`` has no
    tokenizer files: fine for callables and perplexity on token ids, an input error naming the folder otherwise."""
    try:
        if config.builtin_fitness is not None:
            from mergekit_evolve.fitness.evaluator import Fitness

            return Fitness(config.fitness, tokenizer)
        if tokenizer is None:
            raise TokenizerRequired("tasks (lm-eval)")
        from mergekit_evolve.fitness.lm_eval_tasks import LmEvalFitness

        return LmEvalFitness(config, tokenizer, progress=progress)
    except TokenizerRequired as err:
        folder = tokenizer_ref or "the model"
        raise InputError(
            f"{err.what} needs a tokenizer, but {folder} has no tokenizer files (tokenizer.json, "
            f"tokenizer_config.json, ...); set tokenizer_source to a model folder that has them, or copy them "
            f"into {folder}"
        ) from None
