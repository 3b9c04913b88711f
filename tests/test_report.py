"""The report's pure parts: seed statistics, the paper's claims, REPRODUCTION.md blocks.
(The report over a real run of the DAG is checked in test_pipeline.py.)"""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepfusion_cli.main import app
from pipeline.plan import build_plan
from pipeline.claims import check_claims
from pipeline.report import markdown_report, summarize, update_document
from pipeline.spec import load_stages

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages.yaml"


def row(setting, replica, acc, reach=None):
    return {"setting": setting, "replica": replica, "description": "", "train_nodes": 1,
            "train_steps": 8, "paper_accuracy": None, "paper_accuracy_sd": None,
            "paper_loss_sum": None, "paper_train_nodes": None, "eval_loss_sum": 14.5,
            "eval_accuracy": acc, "eval_loss": 1.0, "flops": 100.0, "wall_s": 1.0,
            "flops_to_baseline_acc": reach, "saving_to_baseline_acc": reach and 1 - reach / 100,
            "flops_to_baseline_loss": None, "saving_to_baseline_loss": None}


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return build_plan(STAGES, "smoke", tmp_path_factory.mktemp("runs"))


def test_summary_averages_seeds_and_counts_who_reached_the_baseline(plan):
    rows = [row("1", 0, 0.30, 100.0), row("1", 1, 0.32, 100.0),
            row("5", 0, 0.34, 70.0), row("5", 1, 0.36, None)]
    one, five = summarize(plan, rows)
    assert one["replicas"] == 2 and one["eval_accuracy"] == pytest.approx(0.31)
    assert one["accuracy_sd"] == pytest.approx(0.0141421, rel=1e-5)
    assert five["reached_acc"] == 1 and five["saving_to_baseline_acc"] == pytest.approx(0.3)
    assert five["reached_loss"] == 0 and five["saving_to_baseline_loss"] is None


def _table_cells(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| the paper's claim")]


def test_a_narrow_report_splits_the_settings_table_and_keeps_every_cell(plan):
    rows = [row(k, 0, 0.3 + int(k) / 100, 90.0) for k in "123456"]
    summary = summarize(plan, rows)
    claims = check_claims(plan, rows)
    wide = markdown_report(plan, summary, claims)
    narrow = markdown_report(plan, summary, claims, max_columns=8)
    [header, *rows] = _table_cells(wide.split("\n\n| the paper's claim")[0])
    assert len(header) == 17 and len(rows) == 6
    tables = [t for t in narrow.split("\n\n") if t.startswith("| setting")]
    assert len(tables) == 3  # 16 columns after the setting, at most 7 per table
    split = [_table_cells(t) for t in tables]
    assert all(len(cells) <= 8 for table in split for cells in table)
    # Each table leads with the setting; side by side they are the wide table, cell for cell.
    joined = [first + [cell for more in others for cell in more[1:]]
              for first, *others in zip(*split)]
    assert joined == [header, *rows]
    assert wide.split("train nodes done")[1] == narrow.split("train nodes done")[1]


def test_update_document_rewrites_only_its_block(plan, tmp_path):
    doc = tmp_path / "REPRODUCTION.md"
    doc.write_text("intro\n<!-- report stages.yaml smoke -->\nold\n<!-- end report -->\n"
                   "<!-- report stages.yaml tiny -->\nkeep\n<!-- end report -->\n")
    md, png = tmp_path / "r.md", tmp_path / "c.png"
    md.write_text("| table |\n")
    png.write_bytes(b"png")
    assert update_document(doc, plan, {"markdown": str(md), "plot": str(png)})
    text = doc.read_text()
    assert "old" not in text and "| table |" in text and "keep" in text
    assert "![six-settings at smoke](figures/six-settings-smoke.png)" in text
    assert (tmp_path / "figures" / "six-settings-smoke.png").read_bytes() == b"png"


def test_report_into_a_document_without_the_block_fails_in_one_line(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("no blocks\n")
    result = CliRunner().invoke(app, ["report", str(STAGES), "--profile", "smoke",
                                      "--runs-dir", str(tmp_path), "--into", str(doc)])
    assert result.exit_code == 2
    assert "has no block '<!-- report stages.yaml smoke -->'" in result.output
    assert doc.read_text() == "no blocks\n" and not (tmp_path / "six-settings").exists()


def test_every_reproduction_block_names_a_stages_file_and_profile_that_exist():
    blocks = re.findall(r"^<!-- report (\S+) (\S+) -->$", (REPO / "REPRODUCTION.md").read_text(),
                        re.MULTILINE)
    # Every shipped experiment is reproduced in it, each block naming a real profile.
    assert {stages for stages, _ in blocks} == {p.name for p in REPO.glob("stages*.yaml")}
    for stages, profile in blocks:
        assert profile in load_stages(REPO / stages).profiles, (stages, profile)
