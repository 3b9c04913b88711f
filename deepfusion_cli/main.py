"""The `deepfusion` command line: the top of the house, it may import every layer.

Every command reports bad input as one `error: ...` line per problem on stderr with exit
status 2, a full disk as one line with status 1 (`deepfusion_cli.errors`, for all commands
alike). Each checks its inputs before writing anything, and never creates a missing parent of
the path it was asked to write.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from deepfusion_cli.errors import FAILURE, USAGE_ERROR, Commands


def fail(message: str) -> None:
    """Print one line to stderr and exit with the usage-error status."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)


app = typer.Typer(cls=Commands, no_args_is_help=True, add_completion=False,
                  help="Grow T5 models by deep fusion: train, fuse, convert, benchmark.")
model_app = typer.Typer(cls=Commands, no_args_is_help=True, help="Inspect models and presets.")
bench_app = typer.Typer(cls=Commands, no_args_is_help=True,
                        help="Benchmarks (one line of figures + JSON).")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")


def _writable(path: Path, option: str, new: bool = False, directory: bool = True) -> None:
    """Refuse, before anything is written, a `path` to write that exists (`new`) or is of the
    wrong kind, or whose parent directory is missing: commands never create the parents."""
    if path.exists():
        if new:
            fail(f"{option} {path} already exists; choose a new path")
        if path.is_dir() != directory:
            fail(f"{option} {path} is {'not ' if directory else ''}a directory")
        return
    parent = path.absolute().parent
    if not parent.is_dir():
        fail(f"{option} {path}: the directory {parent} does not exist")


def _resolve_config(preset_or_ckpt: str):
    from deepfusion_core import PRESETS
    from deepfusion_core.checkpoint import read_config

    if preset_or_ckpt in PRESETS:
        return PRESETS[preset_or_ckpt]
    if not Path(preset_or_ckpt).exists():
        fail(f"{preset_or_ckpt!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
             f"checkpoint path")
    return read_config(preset_or_ckpt)


def _preset(name: str, dtype: str | None = None) -> None:
    """Refuse an unknown preset or compute dtype before a benchmark starts."""
    from deepfusion_core import PRESETS
    from deepfusion_core.config import T5Config

    if name not in PRESETS:
        fail(f"--preset {name!r} is not a preset ({', '.join(PRESETS)})")
    if dtype is not None:
        T5Config.model_validate({**PRESETS[name].model_dump(), "dtype": dtype})


@model_app.command("info")
def model_info(preset_or_ckpt: str,
               as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False):
    """Dimensions, parameter count and norm groups of a preset or a checkpoint."""
    from deepfusion_core import count_params

    cfg = _resolve_config(preset_or_ckpt)
    n = count_params(cfg)
    info = {"model": preset_or_ckpt, **cfg.model_dump(mode="json"), "params": n,
            "param_bytes_float32": 4 * n}
    if as_json:
        typer.echo(json.dumps(info))
        return
    typer.echo(f"{preset_or_ckpt}: {cfg.describe()}")
    typer.echo(f"  parameters: {n:,} ({4 * n / 2**20:,.1f} MiB in float32)")
    typer.echo(f"  norm groups: {list(cfg.norm_groups)}   compute dtype: {cfg.dtype}")


def _parse_weights(text: Optional[str], n: int) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        fail(f"--weights must be comma-separated numbers, got {text!r}")
    if len(weights) != n:
        fail(f"--weights has {len(weights)} values for {n} models")
    return weights


