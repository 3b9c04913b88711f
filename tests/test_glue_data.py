"""GLUE as seqio Tasks over the real GLUE files with the T5 vocabulary, and their proportional
mixture."""

import collections

import pytest
import seqio

from deepfusion_core.glue import GlueError, read_examples, to_text
from deepfusion_core.glue_data import register_glue_mixture, register_glue_task

LENGTHS = {"inputs": 128, "targets": 8}


@pytest.fixture(scope="module")
def paths(shared_data):
    return shared_data / "glue", f"t5:{shared_data / 't5' / 'sentencepiece.model'}"


def test_a_task_yields_t5s_text_tokenized_with_eos_and_keeps_the_text(paths):
    glue, vocab = paths
    task = seqio.get_mixture_or_task(register_glue_task(glue, "mrpc", vocab))
    examples = list(task.get_dataset(LENGTHS, split="validation", shuffle=False).take(3))
    vocabulary = task.output_features["inputs"].vocabulary
    for example, row in zip(examples, read_examples(glue, "mrpc", "validation")):
        inputs, targets = to_text("mrpc", row)
        assert example["inputs_pretokenized"].numpy().decode() == inputs
        assert example["targets_pretokenized"].numpy().decode() == targets
        assert example["idx"].numpy() == row["idx"]
        tokens = example["targets"].numpy().tolist()
        assert tokens[-1] == vocabulary.eos_id and vocabulary.decode(tokens[:-1]) == targets
        assert len(example["inputs"]) <= LENGTHS["inputs"]
        assert vocabulary.decode(example["inputs"].numpy().tolist()).startswith("mrpc sentence1:")
    assert task.num_input_examples("validation") == 408


def test_the_mixture_samples_tasks_in_proportion_to_their_training_examples(paths):
    glue, vocab = paths
    mixture = seqio.get_mixture_or_task(register_glue_mixture(glue, ["cola", "rte"], vocab))
    ds = mixture.get_dataset(LENGTHS, split="train", shuffle=True, seed=3, num_epochs=None,
                             copy_pretokenized=True)
    words = collections.Counter(
        e["inputs_pretokenized"].numpy().split(b" ", 1)[0] for e in ds.take(2000))
    share = words[b"rte"] / 2000
    assert share == pytest.approx(2490 / (2490 + 8551), abs=0.03), words  # 0.226


def test_an_unknown_task_is_one_line(paths):
    glue, vocab = paths
    with pytest.raises(GlueError, match="GLUE task 'mnlii' does not exist"):
        register_glue_task(glue, "mnlii", vocab)
