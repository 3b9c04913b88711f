"""Running the shipped DAG through the pipeline API (no Prefect): store, resume, report."""

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from deepfusion_cli.main import app
from deepfusion_core import forward, load_model
from deepfusion_core.metrics import read_metrics
from pipeline import store
from pipeline.code_version import code_version
from pipeline.execute import run_plan
from pipeline.plan import build_plan, plan_records
from pipeline.workdir import Workdir
from pipeline.report import write_report

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages.yaml"
DEEPFUSION = str(Path(sys.executable).parent / "deepfusion")


def done_mtimes(plan):
    return {n: (node.dir / "DONE").stat().st_mtime_ns for n, node in plan.nodes.items()
            if Workdir(node.dir).is_done()}


def edited_stages(tmp_path, edit) -> Path:
    """A copy of the shipped stages file with `edit(raw_dict)` applied."""
    raw = yaml.safe_load(STAGES.read_text())
    edit(raw)
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    plan = build_plan(STAGES, "smoke", runs)
    start = time.perf_counter()
    outcome = run_plan(plan, log=lambda m: None)
    report = write_report(plan)
    return plan, outcome, report, runs, time.perf_counter() - start


@pytest.mark.slow
def test_smoke_dag_runs_every_node_and_reports_six_settings(smoke_run):
    plan, outcome, report, _, seconds = smoke_run
    print(f"smoke DAG: {len(plan.nodes)} nodes in {seconds:.0f}s")
    assert set(outcome.values()) == {"ran"} and len(outcome) == 23
    assert [r["setting"] for r in report["rows"]] == ["1", "2", "3", "4", "5", "6"]
    assert [r["train_nodes"] for r in report["rows"]] == [1, 4, 3, 7, 2, 3]
    with open(report["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 6
    assert Path(report["plot"]).stat().st_size > 10_000
    l4 = next(r for r in report["rows"] if r["setting"] == "4")
    # Setting 4's compute is its seven train nodes, each ancestor counted once.
    assert l4["flops"] == sum(Workdir(plan.nodes[n].dir).done_record().flops
                              for n in plan.ancestry("L4"))
    for node in plan.nodes.values():
        assert Workdir(node.dir).is_done()
        if node.kind == "train":
            assert Workdir(node.dir).latest_checkpoint_step() == node.train.steps


@pytest.mark.slow
def test_setting_2_self_fusion_computes_m12s_function(smoke_run, tmp_path):
    # L2f = self-fuse(M12), M12 grown by fusion-prop: the default norm keeps its groups, so
    # with zero cross blocks the fused model is M12's function (one merged RMSNorm moved it).
    # The shipped L2f adds cross noise (cross_std 1e-3): this edit runs only a new L2f.
    plan, _, _, runs, _ = smoke_run
    edited = build_plan(edited_stages(tmp_path, lambda raw: raw["nodes"]["L2f"].update(
        cross_std=0.0)), "smoke", runs)
    assert run_plan(edited, only=["L2f"], log=lambda m: None)["L2f"] == "ran"
    m12 = load_model(plan.nodes["M12"].model_path)
    l2f = load_model(edited.nodes["L2f"].model_path)
    assert m12[0].norm_groups == (32, 32) and l2f[0].norm_groups == (32, 32, 32, 32)
    assert plan.nodes["L2f"].model == edited.nodes["L2f"].model == l2f[0]
    enc = np.array([[5, 6, 7, 8, 9, 0]]); dec = np.array([[0, 10, 11, 12]])
    assert float(np.abs(forward(*l2f, enc, dec) - forward(*m12, enc, dec)).max()) <= 1e-5


@pytest.mark.slow
def test_second_run_recomputes_nothing(smoke_run):
    plan, _, _, runs, _ = smoke_run
    before = done_mtimes(plan)
    again = build_plan(STAGES, "smoke", runs)
    assert {r.state for r in plan_records(again)} == {"done"}
    assert set(run_plan(again, log=lambda m: None).values()) == {"done"}
    assert done_mtimes(again) == before


@pytest.mark.slow
def test_editing_one_node_reruns_exactly_its_descendants(smoke_run, tmp_path):
    plan, _, _, runs, _ = smoke_run
    before = done_mtimes(plan)

    def edit(raw):
        raw["nodes"]["S3"]["overrides"] = {"steps": 6}
    edited = build_plan(edited_stages(tmp_path, edit), "smoke", runs)
    changed = {n for n in edited.nodes if edited.nodes[n].fingerprint != plan.nodes[n].fingerprint}
    assert changed == {"S3", "M34f", "M34", "L4f", "L4"}
    outcome = run_plan(edited, log=lambda m: None)
    assert {n for n, o in outcome.items() if o == "ran"} == changed
    after = done_mtimes(edited)
    assert {n: after[n] for n in edited.nodes if n not in changed} == \
        {n: before[n] for n in edited.nodes if n not in changed}
    # The old S3 and its descendants stay in the store: editing back costs nothing.
    assert all(Workdir(plan.nodes[n].dir).is_done() for n in changed)
    assert Workdir(edited.nodes["S3"].dir).latest_checkpoint_step() == 6


def test_a_second_run_on_a_locked_runs_dir_refuses(tmp_path):
    plan = build_plan(STAGES, "smoke", tmp_path)
    with store.run_lock(plan.root):
        result = CliRunner().invoke(app, ["run", str(STAGES), "--profile", "smoke",
                                          "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "in use by a running deepfusion run" in result.output
    assert sorted(p.name for p in plan.root.iterdir()) == [".lock"]


def test_plan_json_has_one_record_per_node(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(STAGES), "--profile", "smoke", "--json",
                                      "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert len(records) == 23
    m12 = next(r for r in records if r["name"] == "M12")
    assert m12["kind"] == "train" and m12["parents"] == ["M12f"] and m12["state"] == "to run"
    assert m12["dims"]["norm_groups"] == [32, 32] and len(m12["fingerprint"]) == 12
    assert not any(tmp_path.iterdir())  # planning writes nothing


def _longer_smoke(raw):
    raw["profiles"]["smoke"]["train"].update(steps=28, save_every=4)


@pytest.mark.slow
def test_kill_9_mid_node_resumes_and_the_report_matches(tmp_path):
    stages = edited_stages(tmp_path, _longer_smoke)
    args = ["run", stages, "--profile", "smoke", "--node", "L5", "--no-progress"]
    straight = subprocess.run([DEEPFUSION, *args, "--runs-dir", tmp_path / "a"],
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    runs = tmp_path / "b"
    plan = build_plan(stages, "smoke", runs)
    l5 = plan.nodes["L5"]
    # L5's parents, done, as another store holds them (a store is plain directories): only
    # L5 itself trains again.
    straight_plan = build_plan(stages, "smoke", tmp_path / "a")
    for name in plan.ancestry("L5")[:-1]:
        shutil.copytree(straight_plan.nodes[name].dir, plan.nodes[name].dir)
    proc = subprocess.Popen([DEEPFUSION, *args, "--runs-dir", runs],
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [r["step"] for r in read_metrics(l5.dir / "metrics.jsonl") if r["kind"] == "train"]
        if steps and steps[-1] >= 14 and (Workdir(l5.dir).latest_checkpoint_step() or 0) >= 8:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ma_done = (plan.nodes["Ma"].dir / "DONE").stat().st_mtime_ns
    assert not Workdir(l5.dir).is_done()

    resumed = subprocess.run([DEEPFUSION, *args, "--runs-dir", runs], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert Workdir(l5.dir).done_record().first_step >= 8
    assert (plan.nodes["Ma"].dir / "DONE").stat().st_mtime_ns == ma_done

    def rows(root):
        with open(root / "six-settings" / "report" / "smoke" / "settings.csv") as f:
            return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)]
    assert rows(runs) == rows(tmp_path / "a") and len(rows(runs)) == 1


def test_table1_file_plans_its_four_settings(tmp_path):
    plan = build_plan(REPO / "stages_table1.yaml", "smoke", tmp_path)
    kinds = [n.kind for n in plan.nodes.values()]
    assert kinds.count("train") == 6 and kinds.count("fuse") == 3
    assert plan.nodes["Mprop"].model.norm_groups == (32, 32)
    assert plan.nodes["Mrule"].model.norm_groups == (64,)
    assert list(plan.stages.settings) == ["baseline", "fusion-rule", "fusion-prop", "self-fusion"]


def test_replicas_add_copies_of_the_dag_with_offset_seeds_and_keep_replica_0(tmp_path):
    one = build_plan(STAGES, "smoke", tmp_path)

    def edit(raw):
        raw["profiles"]["smoke"]["replicas"] = 3
    three = build_plan(edited_stages(tmp_path, edit), "smoke", tmp_path)
    assert len(three.nodes) == 3 * len(one.nodes)
    # Raising replicas only adds nodes: replica 0 is the file as written.
    assert all(three.nodes[n].fingerprint == node.fingerprint for n, node in one.nodes.items())
    assert tuple(three.nodes["L4@2"].parents) == ("L4f@2",)
    assert tuple(three.nodes["L4f@2"].parents) == ("M12@2", "M34@2")
    s1 = three.nodes["S1@2"]
    assert s1.seed == s1.data.seed == 2011 and three.nodes["M12f@2"].seed == 2000
    assert len({n.fingerprint for n in three.nodes.values()}) == len(three.nodes)
    assert three.ancestry("L2@1") == ["S1@1", "S2@1", "M12f@1", "M12@1", "L2f@1", "L2@1"]


@pytest.mark.slow
def test_more_steps_continue_the_finished_run_bit_identically(smoke_run, tmp_path):
    plan, _, _, runs, _ = smoke_run
    s1_done = (plan.nodes["S1"].dir / "DONE").stat().st_mtime_ns

    def longer(raw):
        raw["nodes"]["S1"]["overrides"] = {"steps": 12}
    stages = edited_stages(tmp_path, longer)
    extended = build_plan(stages, "smoke", runs)
    node = extended.nodes["S1"]
    assert extended.extension_source("S1") == (plan.nodes["S1"].dir, 8)
    assert extended.state("S1") == ("resumable", 8)
    # Its descendants train on a different S1: they are new nodes.
    assert extended.nodes["M12f"].fingerprint != plan.nodes["M12f"].fingerprint
    logs = []
    assert run_plan(extended, only=["S1"], log=logs.append) == {"S1": "ran"}
    assert any(f"extending {plan.nodes['S1'].dir.name} from its step 8" in m for m in logs)
    done = Workdir(node.dir).done_record()
    assert (done.first_step, done.step) == (8, 12)
    assert (plan.nodes["S1"].dir / "DONE").stat().st_mtime_ns == s1_done  # left as it was
    steps = [r["step"] for r in read_metrics(node.dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))

    fresh = build_plan(stages, "smoke", tmp_path / "fresh")
    assert fresh.extension_source("S1") is None
    run_plan(fresh, only=["S1"], log=lambda m: None)
    _, extended_params = load_model(node.dir)
    _, fresh_params = load_model(fresh.nodes["S1"].dir)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()),
                                     extended_params, fresh_params))


def test_adamw_runs_are_not_extended(tmp_path):
    def adamw(steps):
        def edit(raw):
            raw["nodes"]["S1"]["overrides"] = {"steps": steps, "optimizer": "adamw"}
        return edited_stages(tmp_path, edit)
    short = build_plan(adamw(4), "smoke", tmp_path / "runs")
    run_plan(short, only=["S1"], log=lambda m: None)
    # Adafactor's schedule would allow it; AdamW's cosine ends where `steps` says.
    assert build_plan(adamw(8), "smoke", tmp_path / "runs").extension_source("S1") is None


def test_every_done_names_its_code_and_a_store_of_two_versions_says_so(smoke_run, tmp_path):
    plan, *_ = smoke_run
    codes = {Workdir(n.dir).done_record().code for n in plan.nodes.values()}
    assert codes == {code_version()}  # every node, of every kind
    assert "versions of the code" not in Path(smoke_run[2]["markdown"]).read_text()
    # The same store with one node made by other code under the same fingerprint.
    runs = tmp_path / "runs"
    shutil.copytree(smoke_run[3], runs, ignore=shutil.ignore_patterns("checkpoints", "model"))
    copy = build_plan(STAGES, "smoke", runs)
    done = Workdir(copy.nodes["S1"].dir)
    done.mark_done(done.done_record().model_copy(update={"code": "0123456789ab"}))
    text = Path(write_report(copy)["markdown"]).read_text()
    assert (f"made by 2 versions of the code** (nodes per version: `{code_version()}` 22, "
            f"`0123456789ab` 1)") in text
