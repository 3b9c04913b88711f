"""Fusion composes exactly: property tests over random fusion trees (hypothesis).

A tree's leaves are random small models of random widths, with trained-like norm scales and
position tables (t5x's init has every norm scale at 1 and small position biases, which would
hide a norm that merges groups: one RMSNorm over identical-scale halves is almost the
per-group norm). Each internal node fuses 2 or 3 children, sometimes the same child more
than once (self fusion when all of them are), with random averaging weights and the default
norm. With zero cross blocks the root must compute the weighted ensemble of its leaves, the
weights multiplied down the tree; self fusion of the root must compute the root; and the
root's config must hold the sums the tree implies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfusion_core import T5Config, forward, fuse, init_params
from deepfusion_core.model import Params

TOL = 1e-5  # float32 logits of magnitude ~10: the exact identities' bound
VOCAB = 64
# Shared by every input (fusion widens only d_model, heads and d_ff). One layer keeps each new
# fused width's compile short: the tree, not the depth, is what this file explores.
BASE = T5Config(d_model=4, num_heads=1, head_dim=4, d_ff=4, num_layers=1, vocab_size=VOCAB)
# Leaf widths (d_model, heads, d_ff) from a short menu: every distinct fused width costs an
# XLA compile (~0.5 s here), and two leaf widths already make every mixed-width tree.
WIDTHS = st.sampled_from([(4, 1, 4), (8, 2, 8)])


@dataclass(frozen=True)
class Leaf:
    d_model: int
    num_heads: int
    d_ff: int
    seed: int


@dataclass(frozen=True)
class Fusion:
    children: tuple  # of Leaf | Fusion; the same object repeated is the same input
    weights: tuple[float, ...]


@st.composite
def fusion_trees(draw, nested: bool = True):
    """A Fusion of 2 or 3 children; a child is a leaf or (at the top, about one child in
    four) a nested Fusion of 2. The size is bounded because every distinct fused width
    costs an XLA compile; the variety that matters (widths mixed, groups nested, inputs
    repeated, self fusion of grouped and single-group models, weights) is all there."""
    def child():
        if nested and draw(st.integers(0, 3)) == 0:
            return draw(fusion_trees(nested=False))
        return Leaf(*draw(WIDTHS), draw(st.integers(0, 2**16)))

    n = draw(st.sampled_from([2, 3] if nested else [2]))
    children = [child()]
    for _ in range(n - 1):  # the same input again (self fusion when all are) or a new one
        children.append(children[0] if draw(st.booleans()) else child())
    raw = draw(st.lists(st.floats(0.1, 1.0), min_size=n, max_size=n))
    return Fusion(tuple(children), tuple(w / sum(raw) for w in raw))


@functools.lru_cache(maxsize=None)
def leaf_model(leaf: Leaf) -> tuple[T5Config, Params]:
    """A random model with trained-like norm scales (0.3 to 3) and position tables."""
    cfg = BASE.model_copy(update=dict(d_model=leaf.d_model, num_heads=leaf.num_heads,
                                      d_ff=leaf.d_ff, norm_groups=(leaf.d_model,)))
    rng = np.random.default_rng(leaf.seed)
    flat = traverse_util.flatten_dict(init_params(cfg, leaf.seed))
    for key, value in flat.items():
        if key[-1] == "scale":
            flat[key] = np.exp(rng.uniform(np.log(0.3), np.log(3.0), value.shape)).astype(np.float32)
        elif key[-1] == "rel_embedding":
            # std 1: trained-like; at std 2 the sharper attention amplifies float32 rounding
            # (fused models sum in other orders) to ~1.3e-5 on logits of ~3, past TOL.
            flat[key] = rng.normal(0.0, 1.0, value.shape).astype(np.float32)
    return cfg, traverse_util.unflatten_dict(flat)


@functools.lru_cache(maxsize=None)
def fused_model(node) -> tuple[T5Config, Params]:
    if isinstance(node, Leaf):
        return leaf_model(node)
    return fuse([fused_model(c) for c in node.children], weights=list(node.weights))


def leaf_weights(node, weight: float = 1.0) -> dict[Leaf, float]:
    """Each leaf's weight in the ensemble the tree computes: the product down its paths."""
    if isinstance(node, Leaf):
        return {node: weight}
    total: dict[Leaf, float] = {}
    for child, w in zip(node.children, node.weights):
        for leaf, lw in leaf_weights(child, weight * w).items():
            total[leaf] = total.get(leaf, 0.0) + lw
    return total


def expected_dims(node) -> tuple[int, int, int, tuple[int, ...]]:
    """d_model, heads, d_ff and norm groups the tree implies: widths add up; groups are
    concatenated, except that self fusion of a single-group model keeps one group."""
    if isinstance(node, Leaf):
        return node.d_model, node.num_heads, node.d_ff, (node.d_model,)
    dims = [expected_dims(c) for c in node.children]
    d_model = sum(d[0] for d in dims)
    # Equal subtrees are the same model (equal leaves have equal seeds), and fusion tells self
    # fusion by the parameters, not by where they came from.
    self_fusion = all(c == node.children[0] for c in node.children)
    groups = (d_model,) if self_fusion and len(dims[0][3]) == 1 else sum((d[3] for d in dims), ())
    return d_model, sum(d[1] for d in dims), sum(d[2] for d in dims), groups


def _batch():
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(2, VOCAB, (2, 7)), jnp.int32).at[1, 5:].set(0)  # padding
    dec = jnp.asarray(rng.integers(2, VOCAB, (2, 5)), jnp.int32).at[:, 0].set(0)
    return enc, dec


BATCH = _batch()


def logits(model) -> np.ndarray:
    # The model's own jitted forward: one XLA compile per new fused width (~0.7 s here), which
    # is most of this file's time. (Compiling at a lower XLA optimisation level halves that,
    # but moved a 3-way self fusion's logits by 4e-5 where the default moves them by 1.4e-6.)
    return np.asarray(forward(model[0], model[1], *BATCH))


@functools.lru_cache(maxsize=None)
def leaf_logits(leaf: Leaf) -> np.ndarray:
    return logits(leaf_model(leaf))


# 200 examples: each compiles the forward of at most two new fused widths (the root and its
# self fusion); under a minute on CI's 2-core machine.
# 60 random trees (a fresh draw every run): 200 took two of the suite's minutes.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=fusion_trees(), pick=st.integers(0, 2))
def test_a_fusion_tree_is_the_weighted_ensemble_of_its_leaves(tree, pick):
    root = fused_model(tree)
    d_model, heads, d_ff, groups = expected_dims(tree)
    assert (root[0].d_model, root[0].num_heads, root[0].d_ff) == (d_model, heads, d_ff)
    assert root[0].norm_groups == groups

    ensemble = sum(w * leaf_logits(leaf) for leaf, w in leaf_weights(tree).items())
    root_logits = logits(root)
    assert np.abs(root_logits - ensemble).max() <= TOL

    # Self fusion of a node of the tree (a leaf or a nested, often grouped, fusion) is that
    # node. (The root's own self fusion is in the tree whenever its children are equal.)
    node = tree.children[pick % len(tree.children)]
    model = fused_model(node)
    d_model, _, _, groups = expected_dims(node)
    again = fuse([model, model])
    assert again[0].norm_groups == (groups * 2 if len(groups) > 1 else (2 * d_model,))
    assert np.abs(logits(again) - logits(model)).max() <= TOL
