"""HF transformers interop: logits parity with T5ForConditionalGeneration, bit-exact round trip,
and refusals that write nothing."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch  # the `hf` extra is part of the test install: fail, never skip, without it
import transformers
import yaml
from transformers.models.t5.modeling_t5 import T5Attention
from typer.testing import CliRunner

from deepfusion_cli.main import app
from deepfusion_core import hf
from deepfusion_core.checkpoint import CheckpointError, load_model, save_model
from deepfusion_core.config import PRESETS
from deepfusion_core.model import forward, relative_position_buckets
from pipeline.execute import run_plan
from pipeline.plan import build_plan
from pipeline.workdir import Workdir

CFG = PRESETS["tiny-S"].model_copy(update={"vocab_size": 512})


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random untied T5.1.1 HF model (norm scales randomised too) saved with save_pretrained."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf.config_to_hf(CFG)).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(CFG.vocab_size, CFG.d_model) * 0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def imported(hf_model, tmp_path_factory):
    return hf.import_hf(hf_model[1], tmp_path_factory.mktemp("ckpt") / "imported")


def test_config_round_trip():
    assert hf.config_from_hf(hf.config_to_hf(CFG)) == CFG


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_hf(bidirectional):
    n = 300  # past max_distance=128, and through the log-bucket boundaries 16, 32, 64, 128
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    theirs = T5Attention._relative_position_bucket(rel, bidirectional, CFG.relpos_buckets,
                                                   CFG.relpos_max_distance).numpy()
    ours = relative_position_buckets(n, n, bidirectional, CFG.relpos_buckets,
                                     CFG.relpos_max_distance)
    np.testing.assert_array_equal(ours, theirs)


def test_import_matches_hf_logits(hf_model, imported):
    model, _ = hf_model
    cfg, params = load_model(imported)
    assert cfg == CFG
    rng = np.random.default_rng(0)
    # Long enough that encoder and decoder distances pass every bucket boundary up to 128.
    enc = rng.integers(2, CFG.vocab_size, size=(2, 140))
    enc[1, 100:] = 0  # padding, masked as keys on both sides
    dec = rng.integers(2, CFG.vocab_size, size=(2, 132))
    dec[:, 0] = 0  # decoder start token
    ours = np.asarray(forward(cfg, params, enc.astype(np.int32), dec.astype(np.int32)))
    with torch.no_grad():
        ids = torch.from_numpy(enc)
        theirs = model(input_ids=ids, attention_mask=(ids > 0).long(),
                       decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
    err = np.abs(ours - theirs).max()
    print(f"max abs logits error vs HF: {err:.3g} (logits std {theirs.std():.3g})")
    assert err <= 1e-4


def test_export_import_round_trip_is_bit_exact(imported, tmp_path):
    out = hf.export_hf(imported, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary dir left
    again = hf.import_hf(out, tmp_path / "again")
    (cfg_a, params_a), (cfg_b, params_b) = load_model(imported), load_model(again)
    assert cfg_a == cfg_b
    leaves = jax.tree_util.tree_leaves_with_path(params_a)
    assert len(leaves) == len(jax.tree.leaves(params_b))
    for path, a in leaves:
        b = params_b
        for key in path:
            b = b[key.key]
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), path


def _write_hf_config(path, **overrides):
    """Our tiny config as HF writes it, with fields replaced (or dropped where None)."""
    hf.config_to_hf(CFG).save_pretrained(path)
    config = {**json.loads((path / "config.json").read_text()), **overrides}
    (path / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_config_from_pre_v5_json(tmp_path, tie_word_embeddings):
    # transformers < 5 wrote the untied T5.1.1 head only as tie_word_embeddings=false.
    _write_hf_config(tmp_path, tie_word_embeddings=tie_word_embeddings,
                     scale_decoder_outputs=None)
    hf_config = transformers.T5Config.from_pretrained(tmp_path)
    if tie_word_embeddings:
        with pytest.raises(ValueError, match="tie_word_embeddings"):
            hf.config_from_hf(hf_config)
    else:
        assert hf.config_from_hf(hf_config) == CFG


@pytest.mark.parametrize("overrides, error, match", [
    (None, FileNotFoundError, "config.json not found"),
    ({}, FileNotFoundError, "no file named model.safetensors"),
    ({"model_type": "bert"}, ValueError, "model_type='bert'"),
    ({"tie_word_embeddings": True, "scale_decoder_outputs": True}, ValueError,
     "tie_word_embeddings"),
    ({"feed_forward_proj": "relu"}, ValueError, "feed_forward_proj='relu'"),
    ({"num_decoder_layers": 3}, ValueError, "num_decoder_layers=3"),
])
def test_import_refuses_bad_input(tmp_path, overrides, error, match):
    src = tmp_path / "src"
    if overrides is not None:
        _write_hf_config(src, **overrides)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(error, match=match) as e:
        hf.import_hf(src, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert sorted(tmp_path.rglob("*")) == before


def test_import_refuses_existing_output(hf_model, imported):
    with pytest.raises(CheckpointError, match="already exists"):
        hf.import_hf(hf_model[1], imported)


def test_export_refuses_bad_input(imported, tmp_path):
    cfg, params = load_model(imported)
    fused = save_model(tmp_path / "fused", cfg.model_copy(update={"norm_groups": (16, 16)}),
                       params)
    (tmp_path / "taken").mkdir()
    cases = [(fused, tmp_path / "out", ValueError, r"norm_groups=\[16, 16\]"),
             (tmp_path / "missing", tmp_path / "out", CheckpointError, "does not exist"),
             (imported, tmp_path / "taken", ValueError, "already exists")]
    before = sorted(tmp_path.rglob("*"))
    for ckpt, out, error, match in cases:
        with pytest.raises(error, match=match) as e:
            hf.export_hf(ckpt, out)
        assert "\n" not in str(e.value)
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_round_trip_and_one_line_errors(hf_model, tmp_path):
    runner = CliRunner()
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert runner.invoke(app, ["import-hf", str(hf_model[1]), str(ours)]).exit_code == 0
    assert runner.invoke(app, ["export-hf", str(ours), str(back)]).exit_code == 0
    assert (back / "config.json").exists()
    result = runner.invoke(app, ["import-hf", str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert not (tmp_path / "x").exists()


def test_a_dag_rooted_at_a_transformers_model_self_fuses_it_exactly_and_fine_tunes_it(
        shared_data, tmp_path):
    """A load node over a locally built transformers T5.1.1 (the byte vocabulary's size), its
    self fusion (the fused logits are the original's) and a fine-tune of the fusion, run as
    `deepfusion run` runs a plan; a changed weight file changes every fingerprint downstream."""
    cfg = PRESETS["tiny-S"].model_copy(update={"vocab_size": 384})
    torch.manual_seed(1)
    model = transformers.T5ForConditionalGeneration(hf.config_to_hf(cfg)).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * 0.2)
    model.save_pretrained(tmp_path / "t5")
    finetune = {"data": {"source": f"glue:{shared_data / 'glue'}", "tasks": ["rte"],
                         "targets_length": 16, "batch_size": 8, "eval_examples": 16},
                "train": {"steps": 2, "learning_rate": 0.001, "warmup_steps": 0,
                          "schedule": "constant", "eval_batches": 1, "save_every": 2}}
    stages = tmp_path / "stages.yaml"
    stages.write_text(yaml.safe_dump({
        "name": "public-t5", "default_profile": "smoke",
        "profiles": {"smoke": {"models": {"S": "tiny-S"}, "finetune": finetune,
                               "data": {"source": "builtin", "vocab": "byte", "batch_size": 4},
                               "train": {"steps": 2, "eval_batches": 1}}},
        "nodes": {"T5": {"load": "t5"}, "T5x2": {"fuse": ["T5", "T5"]},
                  "G": {"finetune": "T5x2", "seed": 5}}}))
    runs = tmp_path / "runs"
    plan = build_plan(stages, "smoke", runs)
    assert run_plan(plan, log=lambda m: None) == {"T5": "ran", "T5x2": "ran", "G": "ran"}
    assert plan.nodes["T5"].source_kind == "hf"
    original, fused = (load_model(plan.nodes[n].model_path) for n in ("T5", "T5x2"))
    assert fused[0].d_model == 2 * cfg.d_model
    rng = np.random.default_rng(0)
    enc = rng.integers(2, cfg.vocab_size, (2, 12)).astype(np.int32)
    dec = np.concatenate([np.zeros((2, 1), np.int32),
                          rng.integers(2, cfg.vocab_size, (2, 8)).astype(np.int32)], 1)
    diff = np.abs(np.asarray(forward(*fused, enc, dec)) - np.asarray(forward(*original, enc, dec)))
    assert diff.max() <= 1e-5
    summary = Workdir(plan.nodes["G"].dir).done_record()
    assert summary.kind == "finetune" and set(summary.glue) == {"rte"}
    weights = next((tmp_path / "t5").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    again = build_plan(stages, "smoke", runs)
    assert all(again.nodes[n].fingerprint != plan.nodes[n].fingerprint for n in plan.nodes)