@app.command()
def fuse(checkpoints: Annotated[list[Path], typer.Argument(help="Two or more model checkpoints "
                                                          "(the same one twice: self fusion).")],
         out: Annotated[Path, typer.Option(help="Where to write the fused checkpoint.")],
         norm: Annotated[Optional[str], typer.Option(
             help="prop (grouped RMSNorm, exact ensemble) or rule (one RMSNorm). Default: "
                  "the exact one: rule for self fusion of a single-group model, else prop.")] = None,
         cross_std: Annotated[float, typer.Option(help="Std of the off-diagonal blocks.")] = 0.0,
         seed: Annotated[int, typer.Option(help="Seed of the off-diagonal noise.")] = 0,
         weights: Annotated[Optional[str], typer.Option(
             help="Comma-separated logit averaging weights (default 1/n each).")] = None):
    """Fuse model checkpoints into one wider model (deep fusion)."""
    from deepfusion_core import fuse as fuse_models
    from deepfusion_core import load_model, save_model
    from deepfusion_core.checkpoint import read_config
    from deepfusion_core.fusion import check_fuse_options, check_fusable

    _writable(out, "--out", new=True)
    if norm not in (None, "prop", "rule"):
        fail(f"--norm must be prop or rule, got {norm!r}")
    parsed_weights = _parse_weights(weights, len(checkpoints))
    check_fuse_options(len(checkpoints), cross_std, parsed_weights)
    check_fusable([read_config(c) for c in checkpoints])  # before reading any array
    start = time.perf_counter()
    loaded: dict[Path, tuple] = {}
    for c in checkpoints:  # the same path twice is loaded once (self fusion)
        loaded.setdefault(c.resolve(), load_model(c))
    models = [loaded[c.resolve()] for c in checkpoints]
    cfg, params = fuse_models(models, norm=norm, cross_std=cross_std, seed=seed,
                              weights=parsed_weights)
    save_model(out, cfg, params)
    typer.echo(f"fused {len(models)} models into {out} ({cfg.describe()}) "
               f"in {time.perf_counter() - start:.1f}s")


@app.command("import-hf")
def import_hf(hf_dir: Path, out: Path):
    """Convert a transformers T5ForConditionalGeneration (T5.1.1) directory to a checkpoint."""
    from deepfusion_core.hf import import_hf as convert

    if not hf_dir.is_dir():
        fail(f"{hf_dir} is not a directory (an HF model is saved as one)")
    _writable(out, "OUT", new=True)
    path = convert(hf_dir, out)
    typer.echo(f"imported {hf_dir} into {path}")


@app.command("export-hf")
def export_hf(ckpt: Path, out_dir: Path):
    """Write a checkpoint as a transformers T5ForConditionalGeneration directory."""
    from deepfusion_core.hf import export_hf as convert

    _writable(out_dir, "OUT_DIR", new=True)
    path = convert(ckpt, out_dir)
    typer.echo(f"exported {ckpt} to {path}")


def _parse_seq_len(text: str) -> tuple[int, int]:
    try:
        inputs, targets = (int(x) for x in text.split(","))
    except ValueError:
        fail(f"--seq-len must be IN,OUT (two integers), got {text!r}")
    return inputs, targets


# The train command's options are made from the config classes: every field of the training
# and data configs is an option named after it (a field added there is an option here). A few
# keep a short name of their own too.
_SHORT_NAMES = {"learning_rate": "--lr", "warmup_steps": "--warmup", "batch_size": "--batch",
                "source": "--data"}
# The data's seed is the parameter init's too: one --seed, passed to train() beside the configs.
_SEED_HELP = "Seed of the parameter init, data order and span corruption."


def _or_none(kind: type) -> Callable[[str], object]:
    """A parser of `kind` that reads "none" (any case) as None: how an option turns off a
    setting that may be None (`--grad-clip none`)."""
    def parse(text):
        if not isinstance(text, str):  # the field's default, which click converts too
            return text
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is neither {kind.__name__} nor none") from None

    return parse


def _config_options() -> list[inspect.Parameter]:
    """One keyword parameter with its typer option per field of TrainConfig and DataConfig."""
    from deepfusion_core.config import DataConfig, TrainConfig

    params = []
    for name, field in {**TrainConfig.model_fields, **DataConfig.model_fields}.items():
        kind, parser = field.annotation, None
        if typing.get_origin(kind) is typing.Literal:  # typer takes no Literal: pydantic checks
            kind = str
        args = typing.get_args(kind)
        if type(None) in args:  # X | None: "none" is the value None
            parser = _or_none(next(a for a in args if a is not type(None)))
        default = inspect.Parameter.empty if field.is_required() else field.default
        if typing.get_origin(kind) is tuple:  # a list of names: comma-separated
            kind, default = str, ",".join(default)
            parser = lambda text: tuple(t for t in text.split(",") if t)  # noqa: E731
        names = [f"--{name.replace('_', '-')}", *filter(None, [_SHORT_NAMES.get(name)])]
        if kind is bool:
            names = [f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"]
        option = typer.Option(*names, parser=parser,
                              help=_SEED_HELP if name == "seed" else field.description)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, option]))
    return params


