"""The configs a run is made of, and the paper's model presets: the one home of every setting.

Each is a frozen pydantic model importing neither JAX nor TensorFlow, so planning and the
command line read them fast. In order: `T5Config` (the model; it travels in checkpoints as
JSON, in `stages.yaml` and through fusion) and its presets, `DataConfig` (what the training
text is), `OptimizerConfig` (what training computes), `ExecutionConfig` (how it runs) and
`TrainConfig` (both, with the mesh). The seed of the initial params is no setting: `train()`
takes it as an argument.

Data sources (`DataConfig.source`): ``builtin`` (Python's bundled docs), ``c4:PATH`` (local
C4 shards) or ``tfds:DATA_DIR`` (TFDS ``c4/en:3.1.0``); see `deepfusion_core.sources`.
Vocabularies (`DataConfig.vocab`): ``byte`` or ``t5:PATH`` (a SentencePiece model), both
with `EXTRA_IDS` sentinels; see `deepfusion_core.vocab`. Reading the data is
`deepfusion_core.data`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import (BaseModel, ConfigDict, Field, field_validator, model_serializer,
                      model_validator)

T5_VOCAB_SIZE = 32128  # 32000 SentencePiece pieces + 100 sentinels, padded to a multiple of 128
MAX_SEED = 2**32 - 1  # every seed (params, data, fusion noise) fits what JAX, numpy and TF take


# The model: its dimensions, and the paper's presets.


class T5Config(BaseModel):
    """Dimensions of a T5.1.1 encoder-decoder (encoder and decoder have the same depth).

    `norm_groups` lists the sizes of the groups RMSNorm normalises separately; a standard
    model has one group `[d_model]`, a model made by fusion-prop has one group per input.
    `dtype` is the compute dtype; parameters are always stored in float32.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    d_model: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    d_ff: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    vocab_size: int = Field(default=T5_VOCAB_SIZE, gt=0)
    norm_groups: tuple[int, ...] = ()
    relpos_buckets: int = Field(default=32, gt=1)
    relpos_max_distance: int = Field(default=128, gt=1)
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="before")
    @classmethod
    def _default_norm_groups(cls, data):
        if isinstance(data, dict) and not data.get("norm_groups"):
            data = {**data, "norm_groups": (data.get("d_model"),)}
        return data

    @model_validator(mode="after")
    def _check_norm_groups(self):
        if any(g <= 0 for g in self.norm_groups) or sum(self.norm_groups) != self.d_model:
            raise ValueError(
                f"norm_groups {list(self.norm_groups)} must be positive and sum to "
                f"d_model={self.d_model}"
            )
        return self

    def describe(self) -> str:
        """One line: the dimensions a person compares between models."""
        groups = "" if len(self.norm_groups) == 1 else f" norm_groups={list(self.norm_groups)}"
        return (
            f"d_model={self.d_model} heads={self.num_heads}x{self.head_dim} d_ff={self.d_ff} "
            f"layers={self.num_layers} vocab={self.vocab_size}{groups}"
        )


def _preset(d_model: int, num_heads: int, head_dim: int, d_ff: int, num_layers: int,
            vocab_size: int = T5_VOCAB_SIZE) -> T5Config:
    return T5Config(d_model=d_model, num_heads=num_heads, head_dim=head_dim, d_ff=d_ff,
                    num_layers=num_layers, vocab_size=vocab_size)


# The paper's Tables 6 and 7, plus two CPU families whose S+S fuse to M and M+M to L, like
# the paper's. `tiny-*` runs in seconds (tests); `cpu-*` is the largest that trains usefully
# on a 2-core CPU in minutes (benchmarks, reproduction).
PRESETS: dict[str, T5Config] = {
    "table6-small": _preset(512, 6, 64, 1024, 8),
    "table6-medium": _preset(1024, 12, 64, 2048, 8),
    "table7-S": _preset(512, 6, 128, 1024, 8),
    "table7-M": _preset(1024, 12, 128, 2048, 8),
    "table7-L": _preset(2048, 24, 128, 4096, 8),
    "tiny-S": _preset(32, 2, 16, 64, 2),
    "tiny-M": _preset(64, 4, 16, 128, 2),
    "tiny-L": _preset(128, 8, 16, 256, 2),
    "cpu-S": _preset(128, 2, 64, 256, 4),
    "cpu-M": _preset(256, 4, 64, 512, 4),
    "cpu-L": _preset(512, 8, 64, 1024, 4),
}


