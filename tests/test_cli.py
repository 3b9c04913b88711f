"""The `deepfusion` CLI for models: info, fuse, HF conversion; errors are one line, exit 2."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from deepfusion_cli.main import app
from deepfusion_core import PRESETS, forward, init_params, load_model, save_model

runner = CliRunner()
CFG = PRESETS["tiny-S"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    for name, seed in [("a", 0), ("b", 1)]:
        save_model(root / name, CFG, jax.tree.map(np.asarray, init_params(CFG, seed)))
    save_model(root / "deep", CFG.model_copy(update={"num_layers": 3}),
               jax.tree.map(np.asarray, init_params(CFG.model_copy(update={"num_layers": 3}), 2)))
    return root


def test_model_info_json_for_a_preset():
    result = invoke("model", "info", "table7-L", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["params"] == 1_138_316_800 and info["d_model"] == 2048 and info["norm_groups"] == [2048]


def test_model_info_for_a_checkpoint(ckpts):
    result = invoke("model", "info", ckpts / "a")
    assert result.exit_code == 0 and "d_model=32" in result.output and "2,105,856" in result.output


def test_model_info_unknown_is_one_line_exit_2():
    result = invoke("model", "info", "table9-XL")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "neither a preset" in result.output


def test_fuse_writes_the_average_ensemble(ckpts, tmp_path):
    out = tmp_path / "ab"
    result = invoke("fuse", ckpts / "a", ckpts / "b", "--out", out, "--norm", "prop")
    assert result.exit_code == 0, result.output
    cfg, params = load_model(out)
    assert cfg.norm_groups == (32, 32)
    enc = np.array([[5, 6, 7, 8]]); dec = np.array([[0, 9, 10]])
    mean = sum(forward(*load_model(ckpts / n), enc, dec) for n in "ab") / 2
    assert float(np.abs(forward(cfg, params, enc, dec) - mean).max()) <= 1e-5


def test_self_fusion_by_naming_one_checkpoint_twice(ckpts, tmp_path):
    result = invoke("fuse", ckpts / "a", ckpts / "a", "--out", tmp_path / "aa",
                    "--cross-std", "1e-3", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "aa")[0].norm_groups == (64,)  # rule by default


@pytest.mark.parametrize("second, options, message", [
    ("deep", [], "num_layers"),
    ("missing", [], "does not exist"),
    ("b", ["--norm", "mean"], "--norm"),
    ("b", ["--weights", "1,2,3"], "--weights"),
])
def test_fuse_errors_are_one_line_and_write_nothing(ckpts, tmp_path, second, options, message):
    result = invoke("fuse", ckpts / "a", ckpts / second, *options, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.output and result.output.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_fuse_refuses_an_existing_output(ckpts):
    result = invoke("fuse", ckpts / "a", ckpts / "b", "--out", ckpts / "a")
    assert result.exit_code == 2 and "already exists" in result.output


def test_console_script_runs_as_a_real_process():
    # The installed entry point, in its own process: what a user types.
    exe = os.path.join(os.path.dirname(sys.executable), "deepfusion")
    proc = subprocess.run([exe, "model", "info", "table7-S", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["params"] == 95_835_520


def test_fuse_of_a_prop_fused_model_with_itself_keeps_its_function(ckpts, tmp_path):
    # The default norm of a self fusion keeps a grouped model's groups: one RMSNorm over
    # [a, b, a, b] is not the per-group norm, and moved the logits before it did.
    assert invoke("fuse", ckpts / "a", ckpts / "b", "--out", tmp_path / "ab").exit_code == 0
    result = invoke("fuse", tmp_path / "ab", tmp_path / "ab", "--out", tmp_path / "abab")
    assert result.exit_code == 0, result.output
    cfg, params = load_model(tmp_path / "abab")
    assert cfg.norm_groups == (32, 32, 32, 32)
    enc = np.array([[5, 6, 7, 8]]); dec = np.array([[0, 9, 10]])
    want = forward(*load_model(tmp_path / "ab"), enc, dec)
    assert float(np.abs(forward(cfg, params, enc, dec) - want).max()) <= 1e-5


@pytest.mark.parametrize("extra, message", [
    (["--weights", "nan,nan"], "weights must be finite and > 0"),
    (["--weights", "-0.5,1.5"], "weights must be finite and > 0"),
    (["--weights", "0.5,0.7"], "must sum to 1"),
    (["--cross-std", "inf"], "cross_std must be a finite number"),
])
def test_fuse_refuses_non_finite_or_unnormalised_options(ckpts, tmp_path, extra, message):
    result = invoke("fuse", ckpts / "a", ckpts / "b", "--out", tmp_path / "ab", *extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_fuse_does_not_create_missing_parent_directories(ckpts, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out"
    result = invoke("fuse", ckpts / "a", ckpts / "b", "--out", out)
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], "seed: Input should be less than or equal to 4294967295"),
    (["--vocab", "t5:/etc/hostname"], "is not a SentencePiece model"),
])
def test_train_refuses_bad_input_before_creating_the_workdir(tmp_path, args, message):
    result = invoke("train", "--model", "tiny-S", "--steps", "2", "--workdir", tmp_path / "w",
                    "--no-progress", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "w").exists()
