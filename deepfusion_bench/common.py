"""What the benchmarks share: the machine description, random inputs, a median timer."""

from __future__ import annotations

import platform
import time

import jax
import numpy as np
import psutil


def machine() -> str:
    """A short description of this machine for benchmark records."""
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()} {psutil.cpu_count(logical=True)} cpus {mem:.0f} GiB {platform.node()}"


def random_params(shapes, seed: int):
    """Standard-normal float32 numpy arrays of the given shapes.

    numpy, not init_params: this keeps the inputs at exactly their own size in memory (no
    jax buffers or host copies beside them).
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)


def tree_bytes(tree) -> int:
    """Bytes held by the leaves of a pytree of arrays."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def time_steps(run_step, steps: int, warmup: int = 2) -> float:
    """Median seconds per call: this VM's neighbours make single steps vary by +-20%, and the
    median, unlike the mean, is not moved by the one step a neighbour slowed down."""
    for _ in range(warmup):  # compile, first-touch allocations
        run_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
