"""Multi-head attention's core, softmax(q k^T + bias) v, by interchangeable kernels.

`reference` is two einsums with the logits and weights in memory (t5x's). `xla` and
`cudnn` call `jax.nn.dot_product_attention`: on a GPU the cuDNN kernel fuses the whole
product with T5's additive bias (relative positions and masks) and never writes the
[batch, heads, q, k] weights to memory. Each equals `reference` within rounding: the suite
holds `xla` to it on the CPU (float32 within 1e-5); `cudnn` needs a GPU and bfloat16, and
the device check holds it to `reference` there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("reference", "xla", "cudnn")


def check_implementation(implementation: str, dtype: str) -> None:
    """ValueError, one line, unless this process can run `implementation` for a model
    computing in `dtype` (before anything compiles: cuDNN's own error is a traceback)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention {implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation == "cudnn" and (jax.default_backend() != "gpu" or dtype != "bfloat16"):
        raise ValueError(f"attention: cudnn needs a GPU and a bfloat16 model; this process "
                         f"has {jax.default_backend()} devices and a {dtype} model")


def attend(q, k, v, bias, implementation: str = "reference"):
    """q [b, q, H, k] and k, v [b, s, H, k] in the compute dtype, bias [b or 1, H, q, s] in
    float32 -> [b, q, H, k]. No 1/sqrt(head_dim): T5 folds it into the query's init."""
    if implementation == "reference":
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
        return jnp.einsum("bhqs,bshk->bqhk", weights, v)
    check_implementation(implementation, str(q.dtype))
    # cuDNN takes a bias in the compute dtype only (a float32 one gives NaN gradients there).
    bias = bias.astype(q.dtype) if implementation == "cudnn" else bias
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0,
                                        implementation=implementation)
