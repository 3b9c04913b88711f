"""Training checkpoints: Orbax `CheckpointManager` over `WORKDIR/checkpoints/<step>/`.

Each step directory is a composite checkpoint with the items

    params/       the model parameters (so a step directory is also a model checkpoint)
    config/       the T5Config (JSON)
    opt_state/    the optimizer state
    train_state/  JSON: step, data position, RNG key data, cumulative compute and wall time

Saves are asynchronous (training continues while Orbax writes) and atomic (Orbax finalises a
step by renaming it into place). The manager keeps the last `keep_last` steps plus every step
divisible by `keep_every`. Restoring walks back from the latest step: an unreadable step
(truncated or corrupt files) is reported by name and the previous one is tried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from deepfusion_core.checkpoint import CheckpointError, check_params, item_handlers
from deepfusion_core.config import T5Config

log = logging.getLogger(__name__)


def open_manager(workdir: Path, keep_last: int, keep_every: int | None,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """The workdir's checkpoint manager (creates `checkpoints/` lazily, on first save)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last, keep_period=keep_every, create=True,
        enable_async_checkpointing=async_save)
    # Handlers named up front, so a fresh process can read metadata before any restore.
    # Absolute: Orbax's async writers refuse a relative path (`deepfusion run` defaults to the
    # relative runs/), and only fail in a background thread at the first save.
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_handlers=item_handlers())


def save(manager: ocp.CheckpointManager, step: int, cfg: T5Config, state: dict,
         train_state: dict, force: bool = False) -> None:
    """Start saving `state` ({"params", "opt_state"}) at `step` (asynchronously)."""
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.PyTreeSave(state["params"]),
        opt_state=ocp.args.PyTreeSave(state["opt_state"]),
        config=ocp.args.JsonSave(cfg.model_dump(mode="json")),
        train_state=ocp.args.JsonSave(train_state)), force=force)


def restore_latest(manager: ocp.CheckpointManager, cfg: T5Config, abstract_state: dict,
                   warn: Callable[[str], None] = log.warning) -> tuple[dict, dict] | None:
    """(state, train_state) of the newest readable step, or None if there is no step.

    `abstract_state` holds `jax.ShapeDtypeStruct`s with shardings: arrays are restored
    straight onto their devices. A step whose config differs from `cfg` is an error (the
    workdir belongs to another model), not a fallback.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        stored = T5Config.model_validate(manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
        if stored != cfg:
            raise CheckpointError(f"{manager.directory} holds checkpoints of another model "
                                  f"({stored.describe()}), not {cfg.describe()}")
        try:
            stored_params = manager.item_metadata(step)["params"]
            check_params(cfg, getattr(stored_params, "tree", stored_params),
                         where=f"checkpoint step {step}")
            restored = manager.restore(step, args=ocp.args.Composite(
                params=_restore_onto(abstract_state["params"]),
                opt_state=_restore_onto(abstract_state["opt_state"]),
                train_state=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any unreadable step falls back the same way
            nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older step"
            warn(f"checkpoint step {step} in {manager.directory} is unreadable "
                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); {nxt}")
            continue
        state = {"params": restored.params, "opt_state": restored.opt_state}
        return state, dict(restored.train_state)
    if steps:
        raise CheckpointError(f"no readable checkpoint in {manager.directory} "
                              f"(steps {sorted(steps)} all failed)")
    return None


def _restore_onto(abstract: Any) -> ocp.args.PyTreeRestore:
    """Restore arguments that put each array straight onto its sharding."""
    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
