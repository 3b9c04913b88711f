"""Data batches made once with seqio and TensorFlow, then read from disk by every later process.

Making batches starts TensorFlow and seqio: about 8 s of a node process's start on a 2-core
CPU before the first batch, for data that the same config makes identically every time. So
batches are kept in `cache.cache_dir()` (`.npz`: exact int32 arrays, each checked against its
zip CRC-32 as it is read) under a key that TensorFlow is not needed to compute: the data
config, the files the split is read from (path, size, modification time), the code that makes
the batches and seqio's and TensorFlow's versions. A file that cannot be read whole is made
again. A TFDS source is not fingerprinted and is always read with seqio.

- Validation batches (`validation_batches`) do not depend on the training seed: every node of
  a DAG evaluates on the same ones, and a plan counts them without TensorFlow.
- Training batches (`train_batches`) are the first batches of the stream `cfg.seed` fixes;
  a run that needs at most DEEPFUSION_TRAIN_CACHE_MB of them (default 256; 0 turns it off)
  keeps them, so a resumed, extended or repeated run starts without TensorFlow and without
  making again the batches it skips. A larger run streams them from seqio as it trains.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import itertools
import json
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from deepfusion_core import glue, sources
from deepfusion_core.cache import cache_dir, keep
from deepfusion_core.config import DataConfig, DataError, source_parts
from deepfusion_core.sources import c4_pattern
from deepfusion_core.vocab import sentencepiece_path

# The modules whose code makes the batches: a change to one invalidates what is kept.
_READERS = ("data.py", "config.py", "sources.py", "span_corruption.py", "vocab.py", "glue.py",
            "glue_data.py")
_COUNT = "__batches__"  # beside the feature arrays: how many batches the file holds
_DEFAULT_TRAIN_CACHE_MB = 256
Batches = dict[str, np.ndarray]  # feature -> [batches, batch_size, length]


def check_source(cfg: DataConfig) -> None:
    """Raise `DataError` unless cfg's source is there and holds documents; a TFDS data_dir
    through TensorFlow's file system, which also reads buckets."""
    kind, arg = source_parts(cfg.source)
    if kind == "glue":
        glue.check_tasks(arg, cfg.tasks)
        return
    if kind != "tfds":
        sources.check_source(cfg.source)
        return
    from deepfusion_core import data

    data.register_task(cfg)


def _identity(cfg: DataConfig, split: str) -> list | None:
    """What `split`'s batches depend on beyond `cfg` (see the module's docstring); None for a
    TFDS source."""
    kind, arg = source_parts(cfg.source)
    if kind == "tfds":
        return None
    from pydoc_data import topics

    if kind == "builtin":
        files = [Path(topics.__file__)]
    elif kind == "glue":
        files = [f.absolute() for name in cfg.tasks for f in glue.split_files(arg, name, split)]
    else:
        files = sorted(Path(arg).expanduser().absolute().glob(c4_pattern(split)))
    if cfg.vocab.startswith("t5:"):
        files.append(sentencepiece_path(cfg.vocab))
    stamps = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    here = Path(__file__).parent
    code = [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _READERS]
    return [*stamps, *code, *(importlib.metadata.version(d) for d in ("seqio", "tensorflow"))]


def _path(kind: str, cfg: DataConfig, split: str, *key) -> Path | None:
    identity = _identity(cfg, split)
    if identity is None:
        return None
    digest = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), *key, identity])
                            .encode()).hexdigest()[:16]
    return cache_dir() / f"{kind}-batches-{digest}.npz"


