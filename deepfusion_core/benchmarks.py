"""Benchmarks of the core operations, each returning one flat JSON-able record.

They measure; they assert nothing. The CLI (`deepfusion bench ...`) prints one line of
figures and the record, and BENCHMARKS.md quotes them with the machine they ran on.
"""

from __future__ import annotations

import platform
import resource
import time

import jax
import numpy as np
import psutil

from deepfusion_core.config import PRESETS
from deepfusion_core.fusion import fuse
from deepfusion_core.model import param_shapes


def machine() -> str:
    """A short description of this machine for benchmark records."""
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()} {psutil.cpu_count(logical=True)} cpus {mem:.0f} GiB {platform.node()}"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _random_params(shapes, seed: int):
    # numpy, not init_params: the benchmark is about fusion, and this keeps the inputs at
    # exactly their own size in memory (no jax buffers or host copies beside them).
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)


def _tree_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def bench_fuse(preset: str = "table7-M", cross_std: float = 0.0) -> dict:
    """Fuse two random `preset` models; wall time and peak RSS against the copy bound."""
    cfg = PRESETS[preset]
    shapes = param_shapes(cfg)
    a, b = _random_params(shapes, 1), _random_params(shapes, 2)
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    out_cfg, fused = fuse([(cfg, a), (cfg, b)], norm="prop", cross_std=cross_std, seed=0)
    wall = time.perf_counter() - start
    peak = _peak_rss_bytes()
    in_bytes, out_bytes = _tree_bytes(a) + _tree_bytes(b), _tree_bytes(fused)

    # The copy bound: write every output byte once into fresh memory that stays allocated,
    # as fusion must (reusing one freed buffer would skip the first-touch page faults).
    start = time.perf_counter()
    copies = [np.array(leaf, copy=True) for leaf in jax.tree.leaves(fused)]
    copy = time.perf_counter() - start
    del copies
    return {
        "bench": "fuse", "inputs": f"2 x {preset}", "output": out_cfg.describe(),
        "cross_std": cross_std, "wall_s": round(wall, 3), "copy_s": round(copy, 3),
        "wall_over_copy": round(wall / copy, 2),
        "input_gb": round(in_bytes / 1e9, 3), "output_gb": round(out_bytes / 1e9, 3),
        "rss_before_fuse_gb": round(rss_before / 1e9, 3), "peak_rss_gb": round(peak / 1e9, 3),
        "peak_over_in_plus_out": round(peak / (in_bytes + out_bytes), 3),
        "machine": machine(),
    }

