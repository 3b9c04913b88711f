"""Child processes that do not outlive the process that started them.

A parent killed outright (kill -9, out of memory, a flow's timeout) runs no handler that could
stop its children; the kernel can, through PR_SET_PDEATHSIG, which the child sets on itself
between fork and exec. Linux only. "Parent" is the thread that forked: spawn from a thread
that lives as long as the children should.
"""

from __future__ import annotations

import ctypes
import functools
import signal
import subprocess
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1


def _signal_on_parent_death(signum: int) -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def spawn(argv: Sequence[str], on_parent_death: signal.Signals, **popen) -> subprocess.Popen:
    """`subprocess.Popen(argv, **popen)` whose child gets `on_parent_death` when its parent
    dies: SIGTERM lets it checkpoint first, SIGKILL stops it at once."""
    return subprocess.Popen(list(argv), preexec_fn=functools.partial(
        _signal_on_parent_death, on_parent_death), **popen)
