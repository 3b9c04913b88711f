"""A `jax.profiler` trace of a few train steps, to see where a step's time goes.

    python -m deepfusion_bench.trace --preset table7-L --batch 16 --seq-len 512,114 \\
        --dtype bfloat16 --out trace/

Open the directory with TensorBoard's profile plugin or Perfetto (the `.trace.json.gz`).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

import jax

from deepfusion_bench.step import synthetic_batch
from deepfusion_core import sharding
from deepfusion_core.config import PRESETS, ExecutionConfig, OptimizerConfig
from deepfusion_core.steps import compiled_steps


def trace_steps(preset: str, batch: int, inputs_length: int, targets_length: int, dtype: str,
                kernels, out: Path, steps: int = 3) -> Path:
    """Compile and warm the step, then trace `steps` of it into `out`."""
    cfg = PRESETS[preset].model_copy(update={"dtype": dtype})
    mesh = sharding.make_mesh((jax.device_count(), 1))
    fns = compiled_steps(cfg, OptimizerConfig(steps=steps), kernels, mesh)
    state = fns.init_state(fns.init_random(0))
    device_batch = jax.device_put(synthetic_batch(cfg, batch, inputs_length, targets_length),
                                  sharding.batch_sharding(mesh))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-M", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", default="128,32")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention", default="reference")
    parser.add_argument("--loss-chunk", type=int, default=0)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    inputs_length, targets_length = (int(n) for n in args.seq_len.split(","))
    kernels = ExecutionConfig(remat=args.remat, attention=args.attention,
                              loss_chunk=args.loss_chunk).kernels
    out = trace_steps(args.preset, args.batch, inputs_length, targets_length, args.dtype,
                      kernels, args.out)
    print(f"trace: {out}")
    for name, share in top_ops(out):
        print(f"{share:6.1%}  {name}")


if __name__ == "__main__":
    main()
