"""The jitted pieces of training (deepfusion_core/steps.py): schedules, optimizers, and one
compile per (model, optimizer, kernels, mesh), and every kernel choice trains as the
reference does."""

import jax
import numpy as np
import optax
import pytest

from deepfusion_core import sharding
from deepfusion_core.config import PRESETS, Kernels, OptimizerConfig, TrainConfig
from deepfusion_core.steps import compiled_steps, learning_rate_schedule, make_optimizer


def test_adafactor_warms_up_linearly_then_decays_as_one_over_sqrt_step():
    lr = learning_rate_schedule(OptimizerConfig(steps=1000, learning_rate=0.01, warmup_steps=100))
    for step, want in [(0, 0.01 / 100), (50, 0.005), (100, 0.01), (400, 0.005), (10_000, 0.001)]:
        assert float(lr(step)) == pytest.approx(want, rel=1e-6), step


def test_adamw_decays_to_a_tenth_by_the_last_step():
    tc = OptimizerConfig(steps=200, optimizer="adamw", learning_rate=1e-3, warmup_steps=20)
    lr = learning_rate_schedule(tc)
    assert float(lr(20)) == pytest.approx(1e-3, rel=1e-6)
    assert float(lr(200)) == pytest.approx(1e-4, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_a_constant_schedule_keeps_the_peak_after_warmup(optimizer):
    lr = learning_rate_schedule(OptimizerConfig(steps=500, optimizer=optimizer, learning_rate=1e-3,
                                                warmup_steps=10, schedule="constant"))
    for step, want in [(5, 5e-4), (10, 1e-3), (11, 1e-3), (500, 1e-3)]:
        assert float(lr(step)) == pytest.approx(want, rel=1e-6), step
    no_warmup = learning_rate_schedule(OptimizerConfig(steps=5, warmup_steps=0,
                                                       schedule="constant"))
    assert float(no_warmup(0)) == float(no_warmup(5)) == pytest.approx(0.01)


def test_a_default_schedule_is_left_out_of_the_dump_and_so_of_old_fingerprints():
    assert "schedule" not in OptimizerConfig(steps=5).model_dump()
    assert OptimizerConfig(steps=5, schedule="constant").model_dump()["schedule"] == "constant"


def test_gradients_are_clipped_to_the_global_norm_only_when_asked():
    grads = {"w": np.full((4,), 10.0, np.float32)}  # global norm 20
    params = {"w": np.zeros((4,), np.float32)}

    def first_moment(clip):  # AdamW's mu after one step: 0.1 * the gradient it was given
        opt = make_optimizer(OptimizerConfig(steps=10, optimizer="adamw", grad_clip=clip))
        _, state = opt.update(grads, opt.init(params), params)
        adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
            x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
        return np.asarray(adam[0].mu["w"])

    np.testing.assert_allclose(first_moment(1.0), 0.1 * 10.0 / 20.0, rtol=1e-6)
    np.testing.assert_allclose(first_moment(None), 0.1 * 10.0, rtol=1e-6)


def test_one_compile_serves_every_node_that_differs_only_in_how_it_runs():
    cfg = PRESETS["tiny-S"].model_copy(update={"vocab_size": 384})
    mesh = sharding.make_mesh((jax.device_count(), 1))
    a = TrainConfig(steps=8, save_every=2, eval_every=4)
    b = TrainConfig(steps=8, save_every=5, eval_batches=9, keep_last=3)
    assert compiled_steps(cfg, a.optimizer_config, a.kernels, mesh) is compiled_steps(
        cfg, b.optimizer_config, b.kernels, mesh)
    c = TrainConfig(steps=8, learning_rate=0.5)  # what is computed changes: its own program
    assert compiled_steps(cfg, c.optimizer_config, c.kernels, mesh) is not compiled_steps(
        cfg, a.optimizer_config, a.kernels, mesh)
    d = TrainConfig(steps=8, loss_chunk=4)  # how it is computed changes: its own program too
    assert compiled_steps(cfg, d.optimizer_config, d.kernels, mesh) is not compiled_steps(
        cfg, a.optimizer_config, a.kernels, mesh)


def _packed_batch(vocab: int, b: int = 4, inputs: int = 24, targets: int = 10) -> dict:
    """Two examples packed per row, padding at the end: what the data pipeline gives."""
    rng = np.random.default_rng(3)
    enc_seg = np.repeat([[1] * 10 + [2] * 8 + [0] * (inputs - 18)], b, 0).astype(np.int32)
    dec_seg = np.repeat([[1] * 4 + [2] * 4 + [0] * (targets - 8)], b, 0).astype(np.int32)
    enc = np.where(enc_seg > 0, rng.integers(2, vocab, (b, inputs)), 0).astype(np.int32)
    tgt = np.where(dec_seg > 0, rng.integers(2, vocab, (b, targets)), 0).astype(np.int32)
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1)
    dec_in[:, 4] = 0  # the second example starts with T5's start token too
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
            "decoder_target_tokens": tgt, "decoder_loss_weights": (dec_seg > 0).astype(np.float32),
            "encoder_segment_ids": enc_seg, "decoder_segment_ids": dec_seg}


def _two_steps(cfg, kernels: Kernels):
    mesh = sharding.make_mesh((jax.device_count(), 1))
    steps = compiled_steps(cfg, OptimizerConfig(steps=2, warmup_steps=1, z_loss=1e-4),
                           kernels, mesh)
    batch = jax.device_put(_packed_batch(cfg.vocab_size), sharding.batch_sharding(mesh))
    state, outs = steps.init_state(steps.init_random(7)), []
    for _ in range(2):
        state, out = steps.train_step(state, batch)
        outs.append(out)
    return state["params"], outs, steps.eval_step(state["params"], batch)


@pytest.mark.parametrize("kernels", [Kernels(attention="xla"), Kernels(loss_chunk=3),
                                     Kernels(remat=True, attention="xla", loss_chunk=4)],
                         ids=["xla-attention", "loss-chunk-3", "remat-xla-chunk-4"])
def test_every_fast_kernel_trains_as_the_reference_does(kernels):
    cfg = PRESETS["tiny-S"].model_copy(update={"vocab_size": 384, "num_layers": 1})
    params_ref, outs_ref, eval_ref = _two_steps(cfg, Kernels())
    params, outs, evals = _two_steps(cfg, kernels)
    for out, out_ref in zip(outs, outs_ref, strict=True):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(out[key], out_ref[key], rtol=1e-5)
    for key in ("nll", "correct", "tokens"):
        np.testing.assert_allclose(evals[key], eval_ref[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fast_kernels_train_as_the_reference_does_in_bfloat16_within_its_rounding():
    cfg = PRESETS["tiny-S"].model_copy(update={"vocab_size": 384, "num_layers": 1,
                                                    "dtype": "bfloat16"})
    _, outs_ref, _ = _two_steps(cfg, Kernels())
    _, outs, _ = _two_steps(cfg, Kernels(attention="xla", loss_chunk=4))
    # bfloat16 keeps 8 bits: the loss of ~6 agrees to a few of its ulps (2^-8 relative).
    for out, out_ref in zip(outs, outs_ref, strict=True):
        np.testing.assert_allclose(out["loss"], out_ref["loss"], rtol=4 * 2**-8)
