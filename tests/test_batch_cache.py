"""Batches kept on disk: exactly seqio's, read back without TensorFlow, made again when a file
is cut short or corrupt, when what they are made from changes, or when a run needs more."""

import hashlib
import os
import subprocess
import sys
import threading

import pytest

from deepfusion_core import batch_cache, data
from deepfusion_core.config import DataConfig, DataError
from tests.test_data import TINY, assert_same_batches, take, write_shard

_READ_BACK = """
import hashlib, sys
from deepfusion_core.batch_cache import train_batches, validation_batches
from deepfusion_core.config import DataConfig
digest = hashlib.sha256()
batches = {"validation": lambda: validation_batches(DataConfig(batch_size=4), 3),
           "train": lambda: train_batches(DataConfig(batch_size=4), 3, 8)}[sys.argv[1]]()
for batch in batches:
    for key in sorted(batch):
        digest.update(key.encode() + batch[key].tobytes() + str(batch[key].dtype).encode())
print(digest.hexdigest(), sorted(m for m in ("tensorflow", "seqio") if m in sys.modules))
"""


def _digest(batches) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            digest.update(key.encode() + batch[key].tobytes() + str(batch[key].dtype).encode())
    return digest.hexdigest()


def _read_back(kind: str, cache) -> list[str]:
    """What another process reads from `cache`: the batches' digest, and whether it started
    TensorFlow or seqio to read them."""
    out = subprocess.run([sys.executable, "-c", _READ_BACK, kind], capture_output=True,
                         text=True, env={**os.environ, "DEEPFUSION_CACHE_DIR": str(cache)},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFUSION_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DEEPFUSION_TRAIN_CACHE_MB", raising=False)
    batch_cache._validation.cache_clear()
    yield tmp_path
    batch_cache._validation.cache_clear()


def test_validation_batches_are_made_once_then_read_back_bit_identical(cache):
    made = data.first_validation_batches(TINY, 3)  # straight from the seqio pipeline
    assert_same_batches(made, batch_cache.validation_batches(TINY, 3))  # made, and kept
    [kept] = cache.glob("validation-batches-*.npz")
    # Another process reads them back, exactly, without starting TensorFlow.
    assert _read_back("validation", cache) == [_digest(made), "[]"]
    # A file cut short (a crash, a full disk) is made again, not read.
    kept.write_bytes(kept.read_bytes()[:200])
    batch_cache._validation.cache_clear()
    assert_same_batches(made, batch_cache.validation_batches(TINY, 3))
    assert_same_batches(made, list(batch_cache._unstack(*batch_cache._load(kept))))


def test_kept_training_batches_are_the_stream_from_any_position(cache):
    stream = take(data.train_batches(TINY), 14)
    assert_same_batches(stream[:10], list(batch_cache.train_batches(TINY, 0, 10)))
    [kept] = cache.glob("train-batches-*.npz")
    assert batch_cache._load(kept)[0] == 10
    # Read back from any position (a resume), in another process without TensorFlow.
    assert_same_batches(stream[4:10], list(batch_cache.train_batches(TINY, 4, 10)))
    assert _read_back("train", cache) == [_digest(stream[3:8]), "[]"]
    # A run that needs more (an extension) makes them again, from the same stream.
    assert_same_batches(stream[9:14], list(batch_cache.train_batches(TINY, 9, 14)))
    assert batch_cache._load(kept)[0] == 14
    # Another data seed is another stream, kept apart.
    other = TINY.model_copy(update={"seed": 1})
    assert_same_batches(take(data.train_batches(other), 3),
                        list(batch_cache.train_batches(other, 0, 3)))
    assert len(list(cache.glob("train-batches-*.npz"))) == 2


def test_a_corrupt_or_truncated_file_is_made_again(cache):
    stream = take(data.train_batches(TINY), 6)
    list(batch_cache.train_batches(TINY, 0, 6))
    [kept] = cache.glob("train-batches-*.npz")
    for damage in ("flip", "truncate"):
        raw = bytearray(kept.read_bytes())
        if damage == "flip":  # one byte in the middle of the arrays: the CRC-32 fails
            raw[len(raw) // 2] ^= 0x40
        else:
            raw = raw[:len(raw) // 3]
        kept.write_bytes(bytes(raw))
        assert batch_cache._load(kept) is None, damage
        assert_same_batches(stream[2:6], list(batch_cache.train_batches(TINY, 2, 6)))
        assert batch_cache._load(kept)[0] == 6, damage  # and kept again, whole


def test_a_changed_source_file_is_another_key(tmp_path, cache):
    c4 = tmp_path / "c4"
    c4.mkdir()
    lines = [f'{{"text": "Document {i} says something about {i * 7} things."}}'
             for i in range(64)]
    for split in ("train", "validation"):
        write_shard(c4 / f"c4-{split}.00000-of-00001.json.gz", lines)
    cfg = DataConfig(source=f"c4:{c4}", batch_size=2, inputs_length=32, targets_length=8)
    before = batch_cache._path("train", cfg, "train")
    shard = c4 / "c4-train.00000-of-00001.json.gz"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    assert batch_cache._path("train", cfg, "train") != before
    assert batch_cache._path("train", cfg.model_copy(update={"batch_size": 4}), "train") \
        != batch_cache._path("train", cfg, "train")


def test_a_run_over_the_size_limit_streams_and_keeps_nothing(cache, monkeypatch):
    stream = take(data.train_batches(TINY), 5)
    for megabytes in ("0", str(4 * batch_cache.batch_bytes(TINY) / 2**20)):  # 4 of 5 batches
        monkeypatch.setenv("DEEPFUSION_TRAIN_CACHE_MB", megabytes)
        assert_same_batches(stream[1:5], list(batch_cache.train_batches(TINY, 1, 5)))
        assert not list(cache.glob("train-batches-*.npz"))
    for bad in ("lots", "-1", "inf", "nan"):
        monkeypatch.setenv("DEEPFUSION_TRAIN_CACHE_MB", bad)
        with pytest.raises(DataError, match=f"DEEPFUSION_TRAIN_CACHE_MB must be .*'{bad}'"):
            batch_cache.train_batches(TINY, 0, 1)


def test_batch_bytes_counts_every_feature_unpacked_too():
    unpacked = TINY.model_copy(update={"pack": False})
    batch = next(data.train_batches(unpacked))
    assert sum(v.nbytes for v in batch.values()) == batch_cache.batch_bytes(unpacked)
    batch = next(data.train_batches(TINY))
    assert sum(v.nbytes for v in batch.values()) == batch_cache.batch_bytes(TINY)


def test_batches_kept_ahead_from_several_threads_are_the_stream(cache, monkeypatch):
    # As a flow process keeps each node's batches while others compute: the same config from
    # two threads and another config beside them.
    other = TINY.model_copy(update={"seed": 5})
    kept = []
    threads = [threading.Thread(target=lambda cfg=cfg: kept.append(
        batch_cache.keep_train_batches(cfg, 8))) for cfg in (TINY, TINY, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert kept == [True] * 3 and len(list(cache.glob("train-batches-*.npz"))) == 2
    assert _read_back("train", cache) == [_digest(take(data.train_batches(TINY), 8)[3:]), "[]"]
    monkeypatch.setenv("DEEPFUSION_TRAIN_CACHE_MB", "0")
    assert not batch_cache.keep_train_batches(TINY, 8)
