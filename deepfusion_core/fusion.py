"""Deep fusion (arXiv 2306.11903, section 3): grow a model from n >= 2 models.

The fused model carries the concatenation of its inputs' hidden states. Every parameter is
fused by one rule read off its logical axes (see `param_layout`): along each *fused* axis
(`embed`, `heads`, `mlp`) the inputs occupy consecutive blocks; the other axes (`vocab`, `kv`,
`relpos_buckets`) are shared. A tensor with two fused axes (attention and MLP kernels)
becomes block-diagonal; the off-diagonal ("cross") blocks are zero or N(0, cross_std^2).
A tensor with one fused axis is a concatenation (embeddings, norm scales, position bias
tables along heads). The logits head stacks its input rows scaled by the averaging weights,
so the fused logits are the weighted mean of the inputs' logits.

With zero cross blocks and `norm="prop"` (grouped RMSNorm, one group per input group) the
fused model computes exactly the weighted average ensemble of its inputs. `norm="rule"`
keeps one RMSNorm over the whole width (the standard architecture): exact only for self
fusion of a single-group model, approximate otherwise (a grouped model self-fused with
`rule` loses its groups, and with them its function). `default_norm` is the one place
that decides the default: the exact choice, and the standard architecture where both are
exact.

Fusion runs in host memory (numpy), one parameter at a time, and writes each output block
once: peak memory is the inputs plus the output. The module imports no JAX, so the planner
derives fused configs without loading it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

from deepfusion_core.config import T5Config
from deepfusion_core.param_layout import Params, flatten, param_layout, unflatten

FUSED_AXES = frozenset({"embed", "heads", "mlp"})
LOGITS_KERNEL = ("decoder", "logits_dense", "kernel")
# Fields every input must share: they are not widened by fusion.
_SHARED_FIELDS = ("num_layers", "head_dim", "vocab_size", "relpos_buckets", "relpos_max_distance")

Norm = Literal["prop", "rule"]


class FusionError(ValueError):
    """The inputs cannot be fused (their message names the input and the field)."""


def check_fusable(configs: Sequence[T5Config]) -> None:
    """Raise `FusionError` unless the configs can be fused (n >= 2, shared fields equal)."""
    if len(configs) < 2:
        raise FusionError(f"fusion needs at least 2 models, got {len(configs)}")
    first = configs[0]
    for i, cfg in enumerate(configs[1:], start=2):
        for field in _SHARED_FIELDS:
            a, b = getattr(first, field), getattr(cfg, field)
            if a != b:
                raise FusionError(
                    f"cannot fuse: model 1 has {field}={a} but model {i} has {field}={b} "
                    f"({', '.join(_SHARED_FIELDS)} must match)")


def fused_config(configs: Sequence[T5Config], norm: Norm) -> T5Config:
    """The config of the model that fusing `configs` produces."""
    check_fusable(configs)
    d_model = sum(c.d_model for c in configs)
    groups = tuple(g for c in configs for g in c.norm_groups) if norm == "prop" else (d_model,)
    return configs[0].model_copy(update=dict(
        d_model=d_model,
        num_heads=sum(c.num_heads for c in configs),
        d_ff=sum(c.d_ff for c in configs),
        norm_groups=groups,
    ))


def check_fuse_options(n: int, cross_std: float, weights: Sequence[float] | None) -> None:
    """Raise `FusionError` unless `cross_std` is finite and >= 0 and `weights` (if given) are
    n finite positive numbers that sum to 1 (they average the inputs' logits)."""
    if not (math.isfinite(cross_std) and cross_std >= 0):
        raise FusionError(f"cross_std must be a finite number >= 0, got {cross_std}")
    if weights is None:
        return
    if len(weights) != n:
        raise FusionError(f"got {len(weights)} weights for {n} models")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise FusionError(f"weights must be finite and > 0, got {list(weights)}")
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise FusionError(f"weights {list(weights)} must sum to 1")


def default_norm(configs: Sequence[T5Config], self_fusion: bool) -> Norm:
    """The norm `fuse` uses when none is given: always an exact one.

    "rule" only for self fusion of a single-group model, where one RMSNorm over the
    concatenation equals the original norm (and the standard architecture stays); "prop"
    everywhere else. Self fusion of a grouped model (one made by fusion-prop) must keep its
    groups: one RMSNorm over the concatenation of [a, b] is not the per-group norm of a and b.
    `self_fusion` says whether every input is the same model; the planner knows it from the
    node names, `fuse` from the parameters.
    """
    single_group = all(len(c.norm_groups) == 1 for c in configs)
    return "rule" if self_fusion and single_group else "prop"


def _is_self_fusion(models: Sequence[tuple[T5Config, Params]]) -> bool:
    cfg0, params0 = models[0]
    flat0 = flatten(params0)
    for cfg, params in models[1:]:
        if cfg != cfg0:
            return False
        if params is params0:
            continue
        flat = flatten(params)
        if any(not np.array_equal(np.asarray(flat[k]), np.asarray(v)) for k, v in flat0.items()):
            return False
    return True


def _leaf_rng(seed: int, key: tuple[str, ...]) -> np.random.Generator:
    # Seeded per parameter name, so the noise does not depend on traversal order.
    return np.random.default_rng([seed, zlib.crc32("/".join(key).encode())])


def _fuse_leaf(key, leaves, axes, out_shape, cross_std, seed, weights) -> np.ndarray:
    fused_dims = [d for d, name in enumerate(axes) if name in FUSED_AXES]
    if cross_std > 0 and len(fused_dims) >= 2:
        out = _leaf_rng(seed, key).standard_normal(out_shape, dtype=np.float32)
        out *= np.float32(cross_std)  # diagonal blocks are overwritten below
    else:
        out = np.zeros(out_shape, np.float32)
    offsets = dict.fromkeys(fused_dims, 0)
    for i, leaf in enumerate(leaves):
        index = [slice(None)] * len(out_shape)
        for d in fused_dims:
            index[d] = slice(offsets[d], offsets[d] + leaf.shape[d])
            offsets[d] += leaf.shape[d]
        block = out[tuple(index)]
        if key == LOGITS_KERNEL:
            np.multiply(leaf, np.float32(weights[i]), out=block)
        else:
            block[...] = leaf
    return out


def fuse(models: Sequence[tuple[T5Config, Params]], norm: Norm | None = None,
         cross_std: float = 0.0, seed: int = 0,
         weights: Sequence[float] | None = None) -> tuple[T5Config, Params]:
    """Fuse n >= 2 `(config, params)` pairs into one wider model.

    norm: "prop" (grouped RMSNorm, exact weighted ensemble) or "rule" (one RMSNorm, standard
      architecture; approximate unless the inputs are one single-group model). None picks
      `default_norm`: "rule" for self fusion of a single-group model, "prop" otherwise.
    cross_std: std of the off-diagonal blocks (0 gives zeros), drawn from `seed`.
    weights: averaging weights of the inputs' logits, positive and summing to 1 (default 1/n).
    Returns the fused config and its params as float32 numpy arrays.
    """
    configs = [cfg for cfg, _ in models]
    check_fusable(configs)
    if norm is None:
        norm = default_norm(configs, _is_self_fusion(models))
    if norm not in ("prop", "rule"):
        raise FusionError(f"norm must be 'prop' or 'rule', got {norm!r}")
    check_fuse_options(len(models), cross_std, weights)
    weights = [1.0 / len(models)] * len(models) if weights is None else list(weights)

    out_cfg = fused_config(configs, norm)
    inputs = [flatten(params) for _, params in models]
    fused = {}
    for key, spec in param_layout(out_cfg).items():
        leaves = [np.asarray(flat[key], dtype=np.float32) for flat in inputs]
        out_shape = tuple(
            sum(leaf.shape[d] for leaf in leaves) if name in FUSED_AXES else leaves[0].shape[d]
            for d, name in enumerate(spec.axes))
        fused[key] = _fuse_leaf(key, leaves, spec.axes, out_shape, cross_std, seed, weights)
    return out_cfg, unflatten(fused)
