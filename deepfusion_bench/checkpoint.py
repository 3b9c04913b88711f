"""`deepfusion bench checkpoint`: Orbax save and restore against raw I/O of the same bytes."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from deepfusion_bench.common import machine, random_params, tree_bytes
from deepfusion_core.checkpoint import load_model, save_model
from deepfusion_core.checksums import tree_checksums
from deepfusion_core.config import PRESETS
from deepfusion_core.model import param_shapes

# The Orbax settings `save_model` does not use, measured beside it (params alone).
ORBAX_VARIANTS = {"orbax_default": {},  # OCDBT and zstd
                  "orbax_ocdbt": {"use_compression": False}}


def _write_npy(path: Path, array, durable: bool) -> None:
    with path.open("wb") as f:
        np.save(f, array)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def bench_checkpoint(preset: str = "cpu-L", directory: str | None = None,
                     repeats: int = 3) -> dict:
    """Orbax save and restore of a model checkpoint against a raw write and read of the same
    bytes (one .npy file per parameter) in the same directory, best of `repeats`.

    Orbax fsyncs every file it writes (a checkpoint must survive a crash), so the save is
    compared with a raw write that fsyncs each file too; the raw write through the page cache
    alone is reported beside it. Reads are not cache-dropped on either side.
    """
    cfg = PRESETS[preset]
    params = random_params(param_shapes(cfg), 0)
    leaves = jax.tree.leaves(params)
    nbytes = tree_bytes(params)
    root = Path(tempfile.mkdtemp(prefix="deepfusion-bench-ckpt-", dir=directory))
    times = {"orbax_save": [], "orbax_restore": [], "checksums": [], "raw_write": [],
             "raw_write_cached": [],
             "raw_read": [], **{f"{v}_{op}": [] for v in ORBAX_VARIANTS for op in ("save", "restore")}}
    try:
        for i in range(repeats):
            start = time.perf_counter()
            save_model(root / f"orbax{i}", cfg, params)
            times["orbax_save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(load_model(root / f"orbax{i}")[1])
            times["orbax_restore"].append(time.perf_counter() - start)
            start = time.perf_counter()  # part of the save above (and of the restore)
            tree_checksums(params)
            times["checksums"].append(time.perf_counter() - start)
            for variant, options in ORBAX_VARIANTS.items():
                checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options))
                start = time.perf_counter()
                checkpointer.save(root / f"{variant}{i}", args=ocp.args.PyTreeSave(params))
                times[f"{variant}_save"].append(time.perf_counter() - start)
                start = time.perf_counter()
                checkpointer.restore(root / f"{variant}{i}", args=ocp.args.PyTreeRestore(
                    restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                              params)))
                times[f"{variant}_restore"].append(time.perf_counter() - start)
            for kind, durable in (("raw_write", True), ("raw_write_cached", False)):
                raw = root / f"{kind}{i}"
                raw.mkdir()
                start = time.perf_counter()
                for j, leaf in enumerate(leaves):
                    _write_npy(raw / f"{j}.npy", leaf, durable)
                times[kind].append(time.perf_counter() - start)
            start = time.perf_counter()
            _ = [np.load(root / f"raw_write{i}" / f"{j}.npy") for j in range(len(leaves))]
            times["raw_read"].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    gbps = {k: nbytes / v / 1e9 for k, v in best.items()}
    return {"bench": "checkpoint", "model": preset, "gb": round(nbytes / 1e9, 3),
            "directory": str(root.parent),
            **{f"{k}_gb_per_s": round(v, 2) for k, v in gbps.items()},
            "save_over_raw": round(gbps["orbax_save"] / gbps["raw_write"], 2),
            "checksums_s": round(best["checksums"], 4),
            "checksums_over_save": round(best["checksums"] / best["orbax_save"], 3),
            "restore_over_raw": round(gbps["orbax_restore"] / gbps["raw_read"], 2),
            "machine": machine()}
