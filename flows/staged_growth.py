"""The `staged-growth` Prefect flow: one task run per node of the plan.

Thin by design: the plan, the node store and node execution come from `pipeline/`. The plan
is built once per flow run; each node's job is written into its directory and run as
`deepfusion run-job NODE_DIR` in its own process (device memory freed, an XLA crash fails one
task; no stages file read again), its output forwarded line by line to the Prefect run logger. Tasks are
submitted in topological order with their parents' futures as `wait_for`, so the UI draws the
DAG; a failed node leaves only its descendants NotReady. Nodes already DONE finish at once in
a `Cached` state. Running nodes hold a slot of the global concurrency limit `accelerator`.

Stopping: a node stopped by SIGTERM/SIGINT saves a checkpoint of its current step and its task
ends Cancelled (the next run resumes it). When the flow is interrupted (the worker's SIGTERM on
cancel, Ctrl-C) every running node is told to stop and no other starts; when the worker that
started the flow process dies, the flow process does the same to itself, so nothing trains on
as an orphan. A node whose flow process dies gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from collections import Counter
from typing import Annotated

from prefect import flow, get_run_logger, task
from pydantic import Field
from prefect.artifacts import (create_image_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import AwaitingConcurrencySlot, Cancelled, Completed, Running, State
from prefect.utilities.engine import emit_task_run_state_change_event

from deepfusion_core.metrics import TrainRecord
from deepfusion_core.processes import spawn
from pipeline.job import FuseJob, TrainJob, write_job
from pipeline.plan import build_plan
from pipeline.spec import load_stages
from pipeline.report import markdown_report, write_report
from pipeline.workdir import Workdir

def _shipped_profiles() -> list[str]:
    """The profiles of the stages files beside this project (deployment time): the run form's
    choices. A file that does not load adds none; running it fails with its problems."""
    profiles: dict[str, None] = {}
    for path in sorted(Path(__file__).resolve().parents[1].glob("stages*.yaml")):
        try:
            profiles.update(dict.fromkeys(load_stages(path).profiles))
        except (OSError, ValueError):
            pass
    return list(profiles)


# Offered as choices, not enforced by the schema (the deployments set enforce_parameter_schema
# false): a stages file passed as `stages` may define others, and the plan refuses an unknown
# profile with the list of the file's own.
Profile = Annotated[str, Field(json_schema_extra={"enum": _shipped_profiles()})]
ACCELERATOR_LIMIT = "accelerator"
# The server's shortest lease: a slot held by a flow process killed outright (no release) frees
# after about a minute (plus the repossessor's 15 s loop) instead of Prefect's default 5 minutes.
_LEASE_S = 60
# How a node stopped by a signal exits: 128 + signal after saving its checkpoint, or killed by
# the signal itself outside the training loop's handlers (its last checkpoint stands).
_STOPPED = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGINT: "SIGINT",
            -signal.SIGTERM: "SIGTERM", -signal.SIGINT: "SIGINT"}


def artifact_key(*parts: str) -> str:
    """A valid Prefect artifact key (lowercase letters, digits and dashes)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def ensure_concurrency_limit(slots: int) -> None:
    """Create the global concurrency limit `accelerator` if the server lacks it."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(ACCELERATOR_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=ACCELERATOR_LIMIT, limit=slots))


class NodeProcesses:
    """One flow run's node processes: the slots they take turns on, the processes started,
    and whether the run is stopping. Passed to each task (the thread task runner shares it).

    The local semaphore wakes a waiting branch the moment a node ends; the server's limit
    alone is polled with back-off, which left the one CPU slot idle between nodes.
    """

    def __init__(self, slots: int) -> None:
        self.slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()  # a node starts, or the stop is seen, never both halfway
        self._running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, command: list[str], env: dict) -> subprocess.Popen | None:
        """Start a node process, or None once the flow is stopping."""
        with self._lock:
            if self.stopping:
                return None
            # The node gets SIGTERM (and so checkpoints) when the flow process dies outright
            # (kill -9, out of memory), which no handler in the flow process sees. Cancellation
            # needs no help: the worker signals the flow process's group, which holds the nodes.
            proc = spawn(command, signal.SIGTERM, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
            self._running.add(proc)
            return proc

    def finished(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._running.discard(proc)

    def stop(self) -> None:
        """SIGTERM every running node (each checkpoints and exits) and start no more."""
        with self._lock:
            self.stopping = True
            for proc in self._running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)



class RunProgress:
    """Where a flow run's nodes are: waiting for a slot, computing, done or not done. Each
    change updates the run's progress artifact (done out of all); starts and ends are logged.
    """

    STAGES = ("computing", "waiting for a slot", "done", "not done")

    def __init__(self, nodes: list[str], key: str, logger) -> None:
        self._all, self._logger = len(nodes), logger
        self._stage: dict[str, str] = {}
        self._lock = threading.Lock()
        self._artifact = create_progress_artifact(
            0.0, key=key, description=self._summary())

    def enter(self, node: str, stage: str) -> None:
        with self._lock:
            self._stage[node] = stage
            summary = self._summary()
            done = sum(s == "done" for s in self._stage.values())
        if stage != "waiting for a slot":
            self._logger.info(f"{node} {stage}; {summary}")
        update_progress_artifact(self._artifact, 100.0 * done / self._all, description=summary)

    def _summary(self) -> str:
        counts = Counter(self._stage.values())
        return "nodes: " + ", ".join(f"{counts[s]} {s}" for s in self.STAGES) + f" of {self._all}"


def _show_task_state(state: State) -> None:
    """Make `state` the running task run's state, as its engine does: an event the server
    records. Prefect has no call for a task to name its own state, and a node waiting for a
    slot is not running: that time counts neither in its run time nor in its bar in the graph
    (drawn from its start time, which becomes the moment it got the slot)."""
    task_run = TaskRunContext.get().task_run  # the engine's own object: it goes on from here
    last = task_run.state
    state.state_details.task_run_id, state.state_details.flow_run_id = task_run.id, task_run.flow_run_id
    if last.is_running():
        task_run.total_run_time += state.timestamp - last.timestamp
    if state.is_running():
        task_run.start_time = state.timestamp
    task_run.state, task_run.state_id = state, state.id
    task_run.state_type, task_run.state_name = state.type, state.name
    emit_task_run_state_change_event(task_run=task_run, initial_state=last, validated_state=state)


def _stop_with_parent(parent: int, processes: NodeProcesses, done: threading.Event, logger) -> None:
    """Stop the flow like a cancellation when the process that started it dies.

    Polls the parent pid: the worker starts the flow process in a session of its own, so
    nothing signals it when the worker is killed. PR_SET_PDEATHSIG could only be set here,
    after the start (too late if the worker died first), and follows whichever worker thread
    forked (its main thread in Prefect 3.8, an internal detail).
    """
    while not done.wait(0.2):
        if os.getppid() != parent:
            # The worker read this process's stdout and stderr: a write there now fails, and
            # Prefect's console handler (rich) answers that with SystemExit in the writing
            # thread. The run's logs still reach the API.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            processes.stop()
            logger.error(f"the process that started this flow run (pid {parent}) died: every "
                         "node stops at a checkpoint")
            os.kill(os.getpid(), signal.SIGTERM)  # the flow run ends as Prefect ends a SIGTERM
            return


def _node_command(node_dir: Path) -> list[str]:
    deepfusion = Path(sys.executable).with_name("deepfusion")
    return [str(deepfusion), "run-job", str(node_dir)]


def _watch_progress(node_dir: Path, steps: int, artifact_id, done: threading.Event) -> None:
    while not done.wait(2.0):
        train = [r for r in Workdir(node_dir).metrics_records() if isinstance(r, TrainRecord)]
        if train:
            update_progress_artifact(artifact_id, 100.0 * train[-1].step / steps)


def _forward_output(proc: subprocess.Popen, logger) -> None:
    """Log each line the node prints, until it exits."""
    for line in proc.stdout:
        try:
            logger.info(line.rstrip())
        except SystemExit:
            # Prefect's console handler (rich) raises SystemExit in the logging thread when
            # its write fails on a broken pipe: the worker that read this process's output
            # was killed. The record already reached the API, and _stop_with_parent is
            # stopping the run; keep reading the node until it stops at a checkpoint, so the
            # task ends Cancelled, not Crashed.
            continue


@task(name="node", cache_policy=NO_CACHE)  # DONE in the node store is the cache
def run_node_task(job: TrainJob | FuseJob, runs_dir: str, processes: NodeProcesses,
                  progress: RunProgress):
    """Run one node's job in its own process (a no-op `Cached` state when it is DONE)."""
    try:
        return _run_node(job, runs_dir, processes, progress)
    except BaseException:
        progress.enter(job.name, "not done")
        raise


