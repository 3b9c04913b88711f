"""One writer per node, with real processes: concurrent `run-node`, `run` and `flow` on one
node train it once, a dead holder's lock is taken over, and the result is a single writer's."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import psutil
import pytest
import yaml
from typer.testing import CliRunner

from deepfusion_cli.main import app
from deepfusion_core import load_model, workdir_lock
from deepfusion_core.metrics import read_metrics
from pipeline.execute import run_job
from pipeline.plan import build_plan
from pipeline.workdir import Workdir

REPO = Path(__file__).resolve().parents[1]
DEEPFUSION = str(Path(sys.executable).parent / "deepfusion")
# The smoke profile's S1 with a checkpoint halfway, to kill its writer after it.
TRAIN = {"steps": 24, "save_every": 12, "eval_every": 12}
WALL_TIME = {"step_time_s", "tokens_per_s", "flops_per_s", "wall_s", "device_s"}


def test_train_into_a_workdir_in_use_refuses_naming_the_holder(tmp_path):
    workdir = tmp_path / "w"
    held, release = threading.Event(), threading.Event()

    def holder():  # another thread: its own open file, so the lock is not re-entered
        with workdir_lock.hold(workdir, "w", wait=False):
            held.set()
            release.wait(60)
    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(60)
    try:
        result = CliRunner().invoke(app, ["train", "--workdir", str(workdir), "--steps", "1",
                                          "--model", "tiny-S", "--no-progress"])
    finally:
        release.set()
        thread.join()
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0
    assert (f"workdir {workdir} is in use (pid {os.getpid()} on {socket.gethostname()} "
            f"since ") in result.output
    assert [p.name for p in workdir.iterdir()] == [".lock"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> Path:
    raw = yaml.safe_load((REPO / "stages.yaml").read_text())
    raw["profiles"]["smoke"]["train"].update(TRAIN)
    path = tmp_path_factory.mktemp("stages") / "stages.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def single_writer(stages, tmp_path_factory):
    """S1 trained by one uninterrupted writer: (params, metrics records without wall time)."""
    plan = build_plan(stages, "smoke", tmp_path_factory.mktemp("runs"))
    run_job(plan.job("S1"), log=lambda m: None)
    return outcome(plan.nodes["S1"].dir)


def outcome(node_dir: Path, drop=()):
    params = load_model(node_dir)[1]
    records = [{k: v for k, v in r.items() if k not in WALL_TIME | set(drop)}
               for r in read_metrics(node_dir / "metrics.jsonl")]
    return params, records


def assert_single_writers_result(node_dir: Path, single_writer, drop=()):
    """DONE, no FAILED, no temporary leftovers, params and metrics equal to one writer's."""
    assert Workdir(node_dir).is_done() and not (node_dir / "FAILED").exists()
    leftovers = [p for p in node_dir.rglob("*") if "tmp" in p.name or p.name == ".extending"]
    assert not leftovers, leftovers
    params, records = outcome(node_dir, drop)
    expected_params, expected = single_writer
    assert records == [{k: v for k, v in r.items() if k not in drop} for r in expected]
    assert all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(expected_params), strict=True))


STARTED: list[int] = []  # pids to kill if a test fails (a stopped holder would stay)


@pytest.fixture(autouse=True)
def kill_leftovers():
    yield
    for pid in STARTED:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    STARTED.clear()


