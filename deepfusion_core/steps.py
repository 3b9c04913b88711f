"""The jitted pieces of training: optimizer, train and eval steps, state shardings.

Kept apart from `train.py` (the loop, data, metrics, checkpoints) so that compiling and
benchmarking a step needs JAX, optax and Orbax only, no TensorFlow: `deepfusion bench step`
runs on accelerator machines whose images lack TF, and `memory.compiled_memory` compiles the
paper-size step from here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from deepfusion_core import adafactor, sharding
from deepfusion_core.attention import check_implementation
from deepfusion_core.config import Kernels, OptimizerConfig, T5Config
from deepfusion_core.loss import chunked_token_cross_entropy, token_cross_entropy
from deepfusion_core.model import T5, init_params, logits_from_features, param_shapes

BATCH_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
              "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids")


def learning_rate_schedule(tc: OptimizerConfig) -> optax.Schedule:
    """Linear warmup to the peak, then T5's 1/sqrt(step) (Adafactor) or cosine (AdamW), or
    the peak kept (`schedule: constant`)."""
    warmup = max(tc.warmup_steps, 1)
    if tc.schedule == "constant":
        return lambda step: tc.learning_rate * jnp.minimum(
            jnp.maximum(step, 1).astype(jnp.float32) / warmup, 1.0)
    if tc.optimizer == "adamw":
        return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup,
                                                  max(tc.steps, warmup + 1),
                                                  end_value=0.1 * tc.learning_rate)

    def rsqrt(step):
        step = jnp.maximum(step, 1).astype(jnp.float32)
        return tc.learning_rate * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))
    return rsqrt


def make_optimizer(tc: OptimizerConfig) -> optax.GradientTransformation:
    """Adafactor with T5's settings (factored, parameter-scaled, update clipping) or AdamW."""
    schedule = learning_rate_schedule(tc)
    if tc.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tc.weight_decay)
    else:
        opt = adafactor.adafactor(schedule)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt) if tc.grad_clip else opt


def _token_stats(cfg: T5Config, params, batch, z_loss: float, kernels: Kernels = Kernels()):
    """Per-token negative log-likelihood, z-loss term and correctness."""
    chunk = kernels.loss_chunk
    out = T5(cfg, kernels.remat, kernels.attention, logits=not chunk).apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch.get("encoder_segment_ids"), batch.get("decoder_segment_ids"))
    targets = batch["decoder_target_tokens"]
    if chunk:
        nll, log_z, correct = chunked_token_cross_entropy(
            out, functools.partial(logits_from_features, cfg, params), targets, chunk)
    else:
        nll, log_z, correct = token_cross_entropy(out, targets)
    return nll, z_loss * jnp.square(log_z), correct


def _build_steps(cfg, tc: OptimizerConfig, kernels: Kernels, optimizer, state_sh, mesh):
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def train_step(state, batch):
        weights = batch["decoder_loss_weights"]
        denom = jnp.maximum(weights.sum(), 1.0)  # mean over real (non-padding) target tokens

        def loss_fn(params):
            nll, z, _ = _token_stats(cfg, params, batch, tc.z_loss, kernels)
            return ((nll + z) * weights).sum() / denom, (nll * weights).sum() / denom

        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, {
            "loss": loss, "grad_norm": optax.global_norm(grads)}

    def eval_step(params, batch):
        nll, _, correct = _token_stats(cfg, params, batch, 0.0, kernels._replace(remat=False))
        w = batch["decoder_loss_weights"]
        return {"nll": (nll * w).sum(), "correct": (correct * w).sum(), "tokens": w.sum()}

    return (jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                    donate_argnums=0),
            jax.jit(eval_step, in_shardings=(state_sh["params"], batch_sh), out_shardings=repl))


def _build_state_shardings(cfg, optimizer, mesh):
    param_sh = sharding.param_shardings(cfg, mesh)
    abstract_params = sharding.abstract_like(param_shapes(cfg), param_sh)
    # The optimizer state's layout follows its params: let XLA propagate it, then pin it.
    # Leaves that depend on no param (step counts) come back on one device: replicate them.
    devices = set(mesh.devices.flat)
    opt_sh = jax.tree.map(
        lambda s: s if s.device_set == devices else sharding.replicated(mesh),
        jax.jit(optimizer.init).lower(abstract_params).compile().output_shardings)
    state_sh = {"params": param_sh, "opt_state": opt_sh}
    abstract = {"params": abstract_params,
                "opt_state": sharding.abstract_like(
                    jax.eval_shape(optimizer.init, abstract_params), opt_sh)}
    return state_sh, abstract


class CompiledSteps(NamedTuple):
    """The jitted pieces of training one (model, training, mesh) combination."""

    init_random: Callable  # seed -> params, sharded
    init_state: Callable  # params -> {"params", "opt_state"}, sharded
    state_shardings: dict
    abstract_state: dict  # ShapeDtypeStructs with shardings, the restore target
    train_step: Callable  # (state, batch) -> (state, {"loss", "grad_norm"})
    eval_step: Callable  # (params, batch) -> summed nll, correct, tokens


@functools.lru_cache(maxsize=8)
def compiled_steps(cfg: T5Config, tc: OptimizerConfig, kernels: Kernels, mesh) -> CompiledSteps:
    """Shared by every node with the same (model, optimizer, kernels, mesh), so nodes that
    run in one process compile once: the seed only changes the initial params, and the other
    execution settings (checkpoint and evaluation cadence) nothing compiled."""
    check_implementation(kernels.attention, cfg.dtype)
    optimizer = make_optimizer(tc)
    state_sh, abstract = _build_state_shardings(cfg, optimizer, mesh)
    init_state = jax.jit(lambda params: {"params": params, "opt_state": optimizer.init(params)},
                         out_shardings=state_sh)
    init_random = jax.jit(lambda seed: init_params(cfg, seed), out_shardings=state_sh["params"])
    return CompiledSteps(init_random, init_state, state_sh, abstract,
                         *_build_steps(cfg, tc, kernels, optimizer, state_sh, mesh))
