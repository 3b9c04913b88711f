"""Model checkpoints: Orbax on disk, exact round trip, shape checks before loading."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from deepfusion_core import PRESETS, init_params, load_model, save_model
from deepfusion_core.checkpoint import CheckpointError, read_config

CFG = PRESETS["tiny-S"]


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, init_params(CFG, seed=0))


def test_round_trip_is_bit_exact(tmp_path, params):
    save_model(tmp_path / "m", CFG, params)
    cfg, loaded = load_model(tmp_path / "m")
    assert cfg == CFG
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))


def test_plain_orbax_reads_the_checkpoint(tmp_path, params):
    save_model(tmp_path / "m", CFG, params)
    raw = ocp.PyTreeCheckpointer().restore(tmp_path / "m" / "params")
    assert np.array_equal(raw["decoder"]["logits_dense"]["kernel"],
                          params["decoder"]["logits_dense"]["kernel"])
    config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(tmp_path / "m" / "config")
    assert config["d_model"] == CFG.d_model


def test_refuses_to_overwrite(tmp_path, params):
    save_model(tmp_path / "m", CFG, params)
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(tmp_path / "m", CFG, params)


def test_params_that_do_not_match_the_config_are_not_saved(tmp_path, params):
    wider = CFG.model_copy(update=dict(d_model=64, norm_groups=(64,)))
    with pytest.raises(CheckpointError, match="params to save does not match its config"):
        save_model(tmp_path / "m", wider, params)
    assert not (tmp_path / "m").exists()


def test_config_shape_mismatch_is_refused_with_the_parameter_named(tmp_path, params):
    # Write a checkpoint whose config lies about d_ff, the way a hand-edited or partially
    # copied checkpoint would: Orbax alone would restore it without complaint.
    path = tmp_path / "bad"
    lie = CFG.model_copy(update=dict(d_ff=CFG.d_ff * 2)).model_dump(mode="json")
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
        path, ocp.args.Composite(config=ocp.args.JsonSave(lie), params=ocp.args.PyTreeSave(params)))
    with pytest.raises(CheckpointError, match=r"mlp/wi_0/kernel has shape \(32, 64\), config says \(32, 128\)"):
        load_model(path)


def test_missing_parameter_is_named(tmp_path, params):
    path = tmp_path / "partial"
    partial = {k: v for k, v in params.items() if k != "token_embedder"}
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
        path, ocp.args.Composite(config=ocp.args.JsonSave(CFG.model_dump(mode="json")),
                                 params=ocp.args.PyTreeSave(partial)))
    with pytest.raises(CheckpointError, match="token_embedder/embedding missing"):
        load_model(path)


def test_invalid_config_json_is_one_clear_error(tmp_path, params):
    path = tmp_path / "m"
    save_model(path, CFG, params)
    meta = path / "config" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "d_model": -1}))
    with pytest.raises(CheckpointError, match="d_model"):
        read_config(path)


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model checkpoint"):
        load_model(tmp_path / "empty")


def test_workdir_loads_its_latest_complete_step(tmp_path, params):
    ckpts = tmp_path / "work" / "checkpoints"
    save_model(ckpts / "10", CFG, params)
    bumped = jax.tree.map(lambda x: x + 1, params)
    save_model(ckpts / "20", CFG, bumped)
    (ckpts / "30").mkdir()  # an interrupted step without items is skipped
    _, loaded = load_model(tmp_path / "work")
    assert np.array_equal(loaded["token_embedder"]["embedding"],
                          bumped["token_embedder"]["embedding"])