def _with_config_options(command):
    """`command` taking, beside its own parameters, one option per config field (**options)."""
    hints = typing.get_type_hints(command, include_extras=True)  # its own, resolved
    own = [p.replace(annotation=hints[p.name])
           for p in inspect.signature(command).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*own, *_config_options()])
    return command


@app.command()
@_with_config_options
def train(
    workdir: Annotated[Path, typer.Option(help="Checkpoints, metrics.jsonl and TensorBoard "
                                               "events go here; resumes if it holds checkpoints.")],
    model: Annotated[Optional[str], typer.Option(
        help="Preset or checkpoint whose config to train (a preset takes --vocab's size). "
             "Default: the --init checkpoint's config.")] = None,
    init: Annotated[Optional[Path], typer.Option(
        help="Start from this model checkpoint's params (e.g. a fusion output); fresh "
             "optimizer and schedule.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    processes: Annotated[int, typer.Option(min=1,
        help="Run as N cooperating JAX processes on this machine, splitting its CPU devices "
             "(XLA_FLAGS) between them.")] = 1,
    **options,
):
    """Train a model (or resume its workdir) on span-corrupted text."""
    _writable(workdir, "--workdir")
    _launch_or_join(processes, options["batch_size"])

    from deepfusion_core.checkpoint import read_config
    from deepfusion_core.config import DataConfig, TrainConfig
    from deepfusion_core.train import train as run
    from deepfusion_core.vocab import vocab_size_for_model

    if model is None and init is None:
        fail("give --model (a preset or checkpoint) or --init (a checkpoint)")
    tc = TrainConfig(**{k: options[k] for k in TrainConfig.model_fields})
    dc = DataConfig(**{k: options[k] for k in DataConfig.model_fields})
    from deepfusion_core import PRESETS
    if model in PRESETS:
        cfg = PRESETS[model].model_copy(update={"vocab_size": vocab_size_for_model(dc.vocab)})
    else:
        cfg = _resolve_config(model) if model is not None else read_config(init)
    summary = run(cfg, tc, dc, workdir, seed=dc.seed, init=init, progress=progress,
                  log=lambda m: typer.echo(m, err=True))
    if summary is not None:  # the other processes of a multi-process run print nothing
        typer.echo(json.dumps(summary))



def _launch_or_join(processes: int, batch_size: int, command: list[str] | None = None) -> None:
    """Start `processes` local copies of `command` (default: this command) and exit with their
    code, or, inside one of them (or on a cluster host), join the process group the
    environment describes."""
    from deepfusion_core import distributed

    if processes > 1 and not (os.environ.get(distributed.ENV_COORDINATOR)
                              or os.environ.get(distributed.ENV_AUTO)):
        devices = distributed.local_cpu_device_count(dict(os.environ))
        distributed.check_processes(processes, devices, batch_size)
        argv = [sys.executable, "-m", "deepfusion_cli.main", *(command or sys.argv[1:])]
        raise typer.Exit(distributed.launch_local(argv, processes, devices))
    distributed.initialize_from_env()


STAGES_DEFAULT = Path("stages.yaml")


def _plan(stages: Path, profile: Optional[str], runs_dir: Path, writes: bool = False,
          devices=None):
    """The plan (a bad stages file raises `StagesError`: one line per problem). A command that
    `writes` into the runs directory needs it, or its parent, to be a directory. `devices`:
    the train nodes' device count as a function of the profile's processes, for a plan made
    to run here (`build_plan`); a command that trains here also needs a profile's declared
    devices to be those."""
    from pipeline.plan import build_plan

    if writes:
        _writable(runs_dir, "--runs-dir")
    elif runs_dir.exists() and not runs_dir.is_dir():
        fail(f"--runs-dir {runs_dir} is not a directory")
    plan = build_plan(stages, profile, runs_dir, devices=devices)
    declared = plan.stages.profiles[plan.profile]
    if writes and devices is not None and declared.devices is not None and (
            here := devices(declared.processes)) not in (None, declared.devices):
        fail(f"{stages}: profiles.{plan.profile}.devices: its train nodes run on "
             f"{declared.devices} devices, but one started here gets {here}")
    return plan


StagesArg = Annotated[Path, typer.Argument(help="The stages file.")]
ProfileOpt = Annotated[Optional[str], typer.Option(help="Profile (default: the file's "
                                                        "default_profile).")]
