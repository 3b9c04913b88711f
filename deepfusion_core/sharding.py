"""Device mesh and logical-axis sharding rules (MaxText/t5x style).

The mesh has two axes, `data` and `model`. Parameters carry logical axis names (see
`model.param_axes`); these rules map them onto the mesh: the batch is split over `data`,
heads, MLP features and the vocabulary over `model`, everything else is replicated. Mesh
specs and the checks that need no devices live in `mesh_spec` (no JAX there).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepfusion_core import mesh_spec
from deepfusion_core.config import T5Config
from deepfusion_core.mesh_spec import MeshError, check_mesh_fits
from deepfusion_core.model import param_axes

LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("kv", None),
    ("relpos_buckets", None),
)


def parse_mesh(spec: str | None) -> tuple[int, int]:
    """`"data=4,model=2"` -> (4, 2) (see `mesh_spec.parse_mesh`); None -> all devices on
    `data`."""
    return (jax.device_count(), 1) if spec is None else mesh_spec.parse_mesh(spec)


def check_mesh(shape: tuple[int, int], cfg: T5Config, batch_size: int,
               devices: int | None = None) -> None:
    """Raise `MeshError` naming the first dimension the mesh does not divide."""
    data, model = shape
    devices = jax.device_count() if devices is None else devices
    if data * model != devices:
        raise MeshError(f"mesh data={data},model={model} needs {data * model} devices, "
                        f"but {devices} are available")
    check_mesh_fits(shape, cfg, batch_size)


def make_mesh(shape: tuple[int, int]) -> Mesh:
    """A (data, model) mesh over all devices, in the order jax lists them."""
    return Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))


def param_shardings(cfg: T5Config, mesh: Mesh):
    """NamedShardings for every parameter, from its logical axes and `LOGICAL_RULES`."""
    specs = jax.tree.map(lambda axes: nn.logical_to_mesh_axes(axes, LOGICAL_RULES),
                         param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are [batch, length] arrays split over `data`."""
    return NamedSharding(mesh, PartitionSpec("data", None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_global(tree, shardings):
    """Host arrays (the same in every process) onto their shardings' devices.

    With several processes each one copies only the slices its own devices hold (for a batch:
    its share of the rows), which is what feeding a multi-host mesh means.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
