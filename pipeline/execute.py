"""Running nodes: train or fuse through `deepfusion_core`, in the node store.

`run_node` is what every scheduler calls (the local `deepfusion run` loop here, a Prefect
task in `flows/`): it resumes a partial train node, never recomputes a node with DONE, and
writes DONE last. It holds the node's lock throughout, so writers of one node (two Prefect
flow runs, `run` beside `run-node`) take turns: the later one waits, naming the holder, and
then finds the node DONE, or resumes it if the holder died.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack, contextmanager

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepfusion_core import disk, fuse, load_model, save_model, workdir_lock
from deepfusion_core.train import Preempted, train
from pipeline import store
from pipeline.plan import Plan, PlannedNode

Log = Callable[[str], None]
_LOCK_POLL_S = 2.0


def _node_record(node: PlannedNode) -> dict:
    record = {"name": node.name, "kind": node.kind, "fingerprint": node.fingerprint,
              "parents": list(node.parents), "model": node.model.model_dump(mode="json"),
              "spec": node.spec.model_dump(mode="json")}
    if node.kind == "train":
        record.update(train=node.train.model_dump(mode="json"),
                      data=node.data.model_dump(mode="json"))
    return record


def model_path(node: PlannedNode):
    """Where a node's model is: a fuse node's `model/`, a train node's latest step."""
    return node.dir / "model" if node.kind == "fuse" else node.dir


def run_node(plan: Plan, name: str, log: Log = print, progress: bool = False) -> dict | None:
    """Run one node whose parents are done; returns its DONE summary.

    Another writer of the node is waited for. A failure (other than a stop request) is
    recorded in FAILED before it is raised. In a multi-process train node every process
    trains and the first one alone locks and writes the node's files (None elsewhere).
    """
    node = plan.nodes[name]
    # The processes of a multi-process node decide together, under the lock (below): one
    # that saw DONE a moment before the others would leave them waiting in a collective.
    if jax.process_count() == 1 and store.is_done(node.dir):
        return store.done_record(node.dir)
    missing = [p for p in node.parents if not store.is_done(plan.nodes[p].dir)]
    if missing:
        raise RuntimeError(f"node {name}: parents not done: {', '.join(missing)}")
    primary = jax.process_index() == 0
    with _node_lock(node, log):
        if _done_meanwhile(node):
            if not primary:
                return None
            log(f"{name}: finished by another writer meanwhile")
            return store.done_record(node.dir)
        try:
            return _run_locked(plan, node, log, progress, primary)
        except Preempted:
            raise  # a stop request: the node saved a checkpoint and is resumable, not failed
        except Exception as e:
            if primary:
                _record_failure(node, e)
            raise


def _record_failure(node: PlannedNode, e: Exception) -> None:
    """FAILED, with the error. On a full disk, the save the disk cut short (never resumed)
    makes room for it first, and a FAILED that still does not fit is left out: it must not
    replace the error, and the node resumes from its last checkpoint either way."""
    message = f"{type(e).__name__}: {e}"
    if disk.no_space(e) is None:
        store.mark_failed(node.dir, message)
        return
    store.discard_unfinished_checkpoints(node.dir)
    with contextlib.suppress(OSError):
        store.mark_failed(node.dir, message)


@contextmanager
def _node_lock(node: PlannedNode, log: Log):
    """Hold the node's lock, waiting for another writer.

    In a multi-process node the first process alone takes it (the others would wait for a
    lock their own group holds), trying every `_LOCK_POLL_S` while all the processes agree
    on each try: a collective that outlasted another writer's whole run would time out
    (Gloo's and JAX's coordination service's deadlines are 30 s).
    """
    if jax.process_count() == 1:
        with workdir_lock.hold(node.dir, node.name, wait=True, log=log):
            yield
        return
    primary = jax.process_index() == 0
    with ExitStack() as held:
        for attempt in itertools.count():
            taken = False
            if primary:
                try:
                    held.enter_context(workdir_lock.hold(node.dir, node.name, wait=False))
                    taken = True
                except workdir_lock.LockedError as e:
                    if attempt == 0:
                        log(workdir_lock.waiting_message(node.name, e.holder))
            if multihost_utils.broadcast_one_to_all(np.int32(taken)):
                break
            time.sleep(_LOCK_POLL_S)
        yield