RunsOpt = Annotated[Path, typer.Option(help="Runs directory (the node store).")]
NodesOpt = Annotated[Optional[list[str]], typer.Option(
    help="Run only these nodes (and the ancestors they need).")]


@app.command("plan")
def plan_cmd(stages: StagesArg = STAGES_DEFAULT, profile: ProfileOpt = None,
             runs_dir: RunsOpt = Path("runs"),
             as_json: Annotated[bool, typer.Option("--json", help="One record per node.")] = False,
             compile_steps: Annotated[bool, typer.Option(
                 "--compile", help="Also compile each distinct train step on this machine's "
                                   "devices (abstract, nothing allocated) and print XLA's "
                                   "memory per device.")] = False):
    """Validate a stages file and show every node: state, model, parents, compute, memory per
    device."""
    from deepfusion_core.distributed import devices_here
    from pipeline.plan import plan_records

    plan = _plan(stages, profile, runs_dir, devices=devices_here)
    if compile_steps:
        _compile_train_steps(plan)
    for warning in plan.warnings:
        typer.echo(f"warning: {warning}", err=True)
    records = plan_records(plan)
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=1))
        return
    typer.echo(f"{plan.stages.name} at profile {plan.profile} -> {plan.root}")
    width = max(6, *(len(r.name) for r in records))
    for r in records:
        state = r.state + (f" @ step {r.checkpoint_step}" if r.checkpoint_step else "")
        what = {"train": f"train {r.steps} steps", "finetune": f"fine-tune {r.steps} steps",
                "fuse": "fuse", "load": "load"}[r.kind]
        parents = f" <- {', '.join(r.parents)}" if r.parents else ""
        gib = r.memory["total"] / 2**30
        memory = (f"{gib:6.2f} GiB on the host" if r.kind in ("fuse", "load")
                  else f"{gib:6.2f} GiB/device ({r.mesh or 'data=all'})")
        typer.echo(f"  {r.name:<{width}} {state:<16} {what:<22} {r.flops:>9.3g} FLOPs  "
                   f"{memory:<40} {r.model}{parents}  [{r.fingerprint}]")
    kinds = [r.kind for r in records]
    todo = sum(r.state != "done" for r in records)
    finetune = f", {kinds.count('finetune')} fine-tune nodes" if "finetune" in kinds else ""
    typer.echo(f"{kinds.count('train')} train nodes, {kinds.count('fuse')} fuse nodes{finetune}; "
               f"{todo} not done; total {sum(r.flops for r in records):.3g} FLOPs")


def _compile_train_steps(plan) -> None:
    from deepfusion_core.memory import compiled_memory
    from pipeline.job import TrainJob

    seen = set()
    for node in plan.nodes.values():
        if not isinstance(node, TrainJob) or node.size in seen:
            continue  # one step per size: fused inits change only the norm groups
        seen.add(node.size)
        start = time.perf_counter()
        xla = compiled_memory(node.model, node.train, node.data.batch_size,
                              node.data.inputs_length, node.data.targets_length)
        typer.echo(f"compiled {node.name}'s step ({node.train.mesh or 'data=all'}) in "
                   f"{time.perf_counter() - start:.0f}s: XLA arguments "
                   f"{xla['arguments'] / 2**30:.2f} GiB + temporaries "
                   f"{xla['temporaries'] / 2**30:.2f} GiB per device; estimate "
                   f"{node.memory()['total'] / 2**30:.2f} GiB")


@app.command("run")
def run_cmd(stages: StagesArg = STAGES_DEFAULT, profile: ProfileOpt = None,
            runs_dir: RunsOpt = Path("runs"),
            node: NodesOpt = None,
            progress: Annotated[bool, typer.Option(help="Progress bars.")] = True):
    """Run the DAG locally (no Prefect): every node not done, then the report."""
    from deepfusion_core.distributed import devices_here

    # Every node trains in this process, whatever the profile's processes.
    plan = _plan(stages, profile, runs_dir, writes=True, devices=lambda _: devices_here(1))
    for warning in plan.warnings:
        typer.echo(f"warning: {warning}", err=True)
    from pipeline.execute import run_plan  # after the plan, as in status
    from pipeline.report import write_report

    unknown = [n for n in node or [] if n not in plan.nodes]
    if unknown:
        fail(f"--node: {', '.join(unknown)} not in {stages}")
    outcome = run_plan(plan, node, log=lambda m: typer.echo(m, err=True), progress=progress)
    report = write_report(plan)
    typer.echo(f"report: {report['markdown']}")
    failed = [n for n, o in outcome.items() if not o.startswith(("done", "ran"))]
    if failed:
        typer.echo(f"not done: {', '.join(failed)}", err=True)
        raise typer.Exit(FAILURE)


