"""Training metrics: one JSON line per record in `metrics.jsonl`, mirrored to TensorBoard.

Records carry a `kind`: "train" (per step), "eval" (per evaluation) and "summary" (the
node's cumulative totals, written at the end). After a resume from step k the records past k
(work that was lost with the crash) are dropped, so the file always describes one
uninterrupted run: each step's and each evaluation's record exactly once. (A run that starts
over from step 0 drops everything: its step-0 evaluation is written again.)
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# A train workdir's layout, as the trainer writes it (the pipeline's node store reads these).
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"  # Orbax steps, `<step>/` each (train_checkpoint)


class _Record(BaseModel):
    # Unknown fields are kept: a metrics file written by an older trainer still reads back.
    model_config = ConfigDict(frozen=True, extra="allow")


class TrainRecord(_Record):
    """One training step."""

    kind: Literal["train"] = "train"
    step: int
    loss: float
    grad_norm: float
    lr: float
    step_time_s: float
    tokens_per_s: float
    flops_per_s: float


class EvalRecord(_Record):
    """One evaluation on the validation batches."""

    kind: Literal["eval"] = "eval"
    step: int
    eval_loss: float
    eval_loss_sum: float | None = None  # T5X's summed loss per sequence
    eval_accuracy: float


class SummaryRecord(_Record):
    """A node's cumulative totals, written once at the end (the last evaluation's eval_*)."""

    kind: Literal["summary"] = "summary"
    step: int
    first_step: int
    flops: int | float
    tokens: int | float
    wall_s: float
    device_s: float
    devices: int
    eval_loss: float | None = None
    eval_loss_sum: float | None = None
    eval_accuracy: float | None = None


MetricsRecord = Annotated[TrainRecord | EvalRecord | SummaryRecord, Field(discriminator="kind")]
_RECORD = TypeAdapter(MetricsRecord)


def read_metrics(path: Path) -> list[dict]:
    """All records of a `metrics.jsonl` (an empty list if there is none yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_records(path: Path) -> list[MetricsRecord]:
    """The records of a `metrics.jsonl`, typed by kind (pydantic's ValidationError names a
    malformed one)."""
    return [_RECORD.validate_python(r) for r in read_metrics(path)]


class MetricsLog:
    """Appends records to `WORKDIR/metrics.jsonl` and scalars to `WORKDIR/tensorboard/`."""

    def __init__(self, workdir: Path, resumed_step: int, enabled: bool = True):
        # Disabled (writes nothing) in all but one process of a multi-process node.
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self._logged: set[tuple] = set()  # (kind, step) of the step and eval records in the file
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path)  # nothing when the run starts over
                if resumed_step > 0 and r["step"] <= resumed_step and r["kind"] != "summary"]
        self._logged = {(r.get("kind"), r.get("step")) for r in kept}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)  # atomic: a crash here leaves the old or the new file
        self._file = self.path.open("ab")
        self._tb = _EventFile(workdir / TENSORBOARD_DIR)

    def write(self, record: dict) -> None:
        """Append `record`, unless the file already has this step's record of its kind (an
        evaluation of the resumed step, repeated after a crash between the save and DONE)."""
        key = (record.get("kind"), record.get("step"))
        if not self.enabled or (key[0] != "summary" and key in self._logged):
            return
        self._logged.add(key)
        _append(self._file, self.path, (json.dumps(record) + "\n").encode())
        scalars = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if k not in ("kind", "step") and isinstance(v, (int, float))}
        if "step" in record:
            self._tb.write_scalars(record["step"], scalars)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._tb.close()


def _append(file, path: Path, data: bytes) -> None:
    """Write and flush `data`: synchronous, so a failed write (a full disk) raises here, in
    order, naming the file (an OSError from a write does not)."""
    try:
        file.write(data)
        file.flush()
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


class _EventFile:
    """A TensorBoard event file of scalars, written without TensorFlow.

    TensorFlow's writer (and clu's, around it) costs a node process about 6 s of start-up;
    the format is TFRecord framing (TensorBoard's `RecordWriter`) around its `Event` protos.
    """

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        logdir.mkdir(parents=True, exist_ok=True)
        self.path = logdir / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
        self._file = self.path.open("ab")
        self._records = RecordWriter(self)  # its framing, written through `write` below
        self._records.write(self._event(wall_time=time.time(),
                                        file_version="brain.Event:2").SerializeToString())

    def write(self, framed: bytes) -> None:
        _append(self._file, self.path, framed)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        values = [self._summary.Value(tag=tag, simple_value=value)
                  for tag, value in scalars.items()]
        self._records.write(self._event(wall_time=time.time(), step=step,
                                        summary=self._summary(value=values)).SerializeToString())

    def close(self) -> None:
        self._file.close()