def _load(path: Path) -> tuple[int, Batches] | None:
    """(count, stacked features) kept in `path`; None where it is missing or cannot be read
    whole (a crash mid-write leaves only a temporary file; a changed byte fails the CRC)."""
    with contextlib.suppress(OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        with np.load(path) as kept:
            return len(kept[_COUNT]), {k: kept[k] for k in kept.files if k != _COUNT}
    return None


def _kept_count(path: Path) -> int:
    """How many batches `path` holds, reading that count alone (0 if it cannot be read); the
    reader of the batches checks them whole."""
    with contextlib.suppress(OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        with np.load(path) as kept:
            return len(kept[_COUNT])
    return 0


def _save(path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    stacked = {_COUNT: np.arange(len(batches))}
    if batches:
        stacked.update({k: np.stack([b[k] for b in batches]) for k in batches[0]})
    keep(path, lambda partial: np.savez(partial, **stacked))


def _unstack(count: int, stacked: Batches, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return ({k: v[i] for k, v in stacked.items()} for i in range(start, count))


@functools.lru_cache(maxsize=8)
def _validation(cfg: DataConfig, num_batches: int) -> tuple[dict[str, np.ndarray], ...]:
    path = _path("validation", cfg, "validation", num_batches)
    kept = _load(path) if path is not None else None
    if kept is not None:
        return tuple(_unstack(*kept))
    from deepfusion_core import data  # TensorFlow and seqio: only when not kept

    batches = data.first_validation_batches(cfg, num_batches)
    if path is not None:
        _save(path, batches)
    return tuple(batches)


def validation_batches(cfg: DataConfig, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of the validation split (fewer if it is smaller):
    unshuffled, span masks from a fixed seed, so `cfg.seed` does not change them."""
    return [dict(b) for b in _validation(cfg.model_copy(update={"seed": 0}), num_batches)]


def train_cache_bytes() -> int:
    """The most bytes of training batches one run keeps (DEEPFUSION_TRAIN_CACHE_MB)."""
    value = os.environ.get("DEEPFUSION_TRAIN_CACHE_MB", str(_DEFAULT_TRAIN_CACHE_MB))
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not 0 <= megabytes < float("inf"):
        raise DataError(f"DEEPFUSION_TRAIN_CACHE_MB must be a number of megabytes >= 0, "
                        f"not {value!r}")
    return int(megabytes * 2**20)


def batch_bytes(cfg: DataConfig) -> int:
    """The bytes of one training batch: int32 features of EncDecFeatureConverter, five of
    targets_length (three unpacked) and three of inputs_length (one unpacked)."""
    inputs, targets = (3, 5) if cfg.pack else (1, 3)
    return 4 * cfg.batch_size * (inputs * cfg.inputs_length + targets * cfg.targets_length)


def _train_path(cfg: DataConfig, stop: int) -> Path | None:
    """Where the first `stop` training batches are kept; None if they are not (over the size
    limit, or a TFDS source)."""
    return _path("train", cfg, "train") if stop * batch_bytes(cfg) <= train_cache_bytes() else None


def _make_train(cfg: DataConfig, stop: int, path: Path) -> list[dict[str, np.ndarray]]:
    from deepfusion_core import data  # TensorFlow and seqio: only when not kept

    batches = list(itertools.islice(data.train_batches(cfg), stop))
    _save(path, batches)
    return batches


def train_batches(cfg: DataConfig, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches `start` to `stop - 1` of the training stream `cfg.seed` fixes (shuffled and
    repeated), the same whether kept or streamed: `start` is the checkpointed data position."""
    if not 0 <= start <= stop:
        raise DataError(f"training batches {start} to {stop} are not a range")
    path = _train_path(cfg, stop)
    kept = _load(path) if path is not None else None
    if kept is not None and kept[0] >= stop:
        return itertools.islice(_unstack(*kept, start=start), stop - start)
    if path is not None:
        return iter(_make_train(cfg, stop, path)[start:])
    from deepfusion_core import data

    return itertools.islice(data.train_batches(cfg, start=start), stop - start)


_MAKING = threading.Lock()  # seqio's task registry is not safe to fill from two threads


def keep_train_batches(cfg: DataConfig, stop: int) -> bool:
    """Make the first `stop` training batches and keep them, unless they are kept already;
    whether they are kept (False over the size limit). For a process that outlives the nodes
    it schedules: it starts TensorFlow once for all of them, and each node's own process
    then reads its batches without it. Safe from several threads."""
    with _MAKING:
        path = _train_path(cfg, stop)
        if path is None:
            return False
        if _kept_count(path) < stop:
            _make_train(cfg, stop, path)
        return True
