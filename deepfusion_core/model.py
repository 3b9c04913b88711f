"""T5.1.1 encoder-decoder in Flax Linen (as t5x `examples/t5/network.py`).

RMSNorm (eps 1e-6, no bias, computed in float32, optionally grouped), gated-GELU MLP, no biases,
attention logits without 1/sqrt(head_dim) (folded into the query init), one relative position
bias table per stack (bidirectional in the encoder, causal in the decoder), untied logits head.

Parameter tree (d = d_model, H = num_heads, k = head_dim, f = d_ff, V = vocab_size, B =
relpos_buckets; logical axis names in brackets, which both sharding and fusion read; planning
reads the same tree from `param_layout`, without JAX, and a test keeps the two equal)::

    token_embedder/embedding                           [V, d]      (vocab, embed)
    encoder/relpos_bias/rel_embedding                  [H, B]      (heads, relpos_buckets)
    encoder/layers_{i}/pre_attention_layer_norm/scale  [d]         (embed,)
    encoder/layers_{i}/attention/{query,key,value}/kernel  [d, H, k]  (embed, heads, kv)
    encoder/layers_{i}/attention/out/kernel            [H, k, d]   (heads, kv, embed)
    encoder/layers_{i}/pre_mlp_layer_norm/scale        [d]         (embed,)
    encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel          [d, f]      (embed, mlp)
    encoder/layers_{i}/mlp/wo/kernel                   [f, d]      (mlp, embed)
    encoder/encoder_norm/scale                         [d]         (embed,)
    decoder/relpos_bias/rel_embedding                  [H, B]
    decoder/layers_{i}/pre_self_attention_layer_norm/scale    [d]
    decoder/layers_{i}/self_attention/...              as encoder attention
    decoder/layers_{i}/pre_cross_attention_layer_norm/scale   [d]
    decoder/layers_{i}/encoder_decoder_attention/...   as encoder attention
    decoder/layers_{i}/pre_mlp_layer_norm/scale        [d]
    decoder/layers_{i}/mlp/...                         as encoder mlp
    decoder/decoder_norm/scale                         [d]
    decoder/logits_dense/kernel                        [d, V]      (embed, vocab)

Token id 0 is padding: padded keys are masked in every attention. Packed batches pass
segment ids (1, 2, ... per example, 0 for padding) so examples never attend to each other.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepfusion_core.attention import attend
from deepfusion_core.config import T5Config
from deepfusion_core.param_layout import Params, count_params  # noqa: F401 - the model's API
from deepfusion_core.param_layout import param_layout, unflatten

_NEG_INF = -1e10  # finite, so a fully masked row gives a uniform softmax instead of NaN
RMSNORM_EPS = 1e-6


def _init(scale: float, mode: str, distribution: str, axes: tuple[str, ...],
          in_axis: int | tuple[int, ...] = -2, out_axis: int | tuple[int, ...] = -1):
    fn = nn.initializers.variance_scaling(scale, mode, distribution, in_axis=in_axis,
                                          out_axis=out_axis)
    return nn.with_logical_partitioning(fn, axes)


def _compute_dtype(cfg: T5Config):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


class RMSNorm(nn.Module):
    """RMSNorm over each group of features separately (one group = standard T5 norm)."""

    groups: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = sum(self.groups)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (d,), jnp.float32)
        x = x.astype(jnp.float32)
        if len(self.groups) == 1:
            var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        else:  # per-group mean square, broadcast back to the group's features
            bounds = np.cumsum(self.groups)[:-1]
            parts = jnp.split(jnp.square(x), bounds, axis=-1)
            var = jnp.concatenate(
                [jnp.broadcast_to(jnp.mean(p, -1, keepdims=True), p.shape) for p in parts], -1)
        return (x * jax.lax.rsqrt(var + RMSNORM_EPS) * scale).astype(self.dtype)


def relative_position_buckets(q_len: int, k_len: int, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """T5's bucketing of key-minus-query distances, computed once per shape in numpy."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    n = -rel
    ret = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int64) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    large = max_exact + (
        np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
        / np.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return ret + np.where(n < max_exact, n, large)


class RelativePositionBias(nn.Module):
    cfg: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_len: int, k_len: int):
        cfg = self.cfg
        table = self.param(
            "rel_embedding",
            _init(1.0, "fan_avg", "uniform", ("heads", "relpos_buckets"), in_axis=1, out_axis=0),
            (cfg.num_heads, cfg.relpos_buckets), jnp.float32)
        buckets = relative_position_buckets(q_len, k_len, self.bidirectional,
                                            cfg.relpos_buckets, cfg.relpos_max_distance)
        return table[:, buckets][None]  # [1, H, q, k]


