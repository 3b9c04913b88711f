"""Benchmarks of the core operations, each returning one flat JSON-able record.

They measure; they assert nothing. The CLI (`deepfusion bench ...`) prints one line of
figures and the record, and BENCHMARKS.md quotes them with the machine they ran on.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from deepfusion_core.config import PRESETS, T5Config
from deepfusion_core.flops import train_step_flops
from deepfusion_core.fusion import fuse
from deepfusion_core.model import count_params, param_shapes


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



def gemm_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul through XLA on the default device."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _synthetic_batch(cfg: T5Config, batch: int, inputs_length: int, targets_length: int):
    # Throughput does not depend on token values; a full (unpadded) batch, as packing gives.
    rng = np.random.default_rng(0)
    targets = rng.integers(2, cfg.vocab_size, (batch, targets_length)).astype(np.int32)
    return {"encoder_input_tokens": rng.integers(2, cfg.vocab_size, (batch, inputs_length)).astype(np.int32),
            "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], 1),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones((batch, targets_length), np.float32)}


def _time_steps(run_step, steps: int, warmup: int = 2) -> float:
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


# Dense bf16 peak of accelerators by JAX's device_kind, from their vendors' data sheets:
# MFU is quoted against it (the measured GEMM peak is in the record too).
# Per JAX device: a TPU v3 chip's two cores are two devices (123 TFLOP/s per chip).
NOMINAL_BF16_PEAK = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H200": 989.4e12,
                     "TPU v3": 61.5e12, "TPU v4": 275e12}


def bench_step(preset: str = "cpu-M", batch: int = 8, inputs_length: int = 128,
               targets_length: int = 32, steps: int = 10, dtype: str = "float32",
               torch_baseline: bool = True, remat: bool = False) -> dict:
    """Train-step throughput (Adafactor) against the GEMM peak and against PyTorch T5."""
    from deepfusion_core import sharding
    from deepfusion_core.config import OptimizerConfig
    from deepfusion_core.steps import compiled_steps

    cfg = PRESETS[preset].model_copy(update={"dtype": dtype})
    mesh = sharding.make_mesh((jax.device_count(), 1))
    steps_fns = compiled_steps(cfg, OptimizerConfig(steps=steps), remat, mesh)
    train_step = steps_fns.train_step
    state = steps_fns.init_state(steps_fns.init_random(0))
    batch_np = _synthetic_batch(cfg, batch, inputs_length, targets_length)
    device_batch = jax.device_put(batch_np, sharding.batch_sharding(mesh))

    def run():
        nonlocal state
        state, out = train_step(state, device_batch)
        out["loss"].block_until_ready()

    step_s = _time_steps(run, steps)
    flops = train_step_flops(cfg, batch, inputs_length, targets_length)
    tokens = batch * (inputs_length + targets_length)
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = gemm_peak_flops(n=2048 if on_cpu else 8192,
                           dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    kind = jax.devices()[0].device_kind
    record = {"bench": "step", "model": preset, "dtype": dtype, "device": kind,
              "devices": jax.device_count(), "batch": batch, "remat": remat,
              "seq_len": [inputs_length, targets_length], "params": count_params(cfg),
              "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s),
              "flops_per_s": flops / step_s, "gemm_peak_flops_per_s": peak,
              "fraction_of_gemm_peak": round(flops / step_s / peak, 3), "machine": machine()}
    if dtype == "bfloat16" and kind in NOMINAL_BF16_PEAK:
        nominal = NOMINAL_BF16_PEAK[kind] * jax.device_count()
        record.update(nominal_peak_flops_per_s=nominal, mfu=round(flops / step_s / nominal, 3))
    if torch_baseline:
        torch_s = _torch_step_seconds(cfg, batch_np, steps)
        record.update(torch_step_s=round(torch_s, 4), torch_tokens_per_s=round(tokens / torch_s),
                      speedup_vs_torch=round(torch_s / step_s, 2))
    return record


def _torch_step_seconds(cfg: T5Config, batch_np: dict, steps: int) -> float:
    """The same model, batch and optimizer (Adafactor) in transformers' PyTorch T5."""
    import torch
    import transformers

    from deepfusion_core.hf import config_to_hf

    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config_to_hf(cfg)).train()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    inputs = {"input_ids": torch.from_numpy(batch_np["encoder_input_tokens"]).long(),
              "decoder_input_ids": torch.from_numpy(batch_np["decoder_input_tokens"]).long(),
              "labels": torch.from_numpy(batch_np["decoder_target_tokens"]).long()}

    def run():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    return _time_steps(run, steps)


def bench_memory(preset: str = "table7-L", batch: int = 16, inputs_length: int = 512,
                 targets_length: int = 114, dtype: str = "bfloat16", remat: bool = False,
                 mesh: str | None = None) -> dict:
    """The planner's per-device estimate against XLA's analysis of the compiled step."""
    from deepfusion_core.memory import compiled_memory, train_memory
    from deepfusion_core.sharding import parse_mesh
    from deepfusion_core.config import TrainConfig

    cfg = PRESETS[preset].model_copy(update={"dtype": dtype})
    xla = compiled_memory(cfg, TrainConfig(steps=1, remat=remat, mesh=mesh), batch,
                          inputs_length, targets_length)
    estimate = train_memory(cfg, batch, inputs_length, targets_length, parse_mesh(mesh),
                            remat=remat)
    xla_total = xla["arguments"] + xla["temporaries"] + xla["outputs_not_aliased"]
    return {"bench": "memory", "model": preset, "dtype": dtype, "batch": batch,
            "mesh": "data={},model={}".format(*parse_mesh(mesh)),
            "remat": remat, "device": jax.devices()[0].device_kind,
            "xla_gib": round(xla_total / 2**30, 2),
            "estimate_gib": round(estimate["total"] / 2**30, 2),
            "estimate_over_xla": round(estimate["total"] / xla_total, 2), "machine": machine()}


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
    import shutil
    import tempfile

    import orbax.checkpoint as ocp

    from deepfusion_core.checkpoint import load_model, save_model
    from deepfusion_core.checksums import tree_checksums

    cfg = PRESETS[preset]
    params = _random_params(param_shapes(cfg), 0)
    leaves = jax.tree.leaves(params)
    nbytes = _tree_bytes(params)
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
