"""The GLUE experiment end to end (stages_glue.yaml at its smoke profile, through the real
CLI, on the real GLUE files), its report (Tables 3, 4 and 5, the plot, the claims on GLUE
judged on synthetic node stores whose verdict is known), and a fine-tune node killed with
SIGKILL that resumes bit-identically."""

from __future__ import annotations

import csv
import os
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
from deepfusion_core import load_model
from deepfusion_core.glue import task as glue_task
from deepfusion_core.metrics import TrainRecord
from pipeline.job import FinetuneJob, read_job, write_job
from pipeline.plan import build_plan
from pipeline.report import write_report
from pipeline.workdir import NodeSummary, Workdir

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages_glue.yaml"
DEEPFUSION = str(Path(sys.executable).parent / "deepfusion")


@pytest.fixture(scope="module")
def smoke(shared_data, tmp_path_factory):
    """`deepfusion run stages_glue.yaml --profile smoke`, the command itself, in this process
    (a process of its own would only add its start-up)."""
    runs = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, ["run", str(STAGES), "--profile", "smoke", "--runs-dir",
                                      str(runs)])
    assert result.exit_code == 0, result.output[-3000:]
    return build_plan(STAGES, "smoke", runs), result


@pytest.mark.slow
def test_the_smoke_dag_fine_tunes_every_model_and_reports_table_3(smoke):
    plan, _ = smoke
    assert all(Workdir(node.dir).is_done() for node in plan.nodes.values())
    finetuned = [n for n in plan.nodes.values() if isinstance(n, FinetuneJob)]
    assert len(finetuned) == 11
    for node in finetuned:
        summary = Workdir(node.dir).done_record()
        assert summary.kind == "finetune" and summary.step == node.train.steps
        assert sorted(summary.glue) == sorted(["cola", "sst2", "mrpc", "stsb", "rte"])
        assert summary.glue_average == pytest.approx(
            np.mean([np.mean(list(m.values())) for m in summary.glue.values()]))
    report = (plan.root / "report" / "smoke" / "report.md").read_text()
    table3 = report.split("(the paper's Table 3)", 1)[1].split("####", 1)[0]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
            for line in table3.splitlines() if line.startswith("| ") and "setting" not in line}
    # A row per setting, a cell per fine-tune column it has (the paper's figure beside it).
    assert set(rows) == set(plan.stages.settings)
    columns = ["0", "K/2", "K", "2K"]
    for label, setting in plan.stages.settings.items():
        for column, cell in zip(columns, rows[label]):
            assert (cell.strip(" |") != "—") == (column in setting.finetuned), (label, column)
            if column in setting.finetuned:
                assert f"({setting.paper.glue[column]:g})" in cell
    assert "(the paper's Table 4)" in report and "(the paper's Table 5)" in report
    assert "| CoLA MCC | SST-2 acc. | MRPC F1 | MRPC acc. |" in report
    with (plan.root / "report" / "smoke" / "glue.csv").open() as f:
        glue_csv = list(csv.DictReader(f))
    assert len(glue_csv) == 11 and "cola matthews_corrcoef" in glue_csv[0]
    assert (plan.root / "report" / "smoke" / "glue.png").stat().st_size > 10_000
    # The GLUE claims are judged (one seed: no interval).
    assert report.count("| glue |") == len([c for c in plan.stages.claims if c.metric == "glue"])


def test_fine_tunes_start_where_the_paper_says(smoke):
    plan, _ = smoke
    nodes = plan.nodes
    # The baseline's step 0 is its own random init (its seed, no model to load); the others
    # start from the kept checkpoint at their fraction of the steps, or the fused model.
    assert nodes["G_base_0"].init is None and nodes["G_base_0"].seed == nodes["M0"].seed
    assert nodes["G_base_half"].init == nodes["M0"].dir / "checkpoints" / "2"
    assert nodes["G_base_K"].init == nodes["M0"].dir / "checkpoints" / "4"
    assert nodes["G_prop_0"].init == Workdir(nodes["Mprop_f"].dir).model
    assert nodes["G_small_2K"].init == nodes["S1long"].dir / "checkpoints" / "8"
    for name in ("G_base_half", "G_base_K", "G_small_2K"):
        assert nodes[name].init.is_dir()  # kept by the parent's keep_every


def _synthetic_store(tmp_path, glue_dir: Path, glue: dict[str, list[float]],
                     eval_tasks: tuple[str, ...] | list[str] = ()):
    """The GLUE smoke DAG with three seeds, every node DONE with made-up figures: each
    fine-tune node's GLUE average from `glue` (by its setting@column label, per seed)."""
    raw = yaml.safe_load(STAGES.read_text())
    raw["profiles"]["smoke"]["replicas"] = 3
    raw["profiles"]["smoke"]["finetune"]["data"]["eval_tasks"] = list(eval_tasks)
    stages = tmp_path / "stages_glue.yaml"
    stages.write_text(yaml.safe_dump(raw, sort_keys=False).replace(
        "glue:../shared/data/glue", f"glue:{glue_dir}"))
    plan = build_plan(stages, "smoke", tmp_path / "runs")
    labels = {ref: f"{label}@{column}" for label, s in plan.stages.settings.items()
              for column, ref in s.finetuned.items()}
    for name, node in plan.nodes.items():
        base, _, replica = name.partition("@")
        fields = {"node": name, "kind": node.kind, "fingerprint": node.fingerprint,
                  "run_wall_s": 1.0, "flops": node.flops, "tokens": 1, "wall_s": 1.0,
                  "device_s": 1.0}
        if node.kind != "fuse":
            fields.update(step=node.train.steps, eval_loss=3.0, eval_loss_sum=30.0,
                          eval_accuracy=0.3)
        if node.kind == "finetune":
            # Every trained task scores `average`; a task only scored (not trained on) 0. The
            # stored average is over all of them, as nodes before 2026-12-07 wrote it.
            average = glue[labels[base]][int(replica or 0)]
            scores = {t: dict.fromkeys(glue_task(t).metrics, float(average))
                      for t in node.data.tasks}
            scores |= {t: dict.fromkeys(glue_task(t).metrics, 0.0) for t in eval_tasks}
            fields.update(glue=scores, glue_average=float(np.mean(
                [np.mean(list(m.values())) for m in scores.values()])))
        node.dir.mkdir(parents=True)
        Workdir(node.dir).mark_done(NodeSummary(**fields))
    return plan


