"""From a stages file to a plan: resolved nodes in topological order, fingerprints, states.

Every check that can fail on user input runs here, before anything is written, and all
problems are reported together (one line each, naming the node and field).

A node's fingerprint hashes its resolved config (model, training, data, fusion settings) and
its parents' fingerprints, so editing a node changes exactly its and its descendants'
fingerprints. Of the training settings it hashes exactly `OptimizerConfig` and the seed: how
a node is executed (`ExecutionConfig`, the mesh, processes) does not change what it computes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pydantic

from deepfusion_core import sources
from deepfusion_core.errors import validation_lines
from deepfusion_core.eval_check import check_eval_batches
from deepfusion_core.vocab import vocab_size_for_model
from deepfusion_core.config import PRESETS, DataConfig, TrainConfig, source_parts
from deepfusion_core.fusion import FusionError, default_norm, fused_config
from deepfusion_core.memory import train_memory
from deepfusion_core.mesh_spec import check_mesh_fits, parse_mesh
from deepfusion_core.glue import check_tasks
from pipeline import store
from pipeline.job import FinetuneJob, FuseJob, LoadJob, TrainJob
from pipeline.workdir import NODE_FILE, Workdir
from pipeline.spec import (SEED_STRIDE, FinetuneNode, FuseNode, LoadNode, Stages, StagesError,
                           TrainNode, load_stages, resolve_model)

_DIM_FIELDS = ("d_model", "num_heads", "head_dim", "d_ff", "num_layers", "vocab_size")

State = Literal["done", "resumable", "to run", "failed", "blocked"]


PlannedNode = TrainJob | FinetuneJob | FuseJob | LoadJob
NodeSpec = TrainNode | FuseNode | FinetuneNode | LoadNode


@dataclass
class Plan:
    """A validated stages file resolved for one profile, bound to a runs directory."""

    stages: Stages
    stages_path: Path
    profile: str
    root: Path  # RUNS/<pipeline name>
    nodes: dict[str, PlannedNode] = field(default_factory=dict)  # topological order
    warnings: list[str] = field(default_factory=list)  # problems left for run time

    def state(self, name: str) -> tuple[State, int | None]:
        """(state, latest checkpoint step) of a node, read from the node store."""
        node = self.nodes[name]
        here = Workdir(node.dir)
        if here.is_done():
            return "done", None
        if any(self.state(p)[0] in ("failed", "blocked") for p in node.parents):
            return "blocked", None
        step = here.latest_checkpoint_step() if isinstance(node, TrainJob) else None
        if here.failure():
            return "failed", step
        if step is None and (source := self.extension_source(name)):
            step = source[1]
        return ("resumable", step) if step else ("to run", None)

    def extension_source(self, name: str) -> tuple[Path, int] | None:
        """A finished run of this train node with fewer steps and otherwise the same config
        and parents (found by recomputing its fingerprint), to continue instead of starting
        over: (its directory, its last step). None with AdamW, whose cosine schedule depends
        on the total steps; T5's 1/sqrt schedule does not, so the shorter run is exactly the
        start of the longer one."""
        node = self.nodes[name]
        if not isinstance(node, TrainJob) or node.train.optimizer == "adamw":
            return None
        best = None
        for record_path in (self.root / "nodes").glob(f"*/{NODE_FILE}"):
            steps = (store.read_json(record_path) or {}).get("train", {}).get("steps")
            if not isinstance(steps, int) or steps >= node.train.steps:
                continue
            record = node.fingerprint_record
            shorter = {**record, "train": {**record["train"], "steps": steps}}
            src = Workdir(record_path.parent)
            if (src.path.name.endswith(f"-{_fingerprint(shorter)}") and src.is_done()
                    and src.latest_checkpoint_step() == steps
                    and (best is None or steps > best[1])):
                best = (src.path, steps)
        return best

    def job(self, name: str) -> PlannedNode:
        """The node as its process runs it: with, for a train node without checkpoints, the
        finished shorter run it continues (found now: it may have finished since planning)."""
        node = self.nodes[name]
        if isinstance(node, TrainJob) and (source := self.extension_source(name)):
            return node.model_copy(update={"extend_from": source})
        return node

    @property
    def replicas(self) -> int:
        """Runs of the whole DAG in this profile (seeds)."""
        return self.stages.profiles[self.profile].replicas

    def replica_name(self, name: str, replica: int) -> str:
        """The plan's name of a stages-file node in one replica."""
        return name if replica == 0 else f"{name}@{replica}"

    def runnable_order(self, only: Iterable[str] | None = None) -> list[str]:
        """Nodes to consider, topologically: all, or `only` plus the ancestors they need."""
        if only is None:
            return list(self.nodes)
        wanted = {a for n in only for a in self.ancestry(n)}
        return [n for n in self.nodes if n in wanted]

    def ancestry(self, name: str) -> list[str]:
        """The node and all its ancestors, each once, in topological order."""
        seen: set[str] = set()

        def visit(n):
            if n not in seen:
                seen.add(n)
                for p in self.nodes[n].parents:
                    visit(p)
        visit(name)
        return [n for n in self.nodes if n in seen]