# The data: where the text comes from, its tokens, span corruption and batches.

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
EXTRA_IDS = 100
TFDS_C4 = "c4/en:3.1.0"
EVAL_SEED = 0  # the validation set's span masks do not depend on the training seed


class DataError(ValueError):
    """Data that is missing, empty or inconsistent with what the configuration asks for."""


def source_parts(spec: str) -> tuple[str, str]:
    """('builtin', ''), ('c4', PATH), ('tfds', DATA_DIR) or ('glue', DIR); `DataError` for
    any other spec."""
    kind, _, arg = spec.partition(":")
    if spec == "builtin":
        return kind, ""
    if kind in ("c4", "tfds", "glue") and arg:
        return kind, arg
    raise DataError(f"source must be 'builtin', 'c4:PATH', 'tfds:DATA_DIR' or 'glue:DIR', "
                    f"not {spec!r}")


def vocab_parts(spec: str) -> tuple[str, str]:
    """('byte', '') or ('t5', PATH); `DataError` for any other spec."""
    if spec == "byte":
        return spec, ""
    if spec.startswith("t5:") and len(spec) > 3:
        return "t5", spec[3:]
    raise DataError(f"vocab must be 'byte' or 't5:PATH', not {spec!r}")


def span_corruption_lengths(inputs_length: int) -> tuple[int, int]:
    """(tokens per segment, targets length) for corrupted inputs of `inputs_length`, EOS included.

    T5's `random_spans_helper`: 512 gives (568, 114), 128 gives (141, 29).
    """
    def lengths(tokens: int) -> tuple[int, int]:
        noise = int(round(tokens * NOISE_DENSITY))
        spans = int(round(noise / MEAN_NOISE_SPAN_LENGTH))
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = inputs_length - 1
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    return tokens, lengths(tokens)[1]


def _leave_out_at_default(*names: str):
    """A serializer that leaves the fields `names` out of a dump while they hold their
    defaults: fields added after a config's first release, so that the fingerprints (and
    kept batches) of every config written before them stay what they were."""
    @model_serializer(mode="wrap")
    def serialize(self, handler):
        dumped = handler(self)
        for name in names:
            if getattr(self, name) == type(self).model_fields[name].default:
                dumped.pop(name, None)
        return dumped
    return serialize


