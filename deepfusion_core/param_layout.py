"""Every T5.1.1 parameter's path, shape and logical axes, from a `T5Config` alone.

Planning (parameter counts, memory estimates, fusion configs) needs the parameter tree but
not the model: this module spells out the tree `model.T5` creates (documented in `model.py`)
as plain tuples, so none of that imports JAX or traces the model. A test checks it against
flax's own abstract init, leaf by leaf: same paths, shapes, dtypes and logical axes.

Paths are tuples of names (`("encoder", "layers_0", "mlp", "wo", "kernel")`); `flatten` and
`unflatten` convert between nested dicts of parameters and dicts keyed by such paths.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from math import prod
from typing import Any

from deepfusion_core.config import T5Config

Params = dict[str, Any]  # a nested dict of parameter arrays, keyed by module and name
ParamPath = tuple[str, ...]
PARAM_DTYPE = "float32"  # parameters are stored in float32 whatever the compute dtype


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, the logical name of each axis, and its dtype."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: str = PARAM_DTYPE

    @property
    def size(self) -> int:
        return prod(self.shape)


def _attention(cfg: T5Config) -> Iterator[tuple[ParamPath, ParamSpec]]:
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    for name in ("query", "key", "value"):
        yield (name, "kernel"), ParamSpec((d, h, k), ("embed", "heads", "kv"))
    yield ("out", "kernel"), ParamSpec((h, k, d), ("heads", "kv", "embed"))


def _mlp(cfg: T5Config) -> Iterator[tuple[ParamPath, ParamSpec]]:
    d, f = cfg.d_model, cfg.d_ff
    yield ("wi_0", "kernel"), ParamSpec((d, f), ("embed", "mlp"))
    yield ("wi_1", "kernel"), ParamSpec((d, f), ("embed", "mlp"))
    yield ("wo", "kernel"), ParamSpec((f, d), ("mlp", "embed"))


def _stack(cfg: T5Config, blocks: tuple[str, ...], final_norm: str
           ) -> Iterator[tuple[ParamPath, ParamSpec]]:
    """One encoder or decoder stack; `blocks` names each layer's sublayers in order (a name
    ending in `_norm` is an RMSNorm, one ending in `attention` an attention, `mlp` the MLP)."""
    norm = ParamSpec((cfg.d_model,), ("embed",))
    yield ("relpos_bias", "rel_embedding"), ParamSpec((cfg.num_heads, cfg.relpos_buckets),
                                                      ("heads", "relpos_buckets"))
    for i in range(cfg.num_layers):
        for block in blocks:
            if block.endswith("_norm"):
                yield (f"layers_{i}", block, "scale"), norm
            else:
                sub = _mlp(cfg) if block == "mlp" else _attention(cfg)
                yield from (((f"layers_{i}", block, *path), spec) for path, spec in sub)
    yield (final_norm, "scale"), norm


_ENCODER_BLOCKS = ("pre_attention_layer_norm", "attention", "pre_mlp_layer_norm", "mlp")
_DECODER_BLOCKS = ("pre_self_attention_layer_norm", "self_attention",
                   "pre_cross_attention_layer_norm", "encoder_decoder_attention",
                   "pre_mlp_layer_norm", "mlp")


def param_layout(cfg: T5Config) -> dict[ParamPath, ParamSpec]:
    """Every parameter of the T5.1.1 model `cfg` describes, by path (a fresh dict per call)."""
    d, v = cfg.d_model, cfg.vocab_size
    layout = {("token_embedder", "embedding"): ParamSpec((v, d), ("vocab", "embed"))}
    layout.update((("encoder", *p), s) for p, s in _stack(cfg, _ENCODER_BLOCKS, "encoder_norm"))
    layout.update((("decoder", *p), s) for p, s in _stack(cfg, _DECODER_BLOCKS, "decoder_norm"))
    layout[("decoder", "logits_dense", "kernel")] = ParamSpec((d, v), ("embed", "vocab"))
    return layout


def count_params(cfg: T5Config) -> int:
    """Number of parameters of the model `cfg` describes (nothing is allocated or traced)."""
    return sum(spec.size for spec in param_layout(cfg).values())


def flatten(tree: Mapping[str, Any]) -> dict[ParamPath, Any]:
    """A nested mapping of parameters as one dict keyed by path (leaves are anything that is
    not a mapping)."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(((name, *path), leaf) for path, leaf in flatten(value).items())
        else:
            flat[(name,)] = value
    return flat


def unflatten(flat: Mapping[ParamPath, Any]) -> dict[str, Any]:
    """The nested dict whose `flatten` is `flat`."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree
