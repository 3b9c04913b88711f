"""Node jobs: one node of a plan, resolved, as a process runs it.

The plan resolves every node of a stages file into a `TrainJob`, `FinetuneJob`, `FuseJob` or
`LoadJob`: its configs, its parents' directories, its own directory. A job is all a node's process needs: written
into the node directory as `job.json` (`write_job`), it is run there by

    deepfusion run-job NODE_DIR

without reading the stages file or building a plan (what each Prefect task starts). Each class
carries its kind's behaviour, so a new node kind is one new class here.

Heavy libraries are imported inside `run`: the planner imports this module, and a fuse node's
process must not pay for TensorFlow, which only training reads data with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


from deepfusion_core.config import DataConfig, T5Config, TrainConfig
from deepfusion_core.flops import train_step_flops
from deepfusion_core.memory import train_memory
from deepfusion_core.mesh_spec import parse_mesh
from deepfusion_core.param_layout import count_params
from pipeline import store
from pipeline.workdir import Workdir

Log = Callable[[str], None]


class _Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # as the plan names it (NODE@k in replica k)
    fingerprint: str
    dir: Path
    model: T5Config  # the model the node makes
    parents: dict[str, Path]  # parent name -> its node directory, where DONE is checked
    replica: int = 0
    spec: dict  # the stages file's node, as resolved for its replica
    fingerprint_record: dict  # what the fingerprint hashes

    def node_record(self) -> dict:
        """What `node.json` says the node is."""
        return {"name": self.name, "kind": self.kind, "fingerprint": self.fingerprint,
                "parents": list(self.parents), "model": self.model.model_dump(mode="json"),
                "spec": self.spec}


class TrainJob(_Job):
    """Train `model` for `train.steps` steps, from scratch or from the fuse node's `init`."""

    kind: Literal["train"] = "train"
    size: str  # the stages file's size name (S, M, L)
    train: TrainConfig
    data: DataConfig
    seed: int  # of the initial params (without `init`); the data's is `data.seed`
    init: Path | None = None  # a fuse node's model to start from
    processes: int = Field(default=1, gt=0)  # JAX processes of the node
    # A finished shorter run of this node (same config and parents, fewer steps), whose last
    # checkpoint a node without checkpoints continues from: (its directory, its last step).
    extend_from: tuple[Path, int] | None = None

    @property
    def model_path(self) -> Path:
        """Where the node's model is: its latest checkpoint step."""
        return self.dir

    @property
    def flops(self) -> int:
        d = self.data
        return self.train.steps * train_step_flops(self.model, d.batch_size, d.inputs_length,
                                                   d.targets_length)

    def describe_work(self) -> str:
        return f"train {self.train.steps} steps"

    def memory(self) -> dict[str, int]:
        """Estimated bytes per device of a step (without a mesh: one device), by part."""
        d, tc = self.data, self.train
        return train_memory(self.model, d.batch_size, d.inputs_length, d.targets_length,
                            parse_mesh(tc.mesh) if tc.mesh else (1, 1), tc.optimizer, tc.remat,
                            tc.loss_chunk)

    def node_record(self) -> dict:
        # The seed stays in the record's train settings, where node.json has always had it.
        return {**super().node_record(),
                "train": {**self.train.model_dump(mode="json"), "seed": self.seed},
                "data": self.data.model_dump(mode="json")}

    def prepare_batches(self, log: Log) -> None:
        """Make and keep the batches this node trains on (a small run's only: see
        `batch_cache`), so that its own process starts without TensorFlow. A scheduler whose
        process outlives its nodes calls this while the node waits for its turn. Where it
        fails, the node makes them itself and reports what is wrong."""
        from deepfusion_core.batch_cache import keep_train_batches

        try:
            keep_train_batches(self.data, self.train.steps)  # from data position 0, always
        except Exception as e:  # noqa: BLE001 - the node's own run reports it, in its place
            log(f"{self.name}: its batches were not made ahead ({type(e).__name__}: {e})")

    def run(self, log: Log, progress: bool, primary: bool) -> dict | None:
        """Train (resuming its checkpoints); the summary (None in all but the first process)."""
        import jax
        from jax.experimental import multihost_utils

        from deepfusion_core.train import train

        here = Workdir(self.dir)
        if self.extend_from is not None and here.latest_checkpoint_step() is None:
            if primary:
                source, step = self.extend_from
                here.copy_train_prefix(Workdir(source), step)
                log(f"{self.name}: extending {source.name} from its step {step}")
        if jax.process_count() > 1:  # the others must see the copy before they restore
            multihost_utils.sync_global_devices(f"extend {self.dir.name}")
        return train(self.model, self.train, self.data, self.dir, seed=self.seed,
                     init=self.init, progress=progress, log=log)