def _parents(spec: NodeSpec) -> list[str]:
    if isinstance(spec, FuseNode):
        return list(dict.fromkeys(spec.fuse))
    if isinstance(spec, FinetuneNode):
        return [spec.finetune]
    if isinstance(spec, LoadNode):
        return []
    return [spec.init] if spec.init else []


def _split_label(label: str) -> tuple[str, str | None]:
    """A claim's GLUE label: (setting, column), the column None for the setting's last."""
    setting, _, column = label.partition("@")
    return setting, column or None


def _check_references(stages: Stages) -> list[str]:
    problems = []
    sizes = {s.train for s in stages.nodes.values() if isinstance(s, TrainNode)}
    for pname, profile in stages.profiles.items():
        for size in sorted(sizes - profile.models.keys()):
            problems.append(f"profiles.{pname}.models: no size {size!r} (used by train nodes)")
        for size, spec in profile.models.items():
            if isinstance(spec, str) and spec not in PRESETS:
                problems.append(f"profiles.{pname}.models.{size}: unknown preset {spec!r} "
                                f"(known: {', '.join(PRESETS)})")
    for name, spec in stages.nodes.items():
        if isinstance(spec, TrainNode) and spec.init is not None:
            if spec.init not in stages.nodes:
                problems.append(f"nodes.{name}.init: {spec.init!r} is not a node")
            elif not isinstance(stages.nodes[spec.init], (FuseNode, LoadNode)):
                kind = "train" if isinstance(stages.nodes[spec.init], TrainNode) else "fine-tune"
                problems.append(f"nodes.{name}.init: {spec.init!r} is a {kind} node; init "
                                f"must name a fuse node (or a load node)")
        if isinstance(spec, FinetuneNode):
            if spec.finetune not in stages.nodes:
                problems.append(f"nodes.{name}.finetune: {spec.finetune!r} is not a node")
            elif isinstance(stages.nodes[spec.finetune], FinetuneNode):
                problems.append(f"nodes.{name}.finetune: {spec.finetune!r} is a fine-tune "
                                f"node; fine-tune a train or fuse node")
            elif not isinstance(stages.nodes[spec.finetune], TrainNode) and spec.at != 1.0:
                kind = "fuse" if isinstance(stages.nodes[spec.finetune], FuseNode) else "load"
                problems.append(f"nodes.{name}.at: {spec.finetune!r} is a {kind} node, whose "
                                f"model has no steps; leave out at")
        if isinstance(spec, FuseNode):
            for i, ref in enumerate(spec.fuse):
                if ref not in stages.nodes:
                    problems.append(f"nodes.{name}.fuse[{i}]: {ref!r} is not a node")
            if spec.weights is not None and len(spec.weights) != len(spec.fuse):
                problems.append(f"nodes.{name}.weights: {len(spec.weights)} weights for "
                                f"{len(spec.fuse)} inputs")
    for label, setting in stages.settings.items():
        if setting.node not in stages.nodes:
            problems.append(f"settings.{label}.node: {setting.node!r} is not a node")
        elif not isinstance(stages.nodes[setting.node], TrainNode):
            kind = {FuseNode: "fuse", FinetuneNode: "fine-tune", LoadNode: "load"}[
                type(stages.nodes[setting.node])]
            problems.append(f"settings.{label}.node: {setting.node!r} is a {kind} node; a "
                            f"setting names the train node that makes its final model")
        for column, ref in setting.finetuned.items():
            if not isinstance(stages.nodes.get(ref), FinetuneNode):
                problems.append(f"settings.{label}.finetuned.{column}: {ref!r} is not a "
                                f"fine-tune node")
    for i, claim in enumerate(stages.claims):
        for label in claim.settings():
            setting, column = _split_label(label) if claim.metric == "glue" else (label, None)
            if setting not in stages.settings:
                problems.append(f"claims[{i}]: {setting!r} is not a setting")
            elif claim.metric == "glue" and not stages.settings[setting].finetuned:
                problems.append(f"claims[{i}]: setting {setting!r} has no fine-tuned models "
                                f"(finetuned) to compare on GLUE")
            elif column is not None and column not in stages.settings[setting].finetuned:
                problems.append(f"claims[{i}]: setting {setting!r} has no fine-tune column "
                                f"{column!r}")
    if stages.baseline is not None and stages.baseline not in stages.settings:
        problems.append(f"baseline: {stages.baseline!r} is not a setting")
    if stages.default_profile not in stages.profiles:
        problems.append(f"default_profile: {stages.default_profile!r} is not a profile")
    return problems


