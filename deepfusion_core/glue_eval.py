"""A model's GLUE scores: every validation example answered by greedy decoding and scored as
T5 scores it (`glue_metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import seqio

from deepfusion_core.config import T5Config
from deepfusion_core.decode import answer_ids, greedy_decode
from deepfusion_core.glue_data import register_glue_task
from deepfusion_core.glue_metrics import task_metrics
from deepfusion_core.model import Params

# Maps encoder tokens [batch, inputs_length] to decoded ids [batch, targets_length].
Answer = Callable[[np.ndarray], np.ndarray]


def model_answer(cfg: T5Config, params: Params, targets_length: int) -> Answer:
    """The model's greedy answers."""
    return lambda tokens: greedy_decode(cfg, params, tokens, targets_length)


def _batches(ds, inputs_length: int, batch_size: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(encoder tokens padded to a full batch, the real rows' target texts)."""
    rows = []
    for example in ds.as_numpy_iterator():
        rows.append(example)
        if len(rows) == batch_size:
            yield _stack(rows, inputs_length, batch_size)
            rows = []
    if rows:
        yield _stack(rows, inputs_length, batch_size)


def _stack(rows: list[dict], inputs_length: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
    tokens = np.zeros((batch_size, inputs_length), np.int32)  # one shape: one compile
    for i, row in enumerate(rows):
        tokens[i, :len(row["inputs"])] = row["inputs"]
    return tokens, [row["targets_pretokenized"].decode() for row in rows]


def evaluate_glue(answer: Answer, glue_dir: str | Path, tasks: list[str], vocab: str,
                  lengths: dict[str, int], batch_size: int,
                  max_examples: int | None = None) -> dict[str, dict[str, float]]:
    """Each task's metrics on its validation split (its first `max_examples`, or all),
    answered by `answer`."""
    scores = {}
    for name in tasks:
        task = seqio.get_mixture_or_task(register_glue_task(glue_dir, name, vocab))
        vocabulary = task.output_features["targets"].vocabulary
        ds = task.get_dataset(lengths, split="validation", shuffle=False)
        if max_examples is not None:
            ds = ds.take(max_examples)
        targets, predictions = [], []
        for tokens, texts in _batches(ds, lengths["inputs"], batch_size):
            decoded = answer(tokens)[:len(texts)]
            predictions += [vocabulary.decode(answer_ids(row)) for row in decoded]
            targets += texts
        scores[name] = task_metrics(name, targets, predictions)
    return scores

