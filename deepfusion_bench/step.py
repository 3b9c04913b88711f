"""`deepfusion bench step`: train-step throughput against the GEMM peak and PyTorch T5."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from deepfusion_bench.common import machine, time_steps
from deepfusion_core import sharding
from deepfusion_core.config import PRESETS, Kernels, OptimizerConfig, T5Config
from deepfusion_core.flops import train_step_flops
from deepfusion_core.memory import train_memory
from deepfusion_core.model import count_params
from deepfusion_core.steps import compiled_steps

# Dense bf16 peak of accelerators by JAX's device_kind, from their vendors' data sheets:
# MFU is quoted against it (the measured GEMM peak is in the record too).
# Per JAX device: a TPU v3 chip's two cores are two devices (123 TFLOP/s per chip).
NOMINAL_BF16_PEAK = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H200": 989.4e12,
                     "TPU v3": 61.5e12, "TPU v4": 275e12}


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


def synthetic_batch(cfg: T5Config, batch: int, inputs_length: int, targets_length: int):
    # Throughput does not depend on token values; a full (unpadded) batch, as packing gives.
    rng = np.random.default_rng(0)
    targets = rng.integers(2, cfg.vocab_size, (batch, targets_length)).astype(np.int32)
    return {"encoder_input_tokens": rng.integers(2, cfg.vocab_size, (batch, inputs_length)).astype(np.int32),
            "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], 1),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones((batch, targets_length), np.float32)}


def prepared_step(cfg: T5Config, tc: OptimizerConfig, kernels: Kernels, batch_np: dict):
    """(the compiled steps, a random initial state, `batch_np` on the devices) for timing,
    tracing or comparing the step of `cfg` on all devices as data parallelism."""
    mesh = sharding.make_mesh((jax.device_count(), 1))
    fns = compiled_steps(cfg, tc, kernels, mesh)
    return (fns, fns.init_state(fns.init_random(0)),
            jax.device_put(batch_np, sharding.batch_sharding(mesh)))


def bench_step(preset: str = "cpu-M", batch: int = 8, inputs_length: int = 128,
               targets_length: int = 32, steps: int = 10, dtype: str = "float32",
               torch_baseline: bool = True, kernels: Kernels = Kernels()) -> dict:
    """Train-step throughput (Adafactor) against the GEMM peak and against PyTorch T5, with
    the step's compile time, its peak device memory and the planner's estimate of it."""
    cfg = PRESETS[preset].model_copy(update={"dtype": dtype})
    batch_np = synthetic_batch(cfg, batch, inputs_length, targets_length)
    steps_fns, state, device_batch = prepared_step(cfg, OptimizerConfig(steps=steps), kernels,
                                                   batch_np)
    start = time.perf_counter()
    train_step = steps_fns.train_step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start

    def run():
        nonlocal state
        state, out = train_step(state, device_batch)
        out["loss"].block_until_ready()

    step_s = time_steps(run, steps)
    flops = train_step_flops(cfg, batch, inputs_length, targets_length)
    tokens = batch * (inputs_length + targets_length)
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = gemm_peak_flops(n=2048 if on_cpu else 8192,
                           dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    kind = jax.devices()[0].device_kind
    record = {"bench": "step", "model": preset, "dtype": dtype, "device": kind,
              "devices": jax.device_count(), "batch": batch, **kernels._asdict(),
              "seq_len": [inputs_length, targets_length], "params": count_params(cfg),
              "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s),
              "flops_per_s": flops / step_s, "gemm_peak_flops_per_s": peak,
              "fraction_of_gemm_peak": round(flops / step_s / peak, 3),
              "compile_s": round(compile_s, 2), "machine": machine()}
    estimate = train_memory(cfg, batch, inputs_length, targets_length, (jax.device_count(), 1),
                            remat=kernels.remat, loss_chunk=kernels.loss_chunk)
    record["estimate_gib"] = round(estimate["total"] / 2**30, 2)
    stats = jax.devices()[0].memory_stats()  # None on the CPU
    if stats and "peak_bytes_in_use" in stats:
        record["peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
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
    # torch is an optional extra (`hf`): imported only when the baseline is asked for.
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

    return time_steps(run, steps)