def start(log: Path, *args, env=None, cwd=None) -> subprocess.Popen:
    """A `deepfusion` command whose output goes to `log` (read while it runs)."""
    proc = subprocess.Popen([DEEPFUSION, *map(str, args)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, cwd=cwd)
    proc.log = log
    STARTED.append(proc.pid)
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def finish(proc: subprocess.Popen, timeout=300) -> str:
    assert proc.wait(timeout) == 0, output(proc)
    return output(proc)


def wait_until(condition, procs, timeout=180) -> None:
    """Poll `condition` while every process of `procs` runs."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out:\n" + "\n".join(map(output, procs))
        assert all(p.poll() is None for p in procs), "\n".join(map(output, procs))
        time.sleep(0.02)


def lock_holder(node_dir: Path, procs) -> int:
    """The pid named in the node's lock file once one of the writers `procs` has taken it,
    stopped (SIGSTOP) at once: a slow holder, so that the others arrive while it holds."""
    def holder() -> str:
        return (node_dir / ".lock").read_text() if (node_dir / ".lock").exists() else ""
    wait_until(lambda: holder().startswith("pid "), procs)
    pid = int(holder().split()[1])
    os.kill(pid, signal.SIGSTOP)
    return pid


def holder_line(pid: int) -> str:
    return f"waiting for S1: held by pid {pid} on {socket.gethostname()} since "


@pytest.mark.slow
def test_hostile_writers_take_turns_and_a_dead_holder_is_taken_over(stages, single_writer,
                                                                    tmp_path):
    # Found by a hostile user: `run-node S1` twice and `run --node S1`, all at once.
    common = [stages, "--profile", "smoke", "--runs-dir", tmp_path]
    writers = [start(tmp_path / "a.log", "run-node", "S1", *common),
               start(tmp_path / "b.log", "run-node", "S1", *common),
               start(tmp_path / "c.log", "run", *common, "--node", "S1", "--no-progress")]
    node_dir = build_plan(stages, "smoke", tmp_path).nodes["S1"].dir
    pid = lock_holder(node_dir, writers)
    (holder,) = (w for w in writers if w.pid == pid)
    others = [w for w in writers if w is not holder]
    wait_until(lambda: all("waiting for S1" in output(w) for w in others), writers)
    os.kill(pid, signal.SIGCONT)
    wait_until(lambda: (Workdir(node_dir).latest_checkpoint_step() or 0) >= TRAIN["save_every"],
               writers)
    holder.kill()  # SIGKILL mid-training: no handler runs, the kernel drops the lock
    assert holder.wait() == -signal.SIGKILL and not Workdir(node_dir).is_done()
    outputs = [finish(w) for w in others]
    for out in outputs:  # each named the holder, once
        assert out.count("waiting for S1") == 1 and holder_line(pid) in out, out
    # One took the dead holder's node over and resumed it; the other then found it done.
    assert sorted("resuming" in out for out in outputs) == [False, True], outputs
    assert any("finished by another writer meanwhile" in out for out in outputs), outputs
    train = [r for r in read_metrics(node_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, TRAIN["steps"] + 1))
    # A resumed run's summary counts its own first step; everything else is bit for bit.
    assert_single_writers_result(node_dir, single_writer, drop={"first_step"})


def node_process(runs: Path, procs) -> psutil.Process:
    """The `run-job` process a flow started for a node in `runs`."""
    found = []

    def started() -> bool:
        found.extend(p for p in psutil.process_iter(["cmdline"])
                     if "run-job" in (cmd := p.info["cmdline"] or [])
                     and any(arg.startswith(f"{runs}/") for arg in cmd))
        return bool(found)
    wait_until(started, procs)
    STARTED.append(found[0].pid)
    return found[0]


@pytest.mark.slow
def test_a_flow_beside_a_run_trains_the_node_once(stages, single_writer, tmp_path):
    runs = (tmp_path / "runs").resolve()
    common = [stages, "--profile", "smoke", "--runs-dir", runs]
    # A temporary server, given time to start on a busy machine (Prefect's default is 20 s).
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    flow = start(tmp_path / "flow.log", "flow", *common, "--node", "S1", env=env, cwd=tmp_path)
    flow_node = node_process(runs, [flow])  # the flow's task starts S1's job: run now
    run = start(tmp_path / "run.log", "run", *common, "--node", "S1", "--no-progress")
    node_dir = build_plan(stages, "smoke", runs).nodes["S1"].dir
    pid = lock_holder(node_dir, [flow, run])
    assert pid in (run.pid, flow_node.pid)
    waiter = flow if pid == run.pid else run
    wait_until(lambda: "waiting for S1" in output(waiter), [flow, run])
    os.kill(pid, signal.SIGCONT)
    outputs = finish(run) + finish(flow)
    assert holder_line(pid) in output(waiter), outputs
    assert "finished by another writer meanwhile" in output(waiter), outputs
    assert_single_writers_result(node_dir, single_writer)
    assert (runs / "six-settings" / "report" / "smoke" / "report.md").is_file()


def test_force_does_not_set_aside_a_node_another_writer_holds(tmp_path):
    node = tmp_path / "S1-abc"
    node.mkdir()
    with workdir_lock.hold(node, "node S1", wait=False):
        with pytest.raises(workdir_lock.LockedError, match="in use"):
            Workdir(node).set_aside()
        assert node.is_dir()
    Workdir(node).set_aside()
    assert [p.name.split(".replaced-")[0] for p in tmp_path.iterdir()] == ["S1-abc"]
