"""The configs a run is made of, and the paper's model presets.

Each is a frozen pydantic model importing neither JAX nor TensorFlow, so planning and the
command line read them fast: `T5Config` (the model; it travels in checkpoints as JSON, in
`stages.yaml` and through fusion), `OptimizerConfig` (what training computes),
`ExecutionConfig` (how it runs) and `TrainConfig` (both, with the mesh and seed).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

T5_VOCAB_SIZE = 32128  # 32000 SentencePiece pieces + 100 sentinels, padded to a multiple of 128
MAX_SEED = 2**32 - 1  # every seed (params, data, fusion noise) fits what JAX, numpy and TF take


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
    grad_clip: float | None = Field(default=1.0, gt=0, description="Global gradient norm "
                                                                   "clip (none: off).")
    z_loss: float = Field(default=0.0, ge=0, description="Weight of log(Z)^2 (T5X: 1e-4).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW's weight decay.")


class ExecutionConfig(_Config):
    """How a train node runs, never what it computes: in no fingerprint, and (but `remat`,
    which changes the compiled program) in no compile cache key."""

    remat: bool = Field(default=False, description="Recompute layers in the backward pass "
                                                   "(memory for compute).")
    eval_every: int = Field(default=0, ge=0, description="Evaluate every K steps (0: at the "
                                                         "end only).")
    eval_batches: int = Field(default=4, gt=0, description="Validation batches per evaluation.")
    save_every: int = Field(default=100, gt=0, description="Checkpoint every K steps.")
    keep_last: int = Field(default=2, gt=0, description="Checkpoints kept (the newest).")
    keep_every: int | None = Field(default=None, gt=0, description="Also keep every K-th "
                                                                   "step's checkpoint.")


class TrainConfig(OptimizerConfig, ExecutionConfig):
    """Everything `train()` takes besides the model and the data: the optimizer (what it
    computes), the execution (how), the mesh it runs on and the seed of its initial params."""

    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the parameter init.")
    mesh: str | None = Field(default=None, description="data=D,model=M (default: every device "
                                                       "on data).")

    @property
    def optimizer_config(self) -> OptimizerConfig:
        """The part that says what is computed (the fingerprint's and compile cache's)."""
        return OptimizerConfig(**self.model_dump(include=set(OptimizerConfig.model_fields)))


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
