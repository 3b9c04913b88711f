"""The `deepfusion` CLI for models: info, fuse, HF conversion; errors are one line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
    (["--grad-clip", "off"], "'off' is neither float nor none"),
])
def test_train_refuses_bad_input_before_creating_the_workdir(tmp_path, args, message):
    result = invoke("train", "--model", "tiny-S", "--steps", "2", "--workdir", tmp_path / "w",
                    "--no-progress", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args, grad_clip, keep_every", [
    (["--grad-clip", "none", "--keep-every", "NONE"], None, None),
    (["--grad-clip", "0.5", "--keep-every", "3"], 0.5, 3),
    ([], 1.0, None),
])
def test_train_options_reach_the_configs_none_included(tmp_path, monkeypatch, args, grad_clip,
                                                        keep_every):
    # `none` (any case) turns off a setting that may be None; the seed is train()'s argument.
    import deepfusion_core.train

    seen = {}
    monkeypatch.setattr(deepfusion_core.train, "train",
                        lambda cfg, tc, dc, workdir, seed, **_: seen.update(tc=tc, dc=dc, seed=seed))
    result = invoke("train", "--model", "tiny-S", "--steps", "2", "--workdir", tmp_path / "w",
                    "--seed", "5", *args)
    assert result.exit_code == 0, result.output
    assert (seen["tc"].grad_clip, seen["tc"].keep_every) == (grad_clip, keep_every)
    assert seen["seed"] == seen["dc"].seed == 5


# ------------------------------------------------------------- every command's bad input

STAGES = Path(__file__).resolve().parents[1] / "stages.yaml"
# One hostile input per registered command (paths under the test's directory T), and a
# fragment of the one line it must print.
HOSTILE = {
    "fuse": (["T/missing-a", "T/missing-b", "--out", "T/out"], "the path does not exist"),
    "import-hf": (["T/file.txt", "T/out"], "is not a directory"),
    "export-hf": (["T/missing", "T/file.txt"], "already exists"),
    "train": (["--workdir", "T/w", "--steps", "2", "--model", "tiny-S", "--mesh", "data=0,model=1"],
              "--mesh must look like data=D,model=M"),
    "plan": ([STAGES, "--profile", "nope", "--runs-dir", "T/runs"], "profile 'nope' is not defined"),
    "run": ([STAGES, "--profile", "smoke", "--runs-dir", "T/file.txt"], "is not a directory"),
    "run-node": (["NOPE", STAGES, "--profile", "smoke", "--runs-dir", "T/runs"],
                 "'NOPE' is not a node"),
    "run-job": (["T"], "job.json: no such job file"),
    "flow": ([STAGES, "--profile", "smoke", "--runs-dir", "T/no/such/runs"], "does not exist"),
    "status": (["T/missing.yaml"], "no such stages file"),
    "report": ([STAGES, "--runs-dir", "T", "--into", "T/missing.md"], "is not a file"),
    "schema": (["--out", "T/no/such/dir/x.json"], "does not exist"),
    "model info": (["T/file.txt"], "Not a directory"),
    "bench fuse": (["--preset", "nope"], "is not a preset"),
    "bench step": (["--preset", "tiny-S", "--seq-len", "12"], "--seq-len must be IN,OUT"),
    "bench kernels": (["--attention", "cudnn"], "--attention cudnn needs --dtype bfloat16"),
    "bench trace": (["--out", "T/no/such/dir/trace"], "does not exist"),
    "bench memory": (["--preset", "tiny-S", "--dtype", "float32", "--batch", "8", "--mesh",
                      "data=3,model=1"], "mesh data=3,model=1"),
    "bench checkpoint": (["--directory", "T/nonexistent"], "is not a directory"),
    "bench prefect": (["T/missing.yaml"], "no such stages file"),
    "bench all": (["--out", "T/no/dir/records.jsonl"], "does not exist"),
}


def _command_names(group, prefix=()) -> list[str]:
    names = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            names += _command_names(command, (*prefix, name))
        else:
            names.append(" ".join((*prefix, name)))
    return names


def test_every_registered_command_has_a_hostile_case():
    # A new command must come with its bad-input case below (its errors go through the same
    # group class, deepfusion_cli.errors.Commands, as every other's).
    import typer.main

    assert sorted(_command_names(typer.main.get_command(app))) == sorted(HOSTILE)


def _tree(root):
    return {str(p): (p.is_dir(), p.stat().st_size if p.is_file() else 0) for p in root.rglob("*")}


@pytest.mark.parametrize("command", sorted(HOSTILE))
def test_every_command_reports_bad_input_in_one_line_exit_2_writing_nothing(command, tmp_path,
                                                                             monkeypatch):
    (tmp_path / "cwd").mkdir()
    (tmp_path / "file.txt").write_text("not a model\n")
    monkeypatch.chdir(tmp_path / "cwd")
    args, fragment = HOSTILE[command]
    args = [str(a).replace("T/", f"{tmp_path}/") if str(a).startswith("T") else str(a)
            for a in args]
    args = [str(tmp_path) if a == "T" else a for a in args]
    before = _tree(tmp_path)
    result = runner.invoke(app, [*command.split(), *args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert _tree(tmp_path) == before


def test_bad_input_is_one_line_in_a_real_process(tmp_path):
    # What a terminal shows, C++ logging included (TensorFlow's and XLA's start-up lines are
    # not Python's stderr): commands that plan and read the store, started at once.
    exe = os.path.join(os.path.dirname(sys.executable), "deepfusion")
    cases = [["status", tmp_path / "missing.yaml"],
             ["report", STAGES, "--runs-dir", tmp_path, "--into", tmp_path / "missing.md"],
             ["run", STAGES, "--runs-dir", tmp_path / "no" / "runs"]]
    procs = [subprocess.Popen([exe, *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in cases]
    for args, proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and out == "", (args, out, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (args, err)
    assert list(tmp_path.iterdir()) == []


def test_a_bug_keeps_its_traceback_and_input_errors_are_sorted_by_where_they_arise():
    from deepfusion_cli.errors import input_problems, reported
    from pipeline.spec import check_name

    with pytest.raises(ZeroDivisionError), reported():
        1 / 0
    try:  # a ValueError from inside numpy: a bug of the caller, not bad input
        np.reshape(np.arange(3), (2, 2))
    except ValueError as e:
        assert input_problems(e) is None
    try:  # a ValueError the library raises about its input
        check_name("../up", "node name")
    except ValueError as e:
        assert input_problems(e) == [str(e)] and "node name '../up'" in str(e)


def test_a_full_disk_is_named_in_one_line():
    # /dev/full answers every write with ENOSPC, as a full file system does.
    from deepfusion_core.disk import describe, no_space
    from deepfusion_core.metrics import _append

    def line(e):
        return describe(no_space(e))

    with pytest.raises(OSError) as info:
        with open("/dev/full", "w") as f:
            f.write("x")
    assert line(info.value) == "disk full: [Errno 28] No space left on device"
    try:
        try:
            raise OSError(28, "No space left on device", "/runs/x/checkpoints/4/params")
        except OSError:
            with open("/dev/full", "w") as f:  # a FAILED marker written after it
                f.write("x")
    except OSError as e:
        assert line(e) == ("disk full writing /runs/x/checkpoints/4/params: "
                           "[Errno 28] No space left on device")
    # As TensorStore (Orbax's arrays) says it, and the metrics and TensorBoard files.
    assert line(ValueError('RESOURCE_EXHAUSTED: Error writing local file "/r/4/_sharding": '
                           "No space left on device [os_error_code='28']")) == (
        "disk full writing /r/4/_sharding: [Errno 28] No space left on device")
    with open("/dev/full", "ab") as f, pytest.raises(OSError) as info:
        _append(f, Path("/r/tb/events.out"), b"x" * 10_000)
    assert line(info.value) == "disk full writing /r/tb/events.out: [Errno 28] No space left on device"
    assert no_space(ValueError("no")) is None


# ------------------------------------------------------------- fast start

# Run a command as the console script would, then report which heavy libraries it imported.
_IMPORTS_OF = """
import sys
from deepfusion_cli.main import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(f"imported: {sorted(m for m in ('tensorflow', 'seqio', 'clu', 'jax') if m in sys.modules)}")
sys.exit(code)
"""


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """An environment whose cache holds the shipped file's validation-batch count and this
    machine's device count: the first plan counts them with TensorFlow and JAX, once; later
    ones read them."""
    env = {**os.environ, "DEEPFUSION_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    subprocess.run([sys.executable, "-m", "deepfusion_cli.main", "plan", str(STAGES)], env=env,
                   check=True, capture_output=True, timeout=300)
    return env


@pytest.mark.parametrize("command", ["plan", "status", "--help"])
def test_commands_that_read_no_data_import_neither_tensorflow_nor_jax(command, counted, tmp_path):
    args = [command] if command == "--help" else [command, str(STAGES), "--runs-dir",
                                                   str(tmp_path / "runs")]
    result = subprocess.run([sys.executable, "-c", _IMPORTS_OF, *args], env=counted,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stdout, result.stdout[-500:]
    assert "cuInit" not in result.stderr and "oneDNN" not in result.stderr, result.stderr
