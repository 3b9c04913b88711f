"""The content-addressed node store under a runs directory::

    RUNS/<pipeline>/nodes/<node>-<fingerprint>/   a node's directory (`pipeline.workdir`)
    RUNS/<pipeline>/report/<profile>/             report.md settings.csv curves.png .lock
    RUNS/<pipeline>/.lock                         held by the one `deepfusion run` at a time

Each `.lock` is a `workdir_lock`: whoever writes a node or a report holds it, so one node is
never written by two processes at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from contextlib import ExitStack, contextmanager
from pathlib import Path

from deepfusion_core import workdir_lock


def inside(root: Path, *parts: str) -> Path:
    """`root / parts`, refused (ValueError) unless it stays inside `root`: names come from
    stages files and the command line, and no name may reach outside the runs directory."""
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()) or any(
            p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
        raise ValueError(f"{'/'.join(parts)!r} would be outside {root}")
    return path


def node_path(root: Path, name: str, fingerprint: str) -> Path:
    """A node's directory: RUNS/<pipeline>/nodes/<node>-<fingerprint>."""
    return inside(root, "nodes", f"{name}-{fingerprint}")


def report_path(root: Path, profile: str) -> Path:
    """A profile's report directory: RUNS/<pipeline>/report/<profile>."""
    return inside(root, "report", profile)


class LockedError(workdir_lock.LockedError):
    """Another run holds the runs directory."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the whole new one (fsynced
    before the rename, so a crash cannot leave an empty file in place). Writers at once are
    safe: each writes its own temporary file (a shared one would be renamed away from all
    but one of them), and the last rename wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(text)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: name the file (a failed write does not), leave none
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    tmp.replace(path)


def write_json_atomic(path: Path, record: dict) -> None:
    """Write JSON to `path` so a reader sees the old file or the whole new one."""
    write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


@contextmanager
def run_lock(pipeline_dir: Path):
    """Hold the pipeline directory's lock, or raise `LockedError` naming the holder."""
    with ExitStack() as stack:
        try:
            stack.enter_context(workdir_lock.hold(pipeline_dir, str(pipeline_dir), wait=False))
        except workdir_lock.LockedError as e:
            raise LockedError(f"{pipeline_dir} is in use by a running deepfusion run "
                              f"({e.holder}); wait for it or stop it first", e.holder) from None
        yield


def content_digest(path: Path) -> str:
    """A hash of every file under `path` (or of `path` itself): names relative to it, and
    bytes. What a loaded model's fingerprint rests on: a changed file re-runs its descendants."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
