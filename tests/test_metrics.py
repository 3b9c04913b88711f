"""metrics.jsonl and its TensorBoard mirror: the events TensorBoard reads back, written by a
process that never starts TensorFlow."""

import subprocess
import sys

import numpy as np

from deepfusion_core.metrics import TENSORBOARD_DIR, MetricsLog, read_metrics

_WRITE = """
import sys
from pathlib import Path
from deepfusion_core.metrics import MetricsLog
log = MetricsLog(Path(sys.argv[1]), resumed_step=0)
for step in (1, 2, 3):
    log.write({"kind": "train", "step": step, "loss": 4.0 / step, "lr": 0.01 * step})
log.write({"kind": "eval", "step": 3, "eval_loss": 1.25, "eval_accuracy": 0.5})
log.close()
print(sorted(m for m in ("tensorflow", "clu") if m in sys.modules))
"""


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_reads_the_scalars_written_without_tensorflow(tmp_path):
    out = subprocess.run([sys.executable, "-c", _WRITE, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[]"
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 3]
    f32 = np.float32
    assert _scalars(tmp_path / TENSORBOARD_DIR) == {
        "train/loss": [(1, f32(4.0)), (2, f32(2.0)), (3, f32(4.0 / 3))],
        "train/lr": [(1, f32(0.01)), (2, f32(0.02)), (3, f32(0.03))],
        "eval/eval_loss": [(3, 1.25)], "eval/eval_accuracy": [(3, 0.5)]}


def test_a_resumed_log_adds_an_event_file_and_tensorboard_reads_both(tmp_path):
    first = MetricsLog(tmp_path, resumed_step=0)
    first.write({"kind": "train", "step": 1, "loss": 3.0})
    first.close()
    again = MetricsLog(tmp_path, resumed_step=1)
    again.write({"kind": "train", "step": 2, "loss": 2.0})
    again.close()
    assert len(list((tmp_path / TENSORBOARD_DIR).iterdir())) == 2
    assert _scalars(tmp_path / TENSORBOARD_DIR) == {"train/loss": [(1, 3.0), (2, 2.0)]}
