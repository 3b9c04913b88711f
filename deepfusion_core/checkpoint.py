"""Model checkpoints: a config and its params as one Orbax checkpoint directory.

Layout (a composite Orbax checkpoint, readable with plain `orbax.checkpoint`)::

    PATH/config/   JSON: the T5Config
    PATH/params/   PyTree checkpoint of the parameter tree (see `model` for names and shapes)
    PATH/checksums/  JSON: each array's checksums (see `checksums`), verified on every load

Orbax writes into a temporary directory and renames it when complete, so a crash never
leaves a half-written PATH. Loading checks the stored tree against the config's shapes
before reading any array: Orbax alone restores whatever subset of a tree it finds.

A training workdir holds the same items per step under `checkpoints/<step>/`; `load_model`
on a workdir (or its `checkpoints/`) loads the latest complete step.

Arrays are written as plain zarr arrays, one per parameter, without Orbax's two defaults
(figures in BENCHMARKS.md, `bench checkpoint`): zstd saved 8% of the bytes of weights and
slowed every restore measured, and OCDBT (one key-value store per process, which pays off with
hundreds of hosts writing to a bucket) slowed most saves on a local disk. Orbax reads both from
each checkpoint's metadata, so checkpoints written with them still load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pydantic
from flax import traverse_util

from deepfusion_core import checksums, disk
from deepfusion_core.config import T5Config
from deepfusion_core.model import Params, param_shapes


class _NoRoutineOrbaxNotices(logging.Filter):
    """Orbax 0.12 warns of routine events: that there was no OCDBT file to merge (twice per
    checkpoint) and that a save waits for the previous one (with saves every few steps)."""

    _ROUTINE = ("Skipping merge of OCDBT checkpoints", "Waiting for previous save to complete")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self._ROUTINE)


logging.getLogger("absl").addFilter(_NoRoutineOrbaxNotices())
disk.quiet_abandoned_writes()  # a disk full mid-save: one error, not one per write in flight


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """Orbax handlers of every item a model or training checkpoint holds (arrays: plain zarr,
    neither OCDBT nor zstd)."""
    return {"params": ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False),
            "opt_state": ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False),
            "config": ocp.JsonCheckpointHandler(), "train_state": ocp.JsonCheckpointHandler(),
            "checksums": ocp.JsonCheckpointHandler()}


def _model_checkpointer() -> ocp.Checkpointer:
    # Items are read through the composite, which knows them all (a training step also holds
    # opt_state and train_state); `params/` read on its own makes Orbax warn.
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**item_handlers()))


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or inconsistent with its config."""


def save_model(path: str | Path, cfg: T5Config, params: Params, overwrite: bool = False) -> Path:
    """Write `cfg` and `params` as an Orbax checkpoint at `path` (atomically)."""
    path = Path(path).absolute()
    check_params(cfg, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
                 where="params to save")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")
    _model_checkpointer().save(
        path, ocp.args.Composite(config=ocp.args.JsonSave(cfg.model_dump(mode="json")),
                                 params=ocp.args.PyTreeSave(params),
                                 checksums=ocp.args.JsonSave(
                                     {"params": checksums.tree_checksums(params)})),
        force=overwrite)
    return path


def verify_checksums(path: Path, items: dict, stored: dict | None) -> None:
    """Raise `CheckpointError` if an array of `items` ({item name: tree}) differs from the
    checksums saved with it. `stored` is None for checkpoints written before checksums."""
    if stored is None:
        return
    for item, tree in items.items():
        bad = checksums.mismatches(tree, stored.get(item, {}))
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise CheckpointError(f"{path}/{item} is corrupt: {bad[0]}{more} do not match the "
                                  f"checksums saved with them")


def check_params(cfg: T5Config, found: Params, where: str) -> None:
    """Raise `CheckpointError` naming every parameter whose presence or shape differs from cfg."""
    expected = traverse_util.flatten_dict(param_shapes(cfg))
    actual = traverse_util.flatten_dict(found)
    problems = []
    for key in sorted(expected.keys() | actual.keys()):
        name = "/".join(key)
        if key not in actual:
            problems.append(f"{name} missing")
        elif key not in expected:
            problems.append(f"{name} unexpected")
        elif tuple(actual[key].shape) != tuple(expected[key].shape):
            problems.append(f"{name} has shape {tuple(actual[key].shape)}, config says "
                            f"{tuple(expected[key].shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{where} does not match its config ({cfg.describe()}): "
                              f"{'; '.join(problems[:3])}{more}")


def _read_config(path: Path) -> T5Config:
    raw = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path / "config")
    try:
        return T5Config.model_validate(raw)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        raise CheckpointError(f"{path}/config is not a valid T5Config: "
                              f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def model_dir(path: str | Path) -> Path:
    """Resolve a model checkpoint, a train workdir or its `checkpoints/` to one model dir."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if (path / "params").is_dir() and (path / "config").is_dir():
        return path
    steps_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name) for p in steps_dir.iterdir() if p.name.isdigit()), reverse=True)
    for step in steps:
        candidate = steps_dir / str(step)
        if (candidate / "params").is_dir() and (candidate / "config").is_dir():
            return candidate
    raise CheckpointError(f"no model checkpoint at {path}: expected config/ and params/ or "
                          f"step directories holding them")


def read_config(path: str | Path) -> T5Config:
    """The config of a model checkpoint or train workdir, without reading any array."""
    return _read_config(model_dir(path))


def load_model(path: str | Path) -> tuple[T5Config, Params]:
    """Load `(config, params)` from a model checkpoint or a train workdir's latest step.

    Params come back as float32 numpy arrays on the host. Raises `CheckpointError` if the
    stored tree does not match the config.
    """
    path = model_dir(path)
    cfg = _read_config(path)
    checkpointer = _model_checkpointer()
    stored = checkpointer.metadata(path).item_metadata["params"]
    stored = getattr(stored, "tree", stored)
    check_params(cfg, stored, where=f"checkpoint {path}")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    items = {"params": ocp.args.PyTreeRestore(restore_args=restore_args)}
    if (path / "checksums").is_dir():
        items["checksums"] = ocp.args.JsonRestore()
    try:
        restored = checkpointer.restore(path, args=ocp.args.Composite(**items))
    except (ValueError, OSError) as e:  # truncated or missing chunks
        raise CheckpointError(f"{path} is unreadable: {str(e).splitlines()[0][:200]}") from None
    verify_checksums(path, {"params": restored.params}, restored.get("checksums"))
    return cfg, restored.params
