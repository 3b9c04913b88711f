"""Our Adafactor is optax's T5 Adafactor, computed differently (see the module docstring)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepfusion_core import PRESETS, init_params
from deepfusion_core.adafactor import adafactor
from deepfusion_core.factoring import factored_dims


def _optax_t5_adafactor(schedule):
    return optax.adafactor(schedule, decay_rate=0.8, multiply_by_parameter_scale=True,
                           clipping_threshold=1.0)


def test_matches_optax_adafactor_over_several_steps():
    # tiny-L has factored ([128, 256] MLP, [32128, 128] embedding) and unfactored leaves.
    params = init_params(PRESETS["tiny-L"], 0)
    assert any(factored_dims(p.shape) for p in jax.tree.leaves(params))
    assert any(factored_dims(p.shape) is None for p in jax.tree.leaves(params))
    schedule = lambda step: 1e-2 * jnp.minimum(1.0, (step + 1) / 3)  # noqa: E731
    ours, ref = adafactor(schedule), _optax_t5_adafactor(schedule)
    p_ours, p_ref = params, params
    s_ours, s_ref = ours.init(params), ref.init(params)
    for step in range(6):
        key = jax.random.PRNGKey(step)
        # Gradient scales that differ per leaf and per row, so the factors matter.
        grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape) * (1 + jnp.abs(p)),
                             params)
        u, s_ours = ours.update(grads, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_ref = ref.update(grads, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(p_ref), jax.tree.leaves(params)))
    assert moved > 1e-3  # the comparison below is about real updates
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
        # float32 sums in a different order (matvec vs reduce) and rsqrt vs pow(-0.5).
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(s_ours.count) == 6
