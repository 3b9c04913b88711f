"""The `stages.yaml` schema (pydantic) and its loading.

A stages file declares profiles (model sizes, data, training settings and mesh per scale),
nodes (train, fuse or finetune) and settings (what the report compares)::

    name: six-settings
    default_profile: tiny
    profiles:
      tiny: {models: {S: cpu-S, M: cpu-M, L: cpu-L}, data: {...}, train: {steps: 300, ...}}
    nodes:
      S1:   {train: S, seed: 1}
      M12f: {fuse: [S1, S2], norm: prop, cross_std: 1.0e-3}
      M12:  {train: M, init: M12f}
      G12:  {finetune: M12, at: 0.5}      # GLUE, from M12's checkpoint halfway
    settings:
      "4": {node: L4, description: "...", paper: {accuracy: 70.74, train_nodes: 7}}

Structure is checked here; cross-references (dangling names, cycles, shapes) in
`pipeline.plan.build_plan`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag,
                      ValidationError, field_validator, model_validator)

from deepfusion_core import glue
from deepfusion_core.config import (MAX_SEED, ExecutionConfig, OptimizerConfig, T5Config,
                                    source_parts)
from deepfusion_core.errors import validation_errors
from deepfusion_core.mesh_spec import parse_mesh


SEED_STRIDE = 1000  # replica k of a stages file offsets every seed by k * SEED_STRIDE
MAX_REPLICAS = 100
# A node's seed plus the largest replica offset stays within the core's MAX_SEED.
MAX_NODE_SEED = MAX_SEED - (MAX_REPLICAS - 1) * SEED_STRIDE
MAX_STAGES_BYTES = 1 << 20
# Pipeline, profile and node names become directory names under the runs directory: one
# path component, no "..", nothing a shell or a file system treats specially.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_NAME = re.compile(NAME_PATTERN)


def check_name(name: Any, what: str = "name") -> str:
    """`name` if it is a safe name (`NAME_PATTERN`, no ".."); ValueError otherwise."""
    if isinstance(name, str) and "@" in name:
        raise ValueError(f"{what} {name!r}: '@' is kept for replica names (NODE@k)")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} must match {NAME_PATTERN} without '..' (it names a "
                         f"directory)")
    return name


def _check_names(mapping: dict, what: str) -> dict:
    for key in mapping:
        check_name(key, what)
    return mapping


class _Strict(BaseModel):
    # strict: `steps: true` or `seed: "3"` is refused, not coerced; no NaN or infinity in any
    # float (an infinite learning rate would train to NaN).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelDims(_Strict):
    """A model size given by its dimensions instead of a preset name."""

    d_model: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    d_ff: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"


class DataSettings(_Strict):
    """Data of a profile; each train node adds its own seed."""

    source: str = "builtin"  # builtin | c4:PATH (relative to the stages file) | tfds:DATA_DIR
    vocab: str = "byte"  # byte | t5:PATH (relative to the stages file)
    inputs_length: int = Field(default=128, ge=8)
    targets_length: int = Field(default=32, ge=2)
    batch_size: int = Field(default=8, gt=0)
    pack: bool = True


class TrainSettings(OptimizerConfig, ExecutionConfig):
    """Training settings of a profile: the core's optimizer and execution configs, composed
    (a field added to either is a stages field too)."""

    model_config = _Strict.model_config


class GlueData(_Strict):
    """Fine-tuning data of a profile: GLUE tasks in T5's text-to-text form (same vocab as
    the profile's pretraining data)."""

    source: str = Field(description="glue:PATH, GLUE's TSV layout (relative to the stages file)")
    tasks: list[str] = Field(min_length=1, description="trained on as a mixture, and scored")
    eval_tasks: list[str] = Field(default=[], description=(
        "also scored on their dev sets, not trained on (e.g. QNLI with only its dev set); "
        "reported beside the GLUE average, not in it"))
    inputs_length: int = Field(default=128, ge=8)
    targets_length: int = Field(default=8, ge=2)
    batch_size: int = Field(default=8, gt=0)
    pack: bool = True
    eval_examples: int | None = Field(default=None, gt=0, description=(
        "score each task on its first N dev examples (default: all of them)"))

    @field_validator("source")
    @classmethod
    def _glue_source(cls, v: str) -> str:
        if not v.startswith("glue:"):
            raise ValueError(f"source must be glue:PATH, not {v!r}")
        source_parts(v)  # and a PATH after it
        return v

    @field_validator("tasks", "eval_tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        for name in v:
            glue.task(name)  # one line naming the task and the known ones
        if len(set(v)) < len(v):
            raise ValueError(f"{v} names a task twice")
        return v


class TrainOverrides(_Strict):
    """Per-node changes to the profile's training settings."""

    steps: int | None = Field(default=None, gt=0)
    steps_scale: int | None = Field(default=None, gt=0, description=(
        "the profile's steps times this (a baseline trained twice as long in every profile)"))
    learning_rate: float | None = Field(default=None, gt=0)
    warmup_steps: int | None = Field(default=None, ge=0)
    optimizer: Literal["adafactor", "adamw"] | None = None

    @model_validator(mode="after")
    def _one_way_to_set_steps(self):
        if self.steps is not None and self.steps_scale is not None:
            raise ValueError("give steps or steps_scale, not both")
        return self


class FinetuneSettings(_Strict):
    """Fine-tuning of a profile: the GLUE data, and the training settings of fine-tune nodes."""

    data: GlueData
    train: TrainSettings


class Profile(_Strict):
    """One scale of the experiment: sizes, data, training and hardware."""

    description: str = ""
    models: dict[str, str | ModelDims]  # size name (S, M, L) -> preset name or dimensions
    data: DataSettings = DataSettings()
    train: TrainSettings
    # data=D,model=M for every size, or one per size ({S: ..., L: ...}); None: all on data.
    mesh: str | dict[str, str] | None = None
    processes: int = Field(default=1, gt=0)  # JAX processes per train node (hosts of a slice)
    # Devices of a train node, all its processes together, where the profile runs: for a
    # profile planned away from its hardware (a TPU slice, from a laptop). Every mesh must use
    # exactly these; without it, the devices a node started on the planning machine gets.
    devices: int | None = Field(default=None, gt=0)
    device_memory_gb: float | None = Field(default=None, gt=0)  # plan refuses nodes above it
    # Independent runs of the whole DAG (seeds). Replica k >= 1 adds k * SEED_STRIDE to every
    # node's seed and names its nodes NODE@k; replica 0 is the file as written, so raising
    # this only adds nodes.
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    finetune: FinetuneSettings | None = None  # what fine-tune nodes do in this profile

    @field_validator("mesh")
    @classmethod
    def _check_mesh(cls, v: str | dict[str, str] | None):
        for spec in (v.values() if isinstance(v, dict) else [v]):
            if spec is not None:
                parse_mesh(spec)  # raises MeshError (a ValueError): one line naming the problem
        return v

    @model_validator(mode="after")
    def _check_mesh_sizes(self):
        if isinstance(self.mesh, dict) and set(self.mesh) != set(self.models):
            raise ValueError(f"mesh names sizes {sorted(self.mesh)}, but models are "
                             f"{sorted(self.models)}: give one mesh per size")
        if self.devices is not None and self.devices % self.processes:
            raise ValueError(f"devices={self.devices} is not divisible by processes="
                             f"{self.processes} (each process drives its share)")
        if self.device_memory_gb is not None and self.mesh is None:
            raise ValueError("device_memory_gb needs a mesh (the memory per device depends "
                             "on how the model and batch are split)")
        return self

    def mesh_for(self, size: str) -> str | None:
        """The mesh of a node training a model of this size."""
        return self.mesh.get(size) if isinstance(self.mesh, dict) else self.mesh


class TrainNode(_Strict):
    """Train a model of size `train`, from scratch or from the fuse node `init`."""

    train: str
    init: str | None = None
    seed: int = Field(default=0, ge=0, le=MAX_NODE_SEED)  # parameter init and data order
    overrides: TrainOverrides = TrainOverrides()
    description: str = ""


class FuseNode(_Strict):
    """Fuse the models of two or more nodes (the same node twice: self fusion)."""

    fuse: list[str] = Field(min_length=2)
    # None: the exact default (fusion.default_norm): rule for self fusion of a single-group
    # model, prop otherwise. An explicit rule on a grouped self fusion is allowed: it returns
    # to the standard architecture at the cost of exactness.
    norm: Literal["prop", "rule"] | None = None
    cross_std: float = Field(default=0.0, ge=0)
    weights: list[Annotated[float, Field(gt=0)]] | None = None  # averaging weights, sum 1
    seed: int = Field(default=0, ge=0, le=MAX_NODE_SEED)
    description: str = ""

    @field_validator("weights")
    @classmethod
    def _weights_sum_to_one(cls, v: list[float] | None):
        if v is not None and not math.isclose(sum(v), 1.0, abs_tol=1e-6):
            raise ValueError(f"weights {v} must sum to 1 (they average the inputs' logits)")
        return v


class FinetuneNode(_Strict):
    """Fine-tune the model of a train or fuse node on the profile's GLUE tasks, then score it
    on every dev set by decoding."""

    finetune: str
    # Where in the train node's run to start: 0 its initial model (a fuse node's output, or
    # the random init from its seed), 1 its final model; between, the checkpoint at that
    # fraction of its steps, which its keep_every must keep.
    at: float = Field(default=1.0, ge=0, le=1)
    seed: int = Field(default=0, ge=0, le=MAX_NODE_SEED)  # data order
    overrides: TrainOverrides = TrainOverrides()
    description: str = ""


class LoadNode(_Strict):
    """An existing model as a root of the DAG: a deepfusion model checkpoint (or a train
    workdir's latest step) or a transformers T5.1.1 directory (`save_pretrained`), by path
    relative to the stages file. Its fingerprint hashes the files' content."""

    load: str = Field(min_length=1)
    description: str = ""


_KINDS = ("train", "fuse", "finetune", "load")


def _node_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [k for k in _KINDS if k in value]
        if len(kinds) == 1:
            return kinds[0]
    return None


Node = Annotated[Annotated[TrainNode, Tag("train")] | Annotated[FuseNode, Tag("fuse")]
                 | Annotated[FinetuneNode, Tag("finetune")] | Annotated[LoadNode, Tag("load")],
                 Discriminator(_node_kind, custom_error_type="node_kind",
                               custom_error_message="a node has exactly one of 'train', 'fuse', "
                                                    "'finetune' or 'load'")]


class PaperResult(_Strict):
    """The paper's reported figures for a setting (Tables 1 and 2), printed beside ours."""

    accuracy: float | None = Field(default=None, description="final accuracy, in %")
    accuracy_sd: float | None = Field(default=None, ge=0, description="its ± over seeds")
    loss_sum: float | None = Field(default=None, gt=0, description=(
        "the final validation loss summed over the paper's validation set (\"Loss @1M\"); "
        "ours is summed per sequence, so compare the order, not the size"))
    train_nodes: int | None = None
    glue: dict[str, float] = Field(default={}, description=(
        "GLUE average per fine-tune column (Table 3), e.g. {\"0\": 81.01}"))
    tpu_hours: float | None = Field(default=None, gt=0, description=(
        "pretraining time in TPU hours, fusion inputs included (Table 4)"))


class Setting(_Strict):
    """A row of the report: the final node of one way to make the large model, and its
    fine-tuned models by column (Table 3: the fine-tune node of each pretraining step)."""

    node: str
    description: str = ""
    finetuned: dict[str, str] = {}  # column label -> fine-tune node
    paper: PaperResult = PaperResult()


class Claim(_Strict):
    """A statement of the paper that the report checks on the runs' final `metric` (mean over
    seeds): `better` settings each beat `than`; `best` beats every other setting; `close`
    settings are within `within` (accuracy points or loss nats); `saving` saves at least
    `at_least` of the baseline's compute to reach its final accuracy (or loss).

    With `metric: glue` a label is a setting (its last fine-tune column) or SETTING@COLUMN,
    and the value is the fine-tuned model's GLUE average."""

    claim: str
    metric: Literal["accuracy", "loss", "glue"] = "accuracy"
    better: list[str] | None = None
    than: str | None = None
    best: str | None = None
    close: list[str] | None = Field(default=None, min_length=2, max_length=2)
    within: float = Field(default=0.5, gt=0)
    saving: str | None = None
    at_least: float = Field(default=0.0)

    @model_validator(mode="after")
    def _one_test(self):
        tests = [t for t in ("better", "best", "close", "saving") if getattr(self, t) is not None]
        if len(tests) != 1:
            raise ValueError("a claim has exactly one of better (with than), best, close, saving")
        if (self.better is None) != (self.than is None):
            raise ValueError("'better' and 'than' go together")
        return self

    def settings(self) -> list[str]:
        """The setting labels the claim names."""
        return [*(self.better or []), *([self.than] if self.than else []),
                *([self.best] if self.best else []), *(self.close or []),
                *([self.saving] if self.saving else [])]


class Stages(_Strict):
    """A whole stages file."""

    schema_: str | None = Field(default=None, alias="$schema")
    name: Annotated[str, Field(pattern=f"^{NAME_PATTERN}$"),
                    AfterValidator(lambda v: check_name(v, "name"))]
    description: str = ""
    default_profile: str
    profiles: Annotated[dict[str, Profile], AfterValidator(lambda v: _check_names(v, "profile")),
                        Field(min_length=1)]
    nodes: Annotated[dict[str, Node], AfterValidator(lambda v: _check_names(v, "node name")),
                     Field(min_length=1)]
    settings: dict[str, Setting] = {}
    baseline: str | None = None  # the setting the others are compared against
    claims: list[Claim] = []

    @model_validator(mode="after")
    def _seeds_fit_the_stride(self):
        if any(p.replicas > 1 for p in self.profiles.values()):
            for name, node in self.nodes.items():
                if getattr(node, "seed", 0) >= SEED_STRIDE:
                    raise ValueError(f"nodes.{name}.seed: {node.seed} must be below "
                                     f"{SEED_STRIDE} where a profile has replicas > 1 "
                                     f"(replica k adds k * {SEED_STRIDE})")
        return self


class StagesError(ValueError):
    """A stages file that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


_UNION_TAGS = {"train", "fuse", "finetune", "load", "str", "ModelDims"}


def _where(loc: tuple) -> str | None:
    """A pydantic error location without its union tags (a node's "train"/"fuse", a model's
    "str"/"ModelDims"); None for a mapping given for a preset name, which only reports its
    dimension errors, not "should be a valid string"."""
    if len(loc) == 5 and loc[2] == "models" and loc[4] == "str":
        return None
    union_level = 2 if loc[:1] == ("nodes",) else 4 if loc[2:3] == ("models",) else None
    return ".".join(str(p) for i, p in enumerate(loc)
                    if not (i == union_level and p in _UNION_TAGS and len(loc) > i + 1))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a name or a number, not a {type(key).__name__}",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_stages(path: str | Path) -> Stages:
    """Parse and structurally validate a stages file; `StagesError` lists every problem."""
    path = Path(path)
    if not path.is_file():
        raise StagesError([f"{path}: no such stages file"])
    if (size := path.stat().st_size) > MAX_STAGES_BYTES:
        raise StagesError([f"{path}: {size} bytes is larger than a stages file may be "
                           f"({MAX_STAGES_BYTES} bytes)"])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise StagesError([f"{path}: not UTF-8 text (byte {e.start}: {e.reason})"]) from None
    if text.startswith("\ufeff"):
        raise StagesError([f"{path}: starts with a byte order mark; save it as UTF-8 without one"])
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise StagesError([f"{path}:{line} is not valid YAML: {getattr(e, 'problem', e)}"]) from None
    except RecursionError:
        raise StagesError([f"{path}: nested too deeply to be a stages file"]) from None
    if not isinstance(raw, dict):
        raise StagesError([f"{path}: expected a mapping with name, profiles, nodes, settings"])
    try:
        return Stages.model_validate(raw)
    except RecursionError:
        raise StagesError([f"{path}: nested too deeply to be a stages file"]) from None
    except ValidationError as e:
        raise StagesError([f"{path}: {where + ': ' if where else ''}{msg}"
                          for where, msg in validation_errors(e, _where)]) from None


def resolve_model(spec: str | ModelDims) -> T5Config:
    """A profile's model entry as a config (vocab size set later, from the data)."""
    from deepfusion_core.config import PRESETS

    if isinstance(spec, ModelDims):
        return T5Config(**spec.model_dump())
    return PRESETS[spec]


def json_schema() -> dict:
    """The JSON Schema of stages files, for editors (yaml-language-server)."""
    schema = Stages.model_json_schema(by_alias=True)
    schema["title"] = "deepfusion stages file"
    return schema
