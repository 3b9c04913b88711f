"""Deep fusion: exact where the maths is exact, measured where it is not."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from deepfusion_core import PRESETS, T5Config, forward, fuse, init_params
from deepfusion_core.fusion import FusionError, fused_config

TINY = PRESETS["tiny-S"]
# A third width, so mixed-width fusion is exercised (d_model 48, 3 heads, d_ff 96).
ODD = TINY.model_copy(update=dict(d_model=48, num_heads=3, d_ff=96, norm_groups=(48,)))
TOL = 1e-5  # float32 logits of magnitude ~5: the bound for exact identities


def _batch(seed=0, vocab=32000):
    rng = np.random.default_rng(seed)
    enc = jnp.asarray(rng.integers(2, vocab, (2, 12)), jnp.int32).at[1, 9:].set(0)  # padding
    dec = jnp.asarray(rng.integers(2, vocab, (2, 9)), jnp.int32).at[:, 0].set(0)
    return enc, dec


def _logits(model, batch):
    cfg, params = model
    return forward(cfg, params, *batch)


@pytest.fixture(scope="module")
def models():
    return {name: (cfg, init_params(cfg, seed)) for name, cfg, seed in
            [("a", TINY, 0), ("b", TINY, 1), ("c", TINY, 2), ("d", TINY, 3), ("odd", ODD, 4),
             ("m", PRESETS["tiny-M"], 5)]}


def _max_err(x, y):
    return float(jnp.abs(x - y).max())


def test_self_fusion_reproduces_the_original_logits(models):
    batch = _batch()
    fused = fuse([models["a"], models["a"]], cross_std=0.0)
    assert fused[0].d_model == 2 * TINY.d_model and fused[0].norm_groups == (64,)  # rule
    assert _max_err(_logits(fused, batch), _logits(models["a"], batch)) <= TOL


def test_self_fusion_with_prop_is_also_exact(models):
    batch = _batch()
    fused = fuse([models["a"], models["a"]], norm="prop")
    assert fused[0].norm_groups == (32, 32)
    assert _max_err(_logits(fused, batch), _logits(models["a"], batch)) <= TOL


def test_prop_fusion_of_two_models_is_their_average_ensemble(models):
    batch = _batch(1)
    fused = fuse([models["a"], models["b"]], norm="prop", cross_std=0.0)
    mean = (_logits(models["a"], batch) + _logits(models["b"], batch)) / 2
    assert _max_err(_logits(fused, batch), mean) <= TOL


def test_prop_fusion_of_three_different_widths_is_their_average(models):
    batch = _batch(2)
    trio = [models["a"], models["odd"], models["m"]]
    cfg, params = fuse(trio, norm="prop")
    assert (cfg.d_model, cfg.num_heads, cfg.d_ff) == (32 + 48 + 64, 2 + 3 + 4, 64 + 96 + 128)
    assert cfg.norm_groups == (32, 48, 64)
    mean = sum(_logits(m, batch) for m in trio) / 3
    assert _max_err(_logits((cfg, params), batch), mean) <= TOL


def test_nested_fusion_is_the_average_of_four(models):
    batch = _batch(3)
    ab = fuse([models["a"], models["b"]], norm="prop")
    cd = fuse([models["c"], models["d"]], norm="prop")
    abcd = fuse([ab, cd], norm="prop")
    assert abcd[0].norm_groups == (32, 32, 32, 32)
    mean = sum(_logits(models[k], batch) for k in "abcd") / 4
    assert _max_err(_logits(abcd, batch), mean) <= TOL


def _trained_like(model, seed):
    """`model` with norm scales spread like a trained model's (t5x initialises them to 1)."""
    cfg, params = model
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    for key, value in flat.items():
        if key[-1] == "scale":
            flat[key] = np.exp(rng.uniform(np.log(0.3), np.log(3.0), value.shape)).astype(np.float32)
    return cfg, traverse_util.unflatten_dict(flat)


def test_self_fusion_of_a_prop_fused_model_keeps_its_groups_and_its_function(models):
    batch = _batch(7)
    ab = fuse([_trained_like(models["a"], 0), _trained_like(models["b"], 1)], norm="prop")
    abab = fuse([ab, ab])  # the default: the exact norm
    assert abab[0].norm_groups == (32, 32, 32, 32)
    assert _max_err(_logits(abab, batch), _logits(ab, batch)) <= TOL


def test_rule_on_a_grouped_self_fusion_is_allowed_and_approximate(models):
    # An explicit rule merges the groups into one RMSNorm (the standard architecture back),
    # which divides each input's features by the RMS of all of them: the function moves.
    # Measured here: 3.8 on logits of magnitude 5.3.
    batch = _batch(8)
    ab = fuse([_trained_like(models["a"], 0), _trained_like(models["b"], 1)], norm="prop")
    merged = fuse([ab, ab], norm="rule")
    assert merged[0].norm_groups == (128,)
    assert _max_err(_logits(merged, batch), _logits(ab, batch)) > 0.05


