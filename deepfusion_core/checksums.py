"""Checksums of saved arrays: written beside each checkpoint, verified when it is read.

Orbax stores arrays as plain zarr chunks without any checksum, so random bytes in a chunk
restore silently as garbage values (a resumed run then trains to NaN, a fusion of the model
succeeds). Each array gets two 32-bit sums of its bits, with wraparound arithmetic::

    plain    = sum(bits)                        any change to a single element changes it
    weighted = sum(bits * (1 + P * row index))  catches swapped and shifted rows

where the row is the index along the first axis (the element, for a vector). Both sums add
up shard by shard, wherever the shards live and however the array is sharded, so a
checkpoint saved from 8 devices verifies when it is loaded whole on the host. They cost one
pass over memory in numpy (BENCHMARKS.md, `bench checkpoint`); weighting each axis would
catch swaps within a row too, for a second pass. This detects corruption; it is not a
cryptographic digest.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

_WORD = 2**32
_ROW_WEIGHT = 2654435761  # odd: distinct rows get distinct weights modulo 2**32


def _words(block: np.ndarray) -> np.ndarray:
    """The block's raw bits as uint32 words (an 8-byte element is two words, a new last axis)."""
    block = np.ascontiguousarray(block)
    if block.dtype.itemsize == 8:
        return block.view(np.uint32).reshape(block.shape + (2,))
    if block.dtype.itemsize == 4:
        return block.view(np.uint32)
    return block.view(f"u{block.dtype.itemsize}").astype(np.uint32)


def _block_sums(block: np.ndarray, first_row: int) -> np.ndarray:
    """(plain, weighted) of one block whose first row is the array's row `first_row`."""
    words = _words(block)
    if words.ndim == 0:
        plain = int(words)
        return np.array([plain, plain], dtype=np.uint64)
    rows = words.reshape(words.shape[0], -1).sum(axis=1, dtype=np.uint32)
    index = np.arange(first_row, first_row + len(rows), dtype=np.uint64) % _WORD
    plain = int(rows.sum(dtype=np.uint32))
    weighted = _ROW_WEIGHT * int(np.sum(rows * index.astype(np.uint32), dtype=np.uint32))
    return np.array([plain, (plain + weighted) % _WORD], dtype=np.uint64)


def _array_sums(x: Any) -> np.ndarray:
    """This process's share of the sums of `x`: each distinct shard it holds, once."""
    if not isinstance(x, jax.Array):
        return _block_sums(np.asarray(x), 0)
    total = np.zeros(2, dtype=np.uint64)
    for shard in x.addressable_shards:
        if shard.replica_id == 0:  # a replicated shard counts once, wherever it lives
            first_row = (shard.index[0].start or 0) if shard.index else 0
            total += _block_sums(np.asarray(shard.data), first_row)
    return total % _WORD


def tree_checksums(tree: Any) -> dict[str, list[int]]:
    """{array path: [plain, weighted]} of every array in `tree` (jax or numpy arrays)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = np.stack([_array_sums(x) for _, x in leaves]) if leaves else np.zeros((0, 2))
    if jax.process_count() > 1:  # every process holds a share of the shards
        # Gathered as 16-bit halves: JAX's collectives carry 32-bit integers.
        halves = np.stack([sums >> 16, sums & 0xFFFF]).astype(np.int32)
        hi, lo = np.asarray(multihost_utils.process_allgather(halves)).astype(np.uint64).sum(0)
        sums = (hi << 16) + lo
    sums = sums.astype(np.uint64) % _WORD
    return {jax.tree_util.keystr(path): [int(v) for v in s] for (path, _), s in zip(leaves, sums)}


def mismatches(tree: Any, expected: dict[str, list[int]]) -> list[str]:
    """Paths of the arrays of `tree` whose checksums differ from `expected` (or are absent)."""
    actual = tree_checksums(tree)
    return sorted(k for k in actual.keys() | expected.keys() if actual.get(k) != expected.get(k))
