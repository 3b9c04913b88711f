"""The T5.1.1 model: presets' parameter counts, shapes, masking, bf16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepfusion_core import PRESETS, T5Config, count_params, forward, init_params
from deepfusion_core.model import param_axes, param_shapes, relative_position_buckets

# The paper's parameter counts (Tables 6 and 7), with vocab 32128.
PAPER_COUNTS = {
    "table6-small": 76_961_152,
    "table6-medium": 242_002_688,
    "table7-S": 95_835_520,
    "table7-M": 317_500_160,
    "table7-L": 1_138_316_800,
}


@pytest.mark.parametrize("preset", PAPER_COUNTS)
def test_paper_presets_have_exact_parameter_counts(preset):
    assert count_params(PRESETS[preset]) == PAPER_COUNTS[preset]


def test_count_params_allocates_nothing():
    # 1.1B float32 params would be 4.5 GB; eval_shape gives ShapeDtypeStructs only.
    leaves = jax.tree.leaves(param_shapes(PRESETS["table7-L"]))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_param_tree_matches_documented_names_and_axes():
    cfg = PRESETS["tiny-S"]
    shapes = param_shapes(cfg)
    d, h, k, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    assert shapes["token_embedder"]["embedding"].shape == (v, d)
    attn = shapes["encoder"]["layers_0"]["attention"]
    assert attn["query"]["kernel"].shape == (d, h, k)
    assert attn["out"]["kernel"].shape == (h, k, d)
    assert shapes["decoder"]["layers_1"]["mlp"]["wo"]["kernel"].shape == (f, d)
    assert shapes["decoder"]["relpos_bias"]["rel_embedding"].shape == (h, 32)
    assert shapes["decoder"]["logits_dense"]["kernel"].shape == (d, v)
    axes = param_axes(cfg)
    assert axes["encoder"]["layers_0"]["attention"]["out"]["kernel"] == ("heads", "kv", "embed")
    assert axes["token_embedder"]["embedding"] == ("vocab", "embed")


def test_norm_groups_default_and_validation():
    assert T5Config(d_model=8, num_heads=1, head_dim=4, d_ff=8, num_layers=1).norm_groups == (8,)
    with pytest.raises(ValueError, match="norm_groups"):
        T5Config(d_model=8, num_heads=1, head_dim=4, d_ff=8, num_layers=1, norm_groups=(4, 3))


def _tokens(rng, shape, vocab=1000):
    return jnp.asarray(rng.integers(2, vocab, shape), jnp.int32)


def test_forward_shape_dtype_and_padding_is_masked():
    cfg = PRESETS["tiny-S"]
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    enc, dec = _tokens(rng, (2, 7)), _tokens(rng, (2, 5)).at[:, 0].set(0)
    logits = forward(cfg, params, enc, dec)
    assert logits.shape == (2, 5, cfg.vocab_size) and logits.dtype == jnp.float32
    # Appending encoder padding must not change anything: padded keys are masked.
    padded = jnp.concatenate([enc, jnp.zeros((2, 4), jnp.int32)], axis=1)
    np.testing.assert_allclose(forward(cfg, params, padded, dec), logits, atol=1e-5, rtol=0)
    # Causality: changing the last decoder input changes only the last position.
    changed = forward(cfg, params, enc, dec.at[:, -1].set(3))
    np.testing.assert_allclose(changed[:, :-1], logits[:, :-1], atol=1e-5, rtol=0)
    assert float(jnp.abs(changed[:, -1] - logits[:, -1]).max()) > 1e-3


def test_packed_segments_do_not_attend_to_each_other():
    cfg = PRESETS["tiny-S"]
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(1)
    enc_a, dec_a = _tokens(rng, (1, 6)), _tokens(rng, (1, 4)).at[:, 0].set(0)
    enc_b, dec_b = _tokens(rng, (1, 5)), _tokens(rng, (1, 3)).at[:, 0].set(0)
    alone = forward(cfg, params, enc_a, dec_a)
    packed = forward(cfg, params, jnp.concatenate([enc_a, enc_b], 1),
                     jnp.concatenate([dec_a, dec_b], 1),
                     jnp.array([[1] * 6 + [2] * 5]), jnp.array([[1] * 4 + [2] * 3]))
    np.testing.assert_allclose(packed[:, :4], alone, atol=1e-5, rtol=0)


def test_bf16_compute_keeps_float32_params_and_stays_close():
    cfg = PRESETS["tiny-S"]
    params = init_params(cfg, seed=0)
    bf16 = cfg.model_copy(update={"dtype": "bfloat16"})
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(init_params(bf16, 0)))
    rng = np.random.default_rng(2)
    enc, dec = _tokens(rng, (2, 8)), _tokens(rng, (2, 6))
    ref, low = forward(cfg, params, enc, dec), forward(bf16, params, enc, dec)
    assert low.dtype == jnp.float32
    # bf16 has 8 mantissa bits: relative error of a few percent of the logit scale.
    assert float(jnp.abs(low - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_relative_position_buckets_follow_t5():
    enc = relative_position_buckets(1, 300, True, 32, 128)[0]
    # Keys right of the query use the upper half of the buckets; exact up to distance 7.
    assert list(enc[:8]) == [0, 17, 18, 19, 20, 21, 22, 23]
    assert enc[128] == enc[299] == 31  # everything at or beyond max_distance shares one bucket
    dec = relative_position_buckets(300, 1, False, 32, 128)[:, 0]
    assert list(dec[:16]) == list(range(16)) and dec[299] == 31


@pytest.mark.parametrize("x_shape,kernel_shape,n_contract", [
    ((2, 5, 8), (8, 16), 1),        # MLP, logits
    ((2, 5, 8), (8, 3, 4), 1),      # query/key/value: [embed, heads, kv]
    ((2, 5, 3, 4), (3, 4, 8), 2),   # attention out: [heads, kv, embed]
])
def test_dense_matmul_has_autodiffs_value_and_gradients(x_shape, kernel_shape, n_contract):
    from deepfusion_core.model import _dense_dot_general

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    kernel = jnp.asarray(rng.standard_normal(kernel_shape, np.float32))
    dims = ((tuple(range(len(x_shape) - n_contract, len(x_shape))), tuple(range(n_contract))),
            ((), ()))
    cotangent = jnp.asarray(rng.standard_normal(
        x_shape[:len(x_shape) - n_contract] + kernel_shape[n_contract:], np.float32))

    def loss(dot_general):
        return lambda x, k: (dot_general(x, k, dims) * cotangent).sum()

    ours = jax.grad(loss(_dense_dot_general), argnums=(0, 1))(x, kernel)
    ref = jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(_dense_dot_general(x, kernel, dims),
                               jax.lax.dot_general(x, kernel, dims), rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_remat_recomputes_the_same_loss_and_gradients():
    from deepfusion_core.model import T5

    cfg = PRESETS["tiny-S"]
    params = init_params(cfg, 0)
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 12)), jnp.int32)
    dec = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 5)), jnp.int32)

    def loss(p, remat):
        return T5(cfg, remat).apply({"params": p}, enc, dec).astype(jnp.float32).std()

    plain, remat = (jax.value_and_grad(loss)(params, r) for r in (False, True))
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
