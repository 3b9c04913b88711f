"""Adafactor with T5's settings, as one optax transformation that XLA compiles well on CPU.

The maths is exactly `optax.adafactor(lr, decay_rate=0.8, multiply_by_parameter_scale=True,
clipping_threshold=1.0)` (tests compare the two): a factored second moment for matrices whose
second-largest dim is >= 128, update clipping at RMS 1, and a step scaled by the parameter's
RMS (at least 1e-3). Two things differ in how it is computed, and they cut the optimizer's time
on the CPU from 119 ms to about a third for the cpu-M model (BENCHMARKS.md):

- Means over a non-minor axis are matrix-vector products with a ones vector. XLA:CPU reduces a
  [256, 32128] matrix over axis 0 in 17 ms and over axis 1 in 0.5 ms; the matvec takes 1.5.
- The parameter's RMS is a plain `max(rms, 1e-3)`. optax's `safe_root_mean_squares` selects
  over the whole tensor to keep *its* gradient finite, which an optimizer never needs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfusion_core.factoring import factored_dims

DECAY_RATE = 0.8
CLIPPING_THRESHOLD = 1.0
MIN_PARAM_SCALE = 1e-3
EPSILON = 1e-30


class AdafactorState(NamedTuple):
    """Step count and second moments: row/col factors for matrices, full `v` otherwise."""

    count: jax.Array
    v_row: optax.Params
    v_col: optax.Params
    v: optax.Params


def _mean(x: jax.Array, axis: int) -> jax.Array:
    """`jnp.mean(x, axis)`, as a product with ones (full float32 precision on every backend)."""
    ones = jnp.ones((x.shape[axis],), x.dtype)
    total = jax.lax.dot_general(x, ones, (((axis,), (0,)), ((), ())),
                                precision=jax.lax.Precision.HIGHEST)
    return total / x.shape[axis]


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def adafactor(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """T5's Adafactor (see the module docstring); `learning_rate` may be a schedule."""
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        def moments(p):
            dims = factored_dims(p.shape)
            empty = jnp.zeros((1,), p.dtype)
            if dims is None:
                return empty, empty, jnp.zeros_like(p)
            d1, d0 = dims
            return (jnp.zeros(np.delete(p.shape, d0), p.dtype),
                    jnp.zeros(np.delete(p.shape, d1), p.dtype), empty)
        v_row, v_col, v = (jax.tree.map(lambda p, i=i: moments(p)[i], params) for i in range(3))
        return AdafactorState(jnp.zeros([], jnp.int32), v_row, v_col, v)

    def update(grads, state, params):
        if params is None:
            raise ValueError("adafactor needs params (their RMS scales the step)")
        step = state.count
        decay = 1.0 - (step + 1.0) ** -DECAY_RATE
        lr = schedule(step)

        def one(g, v_row, v_col, v, p):
            g_sq = jnp.square(g) + EPSILON
            dims = factored_dims(p.shape)
            if dims is None:
                v = decay * v + (1.0 - decay) * g_sq
                u = g * jax.lax.rsqrt(v)
            else:
                d1, d0 = dims
                v_row = decay * v_row + (1.0 - decay) * _mean(g_sq, d0)
                v_col = decay * v_col + (1.0 - decay) * _mean(g_sq, d1)
                row_axis = d1 - 1 if d1 > d0 else d1  # d1's position once d0 is reduced
                row_factor = jax.lax.rsqrt(v_row / jnp.mean(v_row, row_axis, keepdims=True))
                u = (g * jnp.expand_dims(row_factor, d0)
                     * jnp.expand_dims(jax.lax.rsqrt(v_col), d1))
            clip = jnp.maximum(1.0, _rms(u) / CLIPPING_THRESHOLD)
            scale = -lr * jnp.maximum(_rms(p), MIN_PARAM_SCALE) / clip
            return u * scale, v_row, v_col, v

        out = jax.tree.map(one, grads, state.v_row, state.v_col, state.v, params)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)  # noqa: E731
        return pick(0), AdafactorState(optax.safe_increment(step), pick(1), pick(2), pick(3))

    return optax.GradientTransformation(init, update)
