"""`deepfusion bench memory`: the planner's memory estimate against XLA's analysis."""

from __future__ import annotations

import jax

from deepfusion_bench.common import machine
from deepfusion_core.config import PRESETS, TrainConfig
from deepfusion_core.memory import compiled_memory, train_memory
from deepfusion_core.sharding import parse_mesh


def bench_memory(preset: str = "table7-L", batch: int = 16, inputs_length: int = 512,
                 targets_length: int = 114, dtype: str = "bfloat16", remat: bool = False,
                 mesh: str | None = None) -> dict:
    """The planner's per-device estimate against XLA's analysis of the compiled step."""
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
