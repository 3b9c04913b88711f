"""Reading the training data with seqio and TensorFlow: T5 span corruption as registered seqio
Tasks, packed into numpy batches.

The only module that starts TensorFlow (quietly, see `_quiet_tensorflow_startup`); what a plan
needs without it lives beside: the config (`config`), vocabulary sizes (`vocab`), the
checks that the data is there (`sources`) and the batches kept on disk (`batch_cache`).
The builtin source's validation split is every tenth topic of `pydoc_data.topics` by name; a C4
line's "text" is decoded with TensorFlow ops. Preprocessing is `span_corruption.span_corruption`.
The order is a function of `DataConfig.seed` alone, so the number of batches consumed is all a
checkpoint needs to resume the stream (`train_batches(start=)`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from deepfusion_core import sources, vocab
from deepfusion_core.config import (EVAL_SEED, EXTRA_IDS, TFDS_C4, DataConfig, DataError,
                                    source_parts)


@contextlib.contextmanager
def _quiet_tensorflow_startup():
    """Mute stderr while TensorFlow loads, unless TF_CPP_MIN_LOG_LEVEL=0 asks for its logs.

    TensorFlow >= 2.20 logs from C++ before absl logging is set up, beyond TF_CPP_MIN_LOG_LEVEL.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _quiet_tensorflow_startup():
    import seqio
    import tensorflow as tf

    try:  # the input pipeline runs on the CPU; accelerators belong to JAX
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow's devices are already initialised: leave them be
        pass

from deepfusion_core.span_corruption import span_corruption  # noqa: E402 - after TF's quiet start

_THREADS = min(8, os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def get_vocabulary(spec: str) -> seqio.Vocabulary:
    """The seqio vocabulary for `spec` ('byte' or 't5:PATH'), with 100 sentinel extra ids;
    `DataError` as `vocab.vocab_size` raises it."""
    vocab.vocab_size(spec)  # checks the spec and the model file
    if spec == "byte":
        return seqio.ByteVocabulary(extra_ids=EXTRA_IDS)
    return seqio.SentencePieceVocabulary(str(vocab.sentencepiece_path(spec)), extra_ids=EXTRA_IDS)


# ---------------------------------------------------------------------------- sources

def _builtin_dataset(split: str, shuffle_files: bool, seed: int | None = None):
    from pydoc_data.topics import topics

    names = sorted(topics)
    texts = [topics[n] for i, n in enumerate(names) if (i % 10 == 0) == (split == "validation")]
    ds = tf.data.Dataset.from_tensor_slices({"text": texts})
    return ds.shuffle(len(texts), seed=seed) if shuffle_files else ds


class _BuiltinSource(seqio.FunctionDataSource):
    """seqio's FunctionDataSource without its warning about shuffling uncached data."""

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **_):
        return _builtin_dataset(split, shuffle, seed)


# A C4 line's "text" is decoded with TensorFlow ops: Python in the input pipeline
# (tf.py_function) can deadlock the interpreter's exit while batches are being prefetched.
_TEXT_FIELD = r'^\s*\{.*?"text"\s*:\s*"((?:[^"\\]|\\.)*)".*$'
_ESCAPES = ((r'\\n', "\n"), (r'\\t', "\t"), (r'\\r', "\r"), (r'\\"', '"'), (r'\\/', "/"),
            (r'\\b', "\b"), (r'\\f', "\f"))


def _decode_u_escapes(s):
    """Replace JSON's backslash-u escapes in the scalar `s` by UTF-8, joining surrogate pairs."""
    parts = tf.strings.split(s, "\\u")
    tails = tf.strings.substr(parts[1:], 4, -1)
    digits = tf.strings.unicode_decode(tf.strings.substr(parts[1:], 0, 4), "UTF-8")
    digits = digits.to_tensor(shape=[None, 4])
    nibbles = tf.where(digits <= 57, digits - 48, tf.bitwise.bitwise_or(digits, 32) - 87)
    cp = tf.reduce_sum(nibbles * tf.constant([4096, 256, 16, 1]), axis=1)
    high = (cp >= 0xD800) & (cp < 0xDC00) & tf.equal(tails, "")
    pair = high & tf.concat([(cp[1:] >= 0xDC00) & (cp[1:] < 0xE000), [False]], 0)
    cp = tf.where(pair, 0x10000 + (cp - 0xD800) * 1024 + tf.concat([cp[1:], [0]], 0) - 0xDC00, cp)
    chars = tf.strings.unicode_encode(cp[:, None], "UTF-8", errors="replace")
    chars = tf.where(tf.concat([[False], pair[:-1]], 0), "", chars)
    return _restore_backslashes(parts[0]) + tf.strings.reduce_join(
        chars + _restore_backslashes(tails))


