"""Meshes and shardings (deepfusion_core/sharding.py) on 8 virtual CPU devices: heads, MLP
features and the vocabulary split over `model`, batches over `data`, the rest replicated."""

import json
import os
import subprocess
import sys

import pytest

from deepfusion_core.config import PRESETS
from deepfusion_core.param_layout import param_layout
from deepfusion_core.sharding import MeshError, check_mesh

PROBE = """
import json
import jax, numpy as np
from deepfusion_core import sharding
from deepfusion_core.config import PRESETS
from deepfusion_core.model import param_shapes

cfg = PRESETS["tiny-S"].model_copy(update={"vocab_size": 384})
mesh = sharding.make_mesh(sharding.parse_mesh("data=4,model=2"))
specs = sharding.param_shardings(cfg, mesh)
flat = {"/".join(p.key for p in path): tuple(s.spec)
        for path, s in jax.tree_util.tree_flatten_with_path(specs)[0]}
abstract = sharding.abstract_like(param_shapes(cfg), specs)
same = all(a.shape == s.shape and a.sharding == sh for a, s, sh in zip(
    jax.tree.leaves(abstract), jax.tree.leaves(param_shapes(cfg)), jax.tree.leaves(specs)))
batch = np.arange(8 * 4, dtype=np.int32).reshape(8, 4)
placed = sharding.put_global(batch, sharding.batch_sharding(mesh))
rows = sorted({(s.index[0].start, s.index[0].stop) for s in placed.addressable_shards})
print(json.dumps({"devices": jax.device_count(), "all_data": sharding.parse_mesh(None),
                  "specs": flat, "abstract_matches": same, "rows": rows,
                  "equal": bool((np.asarray(placed) == batch).all())}))
"""


@pytest.fixture(scope="module")
def probed():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_without_a_spec_every_device_is_on_data(probed):
    assert probed["devices"] == 8 and probed["all_data"] == [8, 1]


def test_parameters_split_over_model_along_heads_mlp_and_vocab_only(probed):
    layout = param_layout(PRESETS["tiny-S"].model_copy(update={"vocab_size": 384}))
    assert set(probed["specs"]) == {"/".join(path) for path in layout}
    for path, leaf in layout.items():
        want = [("model" if axis in ("heads", "mlp", "vocab") else None) for axis in leaf.axes]
        assert probed["specs"]["/".join(path)] == want, path  # never split over data
    assert probed["specs"]["token_embedder/embedding"] == ["model", None]


def test_abstract_params_carry_their_shapes_and_shardings(probed):
    assert probed["abstract_matches"]


def test_a_batch_is_split_by_rows_over_data(probed):
    assert probed["rows"] == [[0, 2], [2, 4], [4, 6], [6, 8]] and probed["equal"]


@pytest.mark.parametrize("shape,devices,message", [
    ((4, 2), 4, "needs 8 devices, but 4 are available"),
    ((8, 1), 8, "batch size 4 is not divisible by mesh data=8"),
    ((1, 3), 3, "num_heads=2 is not divisible by mesh model=3"),
])
def test_a_mesh_that_does_not_fit_is_one_line_naming_why(shape, devices, message):
    with pytest.raises(MeshError, match=message):
        check_mesh(shape, PRESETS["tiny-S"], 4, devices=devices)
