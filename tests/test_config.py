"""The config classes (deepfusion_core/config.py) are the one home of every setting: a field
added to one reaches the stages schema, the command line and (for what is computed) the
fingerprint, with no other edit."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepfusion_core.config import ExecutionConfig, OptimizerConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
# Run inside a copy of the packages whose config.py has one more field: what sees it?
PROBE = """
import json, sys
import typer.main
import yaml
from deepfusion_cli.main import app
from pipeline.plan import build_plan
from pipeline.spec import json_schema

field, value, stages = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
train = typer.main.get_command(app).commands["train"]
plain = build_plan(stages, "smoke", "runs").nodes["S1"]
raw = yaml.safe_load(open(stages))
raw["profiles"]["smoke"]["train"][field] = value
open("edited.yaml", "w").write(json.dumps(raw))
edited = build_plan("edited.yaml", "smoke", "runs").nodes["S1"]
print(json.dumps({
    "schema": field in json_schema()["$defs"]["TrainSettings"]["properties"],
    "cli": "--" + field.replace("_", "-") in [o for p in train.params for o in p.opts],
    "fingerprint_changes": plain.fingerprint != edited.fingerprint,
    "in_record": field in edited.fingerprint_record["train"],
    "in_compile_key": field in edited.train.optimizer_config.model_fields,
    "reaches_train": getattr(edited.train, field) == value,
}))
"""
FIELDS = {
    "optimizer": ("OptimizerConfig", "    weight_decay: float",
                  '    label_smoothing: float = Field(default=0.0, ge=0, description="Smoothing.")\n',
                  "label_smoothing", 0.1),
    "execution": ("ExecutionConfig", "    eval_every: int",
                  '    log_every: int = Field(default=10, gt=0, description="Log every K steps.")\n',
                  "log_every", 5),
}


def test_the_classes_split_what_is_computed_from_how_it_runs():
    assert set(TrainConfig.model_fields) == (set(OptimizerConfig.model_fields)
                                             | set(ExecutionConfig.model_fields) | {"mesh"})
    tc = TrainConfig(steps=5, learning_rate=0.5, save_every=2, mesh="data=1,model=1")
    assert tc.optimizer_config == OptimizerConfig(steps=5, learning_rate=0.5)


@pytest.mark.parametrize("kind", sorted(FIELDS))
def test_a_new_field_reaches_the_schema_the_cli_and_the_fingerprint(kind, tmp_path):
    cls, before, line, field, value = FIELDS[kind]
    for package in ("deepfusion_core", "pipeline", "deepfusion_cli"):
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "deepfusion_core" / "config.py"
    text = config.read_text()
    body = text.index(f"class {cls}(")
    at = text.index(before, body)  # the new field goes inside the class, before this one
    config.write_text(text[:at] + line + text[at:])
    raw = yaml.safe_load((REPO / "stages.yaml").read_text())
    stages = tmp_path / "stages.yaml"
    stages.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = subprocess.run([sys.executable, "-c", PROBE, field, json.dumps(value), str(stages)],
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                            "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    computed = kind == "optimizer"
    assert seen == {"schema": True, "cli": True, "fingerprint_changes": computed,
                    "in_record": computed, "in_compile_key": computed, "reaches_train": True}
