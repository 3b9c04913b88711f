"""`deepfusion bench trace`: a `jax.profiler` trace of a few train steps, to see where a
step's time goes. Open the directory with TensorBoard's profile plugin or Perfetto (the
`.trace.json.gz`); the command prints the ops that took the most time.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import jax

from deepfusion_bench.step import prepared_step, synthetic_batch
from deepfusion_core.config import PRESETS, Kernels, OptimizerConfig


def trace_steps(preset: str, batch: int, inputs_length: int, targets_length: int, dtype: str,
                kernels: Kernels, out: Path, steps: int = 3) -> Path:
    """Compile and warm the step, then trace `steps` of it into `out`."""
    cfg = PRESETS[preset].model_copy(update={"dtype": dtype})
    fns, state, device_batch = prepared_step(
        cfg, OptimizerConfig(steps=steps), kernels,
        synthetic_batch(cfg, batch, inputs_length, targets_length))
    for _ in range(2):  # compile, first-touch allocations
        state, metrics = fns.train_step(state, device_batch)
    jax.block_until_ready(metrics)
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = fns.train_step(state, device_batch)
        jax.block_until_ready(metrics)
    return out


def top_ops(out: Path, n: int = 15) -> list[tuple[str, float]]:
    """The `n` ops that took the most time in the trace under `out`, with their share of the
    traced op time: the device's own ops where a device process is traced (a GPU's
    streams), else every XLA thread's on the host."""
    trace = json.loads(gzip.decompress(next(out.rglob("*.trace.json.gz")).read_bytes()))
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if "/device:" in name}
    python = {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M"
              and e.get("name") == "thread_name" and e["args"]["name"] == "python3"}
    time = collections.Counter()
    for e in events:
        # On the host, XLA:CPU's executor spans enclose the ops: count the ops only.
        if e.get("ph") == "X" and not e["name"].startswith("ThunkExecutor") and (
                e["pid"] in device if device else (e["pid"], e["tid"]) not in python):
            time[e["name"]] += e["dur"]
    total = sum(time.values()) or 1
    return [(name, dur / total) for name, dur in time.most_common(n)]
