"""Per-token cross-entropy of T5's logits, whole or a chunk of target positions at a time.

The logits of a batch are [batch, targets, vocab] in float32: with T5's 32128-token vocab
they and their gradient are the largest activations of a small model's step. The chunked
form makes them for `chunk` target positions at a time inside a scan whose body is
rematerialised, so only one chunk's logits ever exist; the batch axis stays whole in each
chunk, so a data-parallel sharding of the batch is kept. Both forms give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def token_cross_entropy(logits, targets):
    """(nll, log Z, correct) per token for float32 logits [..., vocab] and targets [...]."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return nll, log_z, jnp.argmax(logits, -1) == targets


def chunked_token_cross_entropy(features, make_logits: Callable, targets, chunk: int):
    """`token_cross_entropy(make_logits(features), targets)` for features [batch, targets,
    d], computed `chunk` target positions at a time (recomputed in the backward pass)."""
    b, t, d = features.shape
    chunk = min(chunk, t)  # a chunk longer than the targets is all of them, unpadded
    pad = -t % chunk
    x = jnp.pad(features, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets, ((0, 0), (0, pad)))
    # [chunks, batch, chunk, ...]: the scan walks the positions, the batch stays whole.
    x = x.reshape(b, -1, chunk, d).swapaxes(0, 1)
    y = y.reshape(b, -1, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        xc, yc = args
        return token_cross_entropy(make_logits(xc), yc)

    stats = jax.lax.map(one_chunk, (x, y))
    return tuple(s.swapaxes(0, 1).reshape(b, t + pad)[:, :t] for s in stats)