@app.command("run-node")
def run_node_cmd(node: str, stages: StagesArg = STAGES_DEFAULT, profile: ProfileOpt = None,
                 runs_dir: RunsOpt = Path("runs")):
    """Run one node whose parents are done (what each Prefect task runs in its own process).

    A train node of a profile with `processes: N` runs as N JAX processes: launched here on
    one machine, or one per host where the cluster starts this command on every host with
    DEEPFUSION_DISTRIBUTED=auto (see deepfusion_core/distributed.py).
    """
    from deepfusion_core.distributed import devices_here

    plan = _plan(stages, profile, runs_dir, writes=True, devices=devices_here)
    from pipeline.job import write_job

    if node not in plan.nodes:
        fail(f"{node!r} is not a node of {stages}")
    job = plan.job(node)
    write_job(job)  # every host of a cluster node writes the same job
    _run_job(job)


@app.command("run-job")
def run_job_cmd(node_dir: Annotated[Path, typer.Argument(
        help="A node directory holding job.json (written by run-node, run or a flow).")]):
    """Run the node job in NODE_DIR (what each Prefect task runs in its own process): no
    stages file is read and no plan built. Multi-process train nodes as in run-node."""
    from pipeline.job import read_job

    _run_job(read_job(node_dir))


def _run_job(job) -> None:
    """Run `job` here, after checking its parents are done. A train node with processes > 1
    runs as that many local JAX processes, each running `run-job` (or joins its group, on a
    cluster host)."""
    from pipeline.job import TrainJob
    from pipeline.workdir import Workdir

    missing = [name for name, parent in job.parents.items() if not Workdir(parent).is_done()]
    if missing:
        fail(f"{job.name}: its parents are not done: {', '.join(missing)} (run them first)")
    if isinstance(job, TrainJob) and job.processes > 1:
        _launch_or_join(job.processes, job.data.batch_size, ["run-job", str(job.dir)])
    from pipeline.execute import run_job

    summary = run_job(job, log=lambda m: typer.echo(m, err=True))
    if summary is not None:
        typer.echo(json.dumps(summary.to_json()))


@app.command("flow")
def flow_cmd(stages: StagesArg = STAGES_DEFAULT, profile: ProfileOpt = None,
             runs_dir: RunsOpt = Path("runs"),
             node: NodesOpt = None,
             force: Annotated[bool, typer.Option(help="Recompute even DONE nodes.")] = False):
    """Run the DAG as the Prefect flow `staged-growth` (a temporary local server unless
    PREFECT_API_URL points at one)."""
    plan = _plan(stages, profile, runs_dir, writes=True)  # before starting Prefect
    unknown = [n for n in node or [] if n not in plan.nodes]
    if unknown:
        fail(f"--node: {', '.join(unknown)} not in {stages}")
    from flows.staged_growth import staged_growth

    result = staged_growth(str(stages), profile, node, force, str(runs_dir))
    typer.echo(f"report: {result['report']}")


@app.command("status")
def status_cmd(stages: StagesArg = STAGES_DEFAULT, profile: ProfileOpt = None,
               runs_dir: RunsOpt = Path("runs")):
    """Live progress: each node's state and latest step, read from the node store."""
    plan = _plan(stages, profile, runs_dir)
    from deepfusion_core.metrics import TrainRecord
    from pipeline.plan import plan_records
    from pipeline.workdir import Workdir

    for r in plan_records(plan):
        line = f"{r.name:<6} {r.state:<10}"
        if r.kind == "train" and r.state != "to run":
            train = [m for m in Workdir(Path(r.dir)).metrics_records()
                     if isinstance(m, TrainRecord)]
            if train:
                last = train[-1]
                line += (f" step {last.step}/{r.steps} loss {last.loss:.3f} "
                         f"{last.tokens_per_s:,.0f} tok/s")
        typer.echo(line)