def _run_node(job: TrainJob | FuseJob, runs_dir: str, processes: NodeProcesses,
              progress: RunProgress) -> dict | State:
    logger = get_run_logger()
    here = Workdir(job.dir)
    if here.is_done():
        progress.enter(job.name, "done")
        return Completed(name="Cached", message=f"{job.name} is DONE in {job.dir}",
                         data=here.done_record().to_json())
    progress.enter(job.name, "waiting for a slot")
    _show_task_state(AwaitingConcurrencySlot(
        message=f"making its batches, then waiting for an `{ACCELERATOR_LIMIT}` slot"))
    progress_id, batches_ahead_s = None, 0.0
    if isinstance(job, TrainJob):
        progress_id = create_progress_artifact(
            0.0, key=artifact_key(job.name, "progress"),
            description=f"{job.name}: training {job.model.describe()} for {job.train.steps} steps")
        ahead = time.perf_counter()
        job.prepare_batches(logger.warning)  # while others compute: no TensorFlow in the node
        batches_ahead_s = time.perf_counter() - ahead
    waiting = time.perf_counter()
    with processes.slots, concurrency(ACCELERATOR_LIMIT, occupy=1, lease_duration=_LEASE_S):
        slot_wait_s = time.perf_counter() - waiting
        _show_task_state(Running())
        progress.enter(job.name, "computing")
        # Node processes share a persistent XLA cache: same-shaped nodes compile once.
        env = {"JAX_COMPILATION_CACHE_DIR": str(Path(runs_dir) / ".jax-cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", **os.environ}
        write_job(job)
        proc = processes.start(_node_command(job.dir), env)
        if proc is None:
            progress.enter(job.name, "not done")
            return Cancelled(message=f"{job.name} not started: the flow run is stopping")
        finished = threading.Event()
        watcher = None
        if progress_id is not None:
            watcher = threading.Thread(target=_watch_progress, daemon=True,
                                       args=(job.dir, job.train.steps, progress_id, finished))
            watcher.start()
        started = time.perf_counter()
        try:
            _forward_output(proc, logger)
            returncode = proc.wait()
            process_wall_s = time.perf_counter() - started
            # Before the slot passes on: the counts never show two nodes computing at once.
            progress.enter(job.name, "done" if returncode == 0 else "not done")
        finally:
            finished.set()
            if proc.poll() is None:  # the task itself was interrupted: let the node checkpoint
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=300)
            processes.finished(proc)
    if returncode in _STOPPED:
        return Cancelled(message=f"{job.name} stopped by {_STOPPED[returncode]}; it resumes from "
                                 f"its last checkpoint in {job.dir}")
    if returncode != 0:
        raise RuntimeError(f"node {job.name} exited with status {returncode}; see the log above")
    summary = here.done_record().to_json()
    if progress_id is not None:
        update_progress_artifact(progress_id, 100.0)
    create_table_artifact([here.done_record().display_row()],
                          key=artifact_key(job.name, "metrics"),
                          description=f"{job.name} ({job.kind}): its final metrics; its "
                                      f"directory is [{job.dir}](file://{job.dir})")
    return {**summary, "process_wall_s": process_wall_s, "slot_wait_s": slot_wait_s,
            "batches_ahead_s": batches_ahead_s}


