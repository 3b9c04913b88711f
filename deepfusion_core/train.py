"""The training loop every train node runs: optax on a (data, model) mesh, Orbax resume.

`train()` trains a model for `TrainConfig.steps` steps in a workdir::

    WORKDIR/checkpoints/<step>/   Orbax steps (see `train_checkpoint`)
    WORKDIR/metrics.jsonl         train/eval/summary records (see `metrics`)
    WORKDIR/tensorboard/          the same scalars as TensorBoard events
    WORKDIR/.lock                 held by the one writer (see `workdir_lock`)

It resumes automatically from the newest readable checkpoint, restoring params, optimizer
state, step and data position, so a run killed at any moment and restarted ends with the same
bits as one that was never interrupted (same device count). SIGTERM/SIGINT save a checkpoint at
the current step and raise `Preempted`.

T5.1.1 pretraining uses no dropout: a step consumes no randomness, and the data order (with
its span-corruption masks) is fixed by the data seed and position, both checkpointed.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from deepfusion_core import batch_cache, disk, sharding, train_checkpoint, workdir_lock
from deepfusion_core.checkpoint import CheckpointError, load_model, read_config
from deepfusion_core.config import DataConfig, T5Config, TrainConfig
from deepfusion_core.eval_check import check_eval_batches, eval_batches
from deepfusion_core.flops import train_step_flops
from deepfusion_core.metrics import MetricsLog
from deepfusion_core.preemption import Preempted, stop_requests
from deepfusion_core.steps import BATCH_KEYS, compiled_steps, learning_rate_schedule
from deepfusion_core.vocab import check_model_vocab

class TrainingDiverged(ValueError):
    """A step's loss or gradient norm was not finite; nothing of that step was saved."""


PROGRESS_EVERY_S = 30.0  # without a progress bar, a line at least this often


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def evaluate(eval_step, params, batches, put) -> dict:
    """Mean token loss, the summed loss per target sequence (T5X's `loss`), token accuracy."""
    totals = {"nll": 0.0, "correct": 0.0, "tokens": 0.0}
    for batch in batches:
        for k, v in jax.device_get(eval_step(params, put(batch))).items():
            totals[k] += float(v)
    rows = sum(len(b["decoder_target_tokens"]) for b in batches)
    return {"eval_loss": totals["nll"] / totals["tokens"], "eval_loss_sum": totals["nll"] / rows,
            "eval_accuracy": totals["correct"] / totals["tokens"]}


def check_inputs(cfg: T5Config, tc: TrainConfig, dc: DataConfig,
                 init: str | Path | None) -> tuple[int, int]:
    """Every check that can fail on user input, before anything is written; the mesh shape."""
    mesh_shape = sharding.parse_mesh(tc.mesh)
    sharding.check_mesh(mesh_shape, cfg, dc.batch_size)
    check_model_vocab(dc.vocab, cfg.vocab_size)
    batch_cache.check_source(dc)
    batch_cache.train_cache_bytes()  # DEEPFUSION_TRAIN_CACHE_MB, if set, is a size
    check_eval_batches(dc, tc.eval_batches)  # counted once, then cached
    if init is not None:
        init_cfg = read_config(init)
        if init_cfg.model_copy(update={"dtype": cfg.dtype}) != cfg:
            raise CheckpointError(f"--init {init} is {init_cfg.describe()}, but the model to "
                                  f"train is {cfg.describe()}")
    return mesh_shape


def _all_agree_to_stop(stop: list[int]) -> bool:
    """Whether any process was asked to stop, decided by all of them before each step: a
    signal reaches the processes of a multi-process node at different moments, and one that
    stopped alone would leave the others waiting in the next step's collectives."""
    if jax.process_count() == 1:
        return bool(stop)
    return bool(multihost_utils.process_allgather(np.int32(bool(stop))).any())


