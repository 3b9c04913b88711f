"""T5's `span_corruption` preprocessor in TensorFlow ops (t5.data.preprocessors is not installed).

Documents are tokenized, concatenated in groups of 128 and split into segments that fill
`inputs_length` once corrupted; 15% of each segment's tokens, in spans of mean length 3, move
to the targets. Span k becomes sentinel ``vocab_size - 1 - k`` (``<extra_id_k>``) in the
inputs, and the targets are the spans, each after its sentinel; both end with EOS (appended
after this preprocessor). Every random draw is stateless, from seqio's seeds.

TensorFlow is started (quietly) by `deepfusion_core.data`, which imports this module.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from deepfusion_core.config import (MEAN_NOISE_SPAN_LENGTH, NOISE_DENSITY, DataError,
                                    span_corruption_lengths)


def random_spans_noise_mask(length, noise_density, seeds, mean_noise_span_length=3.0):
    """T5's noise mask over `length` tokens, drawn statelessly from two `seeds`.

    round(length * noise_density) noise tokens in round(that / mean_noise_span_length) spans,
    alternating with as many non-noise spans, non-noise first; span lengths are random.
    """
    orig_length, length = length, tf.maximum(length, 2)
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.minimum(tf.maximum(num_noise, 1), length - 1)
    num_spans = tf.maximum(1, tf.cast(
        tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32))

    def segment_lengths(num_items, seed):  # num_items split at random into num_spans parts
        first = tf.cast(tf.range(num_items - 1) < num_spans - 1, tf.int32)
        first = tf.pad(seqio.utils.stateless_shuffle(first, seed), [[1, 0]])
        return tf.math.segment_sum(tf.ones_like(first), tf.cumsum(first))

    spans = tf.stack([segment_lengths(length - num_noise, seeds[1]),
                      segment_lengths(num_noise, seeds[0])], axis=1)
    starts = tf.cumsum(tf.reshape(spans, [-1]))[:-1]
    span_num = tf.cumsum(tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, length))
    return tf.equal(span_num % 2, 1)[:orig_length]


def _spans_to_sentinels(tokens, mask, vocab_size: int):
    """Replace each span of `mask` by one sentinel, descending from `vocab_size - 1`."""
    prev = tf.pad(mask[:-1], [[1, 0]])
    first = tf.logical_and(mask, tf.logical_not(prev))
    sentinels = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
    return tf.boolean_mask(tf.where(first, sentinels, tokens),
                           tf.logical_not(tf.logical_and(mask, prev)))


def span_corruption(dataset: tf.data.Dataset, sequence_length, output_features,
                    keep_original: bool = False) -> tf.data.Dataset:
    """T5's `span_corruption` preprocessor on tokenized 'targets' (EOS is appended after it).

    With `keep_original`, each example also carries its uncorrupted segment as 'original'.
    """
    max_tokens, needed = span_corruption_lengths(sequence_length["inputs"])
    if sequence_length["targets"] < needed:
        raise DataError(f"targets length {sequence_length['targets']} < {needed} needed")
    vocab_size = output_features["targets"].vocabulary.vocab_size

    @seqio.map_over_dataset(num_seeds=1)
    def random_chunk(x, seed):  # T5's select_random_chunk: at most 65536 tokens of a document
        tokens, chunk = x["targets"], 65536
        num_chunks = (tf.size(tokens) + chunk - 1) // chunk
        start = chunk * tf.random.stateless_uniform([], seed, maxval=num_chunks, dtype=tf.int32)
        return {"targets": tokens[start:start + chunk]}

    def concat(x):  # T5's reduce_concat_tokens; token ids are never 0, the padding
        tokens = tf.reshape(x["targets"], [-1])
        return {"targets": tf.boolean_mask(tokens, tokens > 0)}

    def split(x):  # T5's split_tokens: segments of max_tokens
        tokens = x["targets"]
        starts = tf.range(0, tf.size(tokens), max_tokens)
        return tf.data.Dataset.from_tensor_slices(
            {"targets": tf.RaggedTensor.from_row_starts(tokens, starts)})

    @seqio.map_over_dataset(num_seeds=2)
    def denoise(x, seeds):
        tokens = x["targets"]
        mask = random_spans_noise_mask(tf.size(tokens), NOISE_DENSITY, seeds,
                                       MEAN_NOISE_SPAN_LENGTH)
        out = {"inputs": _spans_to_sentinels(tokens, mask, vocab_size),
               "targets": _spans_to_sentinels(tokens, tf.logical_not(mask), vocab_size)}
        return {**out, "original": tokens} if keep_original else out

    ds = random_chunk(dataset.filter(lambda x: tf.size(x["targets"]) > 0))
    ds = ds.padded_batch(128, padded_shapes={"targets": [-1]}).map(concat).flat_map(split)
    return denoise(ds)
