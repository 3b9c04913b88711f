"""Conversion between our T5.1.1 checkpoints and Hugging Face `T5ForConditionalGeneration`.

Only T5.1.1 maps one-to-one: gated-GELU MLP, untied logits head without output scaling,
equal encoder and decoder depth, RMSNorm eps 1e-6, one norm group. Both sides fold
1/sqrt(head_dim) into the query weights, so every weight is copied as is, only transposed
(torch `Linear` stores [out, in], our kernels [in, ...out]) and split into heads.

transformers >= 5 always reports `tie_word_embeddings=True` for T5 and keeps the T5.1.1
distinction in `scale_decoder_outputs` (False for an untied head); both versions are read.

Needs the `hf` extra (torch, transformers); nothing else in `deepfusion_core` imports this.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydantic
import torch
import transformers
from flax import traverse_util

from deepfusion_core.checkpoint import (CheckpointError, check_params, load_model, read_config,
                                        save_model)
from deepfusion_core.config import T5Config
from deepfusion_core.model import RMSNORM_EPS, Params


def config_from_hf(hf_config: transformers.PretrainedConfig) -> T5Config:
    """Our config for an HF T5.1.1 config; `ValueError` naming a field we can't represent."""
    c = hf_config
    if getattr(c, "model_type", None) != "t5":
        raise ValueError(f"unsupported HF config: model_type={getattr(c, 'model_type', None)!r}, "
                         f"expected 't5'")
    # Pre-v5 configs carry the untied head in tie_word_embeddings; v5 in scale_decoder_outputs.
    tied = getattr(c, "scale_decoder_outputs", getattr(c, "tie_word_embeddings", True))
    problems = [
        (c.feed_forward_proj != "gated-gelu", f"feed_forward_proj={c.feed_forward_proj!r}"),
        (tied, "tie_word_embeddings=True (tied, d_model**-0.5-scaled logits head)"),
        (c.num_decoder_layers != c.num_layers,
         f"num_decoder_layers={c.num_decoder_layers} != num_layers={c.num_layers}"),
        (c.layer_norm_epsilon != RMSNORM_EPS, f"layer_norm_epsilon={c.layer_norm_epsilon}"),
        (c.pad_token_id not in (0, None), f"pad_token_id={c.pad_token_id}"),
        (getattr(c, "decoder_start_token_id", None) not in (0, None),
         f"decoder_start_token_id={getattr(c, 'decoder_start_token_id', None)}"),
    ]
    for bad, field in problems:
        if bad:
            raise ValueError(f"unsupported HF T5 config: {field} (only T5.1.1 is supported)")
    try:
        return T5Config(d_model=c.d_model, num_heads=c.num_heads, head_dim=c.d_kv, d_ff=c.d_ff,
                        num_layers=c.num_layers, vocab_size=c.vocab_size,
                        relpos_buckets=c.relative_attention_num_buckets,
                        relpos_max_distance=c.relative_attention_max_distance)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"unsupported HF T5 config: {'.'.join(map(str, first['loc']))}: "
                         f"{first['msg']}") from None


def _check_exportable(cfg: T5Config) -> None:
    if len(cfg.norm_groups) > 1:
        raise ValueError(f"cannot export to HF: norm_groups={list(cfg.norm_groups)} (a fusion-prop "
                         f"model) needs grouped RMSNorm, which HF T5 does not have")


def config_to_hf(cfg: T5Config) -> transformers.T5Config:
    """The HF T5.1.1 config for `cfg`; `ValueError` for a model with several norm groups."""
    _check_exportable(cfg)
    return transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relpos_buckets,
        relative_attention_max_distance=cfg.relpos_max_distance,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=RMSNORM_EPS,
        dropout_rate=0.0, is_encoder_decoder=True, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)