def train(cfg: T5Config, tc: TrainConfig, dc: DataConfig, workdir: str | Path, seed: int,
          init: str | Path | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> dict | None:
    """Train (or resume training) in `workdir`; returns the summary record (None in all but
    the first process of a multi-process run).

    `init` names a model checkpoint (e.g. a fusion output) to start from: its params only,
    with a fresh optimizer and schedule. Without it the params are initialised from `seed`.
    A workdir that another process is writing is refused (`workdir_lock.LockedError`).
    """
    # SIGTERM/SIGINT are caught from the start: one that arrives while compiling or
    # restoring stops the run at the loop's first check, with a checkpoint, like any other.
    with stop_requests() as stop:
        mesh_shape = check_inputs(cfg, tc, dc, init)
        workdir = Path(workdir)
        # One writer per workdir: a second one refuses, naming the first (a pipeline node
        # holds this lock already and joins it). The first process alone locks, as it alone
        # writes the metrics; in a local multi-process run its refusal stops the others.
        with (workdir_lock.hold(workdir, f"workdir {workdir}", wait=False, log=log,
                                reenter=True)
              if jax.process_index() == 0 else nullcontext()):
            return _train(cfg, tc, dc, workdir, seed, mesh_shape, init, progress, log, stop)


def _train(cfg: T5Config, tc: TrainConfig, dc: DataConfig, workdir: Path, seed: int,
           mesh_shape: tuple[int, int], init: str | Path | None, progress: bool,
           log: Callable[[str], None], stop: list[int]) -> dict | None:
    mesh = sharding.make_mesh(mesh_shape)
    init_random, init_state, state_sh, abstract, train_step, eval_step = compiled_steps(
        cfg, tc.optimizer_config, tc.kernels, mesh)
    batch_sh = sharding.batch_sharding(mesh)

    def put(batch):
        return sharding.put_global({k: batch[k] for k in BATCH_KEYS if k in batch}, batch_sh)

    workdir.mkdir(parents=True, exist_ok=True)
    manager = train_checkpoint.open_manager(workdir, tc.keep_last, tc.keep_every)
    restored = train_checkpoint.restore_latest(manager, cfg, abstract, warn=log)
    if restored:
        state, ts = restored
        log(f"resuming {workdir} from step {ts['step']}")
    else:
        params = (sharding.put_global(load_model(init)[1], state_sh["params"])
                  if init is not None else init_random(seed))
        state = init_state(params)
        ts = {"step": 0, "data_position": 0, "data_seed": dc.seed, "flops": 0, "tokens": 0,
              "wall_s": 0.0, "devices": mesh.size}
    first_step = ts["step"]
    primary = jax.process_index() == 0  # the one writer of metrics; all processes checkpoint
    metrics = MetricsLog(workdir, first_step, enabled=primary)
    eval_set: list = []  # built at the first evaluation: a stopped run may need none
    batches = batch_cache.train_batches(dc, start=ts["data_position"],
                                        stop=ts["data_position"] + tc.steps - first_step)
    step_flops = train_step_flops(cfg, dc.batch_size, dc.inputs_length, dc.targets_length)
    schedule = learning_rate_schedule(tc)
    last_eval = None
    bar = tqdm(total=tc.steps, initial=first_step, disable=not (progress and primary), unit="step",
               desc=workdir.name, dynamic_ncols=True)
    # Without the bar (a pipeline node, a log file), progress goes to `log` as lines.
    lines = primary and bar.disable
    log_every = tc.log_every or max(1, tc.steps // 10)
    loop_start = last_line = time.perf_counter()

    def run_eval():
        nonlocal last_eval
        eval_set[:] = eval_set or eval_batches(dc, tc.eval_batches)
        last_eval = {"kind": "eval", "step": ts["step"],
                     **evaluate(eval_step, state["params"], eval_set, put)}
        metrics.write(last_eval)
        if lines:
            log(f"eval at step {ts['step']}: loss {last_eval['eval_loss']:.4f} (summed per "
                f"sequence {last_eval['eval_loss_sum']:.2f}), accuracy "
                f"{last_eval['eval_accuracy']:.4f}")

    def log_progress(loss: float, tokens_per_s: float) -> None:
        nonlocal last_line
        now = time.perf_counter()
        if not lines or not (ts["step"] % log_every == 0 or ts["step"] == tc.steps
                             or now - last_line >= PROGRESS_EVERY_S):
            return
        eta = (now - loop_start) / (ts["step"] - first_step) * (tc.steps - ts["step"])
        log(f"step {ts['step']}/{tc.steps}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s, "
            f"ETA {_duration(eta)}")
        last_line = now

    finished = False
    try:
        if ts["step"] == 0 and tc.eval_every and not stop:
            run_eval()  # the starting point of every learning curve
        stopping = False
        while ts["step"] < tc.steps and not (stopping := _all_agree_to_stop(stop)):
            step_loop_start = time.perf_counter()
            batch = next(batches)
            step_start = time.perf_counter()
            state, out = train_step(state, put(batch))
            loss = float(out["loss"])  # waits for the step
            step_time = time.perf_counter() - step_start
            grad_norm = float(out["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                # Stop before this step's state reaches a checkpoint or the metrics: a
                # resume starts from the last finite checkpoint.
                manager.wait_until_finished()
                last = manager.latest_step()
                raise TrainingDiverged(
                    f"training diverged at step {ts['step'] + 1}: loss {loss}, gradient norm "
                    f"{grad_norm}; " + (f"the last checkpoint is step {last}" if last is not None
                                         else "no checkpoint was saved")
                    + " (lower the learning rate, or rerun to resume and retry)")
            tokens = int((batch["encoder_input_tokens"] > 0).sum()
                         + (batch["decoder_loss_weights"] > 0).sum())
            ts.update(step=ts["step"] + 1, data_position=ts["data_position"] + 1,
                      flops=ts["flops"] + step_flops, tokens=ts["tokens"] + tokens)
            metrics.write({"kind": "train", "step": ts["step"], "loss": loss,
                           "grad_norm": grad_norm,
                           "lr": float(schedule(ts["step"] - 1)), "step_time_s": step_time,
                           "tokens_per_s": tokens / step_time,
                           "flops_per_s": step_flops / step_time})
            log_progress(loss, tokens / step_time)
            if tc.eval_every and ts["step"] % tc.eval_every == 0:
                run_eval()
            ts["wall_s"] += time.perf_counter() - step_loop_start
            if ts["step"] % tc.save_every == 0:
                train_checkpoint.save(manager, ts["step"], cfg, state, dict(ts))
                if lines:
                    log(f"saving the checkpoint of step {ts['step']}")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / step_time:,.0f}")
        if stopping:
            # A regular save may have just written this step (or still be writing it).
            manager.wait_until_finished()
            if manager.latest_step() != ts["step"]:
                train_checkpoint.save(manager, ts["step"], cfg, state, dict(ts), force=True)
                manager.wait_until_finished()
            if lines:
                log(f"stopped at step {ts['step']}, checkpoint saved")
            raise Preempted(ts["step"], stop[0] if stop else signal.SIGTERM)
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
        finished = True
        return summary if primary else None
    except Exception as e:
        # A full disk, however its writer said it: one OSError naming the first file that
        # could not be written. The checkpoints before it are complete: a rerun resumes.
        if (full := disk.no_space(e)) is not None:
            raise full from e
        raise
    finally:
        bar.close()
        for close in (metrics.close, manager.close):
            # After a failure, closing can only fail again (the disk is still full) and
            # would replace the error that says what happened.
            with contextlib.nullcontext() if finished else contextlib.suppress(Exception):
                close()
