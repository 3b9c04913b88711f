"""Source specs ('builtin' | 'c4:PATH' | 'tfds:DATA_DIR'): is the data there? Without TensorFlow.

``builtin`` is the text of Python's bundled docs (`pydoc_data.topics`), always there.
``c4:PATH`` holds local shards in the allenai/c4 layout (``c4-train.*.json.gz`` and
``c4-validation.*.json.gz``: gzip JSON lines with a ``text`` field); each shard's first
document is read. ``tfds:DATA_DIR`` must hold TFDS ``c4/en:3.1.0`` already prepared.
A plan checks local data here; `deepfusion_core.data` runs the same checks before reading, with
TensorFlow's file system for a remote (``gs://``) DATA_DIR.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from deepfusion_core.config import TFDS_C4, DataError, source_parts

SPLITS = ("train", "validation")


def c4_pattern(split: str) -> str:
    """The file name pattern of a C4 split's shards."""
    return f"c4-{split}.*.json.gz"


def c4_patterns(path: str | Path) -> dict[str, str]:
    """{split: file pattern} of the C4 directory `path`, once each shard is seen to start
    with a document."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise DataError(f"C4 directory {path} does not exist")
    return {split: _checked_pattern(path, split) for split in SPLITS}


def _checked_pattern(path: Path, split: str) -> str:
    pattern = c4_pattern(split)
    shards = sorted(path.glob(pattern))
    if not shards:
        raise DataError(f"no {pattern} shards in {path}")
    for shard in shards:
        try:
            with gzip.open(shard, "rt", encoding="utf-8") as f:
                line = next((line for line in f if line.strip()), None)
            if line is None:
                raise DataError(f"C4 shard {shard} is empty (no documents)")
            if not isinstance(json.loads(line).get("text"), str):
                raise DataError(f"C4 shard {shard}: its first document has no 'text' string")
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise DataError(f"C4 shard {shard} is not gzip JSON lines ({e})") from None
    return str(path / pattern)


def check_tfds(data_dir: str, fs=os.path) -> None:
    """Raise `DataError` unless `data_dir` holds TFDS c4/en:3.1.0. `fs` has `isdir` and
    `exists`: `os.path`, or `tf.io.gfile` for a bucket."""
    info = "/".join([data_dir.rstrip("/"), *TFDS_C4.replace(":", "/").split("/"),
                     "dataset_info.json"])
    if not fs.isdir(data_dir):
        raise DataError(f"TFDS data_dir {data_dir} does not exist")
    if not fs.exists(info):
        raise DataError(f"TFDS data_dir {data_dir} does not hold {TFDS_C4} (no {info}); "
                        "prepare it there with TFDS first")


def check_source(spec: str) -> None:
    """Raise `DataError` (one line) unless the local data of source `spec` is there."""
    kind, arg = source_parts(spec)
    if kind == "c4":
        c4_patterns(arg)
    elif kind == "tfds":
        check_tfds(arg)
