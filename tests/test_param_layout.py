"""The parameter layout without JAX: equal to flax's own abstract init, and JAX-free to import."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from deepfusion_core import PRESETS
from deepfusion_core.fusion import fused_config
from deepfusion_core.model import T5, param_axes, param_shapes
from deepfusion_core.param_layout import count_params, flatten, param_layout, unflatten

CONFIGS = {
    "tiny-S": PRESETS["tiny-S"],
    # Three groups (S, M, S): every norm scale still has one embed axis of the summed width.
    "fused-prop": fused_config([PRESETS["tiny-S"], PRESETS["tiny-M"], PRESETS["tiny-S"]], "prop"),
    "bfloat16": PRESETS["tiny-M"].model_copy(update={"dtype": "bfloat16"}),
    "table7-L": PRESETS["table7-L"],
    # 12 layers: "layers_10" sorts before "layers_2" wherever names are ordered as strings.
    "relpos-48": PRESETS["tiny-S"].model_copy(update={"relpos_buckets": 48, "num_layers": 12}),
}


def _flax_boxed(cfg):
    tokens = jnp.ones((1, 1), jnp.int32)
    return jax.eval_shape(lambda: T5(cfg).init(jax.random.PRNGKey(0), tokens, tokens)["params"])


@pytest.mark.parametrize("name", CONFIGS)
def test_the_layout_is_flaxs_own_parameter_tree(name):
    cfg = CONFIGS[name]
    boxed = _flax_boxed(cfg)
    flax_leaves = {path: (tuple(box.value.shape), str(box.value.dtype), tuple(box.names))
                   for path, box in traverse_util.flatten_dict(boxed).items()}
    layout = {path: (spec.shape, spec.dtype, spec.axes)
              for path, spec in param_layout(cfg).items()}
    assert layout == flax_leaves
    assert count_params(cfg) == sum(jnp.size(x) for x in jax.tree.leaves(nn.meta.unbox(boxed)))
    # What JAX users get from the layout has the structure and leaves of the flax tree.
    unboxed = nn.meta.unbox(boxed)
    assert jax.tree.structure(param_shapes(cfg)) == jax.tree.structure(unboxed)
    assert jax.tree.leaves(param_shapes(cfg)) == jax.tree.leaves(unboxed)
    assert param_axes(cfg) == unflatten({p: s.axes for p, s in param_layout(cfg).items()})


def test_flatten_and_unflatten_are_inverse_and_keep_leaves():
    tree = {"a": {"b": 1, "c": {"d": (2, 3)}}, "e": [4]}
    flat = flatten(tree)
    assert flat == {("a", "b"): 1, ("a", "c", "d"): (2, 3), ("e",): [4]}
    assert unflatten(flat) == tree


def test_planning_modules_import_neither_jax_nor_flax():
    script = ("import sys\n"
              "import deepfusion_core.fusion, deepfusion_core.memory, deepfusion_core.param_layout\n"
              "import deepfusion_core.mesh_spec, deepfusion_core.factoring\n"
              "from deepfusion_core import PRESETS, T5Config\n"
              "from deepfusion_core.fusion import fused_config\n"
              "from deepfusion_core.memory import train_memory\n"
              "from deepfusion_core.mesh_spec import check_mesh_fits, parse_mesh\n"
              "cfg = fused_config([PRESETS['tiny-S'], PRESETS['tiny-S']], 'prop')\n"
              "check_mesh_fits(parse_mesh('data=2,model=2'), cfg, 8)\n"
              "train_memory(cfg, 8, 16, 8, (2, 2))\n"
              "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules)\n"
              "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
