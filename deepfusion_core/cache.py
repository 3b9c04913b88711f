"""Where deepfusion keeps what it computed once for later processes, and how it writes there.

What is kept (data batches, this machine's device count) can always be made again: a file
that cannot be written costs a later process the time to make it, no more, and a file is
replaced whole (written beside, then renamed), so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """DEEPFUSION_CACHE_DIR, or the user's cache (`$XDG_CACHE_HOME/deepfusion`)."""
    if os.environ.get("DEEPFUSION_CACHE_DIR"):
        return Path(os.environ["DEEPFUSION_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepfusion"


def keep(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(partial)` on a file beside `path`, then rename it to `path`; nothing where
    the cache cannot be written (read-only, full disk)."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
