"""The training loop every train node runs: optax on a (data, model) mesh, Orbax resume.

`train()` trains a model for `TrainConfig.steps` steps in a workdir::

    WORKDIR/checkpoints/<step>/   Orbax steps (see `train_checkpoint`)
    WORKDIR/metrics.jsonl         train/eval/summary records (see `metrics`)
    WORKDIR/tensorboard/          the same scalars as TensorBoard events

It resumes automatically from the newest readable checkpoint, restoring params, optimizer
state, step and data position, so a run killed at any moment and restarted ends with the same
bits as one that was never interrupted (same device count). SIGTERM/SIGINT save a checkpoint at
the current step and raise `Preempted`.

T5.1.1 pretraining uses no dropout: a step consumes no randomness, and the data order (with
its span-corruption masks) is fixed by the data seed and position, both checkpointed.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from deepfusion_core import adafactor, data, sharding, train_checkpoint
from deepfusion_core.checkpoint import CheckpointError, load_model, read_config
from deepfusion_core.config import T5Config
from deepfusion_core.flops import train_step_flops
from deepfusion_core.metrics import MetricsLog
from deepfusion_core.model import T5, init_params, param_shapes

BATCH_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
              "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids")


class TrainConfig(BaseModel):
    """How to train one node (the model and data are configured separately)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(gt=0)
    seed: int = Field(default=0, ge=0)  # parameter initialisation (the data seed is separate)
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    learning_rate: float = Field(default=0.01, gt=0)  # peak; T5 uses 0.01 with Adafactor
    warmup_steps: int = Field(default=100, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)  # global norm; None disables
    z_loss: float = Field(default=0.0, ge=0)  # T5X uses 1e-4
    weight_decay: float = Field(default=0.0, ge=0)  # AdamW only
    eval_every: int = Field(default=0, ge=0)  # 0: evaluate at the end only
    eval_batches: int = Field(default=4, gt=0)
    save_every: int = Field(default=100, gt=0)
    keep_last: int = Field(default=2, gt=0)
    keep_every: int | None = Field(default=None, gt=0)
    mesh: str | None = None  # "data=D,model=M"; None puts every device on data


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint saved")
        self.step, self.signum = step, signum


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak, then T5's 1/sqrt(step) (Adafactor) or cosine (AdamW)."""
    warmup = max(tc.warmup_steps, 1)
    if tc.optimizer == "adamw":
        return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup,
                                                  max(tc.steps, warmup + 1),
                                                  end_value=0.1 * tc.learning_rate)

    def rsqrt(step):
        step = jnp.maximum(step, 1).astype(jnp.float32)
        return tc.learning_rate * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))
    return rsqrt


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Adafactor with T5's settings (factored, parameter-scaled, update clipping) or AdamW."""
    schedule = learning_rate_schedule(tc)
    if tc.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tc.weight_decay)
    else:
        opt = adafactor.adafactor(schedule)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt) if tc.grad_clip else opt


def _token_stats(cfg: T5Config, params, batch, z_loss: float):
    """Per-token negative log-likelihood, z-loss term and correctness."""
    logits = T5(cfg).apply({"params": params}, batch["encoder_input_tokens"],
                           batch["decoder_input_tokens"], batch.get("encoder_segment_ids"),
                           batch.get("decoder_segment_ids"))
    targets = batch["decoder_target_tokens"]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return nll, z_loss * jnp.square(log_z), jnp.argmax(logits, -1) == targets


def _build_steps(cfg, tc, optimizer, state_sh, mesh):
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def train_step(state, batch):
        weights = batch["decoder_loss_weights"]
        denom = jnp.maximum(weights.sum(), 1.0)  # mean over real (non-padding) target tokens

        def loss_fn(params):
            nll, z, _ = _token_stats(cfg, params, batch, tc.z_loss)
            return ((nll + z) * weights).sum() / denom, (nll * weights).sum() / denom

        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, {
            "loss": loss, "grad_norm": optax.global_norm(grads)}

    def eval_step(params, batch):
        nll, _, correct = _token_stats(cfg, params, batch, 0.0)
        w = batch["decoder_loss_weights"]
        return {"nll": (nll * w).sum(), "correct": (correct * w).sum(), "tokens": w.sum()}

    return (jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                    donate_argnums=0),
            jax.jit(eval_step, in_shardings=(state_sh["params"], batch_sh), out_shardings=repl))