def _run_name() -> str:
    """`PIPELINE/PROFILE/TIME` for a flow run, e.g. `six-settings/tiny/2026-12-07 14:05:09`:
    which stages file and profile a run is, in the UI's run list (a file that does not load
    is named by its path; the run then fails with its problems)."""
    parameters = flow_run.parameters
    name, profile = Path(parameters.get("stages", "stages.yaml")).name, parameters.get("profile")
    try:
        stages = load_stages(parameters.get("stages", "stages.yaml"))
        name, profile = stages.name, profile or stages.default_profile
    except (OSError, ValueError):
        pass
    return f"{name}/{profile or 'default'}/{time.strftime('%Y-%m-%d %H:%M:%S')}"


# The result (the report's files, the settings table, each node's timings) is kept as JSON in
# the worker's result storage, where the API's state of the run points.
@flow(name="staged-growth", log_prints=True, flow_run_name=_run_name, persist_result=True,
      result_serializer="json")
def staged_growth(stages: str = "stages.yaml", profile: Profile | None = None,
                  nodes: list[str] | None = None, force: bool = False, runs_dir: str = "runs",
                  retries: int = 0, accelerator_slots: int = 1) -> dict:
    """Run the staged-growth DAG of a stages file, one task per node, then its report.

    Args:
        stages: The stages file (a path on the worker's machine, relative to the deployment's
            directory): the DAG, its profiles and the paper's figures.
        profile: The profile to run (sizes, data, steps), one the stages file defines (the
            choices are the shipped files' profiles). Empty: the file's default_profile.
        nodes: Run only these nodes and the ancestors they need (empty: the whole DAG).
        force: Recompute the nodes to run (all, or `nodes`) even where they are done; their
            old directories are set aside, not deleted.
        runs_dir: The node store: every node's directory, the reports and the XLA cache.
        retries: How often a failed node's task is retried; a retry resumes the node from its
            last checkpoint.
        accelerator_slots: How many nodes compute at once: the size of the global concurrency
            limit `accelerator`, when the server does not have it yet.
    """
    stages = str(Path(stages).resolve())
    runs_dir = str(Path(runs_dir).resolve())
    plan = build_plan(stages, profile, runs_dir)  # a bad file fails the run here, with every problem
    order = plan.runnable_order(nodes)
    ensure_concurrency_limit(accelerator_slots)
    processes = NodeProcesses(accelerator_slots)
    if force:
        for name in nodes or order:
            Workdir(plan.nodes[name].dir).set_aside()
    progress = RunProgress(order, artifact_key(plan.stages.name, "nodes"), get_run_logger())
    done = threading.Event()
    if os.environ.get("PREFECT__FLOW_RUN_ID"):  # started by a worker (or runner) for this run
        threading.Thread(target=_stop_with_parent, daemon=True,
                         args=(os.getppid(), processes, done, get_run_logger())).start()
    futures = {}
    try:
        for name in order:
            job = plan.job(name)
            size = job.size if isinstance(job, TrainJob) else f"{job.model.d_model}d"
            futures[name] = run_node_task.with_options(
                name=name, task_run_name=name, tags=[job.kind, f"size:{size}"],
                retries=retries,
            ).submit(job, runs_dir, processes, progress,
                     wait_for=[futures[p] for p in job.parents])
        for future in futures.values():
            future.wait()
    except BaseException:
        # Cancelled (the worker's SIGTERM), the worker died, or Ctrl-C: running nodes
        # checkpoint, and tasks still waiting for a slot must not start theirs.
        processes.stop()
        raise
    finally:
        done.set()
    states = {name: future.state for name, future in futures.items()}
    report = write_report(plan)
    create_table_artifact(report["summary"], key=artifact_key(plan.stages.name, "report"),
                          description=f"{plan.stages.name} at {plan.profile}: {report['csv']}")
    links = "\n".join(f"- {k}: `{report[k]}`" for k in
                      ("markdown", "csv", "plot", "glue_csv", "glue_plot") if k in report)
    narrow = markdown_report(plan, report["summary"], report["claims"], max_columns=8,
                             glue_rows=report["glue_rows"], glue=report["glue"])
    create_markdown_artifact(narrow + "\nFiles:\n" + links,
                             key=artifact_key(plan.stages.name, "report", "md"))
    # The plot itself, not its path: the server holds it (a data URL), so the UI shows it to
    # a reader on another machine than the worker's.
    png = base64.b64encode(Path(report["plot"]).read_bytes()).decode()
    create_image_artifact(f"data:image/png;base64,{png}",
                          key=artifact_key(plan.stages.name, "curves"),
                          description=f"{plan.stages.name} at {plan.profile}: accuracy and loss "
                                      f"against compute ({report['plot']})")
    failed = [n for n, s in states.items() if not s.is_completed()]
    if failed:
        raise RuntimeError(f"nodes not completed: {', '.join(failed)}")
    return {"report": report["markdown"], "csv": report["csv"], "plot": report["plot"],
            "settings": report["summary"],
            "glue": [{k: r[k] for k in ("setting", "column", "replica", "glue_average")}
                     for r in report["glue_rows"]],
            "nodes": {n: {"state": s.name, **_timings(s.result())} for n, s in states.items()}}


def _timings(result: dict) -> dict:
    return {k: result[k] for k in ("kind", "run_wall_s", "process_wall_s", "slot_wait_s",
                                   "batches_ahead_s") if k in result}