@jax.custom_vjp
def _matmul(x, w):
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(residuals, dy):
    # The kernel's gradient as one explicit [in, tokens] @ [tokens, out] product. Left to
    # autodiff, XLA:CPU fuses that transpose into the elementwise producers of `dy` (the
    # gated GELU's backward), which then write column-major and run ~2x slower (issue 3).
    x, w = residuals
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return (dy @ w.T).astype(x.dtype), (x2.T @ dy2).astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(x, kernel, dimension_numbers, precision=None,
                       preferred_element_type=None):
    """DenseGeneral's contraction of x's trailing axes with the kernel's leading ones, as
    one 2-D `_matmul` (same result; a backward pass that compiles well on every backend)."""
    del precision, preferred_element_type  # DenseGeneral passes its defaults (None)
    (x_axes, k_axes), batch_axes = dimension_numbers
    n = len(x_axes)
    assert batch_axes == ((), ()) and tuple(k_axes) == tuple(range(n)), dimension_numbers
    out_shape = x.shape[:x.ndim - n] + kernel.shape[n:]
    y = _matmul(x.reshape(*x.shape[:x.ndim - n], -1),
                kernel.reshape(int(np.prod(kernel.shape[:n])), -1))
    return y.reshape(out_shape)


def _dense(features, axis, axes: tuple[str, ...], dtype, scale: float = 1.0, name=None):
    # DenseGeneral initialises the kernel on its 2-D (fan_in, fan_out) view, as t5x does.
    return nn.DenseGeneral(features=features, axis=axis, use_bias=False, dtype=dtype,
                           param_dtype=jnp.float32, name=name, dot_general=_dense_dot_general,
                           kernel_init=_init(scale, "fan_in", "truncated_normal", axes))


class Attention(nn.Module):
    """Multi-head attention; `bias` carries position bias and masks, [b or 1, H, q, k];
    `kernel` is one of `attention.IMPLEMENTATIONS` (same result)."""

    cfg: T5Config
    kernel: str = "reference"

    @nn.compact
    def __call__(self, x_q, x_kv, bias):
        cfg, dt = self.cfg, _compute_dtype(self.cfg)
        heads = (cfg.num_heads, cfg.head_dim)
        qkv_axes = ("embed", "heads", "kv")
        # 1/sqrt(head_dim) is folded into the query init instead of the logits (T5).
        q = _dense(heads, -1, qkv_axes, dt, 1.0 / cfg.head_dim, "query")(x_q)
        k = _dense(heads, -1, qkv_axes, dt, name="key")(x_kv)
        v = _dense(heads, -1, qkv_axes, dt, name="value")(x_kv)
        ctx = attend(q, k, v, bias, self.kernel)
        return _dense(cfg.d_model, (-2, -1), ("heads", "kv", "embed"), dt, name="out")(ctx)


class MLP(nn.Module):
    """Gated-GELU feed-forward: wo(gelu(x wi_0) * (x wi_1))."""

    cfg: T5Config

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _compute_dtype(self.cfg)
        gate = _dense(cfg.d_ff, -1, ("embed", "mlp"), dt, name="wi_0")(x)
        lin = _dense(cfg.d_ff, -1, ("embed", "mlp"), dt, name="wi_1")(x)
        return _dense(cfg.d_model, -1, ("mlp", "embed"), dt, name="wo")(
            jax.nn.gelu(gate, approximate=True) * lin)