def evaluate(eval_step, params, batches, put) -> dict:
    """Mean token loss, the summed loss per target sequence (T5X's `loss`), token accuracy."""
    totals = {"nll": 0.0, "correct": 0.0, "tokens": 0.0}
    for batch in batches:
        for k, v in jax.device_get(eval_step(params, put(batch))).items():
            totals[k] += float(v)
    rows = sum(len(b["decoder_target_tokens"]) for b in batches)
    return {"eval_loss": totals["nll"] / totals["tokens"], "eval_loss_sum": totals["nll"] / rows,
            "eval_accuracy": totals["correct"] / totals["tokens"]}


def _build_state_shardings(cfg, optimizer, mesh):
    param_sh = sharding.param_shardings(cfg, mesh)
    abstract_params = train_checkpoint.abstract_like(param_shapes(cfg), param_sh)
    # The optimizer state's layout follows its params: let XLA propagate it, then pin it.
    # Leaves that depend on no param (step counts) come back on one device: replicate them.
    devices = set(mesh.devices.flat)
    opt_sh = jax.tree.map(
        lambda s: s if s.device_set == devices else sharding.replicated(mesh),
        jax.jit(optimizer.init).lower(abstract_params).compile().output_shardings)
    state_sh = {"params": param_sh, "opt_state": opt_sh}
    abstract = {"params": abstract_params,
                "opt_state": train_checkpoint.abstract_like(
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
def compiled_steps(cfg: T5Config, tc: TrainConfig, mesh) -> CompiledSteps:
    """Shared by every node with the same (model, training, mesh), so nodes that run in one
    process compile once. The seed only changes the initial params: pass `tc` with seed 0."""
    optimizer = make_optimizer(tc)
    state_sh, abstract = _build_state_shardings(cfg, optimizer, mesh)
    init_state = jax.jit(lambda params: {"params": params, "opt_state": optimizer.init(params)},
                         out_shardings=state_sh)
    init_random = jax.jit(lambda seed: init_params(cfg, seed), out_shardings=state_sh["params"])
    return CompiledSteps(init_random, init_state, state_sh, abstract,
                         *_build_steps(cfg, tc, optimizer, state_sh, mesh))


def check_inputs(cfg: T5Config, tc: TrainConfig, dc: data.DataConfig,
                 init: str | Path | None) -> tuple[int, int]:
    """Every check that can fail on user input, before anything is written; the mesh shape."""
    mesh_shape = sharding.parse_mesh(tc.mesh)
    sharding.check_mesh(mesh_shape, cfg, dc.batch_size)
    data.check_model_vocab(data.get_vocabulary(dc.vocab), cfg.vocab_size)
    data.register_task(dc)  # checks that the source exists and holds documents
    if init is not None:
        init_cfg = read_config(init)
        if init_cfg.model_copy(update={"dtype": cfg.dtype}) != cfg:
            raise CheckpointError(f"--init {init} is {init_cfg.describe()}, but the model to "
                                  f"train is {cfg.describe()}")
    return mesh_shape


def train(cfg: T5Config, tc: TrainConfig, dc: data.DataConfig, workdir: str | Path,
          init: str | Path | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> dict:
    """Train (or resume training) in `workdir`; returns the summary record.

    `init` names a model checkpoint (e.g. a fusion output) to start from: its params only,
    with a fresh optimizer and schedule. Without it the params are initialised from tc.seed.
    """
    mesh_shape = check_inputs(cfg, tc, dc, init)
    workdir = Path(workdir)
    mesh = sharding.make_mesh(mesh_shape)
    init_random, init_state, state_sh, abstract, train_step, eval_step = compiled_steps(
        cfg, tc.model_copy(update={"seed": 0}), mesh)
    batch_sh = sharding.batch_sharding(mesh)

    def put(batch):
        return jax.device_put({k: batch[k] for k in BATCH_KEYS if k in batch}, batch_sh)

    workdir.mkdir(parents=True, exist_ok=True)
    manager = train_checkpoint.open_manager(workdir, tc.keep_last, tc.keep_every)
    restored = train_checkpoint.restore_latest(manager, cfg, abstract, warn=log)
    if restored:
        state, ts = restored
        log(f"resuming {workdir} from step {ts['step']}")
    else:
        params = (jax.device_put(load_model(init)[1], state_sh["params"])
                  if init is not None else init_random(tc.seed))
        state = init_state(params)
        ts = {"step": 0, "data_position": 0, "data_seed": dc.seed, "flops": 0, "tokens": 0,
              "wall_s": 0.0, "devices": mesh.size}
    first_step = ts["step"]
    metrics = MetricsLog(workdir, first_step)
    eval_set = data.eval_batches(dc, tc.eval_batches)
    batches = data.train_batches(dc, start=ts["data_position"])
    step_flops = train_step_flops(cfg, dc.batch_size, dc.inputs_length, dc.targets_length)
    schedule = learning_rate_schedule(tc)
    last_eval = None

    def run_eval():
        nonlocal last_eval
        last_eval = {"kind": "eval", "step": ts["step"],
                     **evaluate(eval_step, state["params"], eval_set, put)}
        metrics.write(last_eval)

    stop: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=tc.steps, initial=first_step, disable=not progress, unit="step",
               desc=workdir.name, dynamic_ncols=True)
    try:
        if ts["step"] == 0 and tc.eval_every:
            run_eval()  # the starting point of every learning curve
        while ts["step"] < tc.steps and not stop:
            loop_start = time.perf_counter()
            batch = next(batches)
            step_start = time.perf_counter()
            state, out = train_step(state, put(batch))
            loss = float(out["loss"])  # waits for the step
            step_time = time.perf_counter() - step_start
            tokens = int((batch["encoder_input_tokens"] > 0).sum()
                         + (batch["decoder_loss_weights"] > 0).sum())
            ts.update(step=ts["step"] + 1, data_position=ts["data_position"] + 1,
                      flops=ts["flops"] + step_flops, tokens=ts["tokens"] + tokens)
            metrics.write({"kind": "train", "step": ts["step"], "loss": loss,
                           "grad_norm": float(out["grad_norm"]),
                           "lr": float(schedule(ts["step"] - 1)), "step_time_s": step_time,
                           "tokens_per_s": tokens / step_time,
                           "flops_per_s": step_flops / step_time})
            if tc.eval_every and ts["step"] % tc.eval_every == 0:
                run_eval()
            ts["wall_s"] += time.perf_counter() - loop_start
            if ts["step"] % tc.save_every == 0:
                train_checkpoint.save(manager, ts["step"], cfg, state, dict(ts))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / step_time:,.0f}")
        if stop:
            train_checkpoint.save(manager, ts["step"], cfg, state, dict(ts), force=True)
            manager.wait_until_finished()
            raise Preempted(ts["step"], stop[0])
        if last_eval is None or last_eval["step"] != ts["step"]:
            run_eval()
        if manager.latest_step() != ts["step"]:
            train_checkpoint.save(manager, ts["step"], cfg, state, dict(ts))
        manager.wait_until_finished()
        summary = {"kind": "summary", "step": ts["step"], "first_step": first_step,
                   "flops": ts["flops"], "tokens": ts["tokens"], "wall_s": ts["wall_s"],
                   "device_s": ts["wall_s"] * ts["devices"], "devices": ts["devices"],
                   **{k: v for k, v in last_eval.items() if k.startswith("eval_")}}
        metrics.write(summary)
        return summary
    finally:
        bar.close()
        metrics.close()
        manager.close()
        for s, h in handlers.items():
            signal.signal(s, h)
