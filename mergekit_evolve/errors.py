"""Errors users can act on.

``InputError`` is for bad input: the CLI prints its message on one line and exits with code 2.
Messages name what is wrong and how to fix it, e.g.
``genome.layer_granularity: 3 does not divide the 8 layers of /m/a; use a divisor of 8 (1, 2, 4, 8) or 0``.
"""

from __future__ import annotations

import errno


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm, Kubernetes and systemd send before they kill a job): handled like Ctrl-C."""


def disk_full_path(error: BaseException) -> str | None:
    """``""`` or the file being written when ``error`` (or what caused it) is a full disk or quota; else None.

    Libraries wrap the OS error in their own (safetensors raises a plain ``SafetensorError``), so the
    message counts too."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(error.filename or "")
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return ""
        error = error.__cause__ or error.__context__
    return None
