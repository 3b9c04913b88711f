"""GLUE tasks as seqio Tasks, and their mixture for fine-tuning.

Each task yields T5's text-to-text examples (`glue.to_text`) from the GLUE files, tokenized,
with EOS after trimming to the lengths, and keeps the texts (`inputs_pretokenized`,
`targets_pretokenized`) and `idx` for evaluation by decoding. The mixture samples each task in
proportion to its training examples, as T5's `glue_v002_proportional` does.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import seqio
import tensorflow as tf

from deepfusion_core.data import get_vocabulary
from deepfusion_core.glue import read_examples, split_files, task, to_text

# A mixture needs each task's training examples; QNLI's dev set alone, for instance, can only
# be evaluated.
SPLITS = ("train", "validation")


def _texts(glue_dir: str, name: str, split: str) -> dict[str, list]:
    """The split's examples as columns: inputs, targets and idx. Read here, not in the
    input pipeline: Python inside tf.data can deadlock the interpreter's exit."""
    examples = read_examples(glue_dir, name, split)
    pairs = [to_text(name, e) for e in examples]
    return {"inputs": [i for i, _ in pairs], "targets": [t for _, t in pairs],
            "idx": [e["idx"] for e in examples]}


class _GlueSource(seqio.DataSource):
    """One GLUE task's splits, in file order (shuffled by seed when asked)."""

    def __init__(self, glue_dir: str, name: str):
        self._glue_dir, self._name = glue_dir, name
        splits = [s for s in SPLITS if split_files(glue_dir, name, s)]
        super().__init__(splits=splits, num_input_examples=None)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> list[str]:
        return [f"{self._name}-{split}"]

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **_):
        texts = _texts(self._glue_dir, self._name, split)
        ds = tf.data.Dataset.from_tensor_slices(texts)
        return ds.shuffle(len(texts["idx"]), seed=seed) if shuffle else ds

    def num_input_examples(self, split: str) -> int:
        return len(read_examples(self._glue_dir, self._name, split))


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def register_glue_task(glue_dir: str | Path, name: str, vocab: str) -> str:
    """Register (once) the seqio Task of GLUE task `name` from `glue_dir`; return its name."""
    glue_dir = str(Path(glue_dir).expanduser().absolute())
    task(name)  # an unknown task is one line here, not a seqio error later
    registered = f"deepfusion_glue_{name}_{_key(glue_dir, vocab)}"
    if registered not in seqio.TaskRegistry.names():
        vocabulary = get_vocabulary(vocab)
        seqio.TaskRegistry.add(
            registered, source=_GlueSource(glue_dir, name), metric_fns=[],
            output_features={"inputs": seqio.Feature(vocabulary, add_eos=True),
                             "targets": seqio.Feature(vocabulary, add_eos=True)},
            preprocessors=[
                functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True),
                seqio.preprocessors.append_eos_after_trim,
            ])
    return registered


def _training_examples(t: seqio.Task) -> int:
    """A task's mixing rate: its training examples (as seqio's `mixing_rate_num_examples`
    falls back to, without its warning that the task is not cached)."""
    return t.source.num_input_examples("train")


def register_glue_mixture(glue_dir: str | Path, names: list[str], vocab: str) -> str:
    """Register (once) the mixture of GLUE tasks `names`, each sampled in proportion to its
    training examples; return its name."""
    tasks = [register_glue_task(glue_dir, n, vocab) for n in names]
    registered = f"deepfusion_glue_mixture_{_key(*tasks)}"
    if registered not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(registered, tasks, default_rate=_training_examples)
    return registered