def _restore_backslashes(s):
    return tf.strings.regex_replace(s, "\x01", r"\\")


def json_text(line):
    """The "text" string of a JSON line (lone surrogates become U+FFFD); fails if it has none."""
    check = tf.debugging.Assert(tf.strings.regex_full_match(line, _TEXT_FIELD),
                                ['C4 line without a JSON "text" string:',
                                 tf.strings.substr(line, 0, 200)])
    with tf.control_dependencies([check]):
        s = tf.strings.regex_replace(line, _TEXT_FIELD, r"\1")
    s = tf.strings.regex_replace(s, r"\\\\", "\x01")  # escaped backslashes, out of the way
    for pattern, char in _ESCAPES:
        s = tf.strings.regex_replace(s, pattern, char)
    return tf.cond(tf.strings.regex_full_match(s, r"(?s).*\\u.*"),
                   lambda: _decode_u_escapes(s), lambda: _restore_backslashes(s))


def _read_c4_file(filename):
    lines = tf.data.TextLineDataset(filename, compression_type="GZIP")
    lines = lines.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
    return lines.map(lambda line: {"text": json_text(line)})


def get_source(spec: str) -> seqio.DataSource:
    """The seqio DataSource for `spec`, after checking that its data is there (a TFDS
    data_dir through TensorFlow's file system, which reads buckets)."""
    kind, arg = source_parts(spec)
    if kind == "builtin":
        return _BuiltinSource(_builtin_dataset, splits=sources.SPLITS)
    if kind == "c4":
        return seqio.FileDataSource(_read_c4_file, sources.c4_patterns(arg))
    sources.check_tfds(arg, fs=tf.io.gfile)
    return seqio.TfdsDataSource(TFDS_C4, tfds_data_dir=arg)


# ---------------------------------------------------------------------------- tasks, batches

def _task(name: str, cfg: DataConfig, keep_original: bool = False) -> seqio.Task:
    vocabulary = get_vocabulary(cfg.vocab)
    return seqio.Task(
        name, source=get_source(cfg.source), metric_fns=[],
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
                         "targets": seqio.Feature(vocabulary, add_eos=True)},
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            seqio.CacheDatasetPlaceholder(),
            functools.partial(span_corruption, keep_original=keep_original),
            seqio.preprocessors.append_eos_after_trim,
        ])


def register_task(cfg: DataConfig) -> str:
    """Register (once) the span-corruption Task for cfg's source and vocab; return its name.

    The data is checked on every call, so a source that went missing is reported here.
    """
    def canonical(spec: str) -> str:
        kind, _, arg = spec.partition(":")
        return f"{kind}:{Path(arg).expanduser().absolute()}" if kind in ("c4", "t5") else spec

    key = f"{canonical(cfg.source)}|{canonical(cfg.vocab)}"
    name = "deepfusion_span_corruption_" + hashlib.sha256(key.encode()).hexdigest()[:12]
    task = _task(name, cfg)
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add_provider(name, task)
    return name


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = _THREADS
    return options


def _get_dataset(task: seqio.Task, cfg: DataConfig, **kwargs) -> tf.data.Dataset:
    """`task.get_dataset` with AutoGraph off while its preprocessors trace their map functions.

    Converting their source took about 3 s of every node process's start, for tf ops that need
    no conversion (the batches are identical: tests/test_data.py). Code that does need it
    fails loudly without it; seqio's packing does, so the feature converter keeps it.
    """
    return tf.autograph.experimental.do_not_convert(task.get_dataset)(cfg.lengths, **kwargs)