def _norm(cfg: T5Config, name: str) -> RMSNorm:
    return RMSNorm(cfg.norm_groups, _compute_dtype(cfg), name=name)


class EncoderLayer(nn.Module):
    cfg: T5Config
    attention: str = "reference"

    @nn.compact
    def __call__(self, x, bias):
        h = _norm(self.cfg, "pre_attention_layer_norm")(x)
        x = x + Attention(self.cfg, self.attention, name="attention")(h, h, bias)
        return x + MLP(self.cfg, name="mlp")(_norm(self.cfg, "pre_mlp_layer_norm")(x))


class DecoderLayer(nn.Module):
    cfg: T5Config
    attention: str = "reference"

    @nn.compact
    def __call__(self, y, encoded, self_bias, cross_bias):
        h = _norm(self.cfg, "pre_self_attention_layer_norm")(y)
        y = y + Attention(self.cfg, self.attention, name="self_attention")(h, h, self_bias)
        h = _norm(self.cfg, "pre_cross_attention_layer_norm")(y)
        y = y + Attention(self.cfg, self.attention, name="encoder_decoder_attention")(
            h, encoded, cross_bias)
        return y + MLP(self.cfg, name="mlp")(_norm(self.cfg, "pre_mlp_layer_norm")(y))


def _mask_bias(q_segments, k_segments, k_tokens, causal: bool):
    """Additive mask [b, 1, q, k]: keys must be real tokens of the query's segment."""
    ok = (k_tokens > 0)[:, None, :] & (q_segments[:, :, None] == k_segments[:, None, :])
    if causal:
        q_len = q_segments.shape[1]
        ok = ok & jnp.tril(jnp.ones((q_len, q_len), bool))[None]
    return jnp.where(ok, 0.0, _NEG_INF)[:, None].astype(jnp.float32)


def logits_from_features(cfg: T5Config, params: Params, features) -> jax.Array:
    """The float32 logits of decoder features [..., d_model], computed as the model's own
    `logits_dense` does (for a loss that makes them a chunk at a time)."""
    dt = _compute_dtype(cfg)
    kernel = params["decoder"]["logits_dense"]["kernel"].astype(dt)
    x = features.astype(dt)
    return _matmul(x.reshape(-1, x.shape[-1]), kernel).reshape(
        *x.shape[:-1], -1).astype(jnp.float32)


def _layer(cls, remat: bool):
    # Rematerialised layers keep only their inputs for the backward pass and recompute the
    # rest: what lets the paper-size models fit a TPU core (see `memory.py`). Same params.
    return nn.remat(cls) if remat else cls


class Encoder(nn.Module):
    cfg: T5Config
    remat: bool = False
    attention: str = "reference"

    @nn.compact
    def __call__(self, x, tokens, segments):
        n = tokens.shape[1]
        bias = RelativePositionBias(self.cfg, True, name="relpos_bias")(n, n)
        bias = bias + _mask_bias(segments, segments, tokens, causal=False)
        for i in range(self.cfg.num_layers):
            x = _layer(EncoderLayer, self.remat)(self.cfg, self.attention,
                                                 name=f"layers_{i}")(x, bias)
        return _norm(self.cfg, "encoder_norm")(x)


