"""The planner: the shipped DAGs' fingerprints are pinned, so a change that would make
existing runs recompute shows up here, node by node."""

import json
import sys
from pathlib import Path

import yaml

from pipeline.plan import build_plan

REPO = Path(__file__).resolve().parents[1]
PINNED = Path(__file__).with_name("fingerprints.json")
# Every profile that plans without data outside ../shared (`small` needs a TFDS directory).
# stages_table1.yaml's paper profile does not plan today (S's 6 heads on a model=4 mesh);
# stages_glue.yaml's needs the whole GLUE where its file says YOUR_GLUE_DIR.
PROFILES = {"stages.yaml": ["smoke", "tiny", "c4-tiny", "c4-cpu", "gpu", "paper",
                            "paper-8gpu"],
            "stages_table1.yaml": ["smoke", "tiny", "c4-tiny", "c4-cpu"],
            "stages_glue.yaml": ["smoke", "cpu", "two-hours"]}


def fingerprints(runs: Path) -> dict[str, dict[str, dict[str, str]]]:
    """{stages file: {profile: {node: fingerprint}}} of the shipped files as planned now."""
    return {stages: {profile: {name: node.fingerprint for name, node in
                               build_plan(REPO / stages, profile, runs).nodes.items()}
                     for profile in profiles}
            for stages, profiles in PROFILES.items()}


def test_the_shipped_dags_keep_their_fingerprints(shared_data, tmp_path):
    pinned, now = json.loads(PINNED.read_text()), fingerprints(tmp_path)
    changed = [f"{stages} {profile} {name}: {fp} -> {now[stages][profile].get(name)}"
               for stages, profiles in pinned.items() for profile, nodes in profiles.items()
               for name, fp in nodes.items() if now[stages][profile].get(name) != fp]
    assert not changed, "fingerprints changed (existing runs would recompute):\n" + "\n".join(changed)
    assert now == pinned  # and no node appeared


def test_a_self_fusion_with_zero_cross_blocks_that_is_trained_on_is_warned_about(
        shared_data, tmp_path):
    """Its copies would get identical updates: only rounding error would tell them apart."""
    raw = yaml.safe_load((REPO / "stages_glue.yaml").read_text())
    del raw["nodes"]["Mself_f"]["cross_std"]  # the self fusion: warned about
    del raw["nodes"]["Mprop_f"]["cross_std"]  # two different models: the exact ensemble, fine
    raw["profiles"]["smoke"]["finetune"]["data"]["source"] = f"glue:{shared_data / 'glue'}"
    stages = tmp_path / "stages_glue.yaml"
    stages.write_text(yaml.safe_dump(raw, sort_keys=False))
    [warning] = build_plan(stages, "smoke", tmp_path / "runs").warnings
    assert warning == (f"{stages}: nodes.Mself_f: self fusion with cross_std 0, trained on by "
                       "Mself, G_self_0: its copies get identical updates, so only rounding "
                       "error tells them apart; give it small random cross blocks (the "
                       "paper's choice), e.g. cross_std: 1.0e-3")


def test_no_shipped_dag_trains_on_tied_copies(shared_data, tmp_path):
    for stages, profiles in PROFILES.items():
        plan = build_plan(REPO / stages, profiles[0], tmp_path)
        assert not [w for w in plan.warnings if "self fusion" in w], stages


if __name__ == "__main__":
    # After a deliberate change: `python tests/test_plan.py RUNS_DIR` rewrites the pins; say
    # in the commit which nodes changed and why.
    PINNED.write_text(json.dumps(fingerprints(Path(sys.argv[1])), indent=1, sort_keys=True) + "\n")
