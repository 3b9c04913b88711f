"""Vocabulary specs ('byte' | 't5:PATH') and the sizes they give, without TensorFlow or seqio.

A plan needs only a vocabulary's size, to size the models' embeddings, so it is computed here
as seqio computes it: ``byte`` is seqio's ByteVocabulary (PAD, EOS, UNK and the 256 bytes);
``t5:PATH`` is the SentencePiece model's pieces, read with the `sentencepiece` package. Both add
`EXTRA_IDS` sentinels. `deepfusion_core.data` builds the seqio vocabularies that tokenize.
"""

from __future__ import annotations

import functools
from pathlib import Path

from deepfusion_core.config import EXTRA_IDS, DataError, vocab_parts

BYTE_VOCAB_SIZE = 3 + 256 + EXTRA_IDS  # seqio.ByteVocabulary(extra_ids=EXTRA_IDS).vocab_size


def sentencepiece_path(spec: str) -> Path:
    """The absolute path of a 't5:PATH' spec's SentencePiece model."""
    return Path(vocab_parts(spec)[1]).expanduser().absolute()


@functools.lru_cache(maxsize=None)
def vocab_size(spec: str) -> int:
    """The number of ids of vocabulary `spec`, sentinels included (seqio's `vocab_size`).

    `DataError` for a bad spec, or a SentencePiece model that is missing or is not one.
    """
    if vocab_parts(spec)[0] == "byte":
        return BYTE_VOCAB_SIZE
    import sentencepiece  # only for a SentencePiece vocabulary

    path = sentencepiece_path(spec)
    if not path.is_file():
        raise DataError(f"vocab {spec!r}: SentencePiece model {path} does not exist")
    try:
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except Exception as e:  # sentencepiece's OSError or RuntimeError, by version
        raise DataError(f"vocab {spec!r}: {path} is not a SentencePiece model "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return pieces + EXTRA_IDS


def vocab_size_for_model(spec: str) -> int:
    """The model vocab size `spec` needs, padded up to a multiple of 128 (32128 for T5's)."""
    return -(-vocab_size(spec) // 128) * 128


def check_model_vocab(spec: str, model_vocab_size: int) -> None:
    """Raise `DataError` if a model with `model_vocab_size` embeddings cannot take `spec`."""
    if model_vocab_size < vocab_size(spec):
        raise DataError(f"the vocabulary has {vocab_size(spec)} ids but the model's vocab_size "
                        f"is {model_vocab_size} (use {vocab_size_for_model(spec)})")
