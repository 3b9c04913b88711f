"""Training checkpoints: Orbax `CheckpointManager` over `WORKDIR/checkpoints/<step>/`.

Each step directory is a composite checkpoint with the items

    params/       the model parameters (so a step directory is also a model checkpoint)
    config/       the T5Config (JSON)
    opt_state/    the optimizer state
    train_state/  JSON: step, data position and seed, cumulative FLOPs, tokens and wall
                  time, device count
    checksums/    JSON: the checksums of every params and opt_state array (see `checksums`)

Saves are asynchronous (training continues while Orbax writes) and atomic (Orbax finalises a
step by renaming it into place). The manager keeps the last `keep_last` steps plus every step
divisible by `keep_every`. Restoring walks back from the latest step: a step that cannot be
read or fails its checksums (truncated, corrupt or missing files, any item) is moved aside to
`WORKDIR/corrupt-checkpoints/` with a warning naming it, and the previous one is tried;
training from there saves the lost steps again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jax.experimental import multihost_utils

from deepfusion_core import checksums, disk
from deepfusion_core.checkpoint import (CheckpointError, check_params, item_handlers,
                                        verify_checksums)
from deepfusion_core.config import T5Config

log = logging.getLogger(__name__)


def open_manager(workdir: Path, keep_last: int, keep_every: int | None,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """The workdir's checkpoint manager; `checkpoints/` is created and checked to be writable.

    Checked here because Orbax finds an unwritable directory only in its background save
    threads, whose sibling threads then wait 20 minutes for a signal that never comes before
    the process can exit.
    """
    directory = (workdir / "checkpoints").absolute()
    try:
        directory.mkdir(exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {directory}: {e.strerror}") from None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last, keep_period=keep_every, create=True,
        enable_async_checkpointing=async_save,
        # A killed writer's unfinished step directories: safe to remove, as the workdir's
        # lock (see `workdir_lock`) guarantees no other writer is mid-save.
        cleanup_tmp_directories=True)
    # Handlers named up front, so a fresh process can read metadata before any restore.
    # Absolute: Orbax's async writers refuse a relative path (`deepfusion run` defaults to the
    # relative runs/), and only fail in a background thread at the first save.
    return ocp.CheckpointManager(directory, options=options,
                                 item_handlers=item_handlers())


def save(manager: ocp.CheckpointManager, step: int, cfg: T5Config, state: dict,
         train_state: dict, force: bool = False) -> None:
    """Start saving `state` ({"params", "opt_state"}) at `step` (asynchronously), once the
    previous save is done and the disk has room for this one (else OSError ENOSPC naming
    the step, before any of it is written)."""
    manager.wait_until_finished()  # as Orbax's save would; a failed previous save raises here
    directory = Path(manager.directory)
    disk.check_space(directory, _checkpoint_bytes(directory, manager.latest_step(), state),
                     directory / str(step))
    sums = {item: checksums.tree_checksums(state[item]) for item in ("params", "opt_state")}
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.PyTreeSave(state["params"]),
        opt_state=ocp.args.PyTreeSave(state["opt_state"]),
        config=ocp.args.JsonSave(cfg.model_dump(mode="json")),
        train_state=ocp.args.JsonSave(train_state),
        checksums=ocp.args.JsonSave(sums)), force=force)


def _checkpoint_bytes(directory: Path, previous: int | None, state: dict) -> int:
    """The disk space a save of `state` takes: the previous step's (the same arrays); for the
    first save, at least its arrays' bytes (the files around them add 30% to 70% for the tiny
    presets on tmpfs and ext4)."""
    if previous is not None and (directory / str(previous)).is_dir():
        return disk.tree_bytes(directory / str(previous))
    return sum(x.nbytes for x in jax.tree.leaves(state))


def restore_latest(manager: ocp.CheckpointManager, cfg: T5Config, abstract_state: dict,
                   warn: Callable[[str], None] = log.warning) -> tuple[dict, dict] | None:
    """(state, train_state) of the newest valid step, or None if there is no step.

    `abstract_state` holds `jax.ShapeDtypeStruct`s with shardings: arrays are restored
    straight onto their devices. Invalid newer steps are moved aside (see the module
    docstring). A step whose config is another model's is an error (the workdir belongs to
    another model), not a fallback.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            stored = T5Config.model_validate(manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
            restored, problem = None, None
        except Exception as e:  # noqa: BLE001 - an unreadable config falls back like the rest
            stored, problem = None, _describe(e)
        if stored is not None and stored != cfg:
            raise CheckpointError(f"{manager.directory} holds checkpoints of another model "
                                  f"({stored.describe()}), not {cfg.describe()}")
        if problem is None:
            try:
                restored = _restore_arrays(manager, step, cfg, abstract_state)
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back the same way
                problem = _describe(e)
        # A chunk is read by the process holding its shard: all must accept the step.
        if not _all_processes_agree(problem is None):
            _move_aside(manager, step, problem or "unreadable in another process", warn)
            continue
        state = {"params": restored.params, "opt_state": restored.opt_state}
        return state, dict(restored.train_state)
    return None


def _describe(e: Exception) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return first if isinstance(e, CheckpointError) else f"{type(e).__name__}: {first}"


def _restore_arrays(manager: ocp.CheckpointManager, step: int, cfg: T5Config,
                    abstract_state: dict) -> ocp.args.Composite:
    stored_params = manager.item_metadata(step)["params"]
    check_params(cfg, getattr(stored_params, "tree", stored_params),
                 where=f"checkpoint step {step}")
    step_dir = Path(manager.directory) / str(step)
    items = dict(params=_restore_onto(abstract_state["params"]),
                 opt_state=_restore_onto(abstract_state["opt_state"]),
                 train_state=ocp.args.JsonRestore())
    if (step_dir / "checksums").is_dir():
        items["checksums"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    verify_checksums(step_dir, {"params": restored.params, "opt_state": restored.opt_state},
                     restored.get("checksums"))
    return restored


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).all())


def _move_aside(manager: ocp.CheckpointManager, step: int, problem: str,
                warn: Callable[[str], None]) -> None:
    """Move an invalid step out of `checkpoints/` (kept for inspection, never read again)."""
    source = Path(manager.directory) / str(step)
    target = source.parent.parent / "corrupt-checkpoints" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
        target.parent.mkdir(exist_ok=True)
        shutil.move(source, target)
        warn(f"checkpoint step {step} in {manager.directory} is invalid ({problem}); moved "
             f"to {target}, trying the previous step")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"move aside checkpoint {step}")
    manager.reload()


def _restore_onto(abstract: Any) -> ocp.args.PyTreeRestore:
    """Restore arguments that put each array straight onto its sharding."""
    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
