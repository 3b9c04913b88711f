"""The jitted pieces of training (deepfusion_core/steps.py): schedules, optimizers, and one
compile per (model, optimizer, remat, mesh)."""

import jax
import numpy as np
import optax
import pytest

from deepfusion_core import sharding
from deepfusion_core.config import PRESETS, OptimizerConfig, TrainConfig
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
    assert compiled_steps(cfg, a.optimizer_config, a.remat, mesh) is compiled_steps(
        cfg, b.optimizer_config, b.remat, mesh)
    c = TrainConfig(steps=8, learning_rate=0.5)  # what is computed changes: its own program
    assert compiled_steps(cfg, c.optimizer_config, c.remat, mesh) is not compiled_steps(
        cfg, a.optimizer_config, a.remat, mesh)