@app.command("report")
def report_cmd(stages: StagesArg = STAGES_DEFAULT, profile: ProfileOpt = None,
               runs_dir: RunsOpt = Path("runs"),
               into: Annotated[Path | None, typer.Option(
                   help="Also rewrite this document's block `<!-- report STAGES PROFILE -->` "
                        "... `<!-- end report -->` (REPRODUCTION.md), its plot beside it.")] = None):
    """Write the settings table (Markdown, CSV), the paper's claims checked and the
    accuracy-vs-compute plot from the node store."""
    if into is not None and not into.is_file():
        fail(f"--into: {into} is not a file")
    if not runs_dir.is_dir():
        fail(f"--runs-dir {runs_dir} is not a directory of runs (nothing has run there)")
    plan = _plan(stages, profile, runs_dir)
    from pipeline.report import has_block, update_document, write_report  # as in status

    if into is not None and not has_block(into, plan):
        fail(f"--into: {into} has no block '<!-- report {plan.stages_path.name} "
             f"{plan.profile} -->'")
    report = write_report(plan)
    typer.echo(Path(report["markdown"]).read_text())
    typer.echo(f"written: {report['markdown']} {report['csv']} {report['plot']}")
    if into is not None:
        update_document(into, plan, report)
        typer.echo(f"updated: {into}")


@app.command("schema")
def schema_cmd(out: Annotated[Path, typer.Option(help="Where to write it.")] =
               Path("stages.schema.json")):
    """Write the JSON Schema of stages files (for editors)."""
    from pipeline.spec import json_schema

    _writable(out, "--out", directory=False)
    out.write_text(json.dumps(json_schema(), indent=1) + "\n")
    typer.echo(f"wrote {out}")


def _emit(record: dict, line: str) -> dict:
    """Print a benchmark's line of figures and its record; return the record for `bench all`."""
    typer.echo(line)
    typer.echo(json.dumps(record))
    return record


@bench_app.command("fuse")
def bench_fuse(preset: str = "table7-M", cross_std: float = 0.0):
    """Fuse two random PRESET models; compare wall time and peak RSS with the copy bound."""
    from deepfusion_bench.fuse import bench_fuse as run
    from deepfusion_core.fusion import check_fuse_options

    _preset(preset)
    check_fuse_options(2, cross_std, None)
    r = run(preset, cross_std)
    return _emit(r, f"fuse {r['inputs']} -> {r['output_gb']} GB: wall {r['wall_s']}s = "
                    f"{r['wall_over_copy']}x copy ({r['copy_s']}s); peak RSS {r['peak_rss_gb']} GB = "
                    f"{r['peak_over_in_plus_out']}x (inputs + output)")


RematOpt = Annotated[bool, typer.Option(help="Recompute layers in the backward pass.")]
AttentionOpt = Annotated[str, typer.Option(
    help="Attention kernel: reference, xla or cudnn (GPU, bfloat16).")]
LossChunkOpt = Annotated[int, typer.Option(
    help="Target positions whose logits are made at a time (0: all).")]


def _kernels(remat: bool, attention: str, loss_chunk: int, dtype: str):
    """The step's kernel choices; bad values are one line each, as every command's."""
    from deepfusion_core.config import ExecutionConfig

    if attention == "cudnn" and dtype != "bfloat16":
        fail("--attention cudnn needs --dtype bfloat16 (cuDNN's fused attention)")
    return ExecutionConfig(remat=remat, attention=attention, loss_chunk=loss_chunk).kernels


