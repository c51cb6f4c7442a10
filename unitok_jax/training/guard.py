"""What stops a training run: :class:`SetupError` (a configuration or input problem found before training starts)
and the numerical-fault policy of the training loops: a step whose loss or gradients are not finite changes nothing
(the train steps already keep params and optimizer state and flag it); this module logs each such step with its
number and aborts the run after ``limit`` consecutive ones.

The flags stay on device until the loop reads its metrics anyway (at log / checkpoint points), so watching them
adds no per-step host synchronisation.
"""
from __future__ import annotations

import sys
from typing import Any, Callable


class SetupError(ValueError):
    """A configuration or input problem found before training starts (the CLI prints it without a traceback)."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradients."""


class BadSteps:
    """``add(step, flag)`` after every step (``flag``: the step's 0/1 skipped metric, a device scalar is fine);
    ``check()`` resolves the pending flags, reports skipped steps and raises :class:`NonFiniteError` once
    ``limit`` consecutive steps were skipped (``limit`` <= 0: never)."""

    def __init__(self, limit: int, report: Callable[[str], Any] = lambda m: print(m, file=sys.stderr)):
        self.limit = int(limit)
        self.report = report
        self.pending: list = []
        self.consecutive = 0
        self.total = 0

    def add(self, step: int, flag) -> None:
        self.pending.append((int(step), flag))

    def check(self) -> None:
        pending, self.pending = self.pending, []
        for step, flag in pending:
            if int(flag):
                self.consecutive += 1
                self.total += 1
                self.report(f"step {step}: non-finite loss or gradients; update skipped "
                            f"({self.consecutive} in a row, {self.total} in this run)")
                if 0 < self.limit <= self.consecutive:
                    raise NonFiniteError(
                        f"aborting at step {step}: {self.consecutive} consecutive steps with a non-finite loss or "
                        f"gradients (train.max_bad_steps={self.limit}); the last checkpoint holds the state before "
                        f"them. Lower the learning rate or check the data.")
            else:
                self.consecutive = 0
