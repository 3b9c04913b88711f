"""`deepfusion bench fuse`: fusion's wall time and peak memory against a plain copy."""

from __future__ import annotations

import resource
import time

import jax
import numpy as np
import psutil

from deepfusion_bench.common import machine, random_params, tree_bytes
from deepfusion_core.config import PRESETS
from deepfusion_core.fusion import fuse
from deepfusion_core.model import param_shapes


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench_fuse(preset: str = "table7-M", cross_std: float = 0.0) -> dict:
    """Fuse two random `preset` models; wall time and peak RSS against the copy bound."""
    cfg = PRESETS[preset]
    shapes = param_shapes(cfg)
    a, b = random_params(shapes, 1), random_params(shapes, 2)
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    out_cfg, fused = fuse([(cfg, a), (cfg, b)], norm="prop", cross_std=cross_std, seed=0)
    wall = time.perf_counter() - start
    peak = _peak_rss_bytes()
    in_bytes, out_bytes = tree_bytes(a) + tree_bytes(b), tree_bytes(fused)

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