def _topological_order(stages: Stages) -> tuple[list[str], list[str]]:
    order, state, problems = [], {}, []

    def visit(name, path):
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            problems.append(f"nodes.{name}: cycle {' -> '.join(cycle)}")
            return
        state[name] = "visiting"
        for parent in _parents(stages.nodes[name]):
            if parent in stages.nodes:
                visit(parent, path + [name])
        state[name] = "done"
        order.append(name)

    for name in stages.nodes:
        visit(name, [])
    return order, problems


def _resolve_path_spec(spec: str, base: Path) -> str:
    """Local paths in `c4:`, `t5:` and `tfds:` are relative to the stages file (URLs stay)."""
    kind, sep, arg = spec.partition(":")
    if kind not in ("c4", "t5", "tfds", "glue") or not arg or "://" in arg:
        return spec
    return f"{kind}:{(base / Path(arg).expanduser()).resolve()}"


def _data_problems(profile: str, settings: dict, eval_batches: int,
                   check_source: bool = True) -> tuple[list[str], int | None]:
    """Problems with a profile's data (one line each) and the model vocab size it needs."""
    where = f"profiles.{profile}.data"
    try:
        dc = DataConfig(**settings)
        vocab_size = vocab_size_for_model(dc.vocab)
    except pydantic.ValidationError as e:
        return validation_lines(e, where), None
    except ValueError as e:
        return [f"{where}: {e}"], None
    try:
        if check_source:
            sources.check_source(dc.source)  # checks that the source exists and holds documents
    except ValueError as e:
        return [f"{where}: {e}"], vocab_size
    try:
        if check_source:
            check_eval_batches(dc, eval_batches)
    except ValueError as e:
        return [f"profiles.{profile}.train.eval_batches: {e}"], vocab_size
    return [], vocab_size


def _mesh_problems(profile: str, prof, sizes: set[str], devices: int) -> list[str]:
    """Each mesh of the profile's train nodes must use exactly the `devices` a node gets."""
    whose = (f"profiles.{profile}.devices" if prof.devices is not None else
             "this machine's; set the profile's devices where it runs elsewhere")
    problems = []
    for mesh in sorted({prof.mesh_for(size) for size in sizes} - {None}):
        data_axis, model_axis = parse_mesh(mesh)
        if data_axis * model_axis != devices:
            problems.append(f"profiles.{profile}.mesh: {mesh} needs {data_axis * model_axis} "
                            f"devices, but a train node gets {devices} ({whose})")
    return problems


