"""What a person watching a run sees: step lines on stderr, and a live bar only on a terminal.

Every step that can take more than a few seconds announces itself (zoo build, baselines, held-out
scoring, model save). When stderr is not a terminal (a log file, CI), there is no bar: the search
prints one line per generation instead of carriage-return redraws.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def on_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def step(message: str, enabled: bool = True) -> Iterator[None]:
    """``[mergekit-evo] message ...`` before a slow step and ``done in N s`` after it."""
    if not enabled:
        yield
        return
    print(f"[mergekit-evo] {message} ...", file=sys.stderr, flush=True)
    started = time.time()
    yield
    print(f"[mergekit-evo] {message}: done in {time.time() - started:.1f} s", file=sys.stderr, flush=True)


def note(message: str, enabled: bool = True) -> None:
    """``[mergekit-evo] message``: a one-line note between steps."""
    if enabled:
        print(f"[mergekit-evo] {message}", file=sys.stderr, flush=True)


def quiet_library_bars_off_terminal() -> None:
    """Turn off huggingface_hub's and transformers' bars ("Loading weights ...") when stderr is not a
    terminal: in a log each is a run of carriage-return redraws. Call before transformers is imported,
    which copies the setting once."""
    if not on_terminal():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
