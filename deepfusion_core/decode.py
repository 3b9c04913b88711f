"""Greedy decoding of a T5: how a fine-tuned model answers, for evaluation by generation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from deepfusion_core.config import T5Config
from deepfusion_core.model import T5, Params

EOS_ID = 1  # seqio's vocabularies (SentencePiece and bytes) both end a sequence with 1


@functools.lru_cache(maxsize=16)
def _decoder(cfg: T5Config, max_length: int):
    model = T5(cfg)

    def decode(params, enc_tokens):
        batch = enc_tokens.shape[0]

        def step(t, carry):
            dec_in, out, done = carry
            # The whole decoder over the tokens so far, no key/value cache: answers are a few
            # tokens, and this is the training forward pass itself.
            logits = model.apply({"params": params}, enc_tokens, dec_in[:, :max_length])
            token = jnp.where(done, 0, jnp.argmax(logits[:, t], -1).astype(jnp.int32))
            return (dec_in.at[:, t + 1].set(token), out.at[:, t].set(token),
                    done | (token == EOS_ID))

        start = (jnp.zeros((batch, max_length + 1), jnp.int32),  # 0: T5's start token
                 jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((batch,), bool))
        return jax.lax.fori_loop(0, max_length, step, start)[1]

    return jax.jit(decode)


def greedy_decode(cfg: T5Config, params: Params, enc_tokens: np.ndarray,
                  max_length: int) -> np.ndarray:
    """Each input row's greedy answer: token ids [batch, max_length], its EOS included and
    0 after it."""
    return np.asarray(_decoder(cfg, max_length)(params, jnp.asarray(enc_tokens, jnp.int32)))


def answer_ids(row: np.ndarray) -> list[int]:
    """A decoded row's tokens before its EOS."""
    ids = row.tolist()
    return ids[:ids.index(EOS_ID)] if EOS_ID in ids else [i for i in ids if i != 0]
