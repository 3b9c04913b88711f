"""A train node as several JAX processes (jax.distributed on one machine, gloo collectives).

Real processes throughout: `deepfusion run-node` of a profile with `processes: 2` launches two
JAX processes of 4 CPU devices each, forming the same 8-device mesh as one process of 8
devices, and computing the same losses as one process of one device.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import psutil
import pytest

from deepfusion_core import load_model
from deepfusion_core.metrics import read_metrics
from deepfusion_core.train import train
from pipeline.job import read_job

DEEPFUSION = str(Path(sys.executable).parent / "deepfusion")
EIGHT_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
ARGS = ["--model", "tiny-S", "--data", "builtin", "--vocab", "byte", "--batch", "8",
        "--inputs-length", "32", "--targets-length", "8", "--mesh", "data=4,model=2", "--warmup", "2", "--no-progress"]


def deepfusion(*args, env=EIGHT_DEVICES, timeout=300):
    return subprocess.run([DEEPFUSION, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def losses(workdir):
    return [r["loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")
            if r["kind"] == "train"]


STAGES = """
name: two-hosts
default_profile: p
profiles:
  p:
    models: {S: tiny-S, M: tiny-M, L: tiny-L}
    data: {source: builtin, vocab: byte, inputs_length: 32, targets_length: 8, batch_size: 8}
    train: {steps: 8, warmup_steps: 2, save_every: 2}
    mesh: data=4,model=2
    processes: 2
nodes:
  S1: {train: S, seed: 1}
"""


@pytest.mark.slow
def test_a_two_process_node_killed_and_resumed_computes_what_one_device_does(tmp_path):
    # `run-node` of a profile with `processes: 2` launches two JAX processes of 4 CPU devices
    # each (one 8-device mesh). One of them is killed -9 once checkpoint 2 exists; the rerun
    # resumes it. The reference is ONE device in this test's process: the interrupted
    # 8-device run must compute what no sharding at all computes.
    stages = tmp_path / "stages.yaml"
    stages.write_text(STAGES)
    runs = tmp_path / "runs"
    launcher = subprocess.Popen([DEEPFUSION, "run-node", "S1", stages, "--runs-dir", runs],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=EIGHT_DEVICES)
    deadline = time.time() + 240
    while not list(runs.glob("two-hosts/nodes/S1-*/checkpoints/2")):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.05)
    (node_dir,) = (runs / "two-hosts" / "nodes").iterdir()
    workers = psutil.Process(launcher.pid).children()
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0  # the launcher stops the survivor and reports the failure
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert not (node_dir / "DONE").exists()

    resumed = deepfusion("run-node", "S1", stages, "--runs-dir", runs)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert len(resumed.stdout.strip().splitlines()) == 1  # one summary: only process 0 writes
    summary = json.loads(resumed.stdout)
    assert summary["node"] == "S1" and summary["devices"] == 8 and summary["step"] == 8
    assert 2 <= summary["first_step"] < 8 and (node_dir / "DONE").exists()

    job = read_job(node_dir)
    one = tmp_path / "one"
    train(job.model, job.train.model_copy(update={"mesh": "data=1,model=1"}), job.data, one,
          seed=job.seed, progress=False, log=lambda _: None)
    # Float32 sums in another order across devices: equal within rounding, not in every bit
    # (bit-identical resume on one process: test_train).
    np.testing.assert_allclose(losses(node_dir), losses(one), rtol=0, atol=1e-5)
    for got, want in zip(jax.tree.leaves(load_model(node_dir)[1]),
                         jax.tree.leaves(load_model(one)[1])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra,message", [
    (["--processes", "3"],
     "--processes 3 does not divide the 8 devices of this machine (XLA_FLAGS device count)"),
    (["--processes", "4", "--batch", "6"], "--processes 4 does not divide the batch size 6"),
])
def test_processes_that_do_not_divide_are_one_line_exit_2(tmp_path, extra, message):
    result = deepfusion("train", "--steps", "2", *ARGS, *extra, "--workdir", tmp_path / "w")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "w").exists()


def test_a_coordinator_that_never_answers_times_out_with_a_clear_error(tmp_path):
    env = {**EIGHT_DEVICES, "DEEPFUSION_COORDINATOR": "127.0.0.1:1",
           "DEEPFUSION_NUM_PROCESSES": "2", "DEEPFUSION_PROCESS_ID": "1",
           "DEEPFUSION_COORDINATOR_TIMEOUT_S": "3"}
    start = time.monotonic()
    result = deepfusion("train", "--steps", "2", *ARGS, "--workdir", tmp_path / "w", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: coordinator 127.0.0.1:1 did not answer within 3 s "
        "(DEEPFUSION_COORDINATOR_TIMEOUT_S)"]
    assert time.monotonic() - start < 30  # the timeout, plus start-up; no hang
    assert not (tmp_path / "w").exists()


def test_the_device_count_is_kept_per_boot_and_environment(tmp_path):
    # In fresh processes, as `deepfusion plan` counts: the first counts with JAX and keeps it.
    def count(**env):
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from deepfusion_core.distributed import "
             "devices_here; print(devices_here(1), 'jax' in sys.modules)"],
            env={**os.environ, "DEEPFUSION_CACHE_DIR": str(tmp_path), **env},
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        devices, jax_imported = result.stdout.split()
        return int(devices), jax_imported == "True"

    assert count() == (jax.device_count(), True)
    (kept,) = tmp_path.iterdir()
    assert json.loads(kept.read_text()) == {"devices": jax.device_count()}
    kept.write_text('{"devices": 3}')  # read back, JAX never imported
    assert count() == (3, False)
    for bad in ('{"devices": 0}', '{"devices": true}', "\x00garbage"):
        kept.write_text(bad)  # counted again and rewritten
        assert count() == (jax.device_count(), True)
        assert json.loads(kept.read_text()) == {"devices": jax.device_count()}
    assert count(XLA_FLAGS="--xla_force_host_platform_device_count=8") == (8, True)
    assert len(list(tmp_path.iterdir())) == 2  # another environment, an entry of its own
