"""The content-addressed node store under a runs directory::

    RUNS/<pipeline>/nodes/<node>-<fingerprint>/   node.json, DONE, FAILED, .lock,
                                                  checkpoints/ metrics.jsonl tensorboard/ (train)
                                                  model/ (fuse: an Orbax model checkpoint)
    RUNS/<pipeline>/report/<profile>/             report.md settings.csv curves.png .lock
    RUNS/<pipeline>/.lock                         held by the one `deepfusion run` at a time

`DONE` (the node's summary as JSON) is written last and atomically: a node directory without
it is work in progress, whatever else it holds. Each `.lock` is a `workdir_lock`: whoever
writes a node or a report holds it, so one node is never written by two processes at once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from deepfusion_core import disk, workdir_lock


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
    before the rename, so a crash cannot leave an empty file in place)."""
    tmp = path.with_name(f".{path.name}.tmp")
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


def is_done(node_dir: Path) -> bool:
    return (node_dir / "DONE").exists()


def done_record(node_dir: Path) -> dict | None:
    """The summary a finished node wrote into DONE (None if it is not finished)."""
    return read_json(node_dir / "DONE")


def mark_done(node_dir: Path, summary: dict) -> None:
    (node_dir / "FAILED").unlink(missing_ok=True)
    write_json_atomic(node_dir / "DONE", summary)


def mark_failed(node_dir: Path, message: str) -> None:
    node_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(node_dir / "FAILED", {"error": message})


def failure(node_dir: Path) -> str | None:
    record = read_json(node_dir / "FAILED")
    return record["error"] if record else None


def latest_checkpoint_step(node_dir: Path) -> int | None:
    """The newest finalised Orbax step of a train node (None if it has none)."""
    ckpts = node_dir / "checkpoints"
    if not ckpts.is_dir():
        return None
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


def discard_unfinished_checkpoints(node_dir: Path) -> None:
    """Remove the steps Orbax left unfinished (`checkpoints/<step>.orbax-checkpoint-tmp`, a
    save cut short): no restore reads them, and a full disk needs their space."""
    for unfinished in (node_dir / "checkpoints").glob(f"*{disk.UNFINISHED}"):
        shutil.rmtree(unfinished, ignore_errors=True)


def set_aside(node_dir: Path) -> None:
    """Keep a node's directory, renamed `<dir>.replaced-<time>`, so the node runs afresh
    (`force`); refused (`workdir_lock.LockedError`) while another writer holds the node."""
    if node_dir.exists():
        with workdir_lock.hold(node_dir, f"node {node_dir.name}", wait=False):
            replaced = f"{node_dir.name}.replaced-{int(time.time())}"
            shutil.move(node_dir, node_dir.with_name(replaced))


def copy_train_prefix(source: Path, step: int, node_dir: Path) -> None:
    """Seed the train node `node_dir` with step `step` of the run in `source`: its metrics and
    TensorBoard events, then (renamed in last, so a crash leaves no half checkpoint) the
    checkpoint. The trainer resumes from it as from its own."""
    node_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "metrics.jsonl", node_dir / "metrics.jsonl")
    if (source / "tensorboard").is_dir():
        shutil.copytree(source / "tensorboard", node_dir / "tensorboard", dirs_exist_ok=True)
    staging = node_dir / ".extending"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source / "checkpoints" / str(step), staging)
    (node_dir / "checkpoints").mkdir(exist_ok=True)
    staging.rename(node_dir / "checkpoints" / str(step))


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
