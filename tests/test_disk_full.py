"""A full disk: one line naming the file, a non-zero exit, and a node that a rerun with space
finishes bit-identically.

The runs directory is a tmpfs mounted in a private user and mount namespace (`unshare
--user --map-root-user --mount`: no privilege needed, nothing mounted outside the test's
processes). Where the kernel gives no such namespace the test skips, saying why.

Two ways to fill it, with a one-node stages file of tiny-L saved at every step:
- 30 MB: a few checkpoints fit, the next does not (refused before Orbax writes any of it);
- the first checkpoint's arrays plus 512 KiB: the disk fills in the middle of Orbax's
  concurrent writes, whose abandoned rest used to print 1,575 lines and 117 tracebacks.
The first rerun resumes from its last checkpoint; the second starts over (its only save was
lost). Both end the same, bit for bit, as a run that never ran out of space.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from deepfusion_core import PRESETS, init_params, load_model
from deepfusion_core.metrics import read_metrics
from deepfusion_core.config import TrainConfig
from deepfusion_core.steps import make_optimizer

DEEPFUSION = Path(sys.executable).with_name("deepfusion")
STAGES = """
name: disk-full
default_profile: p
profiles:
  p:
    models: {S: tiny-S, M: tiny-M, L: tiny-L}
    data: {source: builtin, vocab: byte, inputs_length: 64, targets_length: 16, batch_size: 4}
    train: {steps: 6, warmup_steps: 2, eval_batches: 1, save_every: 1, keep_last: 10}
nodes:
  L1: {train: L, seed: 1}
"""
TIMING = {"step_time_s", "tokens_per_s", "flops_per_s", "wall_s", "device_s", "first_step"}


def _namespace() -> list[str]:
    """The command prefix that gives a private mount namespace, or a skip saying why not."""
    tried = []
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        if shutil.which(prefix[0]) is None:
            pytest.skip("unshare (util-linux) is not installed: no private mount namespace")
        proc = subprocess.run([*prefix, "true"], capture_output=True, text=True)
        if proc.returncode == 0:
            return prefix
        tried.append(f"{' '.join(prefix)}: {proc.stderr.strip()}")
    pytest.skip("the kernel gives this user no private mount namespace to mount a tmpfs in ("
                + "; ".join(tried) + ")")


def _run(runs: Path, stages: Path, log: Path) -> str:
    return (f"({DEEPFUSION} run {stages} --runs-dir {runs} --no-progress "
            f">{log}.out 2>{log}.err; echo $? >{log}.rc)")


def _fill_and_rerun(mount: Path, size: str, stages: Path, out: Path) -> str:
    """Shell: `deepfusion run` on a tmpfs of `size` at `mount`, then again once the tmpfs
    has grown to 200 MB; each run's output in OUT.{full,rerun}.{out,err,rc}, the runs
    directory after each in OUT.{full,rerun}-runs."""
    runs = mount / "runs"
    return " && ".join([f"mkdir {mount}", f"mount -t tmpfs -o size={size} tmpfs {mount}",
                        _run(runs, stages, out.with_suffix(".full")),
                        f"cp -a {runs} {out}.full-runs",
                        f"mount -o remount,size=200m {mount}",
                        _run(runs, stages, out.with_suffix(".rerun")),
                        f"cp -a {runs} {out}.rerun-runs"])


def _node_dir(runs: Path) -> Path:
    (node,) = (runs / "disk-full" / "nodes").iterdir()
    return node


def _assert_one_line_naming_the_file(out: Path, mount: Path) -> str:
    assert Path(f"{out}.full.rc").read_text().strip() == "1"
    err = Path(f"{out}.full.err").read_text()
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    progress = r"L1: running \(.*\)|step \d+/6: .*|eval at step \d+: .*|saving the checkpoint .*"
    lines = [line for line in err.splitlines() if not re.fullmatch(progress, line)]
    assert len(lines) == 1, err[-3000:]
    assert re.fullmatch(rf"error: disk full writing {mount}/runs/disk-full/nodes/L1-\w+/\S+: "
                        r"\[Errno 28\] No space left on device.*", lines[0]), lines[0]
    assert Path(f"{out}.rerun.rc").read_text().strip() == "0", Path(f"{out}.rerun.err").read_text()
    return lines[0]


def _first_checkpoint_array_bytes() -> int:
    cfg = PRESETS["tiny-L"].model_copy(update={"vocab_size": 384})
    params = jax.eval_shape(lambda: init_params(cfg, 0))
    state = (params, jax.eval_shape(make_optimizer(TrainConfig(steps=1)).init, params))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _comparable(node: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(node / "metrics.jsonl")]


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_a_rerun_with_space_ends_bit_identical(tmp_path):
    stages = tmp_path / "stages.yaml"
    stages.write_text(STAGES)
    # At a checkpoint: four of tiny-L's fit in 30 MB, the fifth is refused before Orbax
    # writes any of it. Mid-save: room for the first checkpoint's arrays, not for the files
    # around them, so the save starts and Orbax's writes fail in flight.
    at_checkpoint, mid_save = tmp_path / "at-checkpoint", tmp_path / "mid-save"
    script = " && ".join([
        _fill_and_rerun(at_checkpoint, "30m", stages, tmp_path / "a"),
        _fill_and_rerun(mid_save, f"{_first_checkpoint_array_bytes() // 1024 + 512}k", stages,
                        tmp_path / "b")])
    proc = subprocess.run([*_namespace(), "sh", "-c", script], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    line = _assert_one_line_naming_the_file(tmp_path / "a", at_checkpoint)
    assert "bytes free" in line, line  # the space check's figures
    failed = _node_dir(Path(f"{tmp_path / 'a'}.full-runs"))
    assert json.loads((failed / "FAILED").read_text())["error"].startswith("OSError: [Errno 28]")
    kept = sorted(int(p.name) for p in (failed / "checkpoints").iterdir())  # no partial step
    assert len(kept) >= 2 and kept == list(range(1, len(kept) + 1)), kept
    assert line.split(": ")[1].endswith(f"/checkpoints/{len(kept) + 1}"), line
    assert "resuming" in Path(f"{tmp_path / 'a'}.rerun.err").read_text()

    line = _assert_one_line_naming_the_file(tmp_path / "b", mid_save)
    assert ".orbax-checkpoint-tmp/" in line, line  # in the middle of Orbax's writes
    failed = _node_dir(Path(f"{tmp_path / 'b'}.full-runs"))  # the cut-short save made room
    assert json.loads((failed / "FAILED").read_text())["error"].startswith("OSError: [Errno 28]")
    assert list((failed / "checkpoints").iterdir()) == []

    # The run resumed at step 4 and the run that started over (its first save lost) end the
    # same, bit for bit: every loss and evaluation, and the parameters.
    resumed = _node_dir(Path(f"{tmp_path / 'a'}.rerun-runs"))
    restarted = _node_dir(Path(f"{tmp_path / 'b'}.rerun-runs"))
    for node in (resumed, restarted):
        assert (node / "DONE").exists() and not (node / "FAILED").exists()
    assert _comparable(resumed) == _comparable(restarted)
    assert len([r for r in _comparable(resumed) if r["kind"] == "train"]) == 6
    (_, params), (_, want) = load_model(resumed), load_model(restarted)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, want))
