"""The data layer: T5 span corruption on real C4, deterministic resumable order, clear errors."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest

from deepfusion_core import batch_cache, data, eval_check, span_corruption
from deepfusion_core.config import EXTRA_IDS, DataConfig, DataError, span_corruption_lengths
from deepfusion_core.sources import check_source
from deepfusion_core.vocab import check_model_vocab, vocab_size, vocab_size_for_model

tf = data.tf  # imported quietly by deepfusion_core.data

REPO = Path(__file__).resolve().parents[1]
TINY = DataConfig(batch_size=4)  # builtin text, byte vocabulary: no setup, seconds


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def batches_differ(a, b):
    return any(not np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.fixture(scope="module")
def c4_512(shared_data):
    """C4 and the T5 vocabulary at the lengths of the T5 paper (512 inputs, 114 targets)."""
    return DataConfig(source=f"c4:{shared_data / 'c4' / 'en'}",
                      vocab=f"t5:{shared_data / 't5' / 'sentencepiece.model'}",
                      inputs_length=512, targets_length=114, batch_size=4)


def reconstruct(inputs, targets, first_sentinel):
    """The original tokens: each sentinel in `inputs` replaced by its span from `targets`."""
    spans, current = {}, None
    for t in targets:
        if t >= first_sentinel:
            current = spans.setdefault(int(t), [])
        else:
            current.append(int(t))
    out = []
    for t in inputs:
        out.extend(spans[int(t)] if t >= first_sentinel else [int(t)])
    return out


def test_span_corruption_on_c4_has_t5_statistics_and_loses_nothing(c4_512):
    vocab = data.get_vocabulary(c4_512.vocab)
    assert vocab.vocab_size == 32100
    first_sentinel = vocab.vocab_size - EXTRA_IDS
    examples = data.span_corruption_examples(c4_512, "train", 1000)
    assert len(examples) == 1000
    original_tokens = noise_tokens = noise_spans = full = 0
    for ex in examples:
        inputs, targets, original = ex["inputs"], ex["targets"], ex["original"]
        assert inputs[-1] == targets[-1] == vocab.eos_id  # EOS on both, once
        inputs, targets = inputs[:-1], targets[:-1]
        assert (original < first_sentinel).all() and (original != vocab.eos_id).all()
        sentinels_in = inputs[inputs >= first_sentinel]
        sentinels_out = targets[targets >= first_sentinel]
        # sentinels descend from the last id, in the same order in inputs and targets
        descending = vocab.vocab_size - 1 - np.arange(len(sentinels_in))
        np.testing.assert_array_equal(sentinels_in, descending)
        np.testing.assert_array_equal(sentinels_out, sentinels_in)
        assert targets[0] == vocab.vocab_size - 1  # == <extra_id_0>
        assert reconstruct(inputs, targets, first_sentinel) == original.tolist()
        assert len(inputs) + 1 <= 512 and len(targets) + 1 <= 114
        if len(original) == 568:  # a full segment fills the lengths exactly, as in T5
            full += 1
            assert (len(inputs) + 1, len(targets) + 1) == (512, 114)
        original_tokens += len(original)
        noise_tokens += len(targets) - len(sentinels_out)
        noise_spans += len(sentinels_in)
    density, mean_span = noise_tokens / original_tokens, noise_tokens / noise_spans
    print(f"noise density {density:.4f}, mean noise span length {mean_span:.3f}, "
          f"{full}/1000 full segments")
    assert abs(density - 0.15) <= 0.01
    assert abs(mean_span - 3.0) <= 0.3
    assert full >= 990
    assert vocab.decode([vocab.vocab_size - 1]) == "<extra_id_0>"


def test_noise_mask_is_t5s():
    seeds = [(1, 2), (3, 4)]
    for length in [1, 2, 5, 141, 568]:
        mask = span_corruption.random_spans_noise_mask(length, 0.15, seeds, 3.0).numpy()
        assert mask.shape == (length,) and not mask[0]  # the first token is never noise
        if length >= 2:
            assert mask.sum() == max(1, min(round(length * 0.15), length - 1))
            starts = mask & ~np.concatenate([[False], mask[:-1]])
            assert starts.sum() == max(1, round(mask.sum() / 3))
        np.testing.assert_array_equal(
            mask, span_corruption.random_spans_noise_mask(length, 0.15, seeds, 3.0))
    assert span_corruption_lengths(512) == (568, 114)


def test_c4_json_lines_decode_like_python(shared_data):
    path = shared_data / "c4" / "en" / "c4-validation.00000-of-00001.json.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().splitlines()
    tricky = 'a\\nb "q" \n\t/ \u00e9 \U0001F600 \\u0041 \x01 \\\\" \\'
    lines += [json.dumps({"url": "u", "text": tricky}),
              json.dumps({"text": tricky}, ensure_ascii=False)]
    got = tf.data.Dataset.from_tensor_slices(lines).map(data.json_text).as_numpy_iterator()
    assert [g.decode() for g in got] == [json.loads(line)["text"] for line in lines]


def test_builtin_byte_batches_have_the_model_shapes():
    cfg = DataConfig(batch_size=3)
    vocab = data.get_vocabulary(cfg.vocab)
    assert vocab.vocab_size == 359
    batch = next(data.train_batches(cfg))
    assert set(batch) == {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                          "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids",
                          "encoder_positions", "decoder_positions"}
    for k, v in batch.items():
        length = 128 if k.startswith("encoder") else 32
        assert v.shape == (3, length) and v.dtype == np.int32, k
    assert batch["encoder_input_tokens"].max() < vocab.vocab_size
    np.testing.assert_array_equal(batch["decoder_loss_weights"],
                                  batch["decoder_target_tokens"] > 0)
    unpacked = next(data.train_batches(cfg.model_copy(update={"pack": False})))
    assert "encoder_segment_ids" not in unpacked
    assert unpacked["encoder_input_tokens"].shape == (3, 128)


def test_same_seed_same_batches_other_seed_other_batches_and_resume():
    first = take(data.train_batches(TINY), 8)
    assert_same_batches(first, take(data.train_batches(TINY), 8))
    assert batches_differ(first, take(data.train_batches(TINY.model_copy(update={"seed": 1})), 8))
    assert_same_batches(first[5:8], take(data.train_batches(TINY, start=5), 3))


def test_resume_across_an_epoch_boundary():
    cfg = DataConfig(batch_size=64)  # the builtin train split is 48 such batches
    first = take(data.train_batches(cfg), 56)
    assert_same_batches(first[44:56], take(data.train_batches(cfg, start=44), 12))


def test_resume_on_c4_yields_the_uninterrupted_stream(c4_512):
    first = take(data.train_batches(c4_512), 6)
    assert_same_batches(first[4:6], take(data.train_batches(c4_512, start=4), 2))


def test_batches_made_without_autograph_are_autographs(c4_512):
    # The task's preprocessors trace with AutoGraph off (start-up time); with it on, as seqio
    # runs them by default, C4's JSON decoding, tokenizing and span corruption give the same.
    task = data.seqio.get_mixture_or_task(data.register_task(c4_512))
    converted = task.get_dataset(c4_512.lengths, split="train", shuffle=True, seed=c4_512.seed,
                                 num_epochs=None)
    converted = data.seqio.EncDecFeatureConverter(pack=True)(converted, c4_512.lengths)
    converted = converted.batch(c4_512.batch_size, drop_remainder=True)
    assert_same_batches(take(data.train_batches(c4_512), 4),
                        take(converted.as_numpy_iterator(), 4))


def test_eval_batches_are_fixed_and_independent_of_the_training_seed():
    a = eval_check.eval_batches(TINY, 3)
    assert_same_batches(a, eval_check.eval_batches(TINY, 3))
    assert_same_batches(a, eval_check.eval_batches(TINY.model_copy(update={"seed": 7}), 3))
    assert batches_differ(a, take(data.train_batches(TINY), 3))
    with pytest.raises(DataError, match="validation split .* has only"):
        eval_check.eval_batches(TINY, 10_000)


def write_shard(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


@pytest.mark.parametrize("case, message", [
    ("missing", "C4 directory .*nowhere does not exist"),
    ("no shards", "no c4-train.*.json.gz shards in .*c4"),
    ("empty gzip", "c4-train.00000-of-00001.json.gz is empty"),
    ("zero bytes", "c4-train.00000-of-00001.json.gz is empty"),
    ("not json", "c4-train.00000-of-00001.json.gz is not gzip JSON lines"),
    ("no text", "c4-train.00000-of-00001.json.gz: its first document has no 'text'"),
    ("no validation", "no c4-validation.*.json.gz shards in .*c4"),
])
def test_bad_c4_directories_are_named(tmp_path, case, message):
    c4 = tmp_path / "c4"
    if case != "missing":
        c4.mkdir()
    train = c4 / "c4-train.00000-of-00001.json.gz"
    valid = c4 / "c4-validation.00000-of-00001.json.gz"
    good = [json.dumps({"text": "Some text.", "timestamp": "t", "url": "u"})]
    if case not in ("missing", "no shards"):
        write_shard(train, {"empty gzip": [], "not json": ["hello"],
                            "no text": [json.dumps({"url": "u"})]}.get(case, good))
        if case != "no validation":
            write_shard(valid, good)
    if case == "zero bytes":
        train.write_bytes(b"")
    source = f"c4:{tmp_path / 'nowhere'}" if case == "missing" else f"c4:{c4}"
    with pytest.raises(DataError, match=message) as e:
        check_source(source)  # as a plan checks, without TensorFlow
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=message):
        data.register_task(DataConfig(source=source))  # as a node checks, before reading


@pytest.mark.parametrize("check", [check_source,  # os.path
                                   lambda spec: data.register_task(DataConfig(source=spec))])
def test_tfds_without_its_data_dir_says_so(tmp_path, check):
    with pytest.raises(DataError, match="TFDS data_dir .*absent does not exist"):
        check(f"tfds:{tmp_path / 'absent'}")
    with pytest.raises(DataError, match=r"does not hold c4/en:3.1.0 \(no .*/c4/en/3.1.0/dataset_"):
        check(f"tfds:{tmp_path}")


def test_bad_vocabularies_and_configs_are_named(tmp_path):
    not_a_model = tmp_path / "text.model"
    not_a_model.write_text("hello\n")
    for spec, message in [("gpt2", "vocab must be 'byte' or 't5:PATH', not 'gpt2'"),
                          (f"t5:{tmp_path / 'missing.model'}",
                           "SentencePiece model .*missing.model does not exist"),
                          (f"t5:{not_a_model}", "text.model is not a SentencePiece model \\(")]:
        with pytest.raises(DataError, match=message) as e:
            vocab_size(spec)  # as a plan sizes the model, without seqio
        assert "\n" not in str(e.value)
        with pytest.raises(DataError, match=message):
            data.get_vocabulary(spec)
    for kwargs, field in [({"vocab": "gpt2"}, "vocab"), ({"source": "c4:"}, "source"),
                          ({"source": "hf:c4"}, "source"),
                          ({"targets_length": 28}, "targets_length"),
                          ({"batch_size": 0}, "batch_size"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(pydantic.ValidationError, match=field):
            DataConfig(**kwargs)
    assert DataConfig(targets_length=29).targets_length == 29  # exactly what 128 inputs need


def test_vocab_sizes_read_without_seqio_are_seqios(shared_data):
    t5 = f"t5:{shared_data / 't5' / 'sentencepiece.model'}"
    for spec in ("byte", t5):
        assert vocab_size(spec) == data.get_vocabulary(spec).vocab_size
    assert (vocab_size_for_model("byte"), vocab_size_for_model(t5)) == (384, 32128)


def test_model_vocab_must_hold_the_vocabulary():
    check_model_vocab("byte", 384)
    check_model_vocab("byte", 32128)
    with pytest.raises(DataError, match="359 ids but the model's vocab_size is 256 \\(use 384\\)"):
        check_model_vocab("byte", 256)


def test_register_task_is_idempotent_and_keyed_by_source_and_vocab():
    name = data.register_task(TINY)
    assert data.register_task(DataConfig(seed=3, inputs_length=64, targets_length=16)) == name
    assert name in data.seqio.TaskRegistry.names()


def test_planning_again_starts_neither_tensorflow_nor_seqio(shared_data, tmp_path, monkeypatch):
    """A plan sizes vocabularies, checks sources and reads the cached validation counts
    without TensorFlow; `status` reads metrics without clu (which imports TensorFlow)."""
    from pipeline.plan import build_plan

    monkeypatch.setenv("DEEPFUSION_CACHE_DIR", str(tmp_path / "cache"))
    batch_cache._validation.cache_clear()  # batches this process holds are kept there again
    plans = [(str(REPO / "stages.yaml"), None), (str(REPO / "stages.yaml"), "c4-tiny")]
    for stages, profile in plans:  # counts the validation batches: the cache is filled
        build_plan(stages, profile, tmp_path / "runs")
    code = ("import sys\n"
            "from deepfusion_core.metrics import read_metrics\n"
            "from pipeline.plan import build_plan\n"
            f"for stages, profile in {plans!r}:\n"
            f"    build_plan(stages, profile, {str(tmp_path / 'runs')!r})\n"
            "print(sorted(m for m in ('tensorflow', 'seqio', 'clu') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"
