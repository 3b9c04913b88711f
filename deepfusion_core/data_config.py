"""What the training data is, as configuration: `DataConfig`, its spec formats and constants.

Plain Python (pydantic only): planning a run imports this, and neither TensorFlow nor seqio.

Sources (`DataConfig.source`): ``builtin`` (Python's bundled docs), ``c4:PATH`` (local C4
shards) or ``tfds:DATA_DIR`` (TFDS ``c4/en:3.1.0``); see `deepfusion_core.sources`.
Vocabularies (`DataConfig.vocab`): ``byte`` or ``t5:PATH`` (a SentencePiece model), both with
`EXTRA_IDS` sentinels; see `deepfusion_core.vocab`. Reading the data is `deepfusion_core.data`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deepfusion_core.config import MAX_SEED

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
EXTRA_IDS = 100
TFDS_C4 = "c4/en:3.1.0"
EVAL_SEED = 0  # the validation set's span masks do not depend on the training seed


class DataError(ValueError):
    """Data that is missing, empty or inconsistent with what the configuration asks for."""


def source_parts(spec: str) -> tuple[str, str]:
    """('builtin', ''), ('c4', PATH) or ('tfds', DATA_DIR); `DataError` for any other spec."""
    kind, _, arg = spec.partition(":")
    if spec == "builtin":
        return kind, ""
    if kind in ("c4", "tfds") and arg:
        return kind, arg
    raise DataError(f"source must be 'builtin', 'c4:PATH' or 'tfds:DATA_DIR', not {spec!r}")


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


class DataConfig(BaseModel):
    """Where training text comes from, how it is tokenized, and the shape of the batches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(default="builtin", description="builtin | c4:PATH | tfds:DATA_DIR")
    vocab: str = Field(default="byte", description="byte | t5:PATH (SentencePiece model)")
    inputs_length: int = Field(default=128, ge=8, description="Encoder length (tokens).")
    # 128 needs 29; T5's 512 needs 114
    targets_length: int = Field(default=32, ge=2, description="Decoder length (tokens).")
    batch_size: int = Field(default=8, gt=0, description="Global batch size (sequences).")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the data order and "
                                                                "span corruption.")
    pack: bool = Field(default=True, description="Pack several examples per sequence.")

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
        needed = span_corruption_lengths(self.inputs_length)[1]
        if self.targets_length < needed:
            raise ValueError(f"targets_length={self.targets_length} is too short: span "
                             f"corruption of inputs_length={self.inputs_length} needs {needed}")
        return self

    @property
    def lengths(self) -> dict[str, int]:
        """The task feature lengths, as seqio and its feature converters take them."""
        return {"inputs": self.inputs_length, "targets": self.targets_length}
