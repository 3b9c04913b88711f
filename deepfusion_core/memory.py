"""Per-device memory of a training step, estimated from shapes before anything runs.

The planner uses it to refuse a profile whose nodes cannot fit their devices, and
`deepfusion plan` shows it for every train node. Nothing is allocated and JAX is not imported:
parameter shapes and axes come from `param_layout`, and the rest is arithmetic on them.

Per device, with a (data, model) mesh (params, gradients and optimizer state are split over
`model` along the heads/mlp/vocab axes and replicated over `data`; activations are split over
both):

    params       4 bytes per float32 parameter (+ a compute-dtype copy for bfloat16)
    gradients    4 bytes per parameter
    optimizer    Adafactor: row + column statistics of factored matrices, a full second moment
                 of the others; AdamW: two moments (8 bytes per parameter)
    activations  what the backward pass keeps of every layer, for B / data examples: norm
                 inputs and outputs, q/k/v/context, attention logits (float32) and weights,
                 the MLP's gate, linear, activation and product; with `remat`, only each
                 layer's input plus one layer at a time. And the float32 logits of the head
                 with their gradient.

It is an estimate of what XLA needs, not a bound: tests compare it with XLA's own memory
analysis of the compiled paper-size step.
"""

from __future__ import annotations

import numpy as np

from deepfusion_core.config import T5Config
from deepfusion_core.factoring import factored_dims
from deepfusion_core.param_layout import param_layout

_MODEL_AXES = {"heads", "mlp", "vocab"}  # the logical axes `sharding.LOGICAL_RULES` map to model


def train_memory(cfg: T5Config, batch: int, inputs_length: int, targets_length: int,
                 mesh: tuple[int, int], optimizer: str = "adafactor",
                 remat: bool = False, loss_chunk: int = 0) -> dict[str, int]:
    """Estimated bytes per device of one training step, by part, and their `total`
    (`loss_chunk`: the logits made that many target positions at a time)."""
    data, model = mesh
    layout = param_layout(cfg).values()
    flat_shapes = [spec.shape for spec in layout]
    split = [model if _MODEL_AXES & set(spec.axes) else 1 for spec in layout]
    params = sum(int(np.prod(s)) // k for s, k in zip(flat_shapes, split))
    compute_bytes = 2 if cfg.dtype == "bfloat16" else 4
    parts = {"params": params * (4 + (compute_bytes if compute_bytes == 2 else 0)),
             "gradients": params * 4}
    if optimizer == "adamw":
        parts["optimizer"] = params * 8
    else:
        parts["optimizer"] = sum(_adafactor_floats(s) // k for s, k in zip(flat_shapes, split)) * 4
    parts["activations"] = _activation_bytes(cfg, batch // data, inputs_length, targets_length,
                                             model, compute_bytes, remat, loss_chunk)
    parts["total"] = sum(parts.values())
    return parts


def _adafactor_floats(shape) -> int:
    dims = factored_dims(shape)
    if dims is None:
        return int(np.prod(shape))
    return int(np.prod(shape)) // shape[dims[1]] + int(np.prod(shape)) // shape[dims[0]]


def _activation_bytes(cfg: T5Config, b: int, i: int, o: int, model: int, c: int,
                      remat: bool, loss_chunk: int = 0) -> int:
    d, f, v = cfg.d_model, cfg.d_ff // model, cfg.vocab_size // model
    h = cfg.num_heads // model
    a = h * cfg.head_dim

    def attention(q_tokens, kv_tokens):  # per example
        return (c * (q_tokens * 2 * a + kv_tokens * 2 * a)  # q, context; k, v
                + (4 + c) * h * q_tokens * kv_tokens)      # float32 logits, weights

    mlp = lambda tokens: c * tokens * 4 * f  # noqa: E731 - gate, linear, gelu, product
    norms = lambda tokens, n: 4 * tokens * d * 2 * n  # noqa: E731 - float32 in and out
    enc_layer = norms(i, 2) + attention(i, i) + mlp(i)
    dec_layer = norms(o, 3) + attention(o, o) + attention(o, i) + mlp(o)
    head = 2 * 4 * min(o, loss_chunk or o) * v  # float32 logits and their gradient
    n = cfg.num_layers
    if remat:  # every layer's input (compute dtype), plus one layer's recomputed activations
        layers = c * d * n * (i + o) + max(enc_layer, dec_layer)
    else:
        layers = n * (enc_layer + dec_layer)
    return b * (layers + head)


def compiled_memory(cfg: T5Config, tc, batch: int, inputs_length: int,
                    targets_length: int) -> dict[str, int]:
    """Lower and compile the real train step for `tc.mesh` on this process's devices, from
    abstract shapes only (no parameter is allocated), and return XLA's per-device figures.

    With `--xla_force_host_platform_device_count=16` a laptop compiles the paper's 16-device
    step. XLA:CPU's figures overstate what a TPU/GPU needs: it computes bfloat16 in float32
    and its scheduler does not trade recomputation for memory.
    """
    import jax  # here, not at the top: planning imports this module and must not load JAX

    from deepfusion_core import sharding
    from deepfusion_core.steps import BATCH_KEYS, compiled_steps

    mesh_shape = sharding.parse_mesh(tc.mesh)
    sharding.check_mesh(mesh_shape, cfg, batch)
    mesh = sharding.make_mesh(mesh_shape)
    steps = compiled_steps(cfg, tc.optimizer_config, tc.kernels, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    lengths = {"encoder": inputs_length, "decoder": targets_length}
    abstract_batch = {
        key: jax.ShapeDtypeStruct((batch, lengths[key.split("_")[0]]),
                                  np.float32 if key == "decoder_loss_weights" else np.int32,
                                  sharding=batch_sh)
        for key in BATCH_KEYS}
    stats = steps.train_step.lower(steps.abstract_state, abstract_batch).compile().memory_analysis()
    return {"arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "outputs_not_aliased": stats.output_size_in_bytes - stats.alias_size_in_bytes}
