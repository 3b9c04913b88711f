"""`deepfusion bench prefect`: what orchestration costs per node, and a fully cached rerun.

Runs the staged-growth flow twice on a fresh runs directory (Prefect's temporary local
server unless PREFECT_API_URL is set). Per node, from the first run:

    task_s          the task run's duration as Prefect records it
    batches_ahead_s time the flow process spent making a train node's batches before it
                    waited for a slot (data work the node's process then skips: not overhead)
    slot_wait_s     time the task spent waiting for a slot of the `accelerator` limit (the
                    branches of the DAG queue for the one CPU slot: not overhead)
    process_wall_s  the node's process, start to exit (imports, XLA compile, the node's work)
    run_wall_s      the node's own work inside that process (`run_job`, from its DONE)

`task_s - batches_ahead_s - slot_wait_s - process_wall_s` is Prefect's overhead (state updates, logs,
artifacts); `process_wall_s - run_wall_s` is the price of running each node in its own process.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.staged_growth import staged_growth


def _task_seconds(flow_run_id) -> dict[str, float]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.total_run_time.total_seconds() for r in runs}


def bench_prefect(stages: str = "stages.yaml", profile: str = "smoke",
                  runs_dir: str | None = None) -> dict:
    """Prefect's per-node overhead on a first run, and the wall time of a cached rerun."""
    runs_dir = runs_dir or tempfile.mkdtemp(prefix="deepfusion-bench-prefect-")
    start = time.perf_counter()
    state = staged_growth(stages, profile, runs_dir=runs_dir, return_state=True)
    first_s = time.perf_counter() - start
    result = state.result()
    tasks = _task_seconds(state.state_details.flow_run_id)
    rows = [{"node": n, "task_s": tasks[n], **t} for n, t in result["nodes"].items()]
    prefect_overhead = [r["task_s"] - r["batches_ahead_s"] - r["slot_wait_s"] - r["process_wall_s"]
                        for r in rows]
    isolation = {r["node"]: r["process_wall_s"] - r["run_wall_s"] for r in rows}

    def median_isolation(kind):
        return round(statistics.median(isolation[r["node"]] for r in rows if r["kind"] == kind), 3)
    start = time.perf_counter()
    staged_growth(stages, profile, runs_dir=runs_dir)
    cached_s = time.perf_counter() - start
    return {"bench": "prefect", "stages": str(Path(stages)), "profile": profile,
            "nodes": len(rows), "first_run_s": round(first_s, 1),
            "prefect_overhead_per_node_s": round(statistics.median(prefect_overhead), 3),
            "prefect_overhead_max_s": round(max(prefect_overhead), 3),
            "process_overhead_per_node_s": round(statistics.median(isolation.values()), 3),
            "process_overhead_train_s": median_isolation("train"),
            "process_overhead_fuse_s": median_isolation("fuse"),
            "node_work_total_s": round(sum(r["run_wall_s"] for r in rows), 1),
            "batches_ahead_total_s": round(sum(r["batches_ahead_s"] for r in rows), 1),
            "cached_rerun_s": round(cached_s, 1), "runs_dir": runs_dir}
