"""A full disk, recognised wherever it surfaces, and refused before a checkpoint is started.

The writers of a training run report ENOSPC each their own way: Python as an OSError that
often lacks the file (a failed `write`; the metrics and TensorBoard files name theirs), and
TensorStore (Orbax's arrays) as a ValueError "RESOURCE_EXHAUSTED: Error writing local file
"PATH" ... [os_error_code='28']". `no_space` turns either, or an exception raised while
handling one, into one `OSError(ENOSPC, ..., PATH)` naming the first file that could not be
written.

Orbax writes a checkpoint's arrays concurrently, from background threads. When the disk fills
in the middle of a save, it raises the first failure in the caller (`wait_until_finished`, the
next save) and gives up on the writes still in flight, which fail in turn: its threads log
each failure with a traceback, asyncio each abandoned write ("exception was never
retrieved"), TensorStore's threads each completion that reaches the event loop Orbax closed
("Event loop is closed", through `sys.unraisablehook`), and the interpreter, at exit, each
coroutine that never started: a full disk made 1,575 lines. `quiet_abandoned_writes` drops
exactly those repeats; `check_space` refuses a save that cannot fit before any of it is
written.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import sys
import traceback
import warnings
from pathlib import Path

NO_SPACE = os.strerror(errno.ENOSPC)
# How TensorStore names the file it could not write.
_WRITING = re.compile(r'Error writing local file "([^"]+)"')


def _chain(e: BaseException | None) -> list[BaseException]:
    """`e` and the exceptions it was raised from or while handling, outermost first."""
    out: list[BaseException] = []
    while e is not None and all(e is not seen for seen in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def no_space(e: BaseException) -> OSError | None:
    """`OSError(ENOSPC, "No space left on device", PATH)` if `e`, or an exception it came from,
    is a full disk (PATH: the innermost, first, failure that names its file, else None);
    None if the disk is not the problem."""
    full = [c for c in _chain(e) if (isinstance(c, OSError) and c.errno == errno.ENOSPC)
            or NO_SPACE in str(c)]
    for c in reversed(full):
        if isinstance(c, OSError) and c.filename:
            return c
        if m := _WRITING.search(str(c)):
            return OSError(errno.ENOSPC, NO_SPACE, m[1])
    return OSError(errno.ENOSPC, NO_SPACE) if full else None


def describe(e: OSError) -> str:
    """One line: "disk full writing PATH: [Errno 28] No space left on device"."""
    where = f" writing {e.filename}" if e.filename else ""
    return f"disk full{where}: [Errno {errno.ENOSPC}] {e.strerror or NO_SPACE}"


def tree_bytes(path: Path) -> int:
    """The bytes the files under `path` take on disk (allocated blocks, not their lengths)."""
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))


def check_space(directory: Path, need: int, writing: Path) -> None:
    """Raise `OSError(ENOSPC)` naming `writing` if `directory`'s file system has fewer than
    `need` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{NO_SPACE} ({free:,} bytes free, {need:,} needed)",
                      str(writing))


UNFINISHED = ".orbax-checkpoint-tmp"  # suffix of the directory Orbax writes a step into


@functools.cache
def _orbax_dir() -> str:
    import orbax.checkpoint

    return str(Path(orbax.checkpoint.__file__).parent)


def _abandoned(exc: BaseException | None, frames: list[str]) -> bool:
    """Whether `exc` is the failure of a write Orbax gave up on: raised in its code, or about
    a file of a checkpoint it had not finished."""
    if exc is None:
        return False
    frames = frames + [f.filename for f in traceback.extract_tb(exc.__traceback__)]
    return any(f.startswith(_orbax_dir()) for f in frames) or UNFINISHED in str(exc)


class _AbandonedWrites(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.levelno >= logging.ERROR and _abandoned(exc, [record.pathname]))


def _without_closed_loop_callbacks(hook):
    def unraisable(u):
        tb = u.exc_value.__traceback__ if u.exc_value is not None else None
        closed_loop = (isinstance(u.exc_value, RuntimeError)
                       and str(u.exc_value) == "Event loop is closed" and tb is not None
                       and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")  # from C
        if not (closed_loop or _abandoned(u.exc_value, [])):
            hook(u)
    unraisable.quiets_abandoned_writes = True
    return unraisable


def quiet_abandoned_writes() -> None:
    """Drop the reports of the writes Orbax abandoned after a failed save (see the module
    docstring); the failure itself still reaches the caller. Idempotent."""
    if getattr(sys.unraisablehook, "quiets_abandoned_writes", False):
        return
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_AbandonedWrites())
    sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)
    warnings.filterwarnings("ignore", r"coroutine 'async_serialize_from_host\.",
                            RuntimeWarning)