class DataConfig(BaseModel):
    """Where training text comes from, how it is tokenized, and the shape of the batches.

    A `glue:DIR` source is fine-tuning data: the GLUE `tasks` in T5's text-to-text form,
    mixed in proportion to their training examples, instead of span corruption.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(default="builtin", description="builtin | c4:PATH | tfds:DATA_DIR | "
                                                       "glue:DIR")
    vocab: str = Field(default="byte", description="byte | t5:PATH (SentencePiece model)")
    inputs_length: int = Field(default=128, ge=8, description="Encoder length (tokens).")
    # 128 needs 29; T5's 512 needs 114
    targets_length: int = Field(default=32, ge=2, description="Decoder length (tokens).")
    batch_size: int = Field(default=8, gt=0, description="Global batch size (sequences).")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the data order and "
                                                                "span corruption.")
    pack: bool = Field(default=True, description="Pack several examples per sequence.")
    tasks: tuple[str, ...] = Field(default=(), description="GLUE tasks of a glue: source "
                                                           "(comma-separated).")

    _omit_at_default = _leave_out_at_default("tasks")

    @property
    def is_glue(self) -> bool:
        """Whether this is GLUE fine-tuning data (not span corruption)."""
        return source_parts(self.source)[0] == "glue"

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        source_parts(v)
        return v

    @field_validator("vocab")
    @classmethod
    def _check_vocab(cls, v: str) -> str:
        vocab_parts(v)
        return v

    @model_validator(mode="after")
    def _check_lengths(self):
        if self.is_glue != bool(self.tasks):
            raise ValueError("a glue: source needs tasks, and only a glue: source takes them")
        if self.is_glue:
            return self
        needed = span_corruption_lengths(self.inputs_length)[1]
        if self.targets_length < needed:
            raise ValueError(f"targets_length={self.targets_length} is too short: span "
                             f"corruption of inputs_length={self.inputs_length} needs {needed}")
        return self

    @property
    def lengths(self) -> dict[str, int]:
        """The task feature lengths, as seqio and its feature converters take them."""
        return {"inputs": self.inputs_length, "targets": self.targets_length}


# Training: what it computes (the optimizer), how it runs (the execution), and both.


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class OptimizerConfig(_Config):
    """The optimizer and its schedule: with the model and the data, what a train node
    computes. Every field is part of the node's fingerprint and of the compile cache key."""

    steps: int = Field(gt=0, description="Train until this step.")
    optimizer: Literal["adafactor", "adamw"] = Field(
        default="adafactor", description="adafactor (T5's, 1/sqrt schedule) or adamw (cosine).")
    learning_rate: float = Field(default=0.01, gt=0, description="Peak learning rate (T5: "
                                                                 "0.01 with Adafactor).")
    warmup_steps: int = Field(default=100, ge=0, description="Linear warmup steps.")
    schedule: Literal["decay", "constant"] = Field(
        default="decay", description="After warmup: decay (1/sqrt with adafactor, cosine with "
                                     "adamw) or constant (T5's fine-tuning).")
    grad_clip: float | None = Field(default=1.0, gt=0, description="Global gradient norm "
                                                                   "clip (none: off).")
    z_loss: float = Field(default=0.0, ge=0, description="Weight of log(Z)^2 (T5X: 1e-4).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW's weight decay.")

    _omit_at_default = _leave_out_at_default("schedule")


class Kernels(NamedTuple):
    """How the train step is computed, never what: the part of `ExecutionConfig` that changes
    the compiled program (so in the compile cache key), and each choice's result equals the
    default's within floating-point rounding (tests hold every one to its reference)."""

    remat: bool = False
    attention: str = "reference"
    loss_chunk: int = 0


class ExecutionConfig(_Config):
    """How a train node runs, never what it computes: in no fingerprint, and (but `kernels`,
    which change the compiled program) in no compile cache key."""

    remat: bool = Field(default=False, description="Recompute layers in the backward pass "
                                                   "(memory for compute).")
    attention: Literal["reference", "xla", "cudnn"] = Field(
        default="reference", description="The attention kernel: reference (einsums), xla or "
        "cudnn (jax.nn.dot_product_attention; cudnn is a GPU's fused kernel, bfloat16 only).")
    loss_chunk: int = Field(default=0, ge=0, description="Compute the logits and their "
                            "cross-entropy for this many target positions at a time (each "
                            "for the whole batch), never all at once (0: all at once).")
    eval_every: int = Field(default=0, ge=0, description="Evaluate every K steps (0: at the "
                                                         "end only).")
    eval_batches: int = Field(default=4, gt=0, description="Validation batches per evaluation.")
    save_every: int = Field(default=100, gt=0, description="Checkpoint every K steps.")
    keep_last: int = Field(default=2, gt=0, description="Checkpoints kept (the newest).")
    keep_every: int | None = Field(default=None, gt=0, description="Also keep every K-th "
                                                                   "step's checkpoint.")
    log_every: int | None = Field(default=None, gt=0, description="Without a progress bar, "
                                  "log a line every K steps (default: a tenth of the steps), "
                                  "and at least every 30 s.")

    @property
    def kernels(self) -> Kernels:
        """The settings that change the compiled step (its compile cache key)."""
        return Kernels(self.remat, self.attention, self.loss_chunk)


class TrainConfig(OptimizerConfig, ExecutionConfig):
    """Everything `train()` takes besides the model, the data and the seed of the initial
    params: the optimizer (what it computes), the execution (how) and the mesh it runs on."""

    mesh: str | None = Field(default=None, description="data=D,model=M (default: every device "
                                                       "on data).")

    @property
    def optimizer_config(self) -> OptimizerConfig:
        """The part that says what is computed (the fingerprint's and compile cache's)."""
        return OptimizerConfig(**self.model_dump(include=set(OptimizerConfig.model_fields)))
