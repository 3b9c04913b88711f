"""GLUE tasks as T5 sees them: the GLUE TSV files read as TFDS `glue/*` reads them, and each
example in T5's text-to-text form (`t5.data.preprocessors.glue` and `stsb`).

T5's rule: the inputs are the task's name, then each feature as `name: text` in sorted order of
the feature names, joined by single spaces; the targets are the label's name. STS-B's target is
the score rounded to the nearest 0.2 with one decimal (`3.8`), as TensorFlow computes it: in
float32, halves to even (0.5 -> `0.4`).

The files follow the layout of GLUE's own download script (see ../shared/data/README.md for
their quirks): CoLA has no header, MRPC starts with a UTF-8 BOM, no field is quoted. A task
the directory has no TSV for is read from TFDS's prepared `glue/NAME` there instead (the
directory is then a TFDS `data_dir`, as for MNLI, QQP and QNLI, which are large); that
starts TensorFlow, which nothing else here does.
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


def split_files(glue_dir: str | Path, name: str, split: str) -> list[Path]:
    """The files task `name`'s `split` is read from: its TSV in the GLUE layout, else the
    records of TFDS's prepared `glue/NAME` (its newest version) and their dataset_info.json;
    [] where neither is there."""
    spec = task(name)
    if split not in SPLIT_FILES:
        raise GlueError(f"GLUE split {split!r} does not exist (splits: {', '.join(SPLIT_FILES)})")
    tsv = Path(glue_dir).expanduser() / spec.directory / SPLIT_FILES[split]
    if tsv.is_file():
        return [tsv]
    prepared = sorted((Path(glue_dir).expanduser() / "glue" / spec.name).glob(
        "*/dataset_info.json"), key=lambda p: [int(n) for n in p.parent.name.split(".")
                                               if n.isdigit()])
    records = sorted(prepared[-1].parent.glob(f"glue-{split}.tfrecord*")) if prepared else []
    return [*records, prepared[-1]] if records else []


def read_examples(glue_dir: str | Path, name: str, split: str) -> list[dict]:
    """The examples of one split: `idx` (the row's position), each feature's text and `label`
    (the class id, or STS-B's score as float32), as TFDS `glue/NAME` gives them."""
    spec = task(name)
    files = split_files(glue_dir, name, split)
    if not files:
        raise GlueError(f"{Path(glue_dir) / spec.directory / SPLIT_FILES[split]}: no such GLUE "
                        f"file (expected the GLUE layout, or TFDS's prepared glue/{name} with "
                        f"a {split} split, under {glue_dir})")
    if files[0].suffix != ".tsv":
        return _read_tfds(files[-1].parent, spec, split)
    path = files[0]
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


def _read_tfds(version_dir: Path, spec: GlueTask, split: str) -> list[dict]:
    """A split of TFDS's prepared `glue/NAME` in `version_dir`, in row order."""
    import tensorflow_datasets as tfds  # TensorFlow: only for a TFDS directory

    try:
        rows = tfds.as_numpy(tfds.builder_from_directory(str(version_dir)).as_dataset(
            split=split, shuffle_files=False))
        examples = [{"idx": int(r["idx"]), **{k: r[k].decode("utf-8") for k in spec.features},
                     "label": np.float32(r["label"]) if spec.label_names is None
                     else int(r["label"])} for r in rows]
    except Exception as e:  # noqa: BLE001 - TensorFlow's and TFDS's errors, named below
        raise GlueError(f"{version_dir}: TFDS glue/{spec.name} {split} cannot be read: "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    bad = [e for e in examples if spec.label_names and not 0 <= e["label"] < len(spec.label_names)]
    if bad:
        raise GlueError(f"{version_dir}: TFDS glue/{spec.name} {split} row {bad[0]['idx']}: "
                        f"label {bad[0]['label']} is not one of {spec.name}'s")
    return sorted(examples, key=lambda e: e["idx"])


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
