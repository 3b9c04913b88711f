"""The staged-growth flow end to end against a real `prefect server start`: deployment,
worker, task runs per node, artifacts, cached reruns, crash-resume, cancellation, the worker's
death, bad input."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from deepfusion_core.metrics import read_metrics
from pipeline.plan import build_plan
from pipeline.workdir import Workdir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(prefect) -> subprocess.Popen:
    """A `prefect worker start` on the `local` pool (the fixture stops every one at the end)."""
    worker = subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", "local"],
                              env=prefect["env"], cwd=prefect["checkout"],
                              stdout=(prefect["logs"] / "worker.log").open("a"),
                              stderr=subprocess.STDOUT)
    prefect["workers"].append(worker)
    return worker


def readme_prefect_commands() -> list[str]:
    """The command lines of README's Prefect section, in order, without their comments."""
    section = (REPO / "README.md").read_text().split("\n## Prefect: ", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split(" #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def wait_healthy(api: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline and server.poll() is None, log.read_text()
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """README's Prefect section, each command as written and in order (on a free port instead
    of 4200), in a copy of this checkout beside its `.venv`, so that the runs it starts write
    there: a server, the `local` process pool, the deployments, a worker
    (`prefect["workers"][-1]`; a test that kills it starts the next one), and a tiny run,
    cancelled at once."""
    home = tmp_path_factory.mktemp("prefect-home")
    checkout = tmp_path_factory.mktemp("checkout") / "deepfusion"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info"))
    (checkout / ".venv").symlink_to(REPO / ".venv")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    logs = home / "logs"
    logs.mkdir()
    prefect = {"api": api, "env": env, "logs": logs, "workers": [], "checkout": checkout}
    background = []
    try:
        commands = readme_prefect_commands()
        assert commands[0] == "source .venv/bin/activate", commands
        for command in commands[1:]:
            if command.startswith("export "):
                name, value = command.removeprefix("export ").split("=", 1)
                env[name] = value.replace(":4200", f":{port}")
                continue
            shell = ["bash", "-c", f"source .venv/bin/activate && exec {command}"]
            if command.startswith(("prefect server start", "prefect worker start")):
                log = logs / ("server.log" if "server" in command else "worker.log")
                proc = subprocess.Popen(shell, env=env, cwd=checkout, stdout=log.open("a"),
                                        stderr=subprocess.STDOUT)
                (background if "server" in command else prefect["workers"]).append(proc)
                if "server" in command:
                    wait_healthy(api, proc, log)
                continue
            proc = subprocess.run(shell, env=env, cwd=checkout, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, f"{command}: {proc.stdout}{proc.stderr}"
            if command.startswith("prefect deployment run"):
                run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout).group(1)
                # Cancel once the flow runs: a cancel that lands while the flow process is
                # still starting makes Prefect's engine exit on `UnfinishedRun` and leaves the
                # run Cancelling for good (a Prefect race, not ours to test here).
                wait_run(prefect, run_id, timeout=180, until=("RUNNING", *TERMINAL))
                api_post(prefect, f"/flow_runs/{run_id}/set_state",
                         {"state": {"type": "CANCELLING"}, "force": True})
                assert wait_run(prefect, run_id, timeout=180)["state_type"] == "CANCELLED"
        assert env["PREFECT_API_URL"] == api and len(background) == len(prefect["workers"]) == 1
        yield prefect
    finally:
        for proc in (*prefect["workers"], *background):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def api_post(prefect, path, body):
    response = httpx.post(f"{prefect['api']}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def run_artifact(prefect, run_id, key) -> dict:
    """The artifact `key` of flow run `run_id`, as the API stores it."""
    [artifact] = api_post(prefect, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}},
                                                         "flow_runs": {"id": {"any_": [run_id]}}})
    return artifact


def flow_run(prefect, run_id):
    return httpx.get(f"{prefect['api']}/flow_runs/{run_id}", timeout=30).json()