@bench_app.command("step")
def bench_step(preset: str = "cpu-M", batch: int = 8, seq_len: str = "128,32", steps: int = 10,
               dtype: str = "float32",
               torch: Annotated[bool, typer.Option(help="Also time transformers' PyTorch T5.")] = True,
               remat: RematOpt = False, attention: AttentionOpt = "reference",
               loss_chunk: LossChunkOpt = 0):
    """Train-step tokens/s and FLOP/s against this process's GEMM peak and PyTorch T5, with
    compile time and peak device memory beside the planner's estimate."""
    from deepfusion_bench.step import bench_step as run

    _preset(preset, dtype)
    inputs_length, targets_length = _parse_seq_len(seq_len)
    if batch < 1 or steps < 1:
        fail(f"--batch and --steps must be positive, got {batch} and {steps}")
    kernels = _kernels(remat, attention, loss_chunk, dtype)
    r = run(preset, batch, inputs_length, targets_length, steps, dtype, torch_baseline=torch,
            kernels=kernels)
    line = (f"step {preset} {dtype} batch {batch}x{seq_len} on {r['devices']} {r['device']}: "
            f"{r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:,} tok/s, "
            f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s = {r['fraction_of_gemm_peak']:.0%} of GEMM peak "
            f"({r['gemm_peak_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    if "mfu" in r:
        line += f", MFU {r['mfu']:.0%} of the {r['nominal_peak_flops_per_s'] / 1e12:.0f} TFLOP/s spec"
    memory = f"peak {r['peak_gib']} GiB, " if "peak_gib" in r else ""
    line += f"; compile {r['compile_s']} s, {memory}estimate {r['estimate_gib']} GiB"
    if torch:
        line += (f"; PyTorch {r['torch_step_s'] * 1e3:.1f} ms "
                 f"(JAX is {r['speedup_vs_torch']}x PyTorch's speed)")
    return _emit(r, line)


@bench_app.command("kernels")
def bench_kernels(preset: str = "tiny-S", batch: int = 4, seq_len: str = "64,16",
                  dtype: str = "float32", remat: RematOpt = False,
                  attention: AttentionOpt = "xla", loss_chunk: LossChunkOpt = 0):
    """Two train steps with these kernels against the reference: their largest relative
    differences (loss, gradient norm, params) on this machine's device."""
    from deepfusion_bench.kernels import compare_kernels

    _preset(preset, dtype)
    inputs_length, targets_length = _parse_seq_len(seq_len)
    if batch < 1:
        fail(f"--batch must be positive, got {batch}")
    r = compare_kernels(preset, dtype, batch, inputs_length, targets_length,
                        _kernels(remat, attention, loss_chunk, dtype))
    return _emit(r, f"kernels {preset} {dtype} attention={attention} loss_chunk={loss_chunk}"
                    f"{' remat' if remat else ''} on {r['device']}: relative difference from "
                    f"the reference: loss {r['loss_rel_diff']:.1e}, gradient norm "
                    f"{r['grad_norm_rel_diff']:.1e}, params {r['params_rel_diff']:.1e}"
                    f"{'' if r['finite'] else '; NOT FINITE'}")


@bench_app.command("trace")
def bench_trace(out: Annotated[Path, typer.Option(help="The trace's directory.")],
                preset: str = "cpu-M", batch: int = 8, seq_len: str = "128,32",
                dtype: str = "float32", remat: RematOpt = False,
                attention: AttentionOpt = "reference", loss_chunk: LossChunkOpt = 0):
    """A jax.profiler trace of three train steps into OUT, and the ops that took the most time."""
    from deepfusion_bench.trace import top_ops, trace_steps

    _preset(preset, dtype)
    inputs_length, targets_length = _parse_seq_len(seq_len)
    if batch < 1:
        fail(f"--batch must be positive, got {batch}")
    if not out.parent.is_dir():
        fail(f"--out {out}: {out.parent} does not exist")
    trace_steps(preset, batch, inputs_length, targets_length, dtype,
                _kernels(remat, attention, loss_chunk, dtype), out)
    typer.echo(f"trace of {preset} {dtype} batch {batch}x{seq_len}: {out}")
    for name, share in top_ops(out):
        typer.echo(f"{share:6.1%}  {name}")


@bench_app.command("memory")
def bench_memory(preset: str = "table7-L", batch: int = 16, seq_len: str = "512,114",
                 dtype: str = "bfloat16",
                 mesh: Annotated[Optional[str], typer.Option(
                     help="data=D,model=M (default: all devices on data)")] = None,
                 remat: RematOpt = False):
    """The planner's memory estimate per device against XLA's analysis of the compiled step."""
    from deepfusion_bench.memory import bench_memory as run
    from deepfusion_core.config import PRESETS
    from deepfusion_core.sharding import check_mesh, parse_mesh

    _preset(preset, dtype)
    inputs_length, targets_length = _parse_seq_len(seq_len)
    check_mesh(parse_mesh(mesh), PRESETS[preset], batch)
    r = run(preset, batch, inputs_length, targets_length, dtype, remat, mesh)
    return _emit(r, f"memory {preset} {dtype} batch {batch}x{seq_len} {r['mesh']}{' remat' if remat else ''} "
                    f"on {r['device']}: XLA {r['xla_gib']} GiB per device, estimate "
                    f"{r['estimate_gib']} GiB ({r['estimate_over_xla']}x)")


@bench_app.command("checkpoint")
def bench_checkpoint(preset: str = "cpu-L", directory: Annotated[Optional[Path], typer.Option(
        help="Where to write (default: the system's temporary directory).")] = None):
    """Orbax save/restore of a model against a raw write/read of the same bytes."""
    from deepfusion_bench.checkpoint import bench_checkpoint as run

    _preset(preset)
    if directory is not None and not directory.is_dir():
        fail(f"--directory {directory} is not a directory")
    r = run(preset, str(directory) if directory else None)
    return _emit(r, f"checkpoint {preset} ({r['gb']} GB) in {r['directory']}: Orbax save "
                    f"{r['orbax_save_gb_per_s']} GB/s vs raw write + fsync {r['raw_write_gb_per_s']} "
                    f"GB/s ({r['save_over_raw']:.0%}; {r['raw_write_cached_gb_per_s']} GB/s without "
                    f"fsync); restore {r['orbax_restore_gb_per_s']} GB/s vs raw "
                    f"read {r['raw_read_gb_per_s']} GB/s ({r['restore_over_raw']:.0%}); checksums "
                    f"{r['checksums_s']}s = {r['checksums_over_save']:.1%} of the save")


@bench_app.command("prefect")
def bench_prefect(stages: StagesArg = STAGES_DEFAULT, profile: str = "smoke",
                  runs_dir: Annotated[Optional[Path], typer.Option(
                      help="Runs directory (default: a fresh temporary one).")] = None):
    """Prefect's overhead per node and the wall time of a fully cached rerun."""
    _plan(stages, profile, runs_dir or Path("runs"), writes=runs_dir is not None)
    from deepfusion_bench.prefect import bench_prefect as run  # after the plan: Prefect takes seconds

    r = run(str(stages), profile, str(runs_dir) if runs_dir else None)
    return _emit(r, f"prefect {r['nodes']} nodes ({r['profile']}): overhead per node "
                    f"{r['prefect_overhead_per_node_s']}s Prefect + {r['process_overhead_per_node_s']}s "
                    f"own process; first run {r['first_run_s']}s, fully cached rerun {r['cached_rerun_s']}s")


@bench_app.command("all")
def bench_all(out: Annotated[Path, typer.Option(help="Append every JSON record here.")] = Path(
                  "bench-results.jsonl"),
              prefect: Annotated[bool, typer.Option(help="Include bench prefect (minutes).")] = True,
              torch: Annotated[bool, typer.Option(help="Include the PyTorch baseline.")] = True):
    """Every benchmark in turn with its defaults: step (cpu-M, batch 8 and 32), fuse,
    checkpoint, memory (cpu-M), and Prefect's overhead with a fully cached rerun."""
    _writable(out, "--out", directory=False)
    if prefect:
        _plan(STAGES_DEFAULT, "smoke", Path("runs"))  # before minutes of other benchmarks
    runs = [lambda: bench_step(batch=8, torch=torch), lambda: bench_step(batch=32, torch=torch),
            bench_fuse, bench_checkpoint,
            lambda: bench_memory(preset="cpu-M", batch=8, seq_len="128,32", dtype="float32")]
    for run in runs + ([bench_prefect] if prefect else []):
        record = run()
        with out.open("a") as f:  # each as it comes: a later failure keeps the earlier ones
            f.write(json.dumps(record) + "\n")
    typer.echo(f"records appended to {out}")


# The commands that run a node in this process: each ends with its results on disk (DONE
# written atomically, every checkpoint save waited for) and its summary printed.
_NODE_COMMANDS = ("train", "run-job", "run-node")


def main() -> None:  # pragma: no cover - console entry point
    """The console script. A node command that succeeded in a single JAX process skips the
    interpreter's teardown of TensorFlow, XLA and Orbax: 2.5 s of every smoke train node's
    life, after its work. Failures, other commands and multi-process nodes (whose group
    shuts down together) exit normally."""
    try:
        app(prog_name="deepfusion")
    except SystemExit as e:
        if e.code in (0, None) and sys.argv[1:2] and sys.argv[1] in _NODE_COMMANDS and (
                "jax" not in sys.modules or sys.modules["jax"].process_count() == 1):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
