"""A node directory's layout, and the records its files hold.

    <node>-<fingerprint>/   job.json node.json DONE FAILED .lock
                            checkpoints/ metrics.jsonl tensorboard/   (train: what the trainer
                                                                        writes, named in
                                                                        `deepfusion_core.metrics`)
                            model/                                    (fuse: an Orbax model)

`Workdir` is the one place these names are spelled on the pipeline's side; everything else
asks it for a path or a record. `DONE` (a `NodeSummary`) is written last and atomically: a
node directory without it is work in progress, whatever else it holds.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from deepfusion_core import disk, workdir_lock
from deepfusion_core.metrics import (CHECKPOINTS_DIR, METRICS_FILE, TENSORBOARD_DIR,
                                     MetricsRecord, read_records)
from pipeline.store import read_json, write_json_atomic

JOB_FILE = "job.json"
NODE_FILE = "node.json"
DONE_FILE = "DONE"
FAILED_FILE = "FAILED"
MODEL_DIR = "model"


class NodeSummary(BaseModel):
    """What DONE holds: the node's totals (a train node's summary record, with its last
    evaluation; zeros for a fuse node) and which node wrote them, in how long."""

    # Unknown fields are kept: a DONE written by an older version still reads back.
    model_config = ConfigDict(frozen=True, extra="allow")

    node: str
    kind: Literal["train", "finetune", "fuse", "load"]
    fingerprint: str
    run_wall_s: float
    flops: int | float
    tokens: int | float
    wall_s: float
    device_s: float
    # A train node's only:
    step: int | None = None
    first_step: int | None = None
    devices: int | None = None
    eval_loss: float | None = None
    eval_loss_sum: float | None = None
    eval_accuracy: float | None = None
    # A fine-tune node's only: each GLUE task's metrics (in points) and their average.
    glue: dict[str, dict[str, float]] | None = None
    glue_average: float | None = None
    # `code_version()` of the code that made the node (absent from a DONE older than it).
    code: str | None = None

    def to_json(self) -> dict:
        """The JSON-able form DONE is written in (a fuse node's summary without the train
        fields, as before)."""
        return self.model_dump(mode="json", exclude_none=True)

    def display_row(self) -> dict[str, str | int | float | None]:
        """The node's totals as a person reads them in a table (the UI's metrics artifact):
        at most eight columns, in reading order, to the digits that matter."""
        def rounded(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)

        row: dict[str, str | int | float | None] = {"node": self.node, "kind": self.kind}
        if self.kind == "finetune":
            row.update({"step": self.step, "GLUE": rounded(self.glue_average, 2),
                        "loss": rounded(self.eval_loss, 4)})
        if self.kind == "train":
            row.update({"step": self.step,
                        "accuracy %": rounded(self.eval_accuracy and 100 * self.eval_accuracy, 2),
                        "loss": rounded(self.eval_loss, 4),
                        "loss per sequence": rounded(self.eval_loss_sum, 2)})
        row.update({"FLOPs": f"{self.flops:.3g}", "wall s": round(self.run_wall_s, 1)})
        return row


@dataclass(frozen=True)
class Workdir:
    """A node directory: where each of its files is, and reading and writing them."""

    path: Path

    @property
    def job_json(self) -> Path:
        return self.path / JOB_FILE

    @property
    def node_json(self) -> Path:
        return self.path / NODE_FILE

    @property
    def done(self) -> Path:
        return self.path / DONE_FILE

    @property
    def failed(self) -> Path:
        return self.path / FAILED_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def model(self) -> Path:
        """A fuse node's model checkpoint."""
        return self.path / MODEL_DIR

    def is_done(self) -> bool:
        return self.done.exists()

    def done_record(self) -> NodeSummary | None:
        """The summary a finished node wrote into DONE (None if it is not finished)."""
        record = read_json(self.done)
        return None if record is None else NodeSummary.model_validate(record)

    def mark_done(self, summary: NodeSummary) -> None:
        self.failed.unlink(missing_ok=True)
        write_json_atomic(self.done, summary.to_json())

    def mark_failed(self, message: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.failed, {"error": message})

    def failure(self) -> str | None:
        record = read_json(self.failed)
        return record["error"] if record else None

    def metrics_records(self) -> list[MetricsRecord]:
        """The typed records of the node's metrics file (none before training starts)."""
        return read_records(self.metrics)

    def latest_checkpoint_step(self) -> int | None:
        """The newest finalised Orbax step of a train node (None if it has none)."""
        if not self.checkpoints.is_dir():
            return None
        steps = [int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit()]
        return max(steps) if steps else None

    def discard_unfinished_checkpoints(self) -> None:
        """Remove the steps Orbax left unfinished (`checkpoints/<step>.orbax-checkpoint-tmp`,
        a save cut short): no restore reads them, and a full disk needs their space."""
        for unfinished in self.checkpoints.glob(f"*{disk.UNFINISHED}"):
            shutil.rmtree(unfinished, ignore_errors=True)

    def set_aside(self) -> None:
        """Keep the directory, renamed `<dir>.replaced-<time>`, so the node runs afresh
        (`force`); refused (`workdir_lock.LockedError`) while another writer holds the node."""
        if self.path.exists():
            with workdir_lock.hold(self.path, f"node {self.path.name}", wait=False):
                replaced = f"{self.path.name}.replaced-{int(time.time())}"
                shutil.move(self.path, self.path.with_name(replaced))

    def copy_train_prefix(self, source: Workdir, step: int) -> None:
        """Seed this train node with step `step` of the run in `source`: its metrics and
        TensorBoard events, then (renamed in last, so a crash leaves no half checkpoint) the
        checkpoint. The trainer resumes from it as from its own."""
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.metrics, self.metrics)
        if source.tensorboard.is_dir():
            shutil.copytree(source.tensorboard, self.tensorboard, dirs_exist_ok=True)
        staging = self.path / ".extending"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source.checkpoints / str(step), staging)
        self.checkpoints.mkdir(exist_ok=True)
        staging.rename(self.checkpoints / str(step))