class FinetuneJob(TrainJob):
    """Train on GLUE (`data` is a glue: source) from `init` (or, without it, the random init
    of `seed`: a train node's step 0), then score the model on every task's dev set by
    decoding. Checkpoints, resume and stop requests are the train loop's."""

    kind: Literal["finetune"] = "finetune"  # type: ignore[assignment] - a kind of its own
    at_step: int  # the parent train node's step it starts from (0 for a fuse node)
    eval_tasks: list[str]  # scored: the trained tasks, then the profile's eval_tasks
    eval_examples: int | None = None  # each dev set's first N (None: all)

    def describe_work(self) -> str:
        return f"fine-tune {self.train.steps} steps on {', '.join(self.data.tasks)}"

    def run(self, log: Log, progress: bool, primary: bool) -> dict | None:
        """Fine-tune (resuming its checkpoints), then decode every dev set; the summary with
        each task's metrics and the GLUE average (None in all but the first process)."""
        summary = super().run(log, progress, primary)
        if not primary:
            return None
        from deepfusion_core import load_model
        from deepfusion_core.config import source_parts
        from deepfusion_core.glue_eval import evaluate_glue, model_answer
        from deepfusion_core.glue_metrics import glue_average

        start = time.perf_counter()
        cfg, params = load_model(self.dir)  # the final step's checkpoint
        d = self.data
        scores = evaluate_glue(model_answer(cfg, params, d.targets_length),
                               source_parts(d.source)[1], self.eval_tasks, d.vocab, d.lengths,
                               d.batch_size, self.eval_examples)
        average = glue_average(scores, d.tasks)
        log(f"{self.name}: GLUE average {average:.2f} over {', '.join(d.tasks)} ("
            + ", ".join(f"{t} " + "/".join(f"{v:.1f}" for v in m.values())
                        for t, m in scores.items())
            + f"), decoded in {time.perf_counter() - start:.1f}s")
        return {**summary, "glue": scores, "glue_average": average}


class _ModelJob(_Job):
    """A node that makes one model checkpoint, `model/`, without training: no FLOPs of this
    DAG's. Its `run` reuses a model saved before a crash (the save itself is atomic)."""

    @property
    def model_path(self) -> Path:
        """Where the node's model is: its `model/` checkpoint."""
        return Workdir(self.dir).model

    @property
    def flops(self) -> int:
        return 0

    def make_model(self, out: Path, log: Log) -> None:
        """Write the node's model to `out`."""
        raise NotImplementedError

    def run(self, log: Log, progress: bool, primary: bool) -> dict:
        """Make and save the model (or reuse it); the summary, zeros."""
        out = self.model_path
        if out.exists():  # a crash after saving but before DONE
            log(f"{self.name}: reusing the model at {out}")
        else:
            self.make_model(out, log)
        return {"kind": "summary", "flops": 0, "tokens": 0, "wall_s": 0.0, "device_s": 0.0}


class LoadJob(_ModelJob):
    """Bring an existing model into the node store: a transformers T5.1.1 directory
    converted, or a deepfusion checkpoint copied (its checksums verified on the way)."""

    kind: Literal["load"] = "load"
    source: Path
    source_kind: Literal["hf", "deepfusion"]

    def describe_work(self) -> str:
        return f"load {self.source_kind}"

    def memory(self) -> dict[str, int]:
        total = 4 * count_params(self.model)
        return {"host": total, "total": total}

    def make_model(self, out: Path, log: Log) -> None:
        """Convert or copy the model."""
        from deepfusion_core import load_model, save_model

        if self.source_kind == "hf":
            from deepfusion_core.hf import import_hf

            import_hf(self.source, out)
        else:
            save_model(out, *load_model(self.source))
        log(f"{self.name}: loaded {self.source} ({self.model.describe()})")


class FuseJob(_ModelJob):
    """Fuse the models in `inputs` (the same one twice: self fusion) into `model`."""

    kind: Literal["fuse"] = "fuse"
    inputs: list[Path]  # the input models, in fusion order
    input_models: list[T5Config]
    norm: Literal["prop", "rule"]  # as planned: the children's configs follow it
    cross_std: float
    weights: list[float] | None = None
    seed: int

    def describe_work(self) -> str:
        return "fuse"

    def memory(self) -> dict[str, int]:
        """The host memory fusion holds: its inputs and its output (the measured peak is
        1.03x that, BENCHMARKS.md)."""
        models = [*dict(zip(self.inputs, self.input_models)).values(), self.model]
        total = 4 * sum(count_params(m) for m in models)
        return {"host": total, "total": total}

    def make_model(self, out: Path, log: Log) -> None:
        """Fuse the inputs."""
        from deepfusion_core import fuse, load_model, save_model

        loaded = {path: load_model(path) for path in dict.fromkeys(self.inputs)}
        start = time.perf_counter()
        cfg, params = fuse([loaded[p] for p in self.inputs], norm=self.norm,
                           cross_std=self.cross_std, seed=self.seed, weights=self.weights)
        if cfg != self.model:
            raise RuntimeError(f"{self.name}: fused {cfg.describe()}, but the plan "
                               f"expects {self.model.describe()}")
        save_model(out, cfg, params)
        log(f"{self.name}: fused {' + '.join(self.spec['fuse'])} -> {cfg.describe()} "
            f"in {time.perf_counter() - start:.1f}s")


Job = Annotated[TrainJob | FinetuneJob | FuseJob | LoadJob, Field(discriminator="kind")]


class _JobFile(BaseModel):
    job: Job


def write_job(job: TrainJob | FinetuneJob | FuseJob | LoadJob) -> Path:
    """Write `job` into its node directory (atomically); the path of the file."""
    job.dir.mkdir(parents=True, exist_ok=True)
    path = Workdir(job.dir).job_json
    store.write_text_atomic(path, _JobFile(job=job).model_dump_json(indent=1) + "\n")
    return path


def read_job(node_dir: str | Path) -> TrainJob | FinetuneJob | FuseJob | LoadJob:
    """The job written into `node_dir`; ValueError naming the file if there is none."""
    path = Workdir(Path(node_dir)).job_json
    if not path.is_file():
        raise ValueError(f"{path}: no such job file (a node directory holds one once its plan "
                         f"has run it)")
    return _JobFile.model_validate_json(path.read_text()).job
