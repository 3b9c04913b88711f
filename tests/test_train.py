"""The training loop on the real C4 sample: learning, resume, crashes, sharding, bad input."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from deepfusion_cli.main import app
from deepfusion_core import PRESETS, load_model
from deepfusion_core.metrics import read_metrics
from deepfusion_core.config import DataConfig, TrainConfig
from deepfusion_core.train import TrainingDiverged, train

DEEPFUSION = str(Path(sys.executable).parent / "deepfusion")


def c4_args(shared_data, *extra):
    return ["--data", f"c4:{shared_data / 'c4' / 'en'}", "--vocab", "byte",
            "--model", "tiny-S", "--batch", "4", "--inputs-length", "64", "--targets-length", "16", "--warmup", "10",
            "--no-progress", *map(str, extra)]


def train_records(workdir, kind="train"):
    return [r for r in read_metrics(Path(workdir) / "metrics.jsonl") if r["kind"] == kind]


def wait_for_step(workdir, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = train_records(workdir) if (Path(workdir) / "metrics.jsonl").exists() else []
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise TimeoutError(f"{workdir} never reached step {step}")


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_validation_loss_falls_on_c4(shared_data, tmp_path):
    cfg = PRESETS["tiny-S"]  # the T5 vocabulary: 32128 ids
    dc = DataConfig(source=f"c4:{shared_data / 'c4' / 'en'}",
                    vocab=f"t5:{shared_data / 't5' / 'sentencepiece.model'}",
                    inputs_length=64, targets_length=16, batch_size=8)
    tc = TrainConfig(steps=100, eval_every=50, warmup_steps=10, save_every=100)
    summary = train(cfg, tc, dc, tmp_path / "w", seed=0, progress=False)
    evals = train_records(tmp_path / "w", "eval")
    print("eval loss by step:", [(r["step"], round(r["eval_loss"], 3)) for r in evals],
          "accuracy:", round(summary["eval_accuracy"], 3))
    assert [r["step"] for r in evals] == [0, 50, 100]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 2.0  # from ~ln(32128)=10.4
    assert summary["eval_accuracy"] > 0.05 and summary["flops"] > 0 and summary["tokens"] > 0


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_identical_record_for_record(
        shared_data, tmp_path):
    # Two kills: one before the first checkpoint (it used to leave the step-0 evaluation
    # twice), one at a random step and a random moment within it, saves included.
    rng = np.random.default_rng(int(time.time()))
    seed = int(rng.integers(2**31))
    rng = np.random.default_rng(seed)
    args = ["train", "--steps", "40", "--save-every", "5", "--eval-every", "10",
            "--eval-batches", "2", *c4_args(shared_data)]
    straight = subprocess.run([DEEPFUSION, *args, "--workdir", tmp_path / "straight"],
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr

    crashed = tmp_path / "crashed"
    for low, high in ((1, 4), (6, 36)):
        proc = subprocess.Popen([DEEPFUSION, *args, "--workdir", crashed],
                                stderr=subprocess.PIPE, text=True)
        wait_for_step(crashed, int(rng.integers(low, high + 1)), proc)
        time.sleep(float(rng.uniform(0, 0.3)))
        proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}"
    # Saves are asynchronous: a kill just after a save began leaves only the ones before it.
    committed = [int(p.name) for p in (crashed / "checkpoints").glob("*") if p.name.isdigit()]
    # The last run streams its batches from seqio, skipping those already trained on; the
    # others read them from the batch cache: the same batches either way.
    resumed = subprocess.run([DEEPFUSION, *args, "--workdir", crashed], capture_output=True,
                             text=True, timeout=300,
                             env={**os.environ, "DEEPFUSION_TRAIN_CACHE_MB": "0"})
    assert resumed.returncode == 0, resumed.stderr
    if committed:
        assert f"from step {max(committed)}\n" in resumed.stderr, f"seed {seed}"
    else:  # killed before the first save was on disk: it starts again
        assert "resuming" not in resumed.stderr, f"seed {seed}"
    _, want = load_model(tmp_path / "straight")
    _, got = load_model(crashed)
    assert leaves_equal(got, want), f"seed {seed}"
    # The metrics describe one uninterrupted run: the records lost with a crash were dropped.
    assert _metric_values(crashed) == _metric_values(tmp_path / "straight"), f"seed {seed}"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step(shared_data, tmp_path):
    workdir = tmp_path / "w"
    proc = subprocess.Popen([DEEPFUSION, "train", "--steps", "400", "--save-every", "1000",
                             "--workdir", workdir, *c4_args(shared_data)],
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(workdir, 7, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    last = train_records(workdir)[-1]["step"]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [last] and last >= 7




def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no documents"),
    ("vocab", "vocab_size"),
    ("mesh", "needs 3 devices"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(shared_data, tmp_path, case, message):
    c4 = shared_data / "c4" / "en"
    args = {"missing": ["--data", f"c4:{tmp_path / 'nowhere'}"],
            "empty": ["--data", f"c4:{tmp_path / 'empty'}"],
            "vocab": ["--data", f"c4:{c4}", "--vocab", f"t5:{shared_data / 't5' / 'sentencepiece.model'}",
                      "--model", tmp_path / "small-vocab"],
            "mesh": ["--mesh", "data=3,model=1"]}[case]
    if case == "empty":
        import gzip
        (tmp_path / "empty").mkdir()
        for name in ("c4-train.00000-of-00001.json.gz", "c4-validation.00000-of-00001.json.gz"):
            with gzip.open(tmp_path / "empty" / name, "wt"):
                pass
    if case == "vocab":
        from deepfusion_core import init_params, save_model
        small = PRESETS["tiny-S"].model_copy(update={"vocab_size": 384})
        save_model(tmp_path / "small-vocab", small, jax.tree.map(np.asarray, init_params(small)))
    result = invoke("train", "--steps", "5", "--workdir", tmp_path / "work",
                    *(["--model", "tiny-S"] if "--model" not in args else []), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("shape, batch, message", [
    ((2, 4), 8, "num_heads=2 is not divisible by mesh model=4"),
    ((8, 1), 4, "batch size 4 is not divisible by mesh data=8"),
    ((4, 4), 8, "needs 16 devices, but 8 are available"),
])
def test_mesh_must_divide_devices_batch_and_model(shape, batch, message):
    from deepfusion_core.sharding import MeshError, check_mesh
    with pytest.raises(MeshError, match=message):
        check_mesh(shape, PRESETS["tiny-S"], batch, devices=8)


def test_a_relative_workdir_trains_and_checkpoints(tmp_path, monkeypatch):
    # `deepfusion run` and `make run` use the relative runs/; Orbax's async writers refused
    # relative paths, failing in a background thread at the first save.
    monkeypatch.chdir(tmp_path)
    dc = DataConfig(source="builtin", vocab="byte", inputs_length=32, targets_length=8,
                    batch_size=2)
    train(PRESETS["tiny-S"].model_copy(update={"vocab_size": 384}),
          TrainConfig(steps=2, save_every=1, warmup_steps=1), dc, Path("w"), seed=0, progress=False)
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir()) == ["1", "2"]
    assert load_model("w")[1] is not None


SMALL_DATA = DataConfig(source="builtin", vocab="byte", inputs_length=32, targets_length=8,
                        batch_size=2)
SMALL_TRAIN = TrainConfig(steps=6, save_every=2, eval_every=2, eval_batches=1, warmup_steps=1)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted SMALL_TRAIN run, the reference the crash tests compare with."""
    workdir = tmp_path_factory.mktemp("straight") / "w"
    train(PRESETS["tiny-S"], SMALL_TRAIN, SMALL_DATA, workdir, seed=0, progress=False)
    return workdir


