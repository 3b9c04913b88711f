"""The node directory's layout (`Workdir`) and its typed records: DONE, metrics lines.

The files are spelled here on purpose: the on-disk layout is what existing runs directories
hold, and it must not change.
"""

import json
import multiprocessing
from pathlib import Path

import pydantic
import pytest

from deepfusion_core.metrics import EvalRecord, SummaryRecord, TrainRecord
from pipeline import store
from pipeline.workdir import NodeSummary, Workdir

# A train node's and a fuse node's DONE, as a run wrote them (runs-tiny, c4-tiny), the first
# with a field an older version wrote and this one does not know.
TRAIN_DONE = """{
 "device_s": 44.768409560999714,
 "devices": 1,
 "eval_accuracy": 0.16163793103448276,
 "eval_loss": 6.395727223363416,
 "eval_loss_sum": 185.47608947753906,
 "fingerprint": "d37374b032e9",
 "first_step": 0,
 "flops": 285002956800,
 "kind": "train",
 "node": "S1",
 "older_field": "kept",
 "run_wall_s": 67.636317765,
 "step": 150,
 "tokens": 188185,
 "wall_s": 44.768409560999714
}
"""
FUSE_DONE = """{
 "device_s": 0.0,
 "fingerprint": "697d19f1a224",
 "flops": 0,
 "kind": "fuse",
 "node": "M12f",
 "run_wall_s": 2.7049618149999333,
 "tokens": 0,
 "wall_s": 0.0
}
"""
METRICS = [
    {"kind": "eval", "step": 0, "eval_loss": 10.9, "eval_loss_sum": 316.2, "eval_accuracy": 0.0},
    {"kind": "train", "step": 1, "loss": 10.86, "grad_norm": 1.44, "lr": 0.0005,
     "step_time_s": 10.1, "tokens_per_s": 123.9, "flops_per_s": 187367881.9},
    {"kind": "summary", "step": 1, "first_step": 0, "flops": 1900019712, "tokens": 1254,
     "wall_s": 10.2, "device_s": 10.2, "devices": 1, "eval_loss": 10.1,
     "eval_loss_sum": 300.0, "eval_accuracy": 0.05},
]


def _write_metrics(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_layout_is_the_files_on_disk(tmp_path):
    w = Workdir(tmp_path)
    assert {name: getattr(w, name).relative_to(tmp_path).as_posix() for name in (
        "job_json", "node_json", "done", "failed", "metrics", "tensorboard", "checkpoints",
        "model")} == {"job_json": "job.json", "node_json": "node.json", "done": "DONE",
                      "failed": "FAILED", "metrics": "metrics.jsonl",
                      "tensorboard": "tensorboard", "checkpoints": "checkpoints",
                      "model": "model"}


@pytest.mark.parametrize("text", [TRAIN_DONE, FUSE_DONE], ids=["train", "fuse"])
def test_done_reads_back_and_writes_the_same_bytes(tmp_path, text):
    old, new = Workdir(tmp_path / "old"), Workdir(tmp_path / "new")
    old.path.mkdir()
    old.done.write_text(text)
    summary = old.done_record()
    assert isinstance(summary.flops, int) and isinstance(summary.wall_s, float)
    new.path.mkdir()
    new.mark_done(summary)
    assert new.done.read_text() == text


def test_a_done_missing_a_total_is_refused_naming_it(tmp_path):
    w = Workdir(tmp_path)
    w.done.write_text(TRAIN_DONE.replace(' "flops": 285002956800,\n', ""))
    with pytest.raises(pydantic.ValidationError, match="flops"):
        w.done_record()


def test_failed_then_done(tmp_path):
    w = Workdir(tmp_path / "node")
    assert w.done_record() is None and w.failure() is None and not w.is_done()
    w.mark_failed("RuntimeError: boom")
    assert w.failure() == "RuntimeError: boom"
    w.mark_done(NodeSummary.model_validate_json(FUSE_DONE))
    assert w.is_done() and not w.failed.exists() and w.done_record().node == "M12f"


def test_metrics_records_are_typed_by_kind(tmp_path):
    w = Workdir(tmp_path)
    assert w.metrics_records() == []
    _write_metrics(w.metrics, METRICS)
    records = w.metrics_records()
    assert [type(r) for r in records] == [EvalRecord, TrainRecord, SummaryRecord]
    assert [r.model_dump() for r in records] == METRICS


@pytest.mark.parametrize("bad, named", [
    ({**METRICS[1], "loss": "nan?"}, "loss"),
    ({k: v for k, v in METRICS[1].items() if k != "step"}, "step"),
    ({**METRICS[0], "kind": "evaluation"}, "evaluation"),
], ids=["bad-value", "missing-field", "unknown-kind"])
def test_a_malformed_metrics_line_is_refused_naming_it(tmp_path, bad, named):
    w = Workdir(tmp_path)
    _write_metrics(w.metrics, [METRICS[0], bad])
    with pytest.raises(pydantic.ValidationError, match=named):
        w.metrics_records()


def test_checkpoints_unfinished_steps_and_extending(tmp_path):
    source = Workdir(tmp_path / "short")
    assert source.latest_checkpoint_step() is None
    for step in ("2", "4", "6.orbax-checkpoint-tmp"):
        (source.checkpoints / step).mkdir(parents=True)
        (source.checkpoints / step / "items").write_text(step)
    (source.tensorboard).mkdir()
    (source.tensorboard / "events").write_text("tb")
    _write_metrics(source.metrics, METRICS[:2])
    assert source.latest_checkpoint_step() == 4  # an unfinished save is no step
    source.discard_unfinished_checkpoints()
    assert sorted(p.name for p in source.checkpoints.iterdir()) == ["2", "4"]

    target = Workdir(tmp_path / "long")
    target.copy_train_prefix(source, 2)
    assert target.latest_checkpoint_step() == 2
    assert (target.checkpoints / "2" / "items").read_text() == "2"
    assert target.metrics_records() == source.metrics_records()
    assert (target.tensorboard / "events").read_text() == "tb"
    assert not (target.path / ".extending").exists()


def test_set_aside_keeps_the_directory_under_a_new_name(tmp_path):
    w = Workdir(tmp_path / "S1-abc")
    w.path.mkdir()
    w.done.write_text(FUSE_DONE)
    w.set_aside()
    assert not w.path.exists()
    [kept] = tmp_path.glob("S1-abc.replaced-*")
    assert (kept / "DONE").read_text() == FUSE_DONE


def test_a_summary_reads_as_a_short_rounded_row():
    train = NodeSummary.model_validate_json(TRAIN_DONE).display_row()
    assert train == {"node": "S1", "kind": "train", "step": 150, "accuracy %": 16.16,
                     "loss": 6.3957, "loss per sequence": 185.48, "FLOPs": "2.85e+11",
                     "wall s": 67.6}
    fuse = NodeSummary.model_validate_json(FUSE_DONE).display_row()
    assert fuse == {"node": "M12f", "kind": "fuse", "FLOPs": "0", "wall s": 2.7}


def _write_many(path: Path, text: str, times: int) -> None:
    for _ in range(times):
        store.write_text_atomic(path, text)


def test_concurrent_atomic_writers_of_one_file_all_succeed(tmp_path):
    # Found by CI: two `run-node S1` at once both write job.json; with one shared temporary
    # name, one writer's rename took the other's file away and that writer failed (ENOENT).
    path = tmp_path / "job.json"
    texts = [f"writer {i}\n" * 1000 for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_many, args=(path, text, 300)) for text in texts]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0] * len(writers)
    assert path.read_text() in texts  # one writer's whole text, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]  # no temporary left behind