def _name_map(cfg: T5Config) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """(our path, HF name, layout) for every parameter; layout is how the two arrays relate."""
    def attention(ours: tuple[str, ...], hf: str):
        for our_name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
            yield (*ours, our_name, "kernel"), f"{hf}.{hf_name}.weight", "qkv"
        yield (*ours, "out", "kernel"), f"{hf}.o.weight", "out"

    def mlp(ours: tuple[str, ...], hf: str):
        for name in ("wi_0", "wi_1", "wo"):
            yield (*ours, name, "kernel"), f"{hf}.DenseReluDense.{name}.weight", "T"
        yield (*ours[:-1], "pre_mlp_layer_norm", "scale"), f"{hf}.layer_norm.weight", "id"

    yield ("token_embedder", "embedding"), "shared.weight", "id"
    for stack in ("encoder", "decoder"):
        yield ((stack, "relpos_bias", "rel_embedding"),
               f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T")
        for i in range(cfg.num_layers):
            ours, hf = (stack, f"layers_{i}"), f"{stack}.block.{i}.layer"
            if stack == "encoder":
                yield ((*ours, "pre_attention_layer_norm", "scale"),
                       f"{hf}.0.layer_norm.weight", "id")
                yield from attention((*ours, "attention"), f"{hf}.0.SelfAttention")
                yield from mlp((*ours, "mlp"), f"{hf}.1")
            else:
                yield ((*ours, "pre_self_attention_layer_norm", "scale"),
                       f"{hf}.0.layer_norm.weight", "id")
                yield from attention((*ours, "self_attention"), f"{hf}.0.SelfAttention")
                yield ((*ours, "pre_cross_attention_layer_norm", "scale"),
                       f"{hf}.1.layer_norm.weight", "id")
                yield from attention((*ours, "encoder_decoder_attention"),
                                     f"{hf}.1.EncDecAttention")
                yield from mlp((*ours, "mlp"), f"{hf}.2")
        yield (stack, f"{stack}_norm", "scale"), f"{stack}.final_layer_norm.weight", "id"
    yield ("decoder", "logits_dense", "kernel"), "lm_head.weight", "T"


# HF aliases of `shared.weight` (tied in HF, a single embedding in our tree).
_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def params_from_hf_state_dict(cfg: T5Config, state_dict: dict) -> Params:
    """Our parameter tree (float32 numpy) from an HF T5.1.1 state dict (torch or numpy values)."""
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    flat, names = {}, list(_name_map(cfg))
    missing = [hf for _, hf, _ in names if hf not in state_dict]
    unexpected = sorted(state_dict.keys() - {hf for _, hf, _ in names} - set(_EMBED_ALIASES))
    if missing or unexpected:
        raise ValueError(f"HF state dict does not match the config ({cfg.describe()}): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for ours, hf, layout in names:
        w = state_dict[hf]
        w = w.detach().cpu().float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
        w = w.astype(np.float32)
        if layout == "qkv":
            w = w.T.reshape(d, h, k)
        elif layout == "out":
            w = w.T.reshape(h, k, d)
        elif layout == "T":
            w = w.T
        flat[ours] = np.ascontiguousarray(w)
    params = traverse_util.unflatten_dict(flat)
    check_params(cfg, params, where="HF state dict")
    return params


def params_to_hf_state_dict(cfg: T5Config, params: Params) -> dict[str, torch.Tensor]:
    """The HF T5.1.1 state dict (float32 torch tensors, embedding aliases included) for params."""
    _check_exportable(cfg)
    check_params(cfg, params, where="params to export")
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    flat = traverse_util.flatten_dict(params)
    state_dict = {}
    for ours, hf, layout in _name_map(cfg):
        w = np.asarray(flat[ours], np.float32)
        if layout == "qkv":
            w = w.reshape(d, h * k).T
        elif layout == "out":
            w = w.reshape(h * k, d).T
        elif layout == "T":
            w = w.T
        state_dict[hf] = torch.from_numpy(np.ascontiguousarray(w))
    for alias in _EMBED_ALIASES:
        state_dict[alias] = state_dict["shared.weight"]
    return state_dict


@contextlib.contextmanager
def _quiet_transformers():
    # Loading an untied T5.1.1 head makes v5 warn "update the config with
    # tie_word_embeddings=False", which its T5Config ignores; the head is still loaded untied.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert an HF T5.1.1 directory (from `save_pretrained`) to a model checkpoint at `out`."""
    hf_dir, out = Path(hf_dir).absolute(), Path(out).absolute()
    if out.exists():
        raise CheckpointError(f"{out} already exists")
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no HF model at {hf_dir}: {config_file.name} not found")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "t5":
        raise ValueError(f"{hf_dir} is not an HF T5 model: model_type={model_type!r}")
    hf_config = transformers.T5Config.from_pretrained(hf_dir, local_files_only=True)
    cfg = config_from_hf(hf_config)
    with _quiet_transformers():
        try:
            model, info = transformers.T5ForConditionalGeneration.from_pretrained(
                hf_dir, config=hf_config, local_files_only=True, output_loading_info=True)
        except OSError as e:
            raise FileNotFoundError(f"cannot load HF weights from {hf_dir}: "
                                    f"{str(e).splitlines()[0]}") from None
    if info["missing_keys"]:  # from_pretrained would silently leave these at random init
        raise ValueError(f"{hf_dir} lacks weights: {sorted(info['missing_keys'])[:3]}")
    return save_model(out, cfg, params_from_hf_state_dict(cfg, model.state_dict()))


def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write the model checkpoint (or train workdir) `ckpt` as an HF T5.1.1 directory."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise ValueError(f"{out_dir} already exists")
    hf_config = config_to_hf(read_config(ckpt))  # refuse before reading any array
    cfg, params = load_model(ckpt)
    state_dict = params_to_hf_state_dict(cfg, params)
    model = transformers.T5ForConditionalGeneration(hf_config)
    # The model ties lm_head to shared on construction; give the head its own parameter.
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    model.load_state_dict(state_dict, strict=True)
    # Save next to out_dir and rename, so a failure never leaves a half-written out_dir.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