def _glue_examples(cfg: DataConfig, split: str, shuffle: bool, seed: int,
                   num_epochs: int | None) -> tf.data.Dataset:
    """GLUE fine-tuning examples: for training, the tasks' mixture (each in proportion to
    its training examples); for validation, every task's dev set, interleaved in an order
    fixed by `seed`, so that the first batches hold all the tasks."""
    from deepfusion_core.glue_data import register_glue_mixture, register_glue_task

    glue_dir = source_parts(cfg.source)[1]
    if split == "train":
        mixture = seqio.get_mixture_or_task(register_glue_mixture(glue_dir, cfg.tasks, cfg.vocab))
        return _get_dataset(mixture, cfg, split=split, shuffle=shuffle, seed=seed,
                            num_epochs=num_epochs)
    tasks = [seqio.get_mixture_or_task(register_glue_task(glue_dir, name, cfg.vocab))
             for name in cfg.tasks]
    dev = [_get_dataset(t, cfg, split=split, shuffle=shuffle, seed=seed, num_epochs=num_epochs)
           for t in tasks]
    features = ("inputs", "targets")  # the others (texts, idx) differ between the tasks
    dev = [ds.map(lambda ex: {k: ex[k] for k in features}) for ds in dev]
    return tf.data.Dataset.sample_from_datasets(dev, seed=seed, stop_on_empty_dataset=False)


def _batches(cfg: DataConfig, split: str, shuffle: bool, seed: int,
             num_epochs: int | None) -> tf.data.Dataset:
    if cfg.is_glue:
        ds = _glue_examples(cfg, split, shuffle, seed, num_epochs)
    else:
        task = seqio.get_mixture_or_task(register_task(cfg))
        ds = _get_dataset(task, cfg, split=split, shuffle=shuffle, seed=seed,
                          num_epochs=num_epochs)
    ds = seqio.EncDecFeatureConverter(pack=cfg.pack)(ds, cfg.lengths)
    return ds.batch(cfg.batch_size, drop_remainder=True).with_options(_options())


def train_batches(cfg: DataConfig, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches, shuffled and repeated in an order fixed by `cfg.seed`.

    `start` is the number of batches already consumed (the checkpointed data position): the
    iterator yields exactly what an uninterrupted one would from there on. Skipped batches are
    computed and dropped, so resuming costs about as much as producing them.
    Batches map EncDecFeatureConverter's keys (encoder_input_tokens, decoder_input_tokens,
    decoder_target_tokens, decoder_loss_weights, and with packing encoder_/decoder_segment_ids
    and encoder_/decoder_positions) to int32 [batch_size, inputs_ or targets_length] arrays.
    """
    if start < 0:
        raise DataError(f"start must be >= 0, not {start}")
    ds = _batches(cfg, "train", shuffle=True, seed=cfg.seed, num_epochs=None)
    return ds.skip(start).as_numpy_iterator()


def _validation(cfg: DataConfig) -> tf.data.Dataset:
    """The validation batches: unshuffled, span masks from a fixed seed (not `cfg.seed`)."""
    return _batches(cfg, "validation", shuffle=False, seed=EVAL_SEED, num_epochs=1)


def first_validation_batches(cfg: DataConfig, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of the validation split (fewer if it is smaller), made
    with seqio: unshuffled, span masks from a fixed seed (not `cfg.seed`). Evaluations read
    them through `batch_cache`, which keeps them on disk."""
    return list(_validation(cfg).take(num_batches).as_numpy_iterator())


def span_corruption_examples(cfg: DataConfig, split: str = "validation",
                             num_examples: int = 100) -> list[dict[str, np.ndarray]]:
    """Unpacked, unshuffled examples: 'inputs', 'targets' and the 'original' tokens.

    For inspecting and testing the preprocessing; span masks come from `cfg.seed`.
    """
    task = _task("deepfusion_span_corruption_inspect", cfg, keep_original=True)
    ds = _get_dataset(task, cfg, split=split, shuffle=False, seed=cfg.seed)
    return list(ds.take(num_examples).with_options(_options()).as_numpy_iterator())
