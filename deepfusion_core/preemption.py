"""Stop requests: SIGTERM and SIGINT end a training run at a checkpoint, not mid-step.

A scheduler stops a node with SIGTERM (a cancelled Prefect run, a preempted machine), a
person with Ctrl-C. While `stop_requests()` is held, either signal is only recorded; the
training loop checks before each step, saves a checkpoint and raises `Preempted`, which every
caller treats as "resumable", not "failed".
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint saved")
        self.step, self.signum = step, signum


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Record SIGTERM/SIGINT in the yielded list instead of dying; restore the handlers after."""
    stop: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
