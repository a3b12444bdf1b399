"""An executor that is interrupted mid-run, for the resume tests."""

from __future__ import annotations

from mergekit_evolve.search.executors import LocalExecutor


class StopAfter(LocalExecutor):
    """Our local executor, interrupted (as by Ctrl-C or a kill) after ``n`` evaluations (racing: stages)."""

    def __init__(self, problem, score, n):
        super().__init__(problem, score)
        self.left = n

    def map(self, jobs):
        for item in super().map(jobs):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            yield item