class Decoder(nn.Module):
    """The decoder stack; float32 logits, or with `logits=False` the final normed features
    (the loss then makes the logits itself, a chunk of tokens at a time)."""

    cfg: T5Config
    remat: bool = False
    attention: str = "reference"
    logits: bool = True

    @nn.compact
    def __call__(self, y, encoded, enc_tokens, enc_segments, dec_segments):
        n = dec_segments.shape[1]
        self_bias = RelativePositionBias(self.cfg, False, name="relpos_bias")(n, n)
        # Decoder inputs start with token 0 (T5's start id), so only the causal and segment
        # structure masks self-attention; later padding only reaches padding positions.
        self_bias = self_bias + _mask_bias(dec_segments, dec_segments,
                                           jnp.ones_like(dec_segments), causal=True)
        cross_bias = _mask_bias(dec_segments, enc_segments, enc_tokens, causal=False)
        for i in range(self.cfg.num_layers):
            y = _layer(DecoderLayer, self.remat)(self.cfg, self.attention, name=f"layers_{i}")(
                y, encoded, self_bias, cross_bias)
        y = _norm(self.cfg, "decoder_norm")(y)
        if not self.logits:
            return y
        logits = _dense(self.cfg.vocab_size, -1, ("embed", "vocab"), _compute_dtype(self.cfg),
                        name="logits_dense")(y)
        return logits.astype(jnp.float32)


class T5(nn.Module):
    """The whole encoder-decoder; `__call__` returns float32 logits [batch, dec_len, vocab]
    (with `logits=False`, the decoder's final features [batch, dec_len, d_model]).

    `remat` recomputes each layer in the backward pass instead of keeping its activations;
    `attention` picks the kernel (`attention.IMPLEMENTATIONS`). Neither changes the result.
    """

    cfg: T5Config
    remat: bool = False
    attention: str = "reference"
    logits: bool = True

    @nn.compact
    def __call__(self, enc_tokens, dec_tokens, enc_segments=None, dec_segments=None):
        cfg = self.cfg
        if enc_segments is None:
            enc_segments = jnp.ones_like(enc_tokens)
        if dec_segments is None:
            dec_segments = jnp.ones_like(dec_tokens)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=_compute_dtype(cfg),
                         param_dtype=jnp.float32, name="token_embedder",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(1.0), ("vocab", "embed")))
        encoded = Encoder(cfg, self.remat, self.attention, name="encoder")(
            embed(enc_tokens), enc_tokens, enc_segments)
        return Decoder(cfg, self.remat, self.attention, self.logits, name="decoder")(
            embed(dec_tokens), encoded, enc_tokens, enc_segments, dec_segments)


def param_shapes(cfg: T5Config) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s, from `param_layout` (nothing is
    allocated or traced; each caller gets its own tree)."""
    return unflatten({path: jax.ShapeDtypeStruct(spec.shape, spec.dtype)
                      for path, spec in param_layout(cfg).items()})


def param_axes(cfg: T5Config) -> Params:
    """The logical axis names of every parameter (a tree of tuples, same structure)."""
    return unflatten({path: spec.axes for path, spec in param_layout(cfg).items()})


@functools.partial(jax.jit, static_argnums=0)  # the seed is traced: one compile per config
def _init_params(cfg: T5Config, seed) -> Params:
    tokens = jnp.ones((1, 1), jnp.int32)
    return nn.meta.unbox(T5(cfg).init(jax.random.PRNGKey(seed), tokens, tokens)["params"])


def init_params(cfg: T5Config, seed: int = 0) -> Params:
    """Random T5.1.1 initialisation (t5x's initialisers), float32, as a nested dict."""
    return _init_params(cfg, seed)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, enc_tokens, dec_tokens, enc_segments, dec_segments):
    return T5(cfg).apply({"params": params}, enc_tokens, dec_tokens, enc_segments, dec_segments)


def forward(cfg: T5Config, params: Params, encoder_tokens, decoder_tokens,
            encoder_segment_ids=None, decoder_segment_ids=None) -> jax.Array:
    """Logits [batch, dec_len, vocab] (float32) for teacher-forced decoder inputs.

    `decoder_tokens` are the decoder *inputs* (targets shifted right, starting with 0).
    Segment ids are only needed for packed batches.
    """
    return _forward(cfg, params, encoder_tokens, decoder_tokens, encoder_segment_ids,
                    decoder_segment_ids)
