"""Running node jobs in the node store.

`run_job` is what every scheduler calls (the local `deepfusion run` loop here, the process
`deepfusion run-job` that each Prefect task starts): it resumes a partial train node, never
recomputes a node with DONE, and writes DONE last. It holds the node's lock throughout, so
writers of one node (two Prefect flow runs, `run` beside `run-node`) take turns: the later one
waits, naming the holder, and then finds the node DONE, or resumes it if the holder died.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepfusion_core import disk, workdir_lock
from deepfusion_core.preemption import Preempted
from pipeline import store
from pipeline.code_version import code_version
from pipeline.job import FuseJob, LoadJob, TrainJob
from pipeline.workdir import NodeSummary, Workdir

if TYPE_CHECKING:  # a node process runs one job: the plan's modules are not its to import
    from pipeline.plan import Plan

Log = Callable[[str], None]
Job = TrainJob | FuseJob | LoadJob  # a FinetuneJob is a TrainJob
_LOCK_POLL_S = 2.0


def run_job(job: Job, log: Log = print, progress: bool = False) -> NodeSummary | None:
    """Run one node whose parents are done; returns its DONE summary.

    Another writer of the node is waited for. A failure (other than a stop request) is
    recorded in FAILED before it is raised. In a multi-process train node every process
    trains and the first one alone locks and writes the node's files (None elsewhere).
    """
    # The processes of a multi-process node decide together, under the lock (below): one
    # that saw DONE a moment before the others would leave them waiting in a collective.
    here = Workdir(job.dir)
    if jax.process_count() == 1 and here.is_done():
        return here.done_record()
    missing = [name for name, parent in job.parents.items() if not Workdir(parent).is_done()]
    if missing:
        raise RuntimeError(f"node {job.name}: parents not done: {', '.join(missing)}")
    primary = jax.process_index() == 0
    with _node_lock(job, log):
        if _done_meanwhile(job):
            if not primary:
                return None
            log(f"{job.name}: finished by another writer meanwhile")
            return here.done_record()
        try:
            return _run_locked(job, log, progress, primary)
        except Preempted:
            raise  # a stop request: the node saved a checkpoint and is resumable, not failed
        except Exception as e:
            if primary:
                _record_failure(job, e)
            raise


def _record_failure(job: Job, e: Exception) -> None:
    """FAILED, with the error. On a full disk, the save the disk cut short (never resumed)
    makes room for it first, and a FAILED that still does not fit is left out: it must not
    replace the error, and the node resumes from its last checkpoint either way."""
    message = f"{type(e).__name__}: {e}"
    here = Workdir(job.dir)
    if disk.no_space(e) is None:
        here.mark_failed(message)
        return
    here.discard_unfinished_checkpoints()
    with contextlib.suppress(OSError):
        here.mark_failed(message)


@contextmanager
def _node_lock(job: Job, log: Log):
    """Hold the node's lock, waiting for another writer.

    In a multi-process node the first process alone takes it (the others would wait for a
    lock their own group holds), trying every `_LOCK_POLL_S` while all the processes agree
    on each try: a collective that outlasted another writer's whole run would time out
    (Gloo's and JAX's coordination service's deadlines are 30 s).
    """
    if jax.process_count() == 1:
        with workdir_lock.hold(job.dir, job.name, wait=True, log=log):
            yield
        return
    primary = jax.process_index() == 0
    with ExitStack() as held:
        for attempt in itertools.count():
            taken = False
            if primary:
                try:
                    held.enter_context(workdir_lock.hold(job.dir, job.name, wait=False))
                    taken = True
                except workdir_lock.LockedError as e:
                    if attempt == 0:
                        log(workdir_lock.waiting_message(job.name, e.holder))
            if multihost_utils.broadcast_one_to_all(np.int32(taken)):
                break
            time.sleep(_LOCK_POLL_S)
        yield


def _done_meanwhile(job: Job) -> bool:
    """Whether the node is DONE now, as the first process (which holds the lock) sees it."""
    done = Workdir(job.dir).is_done()
    if jax.process_count() > 1:
        done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
    return done


def _run_locked(job: Job, log: Log, progress: bool, primary: bool) -> NodeSummary | None:
    here = Workdir(job.dir)
    if primary:
        store.write_json_atomic(here.node_json, job.node_record())
    start = time.perf_counter()
    summary = job.run(log, progress, primary)
    if not primary:
        return None
    summary = NodeSummary.model_validate(
        {**summary, "node": job.name, "kind": job.kind, "fingerprint": job.fingerprint,
         "run_wall_s": time.perf_counter() - start, "code": code_version()})
    here.mark_done(summary)
    return summary


def run_plan(plan: Plan, only: Iterable[str] | None = None, log: Log = print,
             progress: bool = False) -> dict[str, str]:
    """Run every node that is not done, in order; a failure blocks only its descendants.

    Returns each node's outcome: "done" (already), "ran", "failed: ..." or "blocked".
    """
    outcome: dict[str, str] = {}
    with store.run_lock(plan.root):
        for name in plan.runnable_order(only):
            node = plan.nodes[name]
            if Workdir(node.dir).is_done():
                outcome[name] = "done"
                continue
            if any(not outcome.get(p, "").startswith(("done", "ran")) for p in node.parents):
                outcome[name] = "blocked"
                log(f"{name}: blocked by a failed parent")
                continue
            log(f"{name}: running ({node.kind}, {node.model.describe()})")
            try:
                run_job(plan.job(name), log=log, progress=progress)
                outcome[name] = "ran"
            except Preempted:
                raise  # a stop request ends the run; the node saved a checkpoint
            except Exception as e:  # noqa: BLE001 - run_job recorded it; the others go on
                if disk.no_space(e) is not None:
                    raise  # every other node would fail the same way: the run ends here
                message = f"{type(e).__name__}: {e}"
                outcome[name] = f"failed: {message}"
                log(f"{name}: FAILED {message}")
    return outcome