def test_glue_claims_are_judged_on_paired_seeds(shared_data, tmp_path):
    glue = {"baseline@0": [60, 61, 62], "baseline@K/2": [70, 70, 70], "baseline@K": [75, 75, 75],
            "baseline@2K": [80, 81, 82],
            # Self fusion: ahead of the Small in every seed; fusion-prop: ahead by -1, +1, 0.
            "self-fusion@0": [79, 80, 81], "self-fusion@K/2": [80, 81, 82],
            "self-fusion@K": [81, 82, 83],
            "fusion-prop@0": [79, 80, 81], "fusion-prop@K/2": [79, 80, 81],
            "fusion-prop@K": [79, 82, 82],
            "T5-small@2K": [77, 78, 79.5]}
    plan = _synthetic_store(tmp_path, shared_data / "glue", glue)
    claims = write_report(plan)["claims"]
    [beats_small, ahead_at_0, reaches, saving] = claims
    # self-fusion@0 - T5-small: 2, 2, 1.5 in the three seeds.
    assert beats_small["verdict"] == "holds" and beats_small["seeds"] == 3
    assert beats_small["measured"].startswith("self-fusion@0: +1.83 [")
    assert ahead_at_0["verdict"] == "holds"
    # fusion-prop@K - baseline: -1, +1, 0 (inconclusive); self-fusion: +1 in every seed.
    assert reaches["verdict"] == "inconclusive"
    assert "fusion-prop: +0.00 [" in reaches["measured"]
    # Self fusion first reaches the baseline's GLUE at its column K/2 in every seed.
    assert saving["verdict"] == "holds" and saving["seeds"] == 3


def test_a_task_only_scored_is_reported_but_not_in_the_glue_average(shared_data, tmp_path):
    """QNLI scored zero-shot (the profile's eval_tasks) would drag every GLUE average by a
    figure that says nothing of fine-tuning: the average is over the tasks trained on."""
    glue = {"baseline@0": [60] * 3, "baseline@K/2": [70] * 3, "baseline@K": [75] * 3,
            "baseline@2K": [80] * 3, "self-fusion@0": [79] * 3, "self-fusion@K/2": [80] * 3,
            "self-fusion@K": [81] * 3, "fusion-prop@0": [79] * 3, "fusion-prop@K/2": [79] * 3,
            "fusion-prop@K": [82] * 3, "T5-small@2K": [77] * 3}
    plan = _synthetic_store(tmp_path, shared_data / "glue", glue, eval_tasks=["qnli"])
    report = Path(write_report(plan)["markdown"]).read_text()
    table3 = report.split("(the paper's Table 3)", 1)[1].split("####", 1)[0]
    assert ("| baseline | 60.00 ± 0.00 (64.07) | 70.00 ± 0.00 (83.33) | 75.00 ± 0.00 (84.35) | "
            "80.00 ± 0.00 (84.74) |") in table3
    assert "over the tasks fine-tuned on (cola, sst2, mrpc, stsb, rte)" in table3
    table5 = report.split("(the paper's Table 5)", 1)[1]
    assert "| RTE acc. | QNLI acc. (not trained on) |" in table5
    assert "| baseline | 80.0 | 0.0 |" in table5  # RTE trained, QNLI only scored
    with (plan.root / "report" / "smoke" / "glue.csv").open() as f:
        assert {float(r["glue_average"]) for r in csv.DictReader(f)} == {
            float(v) for values in glue.values() for v in values}


def test_a_fine_tune_node_killed_with_sigkill_resumes_bit_identically(smoke, tmp_path):
    """The smoke run's G_prop_K (4 steps, a checkpoint every 2) run again in a directory of
    its own, killed with SIGKILL after a checkpoint and run again: the same params, train
    records and GLUE scores as the smoke run's uninterrupted node."""
    plan, _ = smoke
    job = plan.job("G_prop_K")
    straight, node_dir = job.dir, tmp_path / job.dir.name
    write_job(job.model_copy(update={
        "dir": node_dir, "train": job.train.model_copy(update={"log_every": 1})}))
    killed = subprocess.Popen([DEEPFUSION, "run-job", str(node_dir)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while (Workdir(node_dir).latest_checkpoint_step() or 0) < 2:
        assert killed.poll() is None and time.time() < deadline, "it ended before the kill"
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not Workdir(node_dir).is_done()
    subprocess.run([DEEPFUSION, "run-job", str(node_dir)], check=True, capture_output=True,
                   timeout=600)
    want, got = Workdir(straight).done_record(), Workdir(node_dir).done_record()
    assert got.first_step >= 2 and want.first_step == 0
    assert got.glue == want.glue and got.eval_loss == want.eval_loss
    same = jax.tree.map(np.array_equal, load_model(straight)[1], load_model(node_dir)[1])
    assert all(jax.tree.leaves(same))

    def losses(node):
        return [(r.step, r.loss) for r in Workdir(node).metrics_records()
                if isinstance(r, TrainRecord)]
    assert losses(node_dir) == losses(straight) and len(losses(straight)) == 4
    assert read_job(node_dir).kind == "finetune"
