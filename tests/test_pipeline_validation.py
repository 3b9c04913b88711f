"""Validation of stages files: a corpus of broken files, each rejected before anything runs.

Every file in `tests/stages_corpus/` is a broken stages file. Its leading comments say what
it must produce: one `# expect: FRAGMENT` line per expected problem (each fragment must
appear in some problem line) and, for a known validation gap, one `# xfail: REASON` line
(the cases are then strict xfails: they fail the suite once the gap is fixed, so the marker
must go with it).

Each file is checked through the API (`build_plan` raises `StagesError`, one line per
problem, each naming the file) and through the real CLI (`deepfusion plan` and
`deepfusion run`: exit status 2, one `error: ...` line per problem on stderr, nothing written:
no runs directory, the working directory unchanged).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from deepfusion_cli.main import app
from deepfusion_core.distributed import devices_here
from pipeline.plan import build_plan
from pipeline.spec import StagesError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "stages_corpus"
SHIPPED = ROOT / "stages.yaml"

runner = CliRunner()


def _text(path: Path) -> str:
    """A corpus file as text, whatever its encoding (some files are broken by their bytes)."""
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return raw.decode("utf-16")
    return raw.decode("utf-8", errors="replace").lstrip("\ufeff")


def _header(path: Path, tag: str) -> list[str]:
    prefix = f"# {tag}:"
    return [line[len(prefix):].strip() for line in _text(path).splitlines()
            if line.startswith(prefix)]


def _cases() -> list:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        reasons = _header(path, "xfail")
        marks = [pytest.mark.xfail(strict=True, reason="; ".join(reasons))] if reasons else []
        cases.append(pytest.param(path, id=path.stem, marks=marks))
    return cases


CASES = _cases()


def _expected(path: Path) -> list[str]:
    fragments = _header(path, "expect")
    assert fragments, f"{path.name} has no '# expect:' line"
    return fragments


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `roots`: (size, mtime) by path."""
    seen = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            seen[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return seen


def _assert_caught(path: Path, runs: Path) -> list[str]:
    with pytest.raises(StagesError) as info:  # as `deepfusion plan` builds it: to run here
        build_plan(path, runs_dir=runs, devices=devices_here)
    return info.value.problems


# ------------------------------------------------------------------------------ the corpus

def test_the_corpus_is_large_and_every_file_states_its_expectation():
    files = sorted(CORPUS.glob("*.yaml"))
    assert len(files) >= 20
    for path in files:
        _expected(path)
    caught = [p for p in files if not _header(p, "xfail")]
    assert len(caught) >= 20


@pytest.mark.parametrize("path", CASES)
def test_build_plan_lists_every_problem_one_line_each(path, tmp_path):
    runs = tmp_path / "runs"
    problems = _assert_caught(path, runs)
    assert problems, "StagesError with no problems"
    for line in problems:
        assert "\n" not in line, f"a problem spans several lines:\n{line}"
        assert line.startswith(f"{path}:"), f"a problem does not name the file: {line}"
    assert len(set(problems)) == len(problems), f"a problem is listed twice: {problems}"
    for fragment in _expected(path):
        assert any(fragment in line for line in problems), (
            f"expected {fragment!r} in a problem; got:\n" + "\n".join(problems))
    assert not runs.exists()
    assert list(tmp_path.iterdir()) == []


def _invoke_cli(command: str, path: Path, tmp_path: Path, monkeypatch, *extra: str):
    """`deepfusion COMMAND PATH --runs-dir tmp/runs` in-process, from an empty working dir."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    runs = tmp_path / "runs"
    before = _snapshot(tmp_path, CORPUS)
    result = runner.invoke(app, [command, str(path), "--runs-dir", str(runs), *extra])
    after = _snapshot(tmp_path, CORPUS)
    return result, runs, before, after


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("path", CASES)
def test_cli_exits_2_with_one_error_line_per_problem_and_writes_nothing(path, command, tmp_path,
                                                                         monkeypatch):
    if command == "run":
        # Never start a DAG from a file validation lets through (it would train nodes).
        _assert_caught(path, tmp_path / "runs")
    result, runs, before, after = _invoke_cli(command, path, tmp_path, monkeypatch)
    assert result.exit_code == 2, f"exit {result.exit_code}:\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines, "no error printed"
    for line in lines:
        assert line.startswith(f"error: {path}:"), f"not an 'error: FILE: ...' line: {line!r}"
    for fragment in _expected(path):
        assert any(fragment in line for line in lines), (
            f"expected {fragment!r} on stderr; got:\n{result.stderr}")
    assert not runs.exists(), "the runs directory was created"
    assert after == before, "something was written"


def test_console_script_run_exits_2(tmp_path):
    """The installed `deepfusion` script, in a real process: exit status 2, nothing written."""
    script = Path(sys.executable).with_name("deepfusion")
    assert script.exists(), f"console script not installed at {script}"
    path = CORPUS / "multiple_problems.yaml"
    runs = tmp_path / "runs"
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    before = _snapshot(tmp_path, CORPUS)
    proc = subprocess.run([str(script), "run", str(path), "--runs-dir", str(runs)], cwd=work,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    for fragment in _expected(path):
        assert any(fragment in line for line in errors), proc.stderr
    assert len(errors) >= 8
    assert not runs.exists()
    assert _snapshot(tmp_path, CORPUS) == before


def test_a_stages_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(SHIPPED.read_text() + "#" * (1 << 20))
    with pytest.raises(StagesError, match="larger than a stages file may be"):
        build_plan(path, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_an_undefined_profile_is_exit_2(tmp_path, monkeypatch):
    result, runs, before, after = _invoke_cli("run", SHIPPED, tmp_path, monkeypatch,
                                              "--profile", "huge")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: {SHIPPED}: profile 'huge' is not defined "
        f"(profiles: smoke, tiny, c4-tiny, c4-cpu, small, gpu, paper, paper-8gpu)"]
    assert not runs.exists() and after == before


def test_run_refuses_a_profile_declared_for_other_devices(tmp_path, monkeypatch):
    # paper-8gpu plans anywhere (its meshes are checked against its declared 8 devices), but
    # runs only where a node gets 8.
    if devices_here(1) == 8:
        pytest.skip("this machine has the profile's 8 devices")
    result, runs, before, after = _invoke_cli("run", SHIPPED, tmp_path, monkeypatch,
                                              "--profile", "paper-8gpu")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert errors == [f"error: {SHIPPED}: profiles.paper-8gpu.devices: its train nodes run on 8 "
                      f"devices, but one started here gets {devices_here(1)}"]
    assert not runs.exists() and after == before


# ------------------------------------------------------------------- the shipped stages file

@pytest.mark.parametrize("profile", ["smoke", "tiny", None])
def test_the_shipped_stages_file_is_valid(profile, tmp_path):
    plan = build_plan(SHIPPED, profile, runs_dir=tmp_path / "runs")
    kinds = [n.kind for n in plan.nodes.values()]
    assert (kinds.count("train"), kinds.count("fuse")) == (15, 8)
    assert plan.profile == (profile or "tiny")
    assert set(plan.stages.settings) == {"1", "2", "3", "4", "5", "6"}
    assert plan.nodes["L4"].model == plan.nodes["L1"].model.model_copy(
        update={"norm_groups": plan.nodes["L4"].model.norm_groups})
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("profile, replicas", [("c4-tiny", 3), ("c4-cpu", 1)])
def test_the_shipped_stages_file_is_valid_on_real_c4(shared_data, tmp_path, profile, replicas):
    plan = build_plan(SHIPPED, profile, runs_dir=tmp_path / "runs")
    kinds = [n.kind for n in plan.nodes.values()]
    assert (kinds.count("train"), kinds.count("fuse")) == (15 * replicas, 8 * replicas)
    assert plan.nodes["S1"].model.vocab_size == 32128


def test_schema_command_writes_a_json_schema_the_shipped_file_satisfies(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "x.json"
    result = runner.invoke(app, ["schema", "--out", str(out)])
    assert result.exit_code == 0, result.output
    schema = json.loads(out.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    shipped = yaml.safe_load(SHIPPED.read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(shipped)]
    assert errors == []
    # The committed copy the shipped file points editors at is the same schema.
    assert json.loads((ROOT / "stages.schema.json").read_text()) == schema
    # And the schema rejects what the loader rejects structurally.
    for name in ["unknown_key_node", "node_both_train_and_fuse", "fuse_one_input",
                 "steps_zero", "unknown_top_level_key", "bad_norm"]:
        broken = yaml.safe_load((CORPUS / f"{name}.yaml").read_text())
        assert not validator.is_valid(broken), name
