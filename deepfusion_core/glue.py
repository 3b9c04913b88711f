"""GLUE tasks as T5 sees them: the GLUE TSV files read as TFDS `glue/*` reads them, and each
example in T5's text-to-text form (`t5.data.preprocessors.glue` and `stsb`).

T5's rule: the inputs are the task's name, then each feature as `name: text` in sorted order of
the feature names, joined by single spaces; the targets are the label's name. STS-B's target is
the score rounded to the nearest 0.2 with one decimal (`3.8`), as TensorFlow computes it: in
float32, halves to even (0.5 -> `0.4`).

The files follow the layout of GLUE's own download script (see ../shared/data/README.md for
their quirks): CoLA has no header, MRPC starts with a UTF-8 BOM, no field is quoted.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepfusion_core.config import DataError


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its TSV keeps each feature, and its label names (None: a score)."""

    name: str  # T5's benchmark name, the inputs' first word
    directory: str  # in the GLUE layout
    header: bool
    features: dict[str, int]  # TFDS feature name -> column
    label_column: int  # -1: the last column
    label_names: tuple[str, ...] | None  # TFDS's class names, in label-id order
    metrics: tuple[str, ...]  # as in the paper's Table 5, each in [0, 100]


TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "CoLA", False, {"sentence": 3}, 1, ("unacceptable", "acceptable"),
             ("matthews_corrcoef",)),
    GlueTask("sst2", "SST-2", True, {"sentence": 0}, 1, ("negative", "positive"),
             ("accuracy",)),
    GlueTask("mrpc", "MRPC", True, {"sentence1": 3, "sentence2": 4}, 0,
             ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    GlueTask("stsb", "STS-B", True, {"sentence1": 7, "sentence2": 8}, -1, None,
             ("pearson", "spearman")),
    GlueTask("qqp", "QQP", True, {"question1": 3, "question2": 4}, 5,
             ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    GlueTask("mnli", "MNLI", True, {"premise": 8, "hypothesis": 9}, -1,
             ("entailment", "neutral", "contradiction"), ("accuracy",)),
    GlueTask("qnli", "QNLI", True, {"question": 1, "sentence": 2}, -1,
             ("entailment", "not_entailment"), ("accuracy",)),
    GlueTask("rte", "RTE", True, {"sentence1": 1, "sentence2": 2}, -1,
             ("entailment", "not_entailment"), ("accuracy",)),
    GlueTask("wnli", "WNLI", True, {"sentence1": 1, "sentence2": 2}, -1,
             ("not_entailment", "entailment"), ("accuracy",)),
)}
# MNLI's dev sets, as TFDS names its splits.
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv",
               "validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"}


class GlueError(DataError):
    """A GLUE file or task that cannot be read; the message names it (and the row)."""


def task(name: str) -> GlueTask:
    if name not in TASKS:
        raise GlueError(f"GLUE task {name!r} does not exist (tasks: {', '.join(TASKS)})")
    return TASKS[name]


def read_examples(glue_dir: str | Path, name: str, split: str) -> list[dict]:
    """The examples of one split: `idx` (the row's position), each feature's text and `label`
    (the class id, or STS-B's score as float32), as TFDS `glue/NAME` gives them."""
    spec = task(name)
    if split not in SPLIT_FILES:
        raise GlueError(f"GLUE split {split!r} does not exist (splits: {', '.join(SPLIT_FILES)})")
    path = Path(glue_dir) / spec.directory / SPLIT_FILES[split]
    if not path.is_file():
        raise GlueError(f"{path}: no such GLUE file (expected the GLUE layout under {glue_dir})")
    with path.open(encoding="utf-8-sig", newline="") as f:  # utf-8-sig: MRPC's BOM
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.header:
        rows = rows[1:]
    # Columns a row needs: the features', and the label's (-1: the last, after them).
    width = max(*spec.features.values(), spec.label_column) + 1 + (spec.label_column < 0)
    examples = []
    for idx, row in enumerate(rows):
        line = idx + 1 + spec.header
        if len(row) < width:
            raise GlueError(f"{path}:{line}: {len(row)} columns, {spec.name} needs {width}")
        example = {"idx": idx, **{k: row[c] for k, c in spec.features.items()}}
        example["label"] = _label(spec, row[spec.label_column], f"{path}:{line}")
        examples.append(example)
    return examples


def _label(spec: GlueTask, text: str, where: str) -> int | np.float32:
    if spec.label_names is None:
        try:
            return np.float32(text)
        except ValueError:
            raise GlueError(f"{where}: label {text!r} is not a score") from None
    if text in spec.label_names:  # the NLI tasks name their classes
        return spec.label_names.index(text)
    if text.isdigit() and int(text) < len(spec.label_names):
        return int(text)
    raise GlueError(f"{where}: label {text!r} is not one of {spec.name}'s "
                    f"({', '.join(spec.label_names)})")


def to_text(name: str, example: dict) -> tuple[str, str]:
    """(inputs, targets) of an example in T5's text-to-text form."""
    spec = task(name)
    parts = [spec.name]
    for feature in sorted(spec.features):
        parts += [f"{feature}:", example[feature]]
    return " ".join(parts), label_text(spec, example["label"])


def label_text(spec: GlueTask, label) -> str:
    """A label as T5 writes it: the class name, or STS-B's score rounded to 0.2."""
    if spec.label_names is None:
        five = np.float32(5)
        return f"{np.round(np.float32(label) * five) / five:.1f}"
    return spec.label_names[label]


def check_tasks(glue_dir: str | Path, names: tuple[str, ...] | list[str],
                splits: tuple[str, ...] = ("train", "validation")) -> None:
    """Raise `GlueError` (one line: the task, file or row) unless every task's `splits` are
    there and read whole."""
    if not Path(glue_dir).is_dir():
        raise GlueError(f"GLUE directory {glue_dir} does not exist")
    for name in names:
        for split in splits:
            if not read_examples(glue_dir, name, split):
                raise GlueError(f"{Path(glue_dir) / task(name).directory / SPLIT_FILES[split]}"
                                f": no examples")