def _fingerprint(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def build_plan(stages_path: str | Path, profile: str | None = None,
               runs_dir: str | Path = "runs",
               devices: Callable[[int], int | None] | None = None) -> Plan:
    """Load, validate and resolve a stages file; `StagesError` lists every problem.

    Each mesh must use exactly the devices a train node gets: the profile's `devices`, or
    else `devices(processes)` (`distributed.devices_here` for a plan to run here; None: not
    checked, e.g. in a flow, whose nodes check when they start). Each evaluation must find
    its batches in the validation split. A remote data source (the paper's TFDS bucket) is
    not read: `Plan.warnings` says so.
    """
    stages_path = Path(stages_path)
    stages = load_stages(stages_path)
    problems = _check_references(stages)
    order, cycle_problems = _topological_order(stages)
    problems += cycle_problems
    profile = profile or stages.default_profile
    if profile not in stages.profiles:
        problems.append(f"profile {profile!r} is not defined (profiles: "
                        f"{', '.join(stages.profiles)})")
    if problems:
        raise StagesError([f"{stages_path}: {p}" for p in problems])

    prof = stages.profiles[profile]
    base = stages_path.resolve().parent
    data_settings = prof.data.model_dump()
    data_settings.update(source=_resolve_path_spec(prof.data.source, base),
                         vocab=_resolve_path_spec(prof.data.vocab, base))
    # A bucket (tfds:gs://...) is often unreachable where a plan is made (no credentials on
    # a laptop): it is not checked here; each node checks its data when it starts.
    remote = "://" in prof.data.source
    warnings = [f"profiles.{profile}.data: {prof.data.source} is remote and was not checked"
                ] if remote else []
    problems, vocab_size = _data_problems(profile, data_settings, prof.train.eval_batches,
                                          check_source=not remote)
    node_devices = prof.devices if prof.devices is not None else (
        devices(prof.processes) if devices is not None else None)
    if node_devices is not None:
        sizes_used = {s.train for s in stages.nodes.values() if isinstance(s, TrainNode)}
        problems += _mesh_problems(profile, prof, sizes_used, node_devices)
    if vocab_size is None:  # keep checking the nodes, with the data's problems listed
        data_settings = DataConfig().model_dump(exclude={"seed"})
        vocab_size = vocab_size_for_model(data_settings["vocab"])
    sizes = {size: resolve_model(spec).model_copy(update={"vocab_size": vocab_size})
             for size, spec in prof.models.items()}
    finetune_data = None
    finetuners = [n for n, s in stages.nodes.items() if isinstance(s, FinetuneNode)]
    if finetuners and prof.finetune is None:
        problems.append(f"profiles.{profile}.finetune: missing, and nodes "
                        f"{', '.join(finetuners)} fine-tune")
    elif finetuners:
        finetune_data = _finetune_data(profile, prof, base, data_settings["vocab"], problems)

    warnings += _tied_copies(stages)
    plan = Plan(stages, stages_path, profile, Path(runs_dir) / stages.name,
                warnings=[f"{stages_path}: {w}" for w in warnings])
    for replica in range(prof.replicas):
        for name in order:
            spec = _replica_spec(stages.nodes[name], replica)
            parents = _parents(spec)
            parent_fps = [plan.nodes[p].fingerprint for p in parents if p in plan.nodes]
            if len(parent_fps) < len(parents):
                continue  # a parent failed to resolve; its problem is already listed
            planned = plan.replica_name(name, replica)
            try:
                if isinstance(spec, FuseNode):
                    node = _plan_fuse(planned, spec, plan)
                elif isinstance(spec, LoadNode):
                    node = _plan_load(planned, spec, plan, base, vocab_size)
                elif isinstance(spec, FinetuneNode):
                    if finetune_data is None:
                        continue  # the profile's fine-tuning problem is already listed
                    node = _plan_finetune(planned, spec, plan, sizes, prof, finetune_data,
                                          node_devices)
                else:
                    node = _plan_train(planned, spec, plan, sizes, prof, data_settings,
                                       parent_fps, node_devices)
            except (FusionError, ValueError) as e:
                problems.append(f"nodes.{name}: {e}")
                continue
            plan.nodes[planned] = node.model_copy(update={"replica": replica})
        if problems:
            break  # every replica would repeat the same problems
    if problems:
        raise StagesError([f"{stages_path}: {p}" for p in problems])
    return plan


def _finetune_data(profile: str, prof, base: Path, vocab: str,
                   problems: list[str]) -> dict | None:
    """The DataConfig fields of the profile's fine-tune nodes (each adds its seed), once the
    GLUE files are seen to be there and whole; None, with the problem listed, otherwise."""
    data = prof.finetune.data
    settings = {"source": _resolve_path_spec(data.source, base), "vocab": vocab,
                "tasks": tuple(data.tasks), **data.model_dump(
                    include={"inputs_length", "targets_length", "batch_size", "pack"})}
    glue_dir = source_parts(settings["source"])[1]
    try:
        check_tasks(glue_dir, data.tasks)
        check_tasks(glue_dir, data.eval_tasks, splits=("validation",))
        check_eval_batches(DataConfig(**settings), prof.finetune.train.eval_batches)
    except ValueError as e:
        problems.append(f"profiles.{profile}.finetune.data: {e}")
        return None
    return settings


def _replica_spec(spec: NodeSpec, replica: int) -> NodeSpec:
    """A node as it is in replica `replica`: its seed offset, its references renamed."""
    if replica == 0 or isinstance(spec, LoadNode):  # a loaded model is the same in every seed
        return spec
    update = {"seed": spec.seed + replica * SEED_STRIDE}
    if isinstance(spec, FuseNode):
        update["fuse"] = [f"{p}@{replica}" for p in spec.fuse]
    elif isinstance(spec, FinetuneNode):
        update["finetune"] = f"{spec.finetune}@{replica}"
    elif spec.init is not None:
        update["init"] = f"{spec.init}@{replica}"
    return spec.model_copy(update=update)


def _tied_copies(stages: Stages) -> list[str]:
    """Self fusions with zero cross blocks that a node trains on. Their copies get identical
    updates (the model has no dropout), so only rounding error tells them apart: the grown
    model's course then hangs on ulp-level arithmetic (tests/test_fusion.py shows an adaptive
    optimizer turning it into learning-rate-sized differences)."""
    warnings = []
    for name, spec in stages.nodes.items():
        tied = isinstance(spec, FuseNode) and len(set(spec.fuse)) < len(spec.fuse)
        if not tied or spec.cross_std > 0:
            continue
        trained = [n for n, s in stages.nodes.items()
                   if (isinstance(s, TrainNode) and s.init == name)
                   or (isinstance(s, FinetuneNode) and s.finetune == name)]
        if trained:
            warnings.append(f"nodes.{name}: self fusion with cross_std 0, trained on by "
                            f"{', '.join(trained)}: its copies get identical updates, so only "
                            "rounding error tells them apart; give it small random cross "
                            "blocks (the paper's choice), e.g. cross_std: 1.0e-3")
    return warnings


def _plan_fuse(name, spec: FuseNode, plan: Plan) -> PlannedNode:
    inputs = [plan.nodes[p].model for p in spec.fuse]
    norm = spec.norm or default_norm(inputs, self_fusion=len(set(spec.fuse)) == 1)
    try:
        model = fused_config(inputs, norm)
    except FusionError as e:
        raise ValueError(f"fuse: {e}") from None
    record = {"kind": "fuse", "inputs": [plan.nodes[p].fingerprint for p in spec.fuse],
              "norm": norm, "cross_std": spec.cross_std, "weights": spec.weights,
              "seed": spec.seed, "model": model.model_dump(mode="json")}
    fp = _fingerprint(record)
    return FuseJob(name=name, fingerprint=fp, dir=store.node_path(plan.root, name, fp),
                   model=model, parents={p: plan.nodes[p].dir for p in spec.fuse},
                   spec=spec.model_dump(mode="json"), fingerprint_record=record,
                   inputs=[plan.nodes[p].model_path for p in spec.fuse], input_models=inputs,
                   norm=norm, cross_std=spec.cross_std, weights=spec.weights, seed=spec.seed)


def _plan_train(name, spec: TrainNode, plan: Plan, sizes, prof, data_settings,
                parent_fps, devices: int | None) -> PlannedNode:
    declared = sizes[spec.train]
    model = declared
    if spec.init is not None:
        model = plan.nodes[spec.init].model  # the fused model, with its norm groups
        got = {f: getattr(model, f) for f in _DIM_FIELDS}
        want = {f: getattr(declared, f) for f in _DIM_FIELDS}
        if got != want:
            diff = ", ".join(f"{f}={got[f]} vs {want[f]}" for f in _DIM_FIELDS if got[f] != want[f])
            raise ValueError(f"init: {spec.init!r} makes a model that differs from size "
                             f"{spec.train!r}: {diff}")
        model = model.model_copy(update={"dtype": declared.dtype})
    tc = _train_config(prof.train, spec.overrides, prof.mesh_for(spec.train))
    dc = DataConfig(**data_settings, seed=spec.seed)
    _check_fits(model, tc, dc, prof, devices)
    record = {"kind": "train", "model": model.model_dump(mode="json"), "init": parent_fps,
              # What is computed, by construction: the optimizer's fields and the seed.
              "train": {**tc.optimizer_config.model_dump(mode="json"), "seed": spec.seed},
              # The data as written in the file: a checkout's location is not part of it.
              "data": {**dc.model_dump(mode="json"), "source": prof.data.source,
                       "vocab": prof.data.vocab}}
    fp = _fingerprint(record)
    init = plan.nodes[spec.init] if spec.init else None
    return TrainJob(name=name, fingerprint=fp, dir=store.node_path(plan.root, name, fp),
                    model=model, parents={init.name: init.dir} if init else {},
                    spec=spec.model_dump(mode="json"), fingerprint_record=record,
                    size=spec.train, train=tc, data=dc, seed=spec.seed,
                    init=init.model_path if init else None, processes=prof.processes)


def _train_config(settings, overrides, mesh: str | None) -> TrainConfig:
    """A node's training config: the profile's settings, the node's overrides, the mesh."""
    changed = {k: v for k, v in overrides.model_dump().items() if v is not None}
    if (scale := changed.pop("steps_scale", None)) is not None:
        changed["steps"] = settings.steps * scale
    return TrainConfig(**{**settings.model_dump(), **changed}, mesh=mesh)


def _check_fits(model, tc: TrainConfig, dc: DataConfig, prof, devices: int | None) -> None:
    """The batch must split over the mesh, a step fit the profile's device memory, and the
    attention kernel take the model's compute dtype."""
    if tc.attention == "cudnn" and model.dtype != "bfloat16":
        raise ValueError(f"attention: cudnn needs a bfloat16 model (cuDNN's fused attention), "
                         f"not {model.dtype}")
    # Without a mesh every device is on data: the batch must split over them.
    mesh_shape = parse_mesh(tc.mesh) if tc.mesh else (devices or 1, 1)
    check_mesh_fits(mesh_shape, model, dc.batch_size)
    if prof.device_memory_gb is not None:
        need = train_memory(model, dc.batch_size, dc.inputs_length, dc.targets_length,
                            mesh_shape, tc.optimizer, tc.remat, tc.loss_chunk)
        if need["total"] > prof.device_memory_gb * 2**30:
            raise ValueError(f"needs about {need['total'] / 2**30:.1f} GiB per device ("
                             f"{_gib(need)}), over the profile's device_memory_gb="
                             f"{prof.device_memory_gb:g}; set train.remat: true or use more "
                             f"devices on model")


def kept_steps(tc: TrainConfig) -> list[int]:
    """The checkpoint steps a finished train node keeps: it saves every `save_every` steps
    and at its last; Orbax keeps the last `keep_last` and every multiple of `keep_every`."""
    saved = sorted({*range(tc.save_every, tc.steps + 1, tc.save_every), tc.steps})
    periodic = {s for s in saved if tc.keep_every and s % tc.keep_every == 0}
    return sorted(periodic | set(saved[-tc.keep_last:]))


def _plan_load(name, spec: LoadNode, plan: Plan, base: Path, vocab_size: int) -> PlannedNode:
    """A loaded model: its config read (transformers' or ours: each imports its library only
    here), its fingerprint the hash of its files."""
    source = (base / Path(spec.load).expanduser()).resolve()
    if not source.exists():
        raise ValueError(f"load: {source} does not exist")
    if (source / "config.json").is_file():
        import transformers

        from deepfusion_core.hf import config_from_hf

        kind = "hf"
        model = config_from_hf(transformers.T5Config.from_pretrained(source,
                                                                     local_files_only=True))
    else:
        from deepfusion_core.checkpoint import CheckpointError, model_dir, read_config

        kind = "deepfusion"
        try:
            source = model_dir(source)
            model = read_config(source)
        except CheckpointError as e:
            raise ValueError(f"load: {e} (nor a transformers directory: no config.json)") from None
    if model.vocab_size != vocab_size:
        raise ValueError(f"load: {source} has vocab_size={model.vocab_size}, but the "
                         f"profile's vocab makes {vocab_size}")
    record = {"kind": "load", "source_kind": kind, "content": store.content_digest(source),
              "model": model.model_dump(mode="json")}
    fp = _fingerprint(record)
    return LoadJob(name=name, fingerprint=fp, dir=store.node_path(plan.root, name, fp),
                   model=model, parents={}, spec=spec.model_dump(mode="json"),
                   fingerprint_record=record, source=source, source_kind=kind)


def _start_of_finetune(spec: FinetuneNode, parent: PlannedNode) -> tuple[int, Path | None, int]:
    """(the parent's step, the model to start from, the seed of the random init without
    one) of a fine-tune node."""
    if not isinstance(parent, TrainJob):  # a fuse or load node's model
        return 0, parent.model_path, spec.seed
    steps = parent.train.steps
    step = round(spec.at * steps)
    if abs(spec.at * steps - step) > 1e-9:
        raise ValueError(f"at: {spec.at:g} of {parent.name}'s {steps} steps is not a whole step")
    if step == 0:  # the parent's own start: its init, or the random params of its seed
        return 0, parent.init, parent.seed
    kept = kept_steps(parent.train)
    if step not in kept:
        shown = ", ".join(map(str, kept[:8])) + (", ..." if len(kept) > 8 else "")
        raise ValueError(f"at: {spec.at:g} is step {step} of {parent.name}, which keeps only "
                         f"the checkpoints of steps {shown} (set its keep_every to a divisor of "
                         f"{step} that save_every divides)")
    return step, parent.dir / "checkpoints" / str(step), spec.seed


def _plan_finetune(name, spec: FinetuneNode, plan: Plan, sizes, prof, data_settings: dict,
                   devices: int | None) -> PlannedNode:
    parent = plan.nodes[spec.finetune]
    model = parent.model
    step, init, seed = _start_of_finetune(spec, parent)
    size = parent.size if isinstance(parent, TrainJob) else next(
        (k for k, m in sizes.items()
         if all(getattr(m, f) == getattr(model, f) for f in _DIM_FIELDS)), "")
    mesh = prof.mesh_for(size) if size else prof.mesh if isinstance(prof.mesh, str) else None
    tc = _train_config(prof.finetune.train, spec.overrides, mesh)
    dc = DataConfig(**data_settings, seed=spec.seed)
    _check_fits(model, tc, dc, prof, devices)
    glue = prof.finetune.data
    eval_tasks = [*glue.tasks, *(t for t in glue.eval_tasks if t not in glue.tasks)]
    record = {"kind": "finetune", "model": model.model_dump(mode="json"),
              "init": [parent.fingerprint], "at_step": step,
              "train": {**tc.optimizer_config.model_dump(mode="json"), "seed": spec.seed},
              "data": {**dc.model_dump(mode="json"), "source": glue.source,
                       "vocab": prof.data.vocab},
              "eval": {"tasks": eval_tasks, "examples": glue.eval_examples}}
    fp = _fingerprint(record)
    return FinetuneJob(name=name, fingerprint=fp, dir=store.node_path(plan.root, name, fp),
                       model=model, parents={parent.name: parent.dir},
                       spec=spec.model_dump(mode="json"), fingerprint_record=record,
                       size=size, train=tc, data=dc, seed=seed, init=init,
                       processes=prof.processes, at_step=step, eval_tasks=eval_tasks,
                       eval_examples=glue.eval_examples)


def _gib(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items() if k != "total")


class PlanRow(pydantic.BaseModel):
    """A node as `deepfusion plan` and `status` show it (`--json`: one object per node)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["train", "finetune", "fuse", "load"]
    model: str  # the model's one-line description
    dims: dict  # the model's config
    parents: list[str]
    fingerprint: str
    state: State
    checkpoint_step: int | None
    steps: int | None  # train nodes only, as are mesh and a device's memory
    flops: int | float
    mesh: str | None
    memory: dict[str, int]  # bytes by part, and their total (per device; a fuse node's host)
    dir: str


def plan_records(plan: Plan) -> list[PlanRow]:
    """One row per node: name, kind, dims, parents, fingerprint, state, compute."""
    records = []
    for name, node in plan.nodes.items():
        state, step = plan.state(name)
        train = node.train if isinstance(node, TrainJob) else None
        records.append(PlanRow(
            name=name, kind=node.kind, model=node.model.describe(),
            dims=node.model.model_dump(mode="json"), parents=list(node.parents),
            fingerprint=node.fingerprint, state=state, checkpoint_step=step,
            steps=train.steps if train else None, flops=node.flops,
            mesh=train.mesh if train else None, memory=node.memory(), dir=str(node.dir)))
    return records