def start_run(prefect, deployment, **params) -> str:
    """`prefect deployment run` as a user types it; returns the flow run id."""
    proc = subprocess.run([BIN / "prefect", "deployment", "run", f"staged-growth/{deployment}",
                           "--params", json.dumps(params)], env=prefect["env"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout).group(1)


def wait_run(prefect, run_id, timeout=900, until=TERMINAL) -> dict:
    """The flow run once its state type is one of `until` (by default, once it has ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = flow_run(prefect, run_id)
        if run["state_type"] in until:
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} did not finish; worker log:\n"
                       + (prefect["logs"] / "worker.log").read_text()[-3000:])


def task_runs(prefect, run_id) -> dict[str, dict]:
    runs = api_post(prefect, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return {r["name"]: r for r in runs}


def task_states(prefect, task_run_id) -> list[dict]:
    """A task run's states, oldest first."""
    states = httpx.get(f"{prefect['api']}/task_run_states/",
                       params={"task_run_id": task_run_id}, timeout=30).json()
    return sorted(states, key=lambda state: state["timestamp"])


def run_logs(prefect, run_id) -> str:
    logs = api_post(prefect, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
    return "\n".join(entry["message"] for entry in logs)


def logged(prefect, run_id, text: str, timeout=60) -> bool:
    """Whether `text` reaches the run's logs. The flow process ships logs in batches from a
    background thread, so its last lines can arrive after the run's final state: poll."""
    deadline = time.time() + timeout
    while text not in run_logs(prefect, run_id):
        if time.time() > deadline:
            return False
        time.sleep(0.5)
    return True


def long_stages(tmp_path, **train) -> Path:
    raw = yaml.safe_load((REPO / "stages.yaml").read_text())
    raw["profiles"]["smoke"]["train"].update(train)
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def wait_for_node(node_dir: Path, step: int, checkpoint: int = 0, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        train = [r for r in read_metrics(node_dir / "metrics.jsonl") if r["kind"] == "train"]
        if train and train[-1]["step"] >= step and (Workdir(node_dir).latest_checkpoint_step() or 0) >= checkpoint:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{node_dir} did not reach step {step}")


def node_processes(node: str, runs: Path) -> list[psutil.Process]:
    """This test's `run-job` processes of `node` (others may be running the same node)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "run-job" in cmd and any(arg.startswith(f"{runs}/") and
                                    Path(arg).name.startswith(f"{node}-") for arg in cmd):
            found.append(p)
    return found


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running code (an exited orphan may wait a while as a zombie for init)."""
    alive = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def last_train_step(node_dir: Path) -> int:
    return [r for r in read_metrics(node_dir / "metrics.jsonl") if r["kind"] == "train"][-1]["step"]


def accelerator_slots_in_use(prefect) -> int:
    limits = api_post(prefect, "/v2/concurrency_limits/filter", {})
    return next(limit["active_slots"] for limit in limits if limit["name"] == "accelerator")


# Settings 1 and 4 (11 of the 23 nodes: every kind of node, fusion of fused models, the
# baseline the report needs). The whole DAG through Prefect took 7 of the suite's 15 minutes;
# tests/test_pipeline.py runs all 23 nodes in one process, and `deepfusion bench prefect`
# (BENCHMARKS.md) all 23 through Prefect.
SMOKE_NODES = ["L1", "L2"]  # S, M and L nodes; a fusion of two models and a self fusion


@pytest.fixture(scope="module")
def smoke(prefect, tmp_path_factory):
    """The smoke run of SMOKE_NODES, and the task states the API reported while it ran."""
    runs = tmp_path_factory.mktemp("runs")
    start = time.perf_counter()
    run_id = start_run(prefect, "six-settings-smoke", runs_dir=str(runs), nodes=SMOKE_NODES)
    seen, stop = [], threading.Event()

    def watch():
        while not stop.wait(0.3):
            seen.append({name: t["state_name"] for name, t in task_runs(prefect, run_id).items()})

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run = wait_run(prefect, run_id)
    finally:
        stop.set()
        watcher.join()
    return run_id, run, runs, time.perf_counter() - start, seen


def test_deployment_run_completes_every_node_as_a_task_run(prefect, smoke):
    run_id, run, runs, seconds, seen = smoke
    print(f"smoke DAG (settings 1 and 2) through Prefect: {seconds:.0f}s")
    assert run["state_type"] == "COMPLETED", run_logs(prefect, run_id)[-3000:]
    plan = build_plan(REPO / "stages.yaml", "smoke", runs)
    wanted = {n for node in SMOKE_NODES for n in plan.ancestry(node)}
    assert len(wanted) == 7
    tasks = task_runs(prefect, run_id)
    assert set(tasks) == wanted
    assert {t["state_type"] for t in tasks.values()} == {"COMPLETED"}
    assert "size:S" in tasks["S1"]["tags"] and "train" in tasks["S1"]["tags"]
    # The run says which pipeline and profile it is; its deployment explains its form.
    assert re.fullmatch(r"six-settings/smoke/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", run["name"])
    deployment = httpx.get(f"{prefect['api']}/deployments/{run['deployment_id']}",
                           timeout=30).json()
    assert {"six-settings", "smoke"} <= set(deployment["tags"])
    form = deployment["parameter_openapi_schema"]["properties"]
    assert form.keys() == {"stages", "profile", "nodes", "force", "runs_dir", "retries",
                           "accelerator_slots"}
    assert all(len(field.get("description", "")) > 20 for field in form.values()), form
    shipped = [name for path in sorted(REPO.glob("stages*.yaml"))
               for name in yaml.safe_load(path.read_text())["profiles"]]
    [choices] = [option["enum"] for option in form["profile"]["anyOf"] if "enum" in option]
    assert set(choices) == set(shipped) and len(choices) == len(set(shipped))
    assert deployment["enforce_parameter_schema"] is False  # another stages file, other profiles
    artifacts = {a["key"] for a in api_post(prefect, "/artifacts/filter",
                                            {"flow_runs": {"id": {"any_": [run_id]}}})}
    for name, node in plan.nodes.items():
        if name not in wanted:
            assert not node.dir.exists()  # nothing outside the requested nodes ran
            continue
        assert Workdir(node.dir).is_done()
        if node.kind == "train":
            assert {f"{name.lower()}-progress", f"{name.lower()}-metrics"} <= artifacts
            assert Workdir(node.dir).latest_checkpoint_step() == node.train.steps
    assert {"six-settings-report", "six-settings-report-md", "six-settings-curves"} <= artifacts
    # The run's result is persisted: the report's files and its settings table.
    stored = json.loads(Path(run["state"]["data"]["storage_key"]).read_text())
    assert stored["report"] == str(runs / "six-settings" / "report" / "smoke" / "report.md")
    table = json.loads(run_artifact(prefect, run_id, "six-settings-report")["data"])
    assert [r["setting"] for r in stored["settings"]] == [r["setting"] for r in table]
    assert set(stored["nodes"]) == wanted
    curves = run_artifact(prefect, run_id, "six-settings-curves")
    assert curves["type"] == "image" and curves["data"].startswith("data:image/png;base64,")
    [row] = json.loads(run_artifact(prefect, run_id, "s1-metrics")["data"])
    assert list(row) == ["node", "kind", "step", "accuracy %", "loss", "loss per sequence",
                         "FLOPs", "wall s"]
    report = runs / "six-settings" / "report" / "smoke"
    assert {"report.md", "settings.csv", "curves.png"} <= {p.name for p in report.iterdir()}
    # One slot, two roots: each node shows its wait for the slot as Prefect's own concurrency
    # state; its run time and its bar in the graph (start to end) count only its work.
    for name, t in tasks.items():
        states = task_states(prefect, t["id"])
        assert [s["name"] for s in states] == ["Pending", "Running", "AwaitingConcurrencySlot",
                                               "Running", "Completed"], name
        running = [(datetime.fromisoformat(a["timestamp"]), datetime.fromisoformat(b["timestamp"]))
                   for a, b in zip(states, states[1:]) if a["type"] == "RUNNING"]
        assert t["total_run_time"] == pytest.approx(
            sum((b - a).total_seconds() for a, b in running), abs=0.01), name
        start, end = datetime.fromisoformat(t["start_time"]), datetime.fromisoformat(t["end_time"])
        assert start == datetime.fromisoformat(states[3]["timestamp"]), name
        # The bar is the Running after the wait; the moment of Running before it (the task
        # asking for its slot, under 0.6 s here on a loaded machine) counts in the run time.
        last = running[-1][1] - running[-1][0]
        assert (end - start).total_seconds() == pytest.approx(last.total_seconds(), abs=0.01), name
        assert t["total_run_time"] - last.total_seconds() < 2, name
        # Its duration is its node's work, give or take the process start and the hand-over.
        work = Workdir(plan.nodes[name].dir).done_record().run_wall_s
        assert abs(t["total_run_time"] - work) < 5, (name, t["total_run_time"], work)
    # While S1, S2 and L1 were ready: one Running, the others waiting for the slot.
    assert any(list(states.values()).count("Running") == 1
               and list(states.values()).count("AwaitingConcurrencySlot") >= 1
               for states in seen), seen
    waits = [task_states(prefect, t["id"]) for t in tasks.values()]
    assert max((datetime.fromisoformat(s[3]["timestamp"])
                - datetime.fromisoformat(s[2]["timestamp"])).total_seconds() for s in waits) > 1
    nodes_progress = run_artifact(prefect, run_id, "six-settings-nodes")
    assert nodes_progress["data"] == 100.0
    assert nodes_progress["description"] == ("nodes: 0 computing, 0 waiting for a slot, "
                                             "7 done, 0 not done of 7")
    assert logged(prefect, run_id, "S1 computing; nodes: 1 computing, ")
    # One slot, handed over in order (not "S2 computing": a node's name ends in a digit).
    assert not re.search(r"nodes: [2-9] computing", run_logs(prefect, run_id))
    # Node output reaches the run logger: a train node's progress lines, without the noise of
    # the libraries under it (TensorFlow, absl, XLA's start-up, Orbax's routine waits).
    assert logged(prefect, run_id, "fused S1 + S2")
    assert logged(prefect, run_id, "step 8/8: loss ")
    # A train node's own task logs a progress line every log_every steps (1 of 8 here).
    s1_logs = "\n".join(entry["message"] for entry in api_post(
        prefect, "/logs/filter", {"logs": {"task_run_id": {"any_": [tasks["S1"]["id"]]}}}))
    for step in range(1, 9):
        assert re.search(rf"step {step}/8: loss \d+\.\d+, [\d,]+ tokens/s, ETA ", s1_logs), step
    # The report artifact's tables fit a page: at most 8 columns each.
    report_md = run_artifact(prefect, run_id, "six-settings-report-md")["data"]
    widths = [line.count("|") - 1 for line in report_md.splitlines() if line.startswith("|")]
    assert widths and max(widths) <= 8, widths
    logs = run_logs(prefect, run_id)
    for noise in ("absl", "cuda", "tensorflow", "Waiting for previous save", "oneDNN", "XLA"):
        assert noise.lower() not in logs.lower(), noise


def test_a_second_run_finds_every_node_cached(prefect, smoke):
    _, _, runs, _, _ = smoke
    start = time.perf_counter()
    run_id = start_run(prefect, "six-settings-smoke", runs_dir=str(runs), nodes=SMOKE_NODES)
    run = wait_run(prefect, run_id)
    print(f"fully cached rerun of the smoke DAG: {time.perf_counter() - start:.1f}s "
          f"(flow run {run['total_run_time']:.1f}s)")
    assert run["state_type"] == "COMPLETED"
    assert {t["state_name"] for t in task_runs(prefect, run_id).values()} == {"Cached"}


def test_force_recomputes_the_named_node_and_sets_its_old_directory_aside(prefect, smoke):
    _, _, runs, _, _ = smoke
    s1 = build_plan(REPO / "stages.yaml", "smoke", runs).nodes["S1"].dir
    old = Workdir(s1).done_record()
    run_id = start_run(prefect, "six-settings-smoke", runs_dir=str(runs), nodes=["S1"],
                       force=True)
    assert wait_run(prefect, run_id)["state_type"] == "COMPLETED", run_logs(prefect, run_id)[-3000:]
    assert task_runs(prefect, run_id)["S1"]["state_name"] == "Completed"  # not Cached
    [aside] = s1.parent.glob(f"{s1.name}.replaced-*")
    assert Workdir(aside).done_record() == old
    new = Workdir(s1).done_record()
    assert new.run_wall_s != old.run_wall_s and new.eval_loss == old.eval_loss  # rerun, same maths


def test_cancel_or_the_workers_sigkill_stops_the_node_at_a_checkpoint_and_a_rerun_resumes(
        prefect, tmp_path):
    """One node through three deployment runs: the first is cancelled, the second resumes it
    and loses its worker to SIGKILL, the third (on a new worker) resumes it and completes."""
    # No periodic save before the last step: each checkpoint found is the one a stop made. A
    # log line every step: the worker dies while the flow process forwards the node's lines.
    stages = long_stages(tmp_path, steps=200, eval_every=100, save_every=100000, log_every=1)
    runs = tmp_path / "runs"
    ma = build_plan(stages, "smoke", runs).nodes["Ma"]
    params = dict(stages=str(stages), nodes=["Ma"], runs_dir=str(runs))
    cancelled = start_run(prefect, "six-settings-smoke", **params)
    wait_for_node(ma.dir, step=20)
    # What `prefect flow-run cancel` sends, without its 4 s start-up (some 150 more steps).
    cancel = api_post(prefect, f"/flow_runs/{cancelled}/set_state",
                      {"state": {"type": "CANCELLING"}})
    assert cancel["status"] == "ACCEPT", cancel
    assert wait_run(prefect, cancelled, timeout=180)["state_type"] == "CANCELLED"
    deadline = time.time() + 120
    while node_processes("Ma", runs) and time.time() < deadline:
        time.sleep(0.5)
    assert not node_processes("Ma", runs)
    first_stop = last_train_step(ma.dir)
    assert 20 <= first_stop < 200 and Workdir(ma.dir).latest_checkpoint_step() == first_stop
    assert not Workdir(ma.dir).is_done()
    assert task_runs(prefect, cancelled)["Ma"]["state_type"] == "CANCELLED"
    assert accelerator_slots_in_use(prefect) == 0

    orphaned = start_run(prefect, "six-settings-smoke", **params)
    wait_for_node(ma.dir, step=first_stop + 10)
    worker = prefect["workers"][-1]
    flow_processes = [p for p in psutil.Process(worker.pid).children()
                      if "prefect.engine" in p.cmdline()]
    nodes = node_processes("Ma", runs)
    assert len(flow_processes) == 1 and len(nodes) == 1
    worker.kill()
    killed = time.perf_counter()
    start_worker(prefect)  # now, so that a failure below leaves the next tests a worker
    deadline = killed + 10
    while running(flow_processes + nodes) and time.perf_counter() < deadline:
        time.sleep(0.1)
    print(f"flow and node processes gone {time.perf_counter() - killed:.1f}s after the worker's "
          "SIGKILL")
    assert not running(flow_processes + nodes) and not node_processes("Ma", runs)
    second_stop = last_train_step(ma.dir)
    assert first_stop + 10 <= second_stop < 200
    assert Workdir(ma.dir).latest_checkpoint_step() == second_stop
    assert logged(prefect, orphaned, f"from step {first_stop}")  # it resumed the first stop
    assert wait_run(prefect, orphaned, timeout=30)["state_type"] == "CRASHED"
    assert task_runs(prefect, orphaned)["Ma"]["state_type"] == "CANCELLED"
    assert accelerator_slots_in_use(prefect) == 0  # released by the flow process on its way out

    completed = start_run(prefect, "six-settings-smoke", **params)
    assert wait_run(prefect, completed)["state_type"] == "COMPLETED", \
        run_logs(prefect, completed)[-3000:]
    assert task_runs(prefect, completed)["Ma"]["state_name"] == "Completed"
    assert Workdir(ma.dir).done_record().first_step == second_stop
    assert accelerator_slots_in_use(prefect) == 0


def test_the_glue_deployment_runs_fine_tune_nodes_as_tasks(prefect, shared_data, tmp_path):
    """stages_glue.yaml through its deployment: the same flow, a task per node, a fine-tune
    node among them (its GLUE scores in its task's logs, Table 3 in the report artifact)."""
    run_id = start_run(prefect, "glue-medium", stages=str(REPO / "stages_glue.yaml"),
                       profile="smoke", runs_dir=str(tmp_path / "runs"), nodes=["G_self_0"])
    run = wait_run(prefect, run_id, timeout=600)
    assert run["state_type"] == "COMPLETED", run_logs(prefect, run_id)[-3000:]
    tasks = task_runs(prefect, run_id)
    assert {n: t["state_name"] for n, t in tasks.items()} == {
        "S1": "Completed", "Mself_f": "Completed", "G_self_0": "Completed"}
    assert "finetune" in tasks["G_self_0"]["tags"]
    assert logged(prefect, run_id, "G_self_0: GLUE average"), run_logs(prefect, run_id)[-3000:]
    report = run_artifact(prefect, run_id, "glue-medium-report-md")["data"]
    assert "(the paper's Table 3)" in report and "| self-fusion | " in report


def test_a_bad_stages_file_fails_the_run_at_once_with_the_message(prefect, tmp_path):
    broken = REPO / "tests" / "stages_corpus" / "dangling_init.yaml"
    run_id = start_run(prefect, "six-settings-smoke", stages=str(broken),
                       runs_dir=str(tmp_path / "runs"))
    run = wait_run(prefect, run_id, timeout=300)
    assert run["state_type"] == "FAILED"
    assert logged(prefect, run_id, "nodes.M12.init: 'M99f' is not a node"), run_logs(prefect, run_id)
    assert task_runs(prefect, run_id) == {}
    assert not (tmp_path / "runs").exists()