def test_weighted_fusion_averages_with_the_given_weights(models):
    batch = _batch(4)
    fused = fuse([models["a"], models["b"]], norm="prop", weights=[0.25, 0.75])
    want = 0.25 * _logits(models["a"], batch) + 0.75 * _logits(models["b"], batch)
    assert _max_err(_logits(fused, batch), want) <= TOL


def test_rule_fusion_of_different_models_is_not_the_ensemble(models):
    # One RMSNorm over both halves divides each half by the RMS of the whole vector, not its
    # own: exact only when the halves have the same RMS (self fusion). Measured here on
    # tiny-S: the deviation is ~1.6 on logits of magnitude ~5, 10^5 times the exact bound.
    batch = _batch(5)
    mean = (_logits(models["a"], batch) + _logits(models["b"], batch)) / 2
    rule = fuse([models["a"], models["b"]], norm="rule")
    assert rule[0].norm_groups == (64,)
    assert _max_err(_logits(rule, batch), mean) > 0.1


def test_cross_noise_deviation_grows_with_std_and_is_seeded(models):
    batch = _batch(6)
    mean = (_logits(models["a"], batch) + _logits(models["b"], batch)) / 2
    errs = [_max_err(_logits(fuse([models["a"], models["b"]], norm="prop", cross_std=s), batch),
                     mean) for s in (1e-4, 1e-3, 1e-2)]
    assert errs[0] < errs[1] < errs[2]
    assert errs[0] < 0.01 * float(jnp.abs(mean).max())  # small std: close to the ensemble
    x = fuse([models["a"], models["b"]], cross_std=1e-3, seed=7)[1]
    y = fuse([models["a"], models["b"]], cross_std=1e-3, seed=7)[1]
    z = fuse([models["a"], models["b"]], cross_std=1e-3, seed=8)[1]
    leaf = ("encoder", "layers_0", "mlp", "wi_0", "kernel")
    flat = [traverse_util.flatten_dict(p)[leaf] for p in (x, y, z)]
    assert np.array_equal(flat[0], flat[1]) and not np.array_equal(flat[0], flat[2])
    # Noise lands only off the diagonal: the diagonal blocks are the inputs themselves.
    a_leaf = np.asarray(traverse_util.flatten_dict(models["a"][1])[leaf])
    assert np.array_equal(flat[0][:32, :64], a_leaf)


def _train_steps(model, steps=4):
    cfg, params = model
    params = jax.tree.map(jnp.asarray, params)
    # Plain SGD: an update proportional to the gradient keeps float32 rounding at rounding
    # size. Adam divides by sqrt(v), so where a gradient is near zero a rounding-level
    # difference between the halves became a learning-rate-sized one (7.7e-5 on AMD EPYC).
    opt = optax.sgd(1.0)
    state = opt.init(params)
    rng = np.random.default_rng(0)

    def loss_fn(p, enc, dec_in, targets):
        logits = forward(cfg, p, enc, dec_in)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    for _ in range(steps):
        targets = jnp.asarray(rng.integers(2, 500, (4, 8)), jnp.int32)
        dec_in = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), targets[:, :-1]], 1)
        enc = jnp.asarray(rng.integers(2, 500, (4, 10)), jnp.int32)
        grads = jax.grad(loss_fn)(params, enc, dec_in, targets)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _halves_gap(params, d):
    emb = np.asarray(params["token_embedder"]["embedding"])
    return float(np.abs(emb[:, :d] - emb[:, d:]).max())


def test_self_fusion_halves_stay_identical_without_noise_and_diverge_with_it(models):
    # Swapping the two halves maps a zero-cross self-fused model to itself, so its gradients
    # are swap-symmetric and training can never tell the halves apart: the cross-block noise
    # is what lets self fusion add capacity. (Not bit-exact: the halves sum in different
    # orders inside matmuls, so they may drift by float32 rounding, ~1e-7.)
    d = TINY.d_model
    plain = _train_steps(fuse([models["a"], models["a"]], cross_std=0.0))
    noisy = _train_steps(fuse([models["a"], models["a"]], cross_std=1e-2, seed=0))
    assert _halves_gap(plain, d) <= 1e-5
    assert _halves_gap(noisy, d) > 1e-3


@pytest.mark.parametrize("field, value", [("num_layers", 3), ("head_dim", 8), ("vocab_size", 512)])
def test_fusing_incompatible_models_names_the_field(field, value):
    other = TINY.model_copy(update={field: value})
    with pytest.raises(FusionError, match=f"{field}="):
        fused_config([TINY, other], "prop")


def test_fusing_needs_two_models_and_matching_weights(models):
    with pytest.raises(FusionError, match="at least 2"):
        fuse([models["a"]])
    with pytest.raises(FusionError, match="weights"):
        fuse([models["a"], models["b"]], weights=[1.0])


def test_paper_sizes_fuse_into_the_next_preset():
    def dims(c: T5Config):
        return (c.d_model, c.num_heads, c.head_dim, c.d_ff, c.num_layers, c.vocab_size)

    for small, big in [("table7-S", "table7-M"), ("table7-M", "table7-L"),
                       ("table6-small", "table6-medium")]:
        assert dims(fused_config([PRESETS[small]] * 2, "rule")) == dims(PRESETS[big])
