"""Node jobs (pipeline/job.py): a node's process runs its job.json alone, never the stages
file; a fuse node's process never imports TensorFlow, nor does a train node's whose batches
were made ahead."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.job import FuseJob, TrainJob, read_job, write_job
from pipeline.plan import build_plan
from pipeline.workdir import Workdir

REPO = Path(__file__).resolve().parents[1]
# Run the CLI as a node process would, then report which heavy libraries it imported.
RUN_JOB = """
import sys
from deepfusion_cli.main import app
try:
    app(["run-job", sys.argv[1]])
except SystemExit as e:
    code = e.code
print(f"imported: {sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules)}")
sys.exit(code)
"""


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """The shipped DAG at smoke size with 2 steps per node, its stages file then removed."""
    raw = yaml.safe_load((REPO / "stages.yaml").read_text())
    raw["profiles"]["smoke"]["train"].update(steps=2, save_every=2, eval_every=0)
    path = tmp_path_factory.mktemp("stages") / "stages.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    plan = build_plan(path, "smoke", tmp_path_factory.mktemp("runs"))
    path.unlink()  # the node processes below must not need it
    return plan


def run_job_process(node_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_JOB, str(node_dir)], capture_output=True,
                          text=True, timeout=600)


def test_a_job_round_trips_through_its_file(plan):
    for name in ("S1", "M11f"):
        job = plan.job(name)
        write_job(job)
        assert read_job(job.dir) == job
    assert isinstance(read_job(plan.nodes["S1"].dir), TrainJob)
    assert isinstance(read_job(plan.nodes["M11f"].dir), FuseJob)


def test_a_directory_without_a_job_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"job.json: no such job file"):
        read_job(tmp_path)


@pytest.mark.slow
def test_node_processes_run_their_jobs_without_the_stages_file(plan):
    s1, fused = plan.job("S1"), plan.job("M11f")
    for job in (s1, fused):
        write_job(job)

    early = run_job_process(fused.dir)  # its parent is not done: refused, nothing written
    assert early.returncode == 2 and "its parents are not done: S1" in early.stderr
    assert not Workdir(fused.dir).is_done()

    s1.prepare_batches(log=pytest.fail)  # as the flow does while the node waits for its turn
    trained = run_job_process(s1.dir)
    assert trained.returncode == 0, trained.stderr
    assert "imported: []" in trained.stdout  # its batches were made ahead: no TensorFlow
    assert json.loads(trained.stdout.splitlines()[0])["step"] == 2
    assert Workdir(s1.dir).latest_checkpoint_step() == 2

    done = run_job_process(fused.dir)
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stdout  # a fuse node reads no data: no TensorFlow
    assert Workdir(fused.dir).done_record().node == "M11f"
    assert (fused.dir / "model").is_dir()


def test_batches_that_cannot_be_made_ahead_are_left_to_the_node(plan, tmp_path):
    job = plan.job("S2")
    gone = job.model_copy(update={"data": job.data.model_copy(
        update={"source": f"c4:{tmp_path / 'gone'}"})})
    said = []
    gone.prepare_batches(log=said.append)
    assert len(said) == 1 and said[0].startswith("S2: its batches were not made ahead "
                                                 "(DataError: C4 directory ")