def _done_meanwhile(node: PlannedNode) -> bool:
    """Whether the node is DONE now, as the first process (which holds the lock) sees it."""
    done = store.is_done(node.dir)
    if jax.process_count() > 1:
        done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
    return done


def _run_locked(plan: Plan, node: PlannedNode, log: Log, progress: bool,
                primary: bool) -> dict | None:
    if primary:
        store.write_json_atomic(node.dir / "node.json", _node_record(node))
    start = time.perf_counter()
    if node.kind == "fuse":
        summary = _run_fuse(plan, node, log)
    else:
        _extend_if_possible(plan, node, log, primary)
        init = model_path(plan.nodes[node.spec.init]) if node.spec.init else None
        summary = train(node.model, node.train, node.data, node.dir, init=init,
                        progress=progress, log=log)
    if not primary:
        return None
    summary = {**summary, "node": node.name, "kind": node.kind,
               "fingerprint": node.fingerprint, "run_wall_s": time.perf_counter() - start}
    store.mark_done(node.dir, summary)
    return summary


def _extend_if_possible(plan: Plan, node: PlannedNode, log: Log, primary: bool) -> None:
    """Start a train node without checkpoints from a finished shorter run of it (more steps
    in stages.yaml): its last checkpoint and metrics are copied, and training resumes there."""
    if store.latest_checkpoint_step(node.dir) is None:
        source = plan.extension_source(node.name)
        if source and primary:
            store.copy_train_prefix(*source, node.dir)
            log(f"{node.name}: extending {source[0].name} from its step {source[1]}")
    if jax.process_count() > 1:  # the others must see the copy before they restore
        multihost_utils.sync_global_devices(f"extend {node.dir.name}")


def _run_fuse(plan: Plan, node: PlannedNode, log: Log) -> dict:
    spec = node.spec
    out = node.dir / "model"
    if out.exists():  # a crash after saving but before DONE: the save itself is atomic
        log(f"{node.name}: reusing fused model at {out}")
    else:
        loaded = {p: load_model(model_path(plan.nodes[p])) for p in node.parents}
        start = time.perf_counter()
        # The planned norm, not the core's default again: the plan decided self fusion by
        # node names, and its fingerprint and the children's configs follow that decision.
        cfg, params = fuse([loaded[p] for p in spec.fuse], norm=node.record["norm"],
                           cross_std=spec.cross_std, seed=spec.seed, weights=spec.weights)
        if cfg != node.model:
            raise RuntimeError(f"{node.name}: fused {cfg.describe()}, but the plan expects "
                               f"{node.model.describe()}")
        save_model(out, cfg, params)
        log(f"{node.name}: fused {' + '.join(spec.fuse)} -> {cfg.describe()} "
            f"in {time.perf_counter() - start:.1f}s")
    return {"kind": "summary", "flops": 0, "tokens": 0, "wall_s": 0.0, "device_s": 0.0}


def runnable_order(plan: Plan, only: Iterable[str] | None = None) -> list[str]:
    """Nodes to consider, topologically: all, or `only` plus the ancestors they need."""
    if only is None:
        return list(plan.nodes)
    wanted = {a for n in only for a in plan.ancestry(n)}
    return [n for n in plan.nodes if n in wanted]


def run_plan(plan: Plan, only: Iterable[str] | None = None, log: Log = print,
             progress: bool = False) -> dict[str, str]:
    """Run every node that is not done, in order; a failure blocks only its descendants.

    Returns each node's outcome: "done" (already), "ran", "failed: ..." or "blocked".
    """
    outcome: dict[str, str] = {}
    with store.run_lock(plan.root):
        for name in runnable_order(plan, only):
            node = plan.nodes[name]
            if store.is_done(node.dir):
                outcome[name] = "done"
                continue
            if any(not outcome.get(p, "").startswith(("done", "ran")) for p in node.parents):
                outcome[name] = "blocked"
                log(f"{name}: blocked by a failed parent")
                continue
            log(f"{name}: running ({node.kind}, {node.model.describe()})")
            try:
                run_node(plan, name, log=log, progress=progress)
                outcome[name] = "ran"
            except Preempted:
                raise  # a stop request ends the run; the node saved a checkpoint
            except Exception as e:  # noqa: BLE001 - run_node recorded it; the others go on
                if disk.no_space(e) is not None:
                    raise  # every other node would fail the same way: the run ends here
                message = f"{type(e).__name__}: {e}"
                outcome[name] = f"failed: {message}"
                log(f"{name}: FAILED {message}")
    return outcome
