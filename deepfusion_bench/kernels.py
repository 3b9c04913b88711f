"""`deepfusion bench kernels`: a kernel choice against the reference on this machine's device.

The suite holds every kernel the CPU has to the reference; cuDNN's attention exists only on
a GPU, so this is where it is checked: two train steps of one model from the same params and
batch, each way, and the largest relative differences of loss, gradient norm and params.
"""

from __future__ import annotations

import jax
import numpy as np

from deepfusion_bench.common import machine
from deepfusion_bench.step import prepared_step, synthetic_batch
from deepfusion_core.config import PRESETS, Kernels, OptimizerConfig, T5Config


def _two_steps(cfg: T5Config, kernels: Kernels, batch_np: dict):
    steps, state, batch = prepared_step(cfg, OptimizerConfig(steps=2, warmup_steps=1), kernels,
                                        batch_np)
    outs = []
    for _ in range(2):
        state, out = steps.train_step(state, batch)
        outs.append(jax.device_get(out))
    return jax.device_get(state["params"]), outs


def compare_kernels(preset: str, dtype: str, batch: int, inputs_length: int,
                    targets_length: int, kernels: Kernels) -> dict:
    """Largest relative differences between `kernels` and the reference over two steps."""
    cfg = PRESETS[preset].model_copy(update={"dtype": dtype})
    batch_np = synthetic_batch(cfg, batch, inputs_length, targets_length)
    ref_params, ref_outs = _two_steps(cfg, Kernels(remat=kernels.remat), batch_np)
    params, outs = _two_steps(cfg, kernels, batch_np)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

    finite = all(np.isfinite(out[k]) for out in outs for k in ("loss", "grad_norm"))
    return {"bench": "kernels", "model": preset, "dtype": dtype, **kernels._asdict(),
            "batch": batch, "seq_len": [inputs_length, targets_length],
            "device": jax.devices()[0].device_kind, "finite": finite,
            "loss": [float(o["loss"]) for o in outs],
            "reference_loss": [float(o["loss"]) for o in ref_outs],
            "loss_rel_diff": max(rel(o["loss"], r["loss"]) for o, r in zip(outs, ref_outs)),
            "grad_norm_rel_diff": max(rel(o["grad_norm"], r["grad_norm"])
                                      for o, r in zip(outs, ref_outs)),
            "params_rel_diff": max(rel(a, b) for a, b in zip(jax.tree.leaves(params),
                                                             jax.tree.leaves(ref_params))),
            "machine": machine()}
