"""Checkpoint faults on real Orbax steps: every fault ends in a bit-identical resume from the
newest valid step, with the bad step moved aside, or in one clear error; never in NaN."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from deepfusion_core import PRESETS, load_model
from deepfusion_core.checkpoint import CheckpointError, save_model
from deepfusion_core.metrics import read_metrics
from deepfusion_core.config import DataConfig, TrainConfig
from deepfusion_core.train import train

DEEPFUSION = str(Path(sys.executable).parent / "deepfusion")
CFG = PRESETS["tiny-S"]
DATA = DataConfig(source="builtin", vocab="byte", inputs_length=32, targets_length=8,
                  batch_size=2)
TRAIN = TrainConfig(steps=6, save_every=2, eval_every=2, eval_batches=1, warmup_steps=1)
TIMINGS = {"step_time_s", "tokens_per_s", "flops_per_s", "wall_s", "device_s", "first_step"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (steps 4 and 6 kept), the one every fault case starts from."""
    workdir = tmp_path_factory.mktemp("finished") / "w"
    train(CFG, TRAIN, DATA, workdir, seed=0, progress=False)
    return workdir


def _metrics(workdir):
    return [{k: v for k, v in r.items() if k not in TIMINGS}
            for r in read_metrics(Path(workdir) / "metrics.jsonl")]


def _biggest_file(directory: Path) -> Path:
    """The biggest file of an item: array data, whatever Orbax's layout."""
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _random_bytes(step: Path, item: str) -> None:
    chunk = _biggest_file(step / item)
    chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))


def _truncate(step: Path, item: str) -> None:
    chunk = _biggest_file(step / item)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


FAULTS = {
    "random bytes in params": lambda step: _random_bytes(step, "params"),
    "random bytes in opt_state": lambda step: _random_bytes(step, "opt_state"),
    "truncated params chunk": lambda step: _truncate(step, "params"),
    "deleted _METADATA": lambda step: (step / "params" / "_METADATA").unlink(),
    "garbage config": lambda step: next((step / "config").glob("*")).write_bytes(b"\x00garbage"),
    "deleted config": lambda step: shutil.rmtree(step / "config"),
    "garbage train_state": lambda step: next((step / "train_state").glob("*")).write_text("{"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_latest_step_is_moved_aside_and_retrained_bit_identically(finished, tmp_path, fault):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    FAULTS[fault](workdir / "checkpoints" / "6")
    warnings = []
    summary = train(CFG, TRAIN, DATA, workdir, seed=0, progress=False, log=warnings.append)

    assert summary["first_step"] == 4
    assert any("checkpoint step 6" in w and "corrupt-checkpoints" in w for w in warnings), warnings
    assert [p.name.split("-")[0] for p in (workdir / "corrupt-checkpoints").iterdir()] == ["6"]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "6"]  # rewritten
    got, want = load_model(workdir)[1], load_model(finished)[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert _metrics(workdir) == _metrics(finished)


def test_every_step_bad_starts_over_and_still_ends_identical(finished, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    for step in ("4", "6"):
        _random_bytes(workdir / "checkpoints" / step, "params")
    summary = train(CFG, TRAIN, DATA, workdir, seed=0, progress=False, log=lambda _: None)
    assert summary["first_step"] == 0
    got, want = load_model(workdir)[1], load_model(finished)[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_a_checkpoint_of_another_model_is_an_error_not_a_fallback(finished, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    other = CFG.model_copy(update={"d_ff": CFG.d_ff * 2})
    with pytest.raises(CheckpointError, match="holds checkpoints of another model"):
        train(other, TRAIN, DATA, workdir, seed=0, progress=False)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "6"]


def test_loading_or_fusing_a_corrupt_model_refuses_with_one_line(finished, tmp_path):
    model = tmp_path / "model"
    save_model(model, CFG, load_model(finished)[1])
    _random_bytes(model, "params")
    with pytest.raises(CheckpointError, match=r"params is corrupt: .* do not match the checksums"):
        load_model(model)
    out = tmp_path / "fused"
    proc = subprocess.run([DEEPFUSION, "fuse", model, finished, "--out", out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "is corrupt" in proc.stderr, proc.stderr
    assert not out.exists()


def test_checksums_are_saved_with_every_step_and_model(finished):
    sums = json.loads(next((finished / "checkpoints" / "6" / "checksums").glob("*")).read_text())
    params = load_model(finished)[1]
    assert sums.keys() == {"params", "opt_state"}
    assert len(sums["params"]) == len(jax.tree.leaves(params))
    assert len(sums["opt_state"]) > 0


def test_a_read_only_checkpoints_directory_gives_one_line_and_a_prompt_exit(finished, tmp_path):
    # Orbax met it only in its background save threads, and the process then hung for the
    # 20 minutes its other threads wait for a signal. A read-only bind mount in a private
    # mount namespace makes it read-only for root too.
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    ckpts = workdir / "checkpoints"
    train_cmd = [DEEPFUSION, "train", "--workdir", workdir, "--steps", "8", "--data", "builtin",
                 "--vocab", "byte", "--model", "tiny-S", "--batch", "2", "--inputs-length", "32", "--targets-length", "8",
                 "--warmup", "1", "--save-every", "2", "--no-progress"]
    script = f'mount --bind -o ro "{ckpts}" "{ckpts}" && exec "$@"'
    proc = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                           *map(str, train_cmd)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: cannot write checkpoints to {ckpts}: Read-only file system\n"
    assert sorted(p.name for p in ckpts.iterdir()) == ["4", "6"]


def test_a_killed_writers_unfinished_step_is_cleaned_up_on_resume(finished, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    # What a writer killed mid-save leaves: a step not yet renamed into place (one that the
    # resumed run does not save again, which would replace it).
    shutil.copytree(workdir / "checkpoints" / "6", workdir / "checkpoints" / "7.orbax-checkpoint-tmp")
    train(CFG, TRAIN.model_copy(update={"steps": 8}), DATA, workdir, seed=0, progress=False)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6", "8"]
