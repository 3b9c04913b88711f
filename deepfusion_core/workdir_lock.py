"""One writer per directory: an exclusive `flock` on `DIR/.lock`, which names its holder.

Whatever writes a training workdir, a node of the pipeline's store or a report holds that
directory's lock for the whole write. The file says "pid P on HOST since TIME", so a second
writer can say whom it waits for or why it refuses. The kernel drops a flock when its holder
dies, even by SIGKILL: a dead holder's lock is simply taken over, never cleaned up by hand.

A holder that asks to `reenter` joins a lock its own thread holds already (the `train()` a
pipeline node runs inside the node's lock); any other second holder, in another process or
thread or the same one, waits or is refused like any writer. flock is reliable on local
filesystems only: over NFS Linux emulates it with POSIX byte-range locks (lockd), and other
network filesystems may not lock at all, so writers on different hosts sharing one runs
directory are only as safe as that filesystem's locking.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

LOCK_NAME = ".lock"
_held: set[tuple[str, int]] = set()  # (lock file, thread) of the locks this process holds


class LockedError(OSError):
    """Another process holds the lock (an OSError: the command line reports it as one line)."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


def _holder(f) -> str:
    # The holder writes its line just after taking the lock: give it a moment.
    for _ in range(20):
        f.seek(0)
        text = f.read().strip()
        if text:
            return text
        time.sleep(0.05)
    return "another process"


def waiting_message(what: str, holder: str) -> str:
    """The one line a writer logs while it waits for `holder`."""
    return f"waiting for {what}: held by {holder}"


@contextmanager
def hold(directory: str | Path, what: str, wait: bool, log: Callable[[str], None] = print,
         reenter: bool = False) -> Iterator[None]:
    """Hold `directory`'s lock for the block (the directory is created if need be).

    If someone else holds it: with `wait`, log once "waiting for WHAT: held by pid P on
    HOST since T" and block until it is released or its holder dies; without, raise
    `LockedError` naming the holder. With `reenter`, a lock this thread holds is joined.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    key = (os.path.realpath(path), threading.get_ident())
    if key in _held:
        if reenter:  # the outer block releases it
            yield
            return
        if wait:  # flock would wait for this very thread forever
            raise RuntimeError(f"{what}: this thread holds {path} already")
    with path.open("a+") as f:  # never truncated on open: the holder's line must survive
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            if not wait:
                raise LockedError(f"{what} is in use ({holder}); wait for it or stop it first",
                                  holder) from None
            log(waiting_message(what, holder))
            fcntl.flock(f, fcntl.LOCK_EX)
        since = datetime.now().astimezone().isoformat(timespec="seconds")
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        f.flush()
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
