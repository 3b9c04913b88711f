"""Greedy decoding, and GLUE scores by decoding every validation example of the real files."""

import jax
import numpy as np
import pytest
import seqio

from deepfusion_core.config import PRESETS
from deepfusion_core.decode import EOS_ID, answer_ids, greedy_decode
from deepfusion_core.glue import read_examples
from deepfusion_core.glue_data import register_glue_task
from deepfusion_core.glue_eval import evaluate_glue, model_answer
from deepfusion_core.model import T5, init_params

LENGTHS = {"inputs": 128, "targets": 8}


@pytest.fixture(scope="module")
def paths(shared_data):
    return shared_data / "glue", f"t5:{shared_data / 't5' / 'sentencepiece.model'}"


def test_greedy_decoding_is_the_argmax_of_the_model_fed_its_own_answer():
    cfg = PRESETS["tiny-S"].model_copy(update={"vocab_size": 512})  # a small vocab: fast
    params = init_params(cfg, seed=3)
    inputs = np.random.default_rng(0).integers(2, 300, size=(4, 12)).astype(np.int32)
    decoded = greedy_decode(cfg, params, inputs, max_length=6)
    assert decoded.shape == (4, 6)
    fed = np.concatenate([np.zeros((4, 1), np.int32), decoded[:, :-1]], axis=1)
    logits = T5(cfg).apply({"params": params}, inputs, fed)
    again = np.asarray(jax.numpy.argmax(logits, -1))
    for row, want in zip(decoded, again):
        ids = row.tolist()
        end = ids.index(EOS_ID) + 1 if EOS_ID in ids else len(ids)
        assert ids[:end] == want[:end].tolist()  # each token is the argmax given the ones before
        assert not any(ids[end:])  # nothing after EOS
    assert answer_ids(np.array([5, 7, EOS_ID, 0])) == [5, 7]


def test_right_answers_score_100_and_a_constant_answer_scores_the_label_share(paths):
    glue, vocab = paths
    # An oracle that answers each input with its target's tokens (found by the input's tokens).
    truth = {}
    for name in ("rte", "mrpc", "stsb"):
        task = register_glue_task(glue, name, vocab)
        for e in seqio.get_mixture_or_task(task).get_dataset(
                LENGTHS, split="validation", shuffle=False).as_numpy_iterator():
            truth[tuple(e["inputs"])] = e["targets"]

    def oracle(tokens):
        out = np.zeros((len(tokens), LENGTHS["targets"]), np.int32)
        for i, row in enumerate(tokens):
            key = tuple(int(t) for t in row if t)
            if key in truth:
                out[i, :len(truth[key])] = truth[key]
        return out

    scores = evaluate_glue(oracle, glue, ["rte", "mrpc", "stsb"], vocab, LENGTHS, batch_size=32)
    assert scores == {"rte": {"accuracy": 100.0}, "mrpc": {"f1": 100.0, "accuracy": 100.0},
                      "stsb": {"pearson": pytest.approx(100.0), "spearman": pytest.approx(100.0)}}
    # Always "entailment": the share of entailment labels (class 0) in RTE's dev set.
    task = seqio.get_mixture_or_task(register_glue_task(glue, "rte", vocab))
    ids = task.output_features["targets"].vocabulary.encode("entailment") + [EOS_ID]
    always = np.array(ids + [0] * (LENGTHS["targets"] - len(ids)), np.int32)
    constant = evaluate_glue(lambda t: np.tile(always, (len(t), 1)), glue, ["rte"], vocab,
                             LENGTHS, batch_size=32)
    labels = [e["label"] for e in read_examples(glue, "rte", "validation")]
    assert constant["rte"]["accuracy"] == pytest.approx(100 * labels.count(0) / len(labels))


def test_a_model_answers_every_example(paths):
    glue, vocab = paths
    cfg = PRESETS["tiny-S"]
    scores = evaluate_glue(model_answer(cfg, init_params(cfg, seed=0), LENGTHS["targets"]),
                           glue, ["rte"], vocab, LENGTHS, batch_size=64)
    assert 0.0 <= scores["rte"]["accuracy"] <= 100.0  # an untrained model's answers, scored