def test_a_non_finite_loss_fails_the_run_at_its_step_and_saves_nothing_of_it(tmp_path):
    # A learning rate of 1e30 is finite (the stages schema lets it through) but blows the
    # parameters up within a few steps: the run must stop, never save or log a NaN.
    tc = TrainConfig(steps=12, save_every=1, warmup_steps=1, learning_rate=1e30,
                     grad_clip=None)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step") as info:
        train(PRESETS["tiny-S"], tc, SMALL_DATA, tmp_path / "w", seed=0, progress=False)
    failed_step = int(str(info.value).split("step ")[1].split(":")[0])
    records = read_metrics(tmp_path / "w" / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, failed_step))
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    steps = sorted(int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert steps and steps[-1] == failed_step - 1
    params = load_model(tmp_path / "w")[1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_sigterm_right_after_a_regular_save_stops_cleanly_and_resumes_bit_identically(
        tmp_path, monkeypatch, straight_run):
    # The stop's own save used to collide with the regular save of the same step
    # (StepAlreadyExistsError), failing a cancelled node instead of stopping it.
    from deepfusion_core import train as train_module
    from deepfusion_core.preemption import Preempted

    real_save = train_module.train_checkpoint.save

    def save_then_sigterm(manager, step, *args, **kwargs):
        real_save(manager, step, *args, **kwargs)
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # lands before the loop checks for a stop

    monkeypatch.setattr(train_module.train_checkpoint, "save", save_then_sigterm)
    with pytest.raises(Preempted, match="at step 2"):
        train(PRESETS["tiny-S"], SMALL_TRAIN, SMALL_DATA, tmp_path / "stopped", seed=0,
              progress=False)
    monkeypatch.setattr(train_module.train_checkpoint, "save", real_save)
    train(PRESETS["tiny-S"], SMALL_TRAIN, SMALL_DATA, tmp_path / "stopped", seed=0, progress=False)
    assert leaves_equal(load_model(tmp_path / "stopped")[1], load_model(straight_run)[1])


STOP_TRAIN = SMALL_TRAIN.model_copy(update={"steps": 48, "eval_every": 8})


def test_sigterm_at_twenty_moments_always_checkpoints_and_resumes_bit_identically(
        tmp_path, monkeypatch):
    # Real SIGTERMs to this process, handled by train(): right after a regular save, right
    # before one, from another thread at a random moment of a random step (in a step, an
    # evaluation or an asynchronous save in flight), and while restoring, before the loop.
    from deepfusion_core import train as train_module
    from deepfusion_core.preemption import Preempted

    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    real_save = train_module.train_checkpoint.save
    plan = {}  # this round: {"mode": ..., "step": ...}

    def save_with_stop(manager, step, *args, **kwargs):
        if plan.get("mode") == "before save" and step >= plan["step"]:
            signal.raise_signal(signal.SIGTERM)
        real_save(manager, step, *args, **kwargs)
        if plan.get("mode") == "after save" and step >= plan["step"]:
            signal.raise_signal(signal.SIGTERM)

    def stop_later(workdir, step, delay, done):
        while not done.is_set():
            records = train_records(workdir) if (workdir / "metrics.jsonl").exists() else []
            if records and records[-1]["step"] >= step:
                time.sleep(delay)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.002)

    real_restore = train_module.train_checkpoint.restore_latest

    def restore_with_stop(*args, **kwargs):
        if plan.get("mode") == "restoring":
            signal.raise_signal(signal.SIGTERM)
        return real_restore(*args, **kwargs)

    monkeypatch.setattr(train_module.train_checkpoint, "save", save_with_stop)
    monkeypatch.setattr(train_module.train_checkpoint, "restore_latest", restore_with_stop)
    workdir, stops, done = tmp_path / "w", [], threading.Event()
    for i in range(20):  # each of the four kinds of moment five times
        start = stops[-1] if stops else 0
        step = start + 1 + int(rng.integers(0, 2))
        plan.update(mode=("after save", "before save", "thread", "restoring")[i % 4], step=step)
        thread = None
        if plan["mode"] == "thread":
            done.clear()
            thread = threading.Thread(target=stop_later, daemon=True,
                                      args=(workdir, step, float(rng.uniform(0, 0.05)), done))
            thread.start()
        with pytest.raises(Preempted) as stopped:
            train(PRESETS["tiny-S"], STOP_TRAIN, SMALL_DATA, workdir, seed=0, progress=False,
                  log=lambda _: None)
        done.set()
        stop = stopped.value.step
        assert stopped.value.signum == signal.SIGTERM  # the CLI exits 128 + 15 = 143
        steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
        logged = [r["step"] for r in train_records(workdir)] or [0]
        assert max(steps) == stop == logged[-1], (seed, i, plan)
        stops.append(stop)
    plan.clear()
    train(PRESETS["tiny-S"], STOP_TRAIN, SMALL_DATA, workdir, seed=0, progress=False)
    reference = tmp_path / "straight"
    train(PRESETS["tiny-S"], STOP_TRAIN, SMALL_DATA, reference, seed=0, progress=False)
    assert stops[-1] < STOP_TRAIN.steps, stops
    assert leaves_equal(load_model(workdir)[1], load_model(reference)[1]), seed
    assert _metric_values(workdir) == _metric_values(reference), seed


def _metric_values(workdir):
    """The records of metrics.jsonl without their timings (which differ run to run) and the
    summary's first_step (where this invocation resumed)."""
    timing = {"step_time_s", "tokens_per_s", "flops_per_s", "wall_s", "device_s", "run_wall_s",
              "first_step"}
    return [{k: v for k, v in r.items() if k not in timing}
            for r in read_metrics(Path(workdir) / "metrics.jsonl")]


@pytest.mark.parametrize("crash_at_save, save_lands", [(1, False), (3, True)])
def test_metrics_hold_each_record_once_after_a_crash(tmp_path, monkeypatch, crash_at_save,
                                                     save_lands, straight_run):
    # A crash before the first checkpoint left the step-0 evaluation twice; one after the
    # final save (before DONE) logged the final evaluation again on the rerun.
    from deepfusion_core import train as train_module

    real_save, saves = train_module.train_checkpoint.save, []

    def crash_at_nth_save(*args, **kwargs):
        saves.append(1)
        if len(saves) == crash_at_save:
            if save_lands:
                real_save(*args, **kwargs)
                args[0].wait_until_finished()
            raise SystemExit("killed")
        real_save(*args, **kwargs)

    monkeypatch.setattr(train_module.train_checkpoint, "save", crash_at_nth_save)
    with pytest.raises(SystemExit):
        train(PRESETS["tiny-S"], SMALL_TRAIN, SMALL_DATA, tmp_path / "crashed", seed=0,
              progress=False)
    monkeypatch.setattr(train_module.train_checkpoint, "save", real_save)
    train(PRESETS["tiny-S"], SMALL_TRAIN, SMALL_DATA, tmp_path / "crashed", seed=0, progress=False)
    assert _metric_values(tmp_path / "crashed") == _metric_values(straight_run)


def test_without_a_bar_progress_is_logged_as_lines(tmp_path):
    said = []
    tc = SMALL_TRAIN.model_copy(update={"log_every": 3})
    train(PRESETS["tiny-S"], tc, SMALL_DATA, tmp_path / "w", seed=0, progress=False,
          log=said.append)
    number = r"\d+\.\d{4}"
    eval_line = rf"eval at step (\d+): loss {number} \(summed per sequence \d+\.\d\d\), " \
                rf"accuracy {number}"
    step_line = rf"step (\d+)/6: loss {number}, [\d,]+ tokens/s, ETA (\d+h)?(\d+m)?\d+s"
    kinds = []
    for line in said:
        for kind, pattern in (("eval", eval_line), ("step", step_line),
                              ("save", r"saving the checkpoint of step (\d+)")):
            if match := re.fullmatch(pattern, line):
                kinds.append((kind, int(match[1])))
                break
        else:
            pytest.fail(f"unexpected line {line!r}")
    assert kinds == [("eval", 0), ("eval", 2), ("save", 2), ("step", 3), ("eval", 4),
                     ("save", 4), ("step", 6), ("eval", 6), ("save", 6)]
    said.clear()  # with a progress bar, no lines: the bar shows them
    train(PRESETS["tiny-S"], tc.model_copy(update={"steps": 8}), SMALL_DATA, tmp_path / "w",
          seed=0, progress=True, log=said.append)
    assert said == [f"resuming {tmp_path / 'w'} from step 6"]
