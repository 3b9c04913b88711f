"""Mesh specs ("data=D,model=M") and the checks on them that need no devices.

Apart from `sharding.py` (which builds meshes and shardings with JAX) so that validating a
stages file and planning import no JAX: a mesh is checked against the batch and the model's
dimensions here, against the devices in `sharding.check_mesh`.
"""

from __future__ import annotations

import re

from deepfusion_core.config import T5Config


class MeshError(ValueError):
    """A mesh that does not fit the devices, the batch or the model."""


def parse_mesh(spec: str) -> tuple[int, int]:
    """`"data=4,model=2"` -> (4, 2); `MeshError` for anything else."""
    m = re.fullmatch(r"\s*data\s*=\s*(\d+)\s*,\s*model\s*=\s*(\d+)\s*", spec)
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise MeshError(f"--mesh must look like data=D,model=M with positive D and M, got {spec!r}")
    return int(m[1]), int(m[2])


def check_mesh_fits(shape: tuple[int, int], cfg: T5Config, batch_size: int) -> None:
    """Raise `MeshError` naming the first of the batch and the model's split dimensions
    (heads, d_ff, vocab) that the mesh does not divide."""
    data, model = shape
    if batch_size % data:
        raise MeshError(f"batch size {batch_size} is not divisible by mesh data={data}")
    for name, size in [("num_heads", cfg.num_heads), ("d_ff", cfg.d_ff),
                       ("vocab_size", cfg.vocab_size)]:
        if size % model:
            raise MeshError(f"model {name}={size} is not divisible by mesh model={model}")
