"""The attention kernels (deepfusion_core/attention.py): every fast path equals the einsum
reference, values and gradients, with T5's bias, padding and fully masked rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepfusion_core.attention import attend, check_implementation

NEG_INF = -1e10  # the model's additive mask value


def _inputs(dtype, b=2, q=7, s=9, heads=3, k=16):
    rng = np.random.default_rng(0)
    q_, k_, v_ = (jnp.asarray(rng.normal(size=(b, n, heads, k)), dtype) for n in (q, s, s))
    bias = rng.normal(size=(b, heads, q, s)).astype(np.float32)
    bias[0, :, :, -3:] = NEG_INF  # padded keys
    bias[1, :, 2, :] = NEG_INF  # a query with no key at all: a uniform row in every kernel
    return q_, k_, v_, jnp.asarray(bias)


def _value_and_grads(implementation, q, k, v, bias):
    def loss(q, k, v, bias):
        return jnp.sum(jnp.square(attend(q, k, v, bias, implementation).astype(jnp.float32)))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)


def test_xla_kernel_equals_the_reference_in_float32_values_and_gradients():
    inputs = _inputs(jnp.float32)
    out_ref, out = attend(*inputs), attend(*inputs, implementation="xla")
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    (loss_ref, grads_ref), (loss, grads) = (_value_and_grads(i, *inputs)
                                            for i in ("reference", "xla"))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_xla_kernel_equals_the_reference_in_bfloat16_within_its_rounding():
    inputs = _inputs(jnp.bfloat16)
    out_ref, out = attend(*inputs), attend(*inputs, implementation="xla")
    assert out.dtype == out_ref.dtype == jnp.bfloat16
    # The reference rounds the logits to bfloat16 before adding the bias, the fused form
    # keeps them in float32: outputs of size ~1 differ by a few bfloat16 ulps (2^-7 each).
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_ref, np.float32),
                               atol=4 * 2**-7)


def test_an_unknown_kernel_is_refused_by_name():
    with pytest.raises(ValueError, match="'flash'"):
        attend(*_inputs(jnp.float32), implementation="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the refusal is for machines "
                    "without a GPU; a GPU runs the kernel (scripts/gpu_check.sh)")
def test_cudnn_without_a_gpu_is_one_line_before_anything_compiles():
    with pytest.raises(ValueError, match="attention: cudnn needs a GPU and a bfloat16 model; "
                                         "this process has cpu devices"):
        check_implementation("cudnn", "bfloat16")
