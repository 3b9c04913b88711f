"""The per-token cross-entropy (deepfusion_core/loss.py): the chunked form equals the whole
one, values and gradients, for chunks that do and do not divide the targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepfusion_core.loss import chunked_token_cross_entropy, token_cross_entropy


def _inputs(b=3, t=10, d=8, vocab=50):
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32),
            jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32))


@pytest.mark.parametrize("chunk", [1, 3, 5, 10, 16, 10**9])
def test_chunks_give_the_whole_batch_figures_and_gradients(chunk):
    features, kernel, targets = _inputs()

    def stats(features, kernel, chunked):
        logits = lambda x: x @ kernel  # noqa: E731
        if chunked:
            return chunked_token_cross_entropy(features, logits, targets, chunk)
        return token_cross_entropy(logits(features), targets)

    for whole, part in zip(stats(features, kernel, False), stats(features, kernel, True),
                           strict=True):
        assert part.shape == whole.shape == targets.shape
        np.testing.assert_allclose(part, whole, rtol=1e-6, atol=1e-6)

    def loss(features, kernel, chunked):
        nll, log_z, _ = stats(features, kernel, chunked)
        return jnp.sum(nll) + 1e-2 * jnp.sum(jnp.square(log_z))

    grads = [jax.grad(loss, argnums=(0, 1))(features, kernel, c) for c in (False, True)]
    for g_whole, g_part in zip(*grads, strict=True):
        np.testing.assert_allclose(g_part, g_whole, rtol=1e-5, atol=1e-6)
