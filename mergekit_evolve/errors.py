"""Errors users can act on.

``InputError`` is for bad input: the CLI prints its message on one line and exits with code 2.
Messages name what is wrong and how to fix it, e.g.
``genome.layer_granularity: 3 does not divide the 8 layers of /m/a; use a divisor of 8 (1, 2, 4, 8) or 0``.
"""


class InputError(Exception):
    """Bad user input (config, paths, data). One line, names the field and the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class TokenizerRequired(InputError):
    """A fitness task needs a tokenizer and the models have none; ``what`` names the task.

    ``fitness.factory.make_fitness`` turns it into one line naming the model folder and the fix.
    """

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"{what} needs a tokenizer and none was given")


class CandidateError(Exception):
    """A single candidate failed (merge raised, NaN weights, evaluation error).

    Recorded with the worst fitness; the run goes on.
    """


class RunFailedError(RuntimeError):
    """Too many candidates failed (``optimizer.max_failures``); the CLI prints it on one line (exit 1)."""
