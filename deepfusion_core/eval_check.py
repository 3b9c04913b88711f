"""The validation batches every evaluation uses: made once with TensorFlow, then read from disk.

Making them reads the data with seqio and TensorFlow (`deepfusion_core.data`): seconds to
start, about a third of a small train node's time. They do not depend on the training seed,
so every node of a DAG evaluates on the same batches: they are kept on disk (`.npz`, exact
int32 arrays) under a key that TensorFlow is not needed to compute, and a plan made again
checks them, and a node evaluates on them, without starting TensorFlow or seqio.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from deepfusion_core.config import DataConfig, DataError, source_parts
from deepfusion_core.sources import c4_pattern
from deepfusion_core.vocab import sentencepiece_path

# The modules whose code makes the validation batches: a change to one invalidates the cache.
_READERS = ("data.py", "config.py", "sources.py", "span_corruption.py")
_COUNT = "__batches__"  # beside the feature arrays: how many batches the file holds


def check_enough(cfg: DataConfig, found: int, num_batches: int) -> None:
    """Raise `DataError` if `found` validation batches are fewer than `num_batches`."""
    if found < num_batches:
        raise DataError(f"the validation split of {cfg.source!r} has only {found} batches of "
                        f"{cfg.batch_size}, not {num_batches}")


def cache_dir() -> Path:
    """Where deepfusion keeps what it computed for later processes (validation batches, device
    counts): DEEPFUSION_CACHE_DIR, or the user's cache."""
    if os.environ.get("DEEPFUSION_CACHE_DIR"):
        return Path(os.environ["DEEPFUSION_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepfusion"


def _validation_identity(cfg: DataConfig) -> list | None:
    """What the validation batches depend on beyond `cfg`: the files they are made from (path,
    size, modification time), the code that reads them and seqio's and TensorFlow's versions;
    None for a TFDS source, which is not fingerprinted."""
    kind, arg = source_parts(cfg.source)
    if kind == "tfds":
        return None
    from pydoc_data import topics

    files = ([Path(topics.__file__)] if kind == "builtin" else
             sorted(Path(arg).expanduser().absolute().glob(c4_pattern("validation"))))
    if cfg.vocab.startswith("t5:"):
        files.append(sentencepiece_path(cfg.vocab))
    stamps = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    here = Path(__file__).parent
    code = [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _READERS]
    return [*stamps, *code, *(importlib.metadata.version(d) for d in ("seqio", "tensorflow"))]


def _cache_path(cfg: DataConfig, num_batches: int) -> Path | None:
    identity = _validation_identity(cfg)
    if identity is None:
        return None
    key = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), num_batches, identity])
                         .encode()).hexdigest()[:16]
    return cache_dir() / f"validation-batches-{key}.npz"


def _load(path: Path) -> list[dict[str, np.ndarray]] | None:
    # Missing or unreadable (a crash mid-write leaves only a temporary file): made again.
    with contextlib.suppress(OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        with np.load(path) as stacked:
            count = len(stacked[_COUNT])
            rows = {k: stacked[k] for k in stacked.files if k != _COUNT}
        return [{k: v[i] for k, v in rows.items()} for i in range(count)]
    return None


def _save(path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    stacked = {_COUNT: np.arange(len(batches))}
    if batches:
        stacked.update({k: np.stack([b[k] for b in batches]) for k in batches[0]})
    with contextlib.suppress(OSError):  # a cache: where it cannot be written, make them again
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")
        np.savez(tmp, **stacked)
        tmp.replace(path)


@functools.lru_cache(maxsize=8)
def _first_batches(cfg: DataConfig, num_batches: int) -> tuple[dict[str, np.ndarray], ...]:
    """Up to `num_batches` validation batches (fewer if the split is smaller), cached."""
    path = _cache_path(cfg, num_batches)
    batches = _load(path) if path is not None else None
    if batches is None:
        from deepfusion_core import data  # TensorFlow and seqio: only when not cached

        batches = data.first_validation_batches(cfg, num_batches)
        if path is not None:
            _save(path, batches)
    return tuple(batches)


def eval_batches(cfg: DataConfig, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of the validation split, the same on every call and
    in every process: unshuffled, span masks from a fixed seed (the training seed does not
    change them, so runs that differ in it are evaluated on the same examples)."""
    batches = _first_batches(cfg.model_copy(update={"seed": 0}), num_batches)
    check_enough(cfg, len(batches), num_batches)
    return [dict(b) for b in batches]


def check_eval_batches(cfg: DataConfig, num_batches: int) -> None:
    """Raise `DataError` if the validation split makes fewer than `num_batches` batches.

    The first time for a data config the batches are made (about 1.5 s for 4 to 16 batches of
    the builtin data or the C4 sample on a 2-core CPU, 3 to 5 s more in a process that has not
    started TensorFlow yet) and kept; later checks and evaluations read them from the cache,
    keyed by the data config and `_validation_identity`.
    """
    eval_batches(cfg, num_batches)
