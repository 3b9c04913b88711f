"""Checksums of saved arrays: written beside each checkpoint, verified when it is read.

Orbax stores arrays as plain zarr chunks without any checksum, so random bytes in a chunk
restore silently as garbage values (a resumed run then trains to NaN, a fusion of the model
succeeds). Each array gets two 32-bit sums of its bits, with wraparound arithmetic::

    plain    = sum(bits)                     any change to a single element changes it
    weighted = sum(bits * position weight)   catches swapped and shifted elements

The position weight is affine in the element's global index (1 + sum of index x an odd
constant per axis), so the weighted sum splits into one marginal sum per axis. Both sums are
therefore computed shard by shard, wherever the shards live and however the array is
sharded, and add up to the same value: a checkpoint saved from 8 devices verifies when it is
loaded whole on the host. numpy sums run at memory speed (BENCHMARKS.md, `bench
checkpoint`). This detects corruption; it is not a cryptographic digest.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

_WORD = 2**32
_AXIS_WEIGHTS = (2654435761, 2246822519, 3266489917, 668265263, 374761393, 3323198485)


def _words(block: np.ndarray) -> np.ndarray:
    """The block's raw bits as uint32 words (an 8-byte element is two words, a new last axis)."""
    block = np.ascontiguousarray(block)
    if block.dtype.itemsize == 8:
        return block.view(np.uint32).reshape(block.shape + (2,))
    if block.dtype.itemsize == 4:
        return block.view(np.uint32)
    return block.view(f"u{block.dtype.itemsize}").astype(np.uint32)


def _block_sums(block: np.ndarray, offsets: tuple[int, ...]) -> np.ndarray:
    """(plain, weighted) of one block whose first element sits at global index `offsets`."""
    words = _words(block)
    offsets = offsets + (0,) * (words.ndim - len(offsets))
    if words.ndim == 0:
        plain = int(words)
        return np.array([plain, plain], dtype=np.uint64)
    weighted = 0
    for axis in range(words.ndim):
        others = tuple(a for a in range(words.ndim) if a != axis)
        marginal = words.sum(axis=others, dtype=np.uint32) if others else words
        index = np.arange(offsets[axis], offsets[axis] + words.shape[axis], dtype=np.uint64)
        index = (index % _WORD).astype(np.uint32)
        weighted += _AXIS_WEIGHTS[axis % len(_AXIS_WEIGHTS)] * int(
            np.sum(marginal * index, dtype=np.uint32))
    plain = int(marginal.sum(dtype=np.uint32))
    return np.array([plain, (plain + weighted) % _WORD], dtype=np.uint64)


def _array_sums(x: Any) -> np.ndarray:
    """This process's share of the sums of `x`: each distinct shard it holds, once."""
    if not isinstance(x, jax.Array):
        return _block_sums(np.asarray(x), (0,) * np.ndim(x))
    total = np.zeros(2, dtype=np.uint64)
    for shard in x.addressable_shards:
        if shard.replica_id == 0:  # a replicated shard counts once, wherever it lives
            offsets = tuple(s.start or 0 for s in shard.index)
            total += _block_sums(np.asarray(shard.data), offsets)
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
