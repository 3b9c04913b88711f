"""GLUE as seqio Tasks over the real GLUE files with the T5 vocabulary, and their proportional
mixture."""

import collections

import numpy as np
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


def test_fine_tuning_batches_resume_exactly_and_validation_interleaves_the_tasks(paths):
    """A glue: DataConfig's batches, as the train loop reads them: batch k is the same whether
    the stream starts at 0 or at k (a resumed fine-tune node), and the first validation
    batches (the eval loss's) hold every task."""
    from deepfusion_core import batch_cache
    from deepfusion_core.config import DataConfig
    from deepfusion_core.data import get_vocabulary
    from deepfusion_core.eval_check import eval_batches

    glue, vocab = paths
    dc = DataConfig(source=f"glue:{glue}", vocab=vocab, tasks=("cola", "rte", "stsb"),
                    inputs_length=128, targets_length=8, batch_size=4, pack=False, seed=7)
    whole = list(batch_cache.train_batches(dc, 0, 6))
    resumed = list(batch_cache.train_batches(dc, 3, 6))
    for a, b in zip(whole[3:], resumed):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    vocabulary = get_vocabulary(vocab)
    words = {vocabulary.decode(row.tolist()).split()[0]
             for b in eval_batches(dc, 4) for row in b["encoder_input_tokens"]}
    assert words == {"cola", "rte", "stsb"}
    with pytest.raises(ValueError, match="a glue: source needs tasks"):
        DataConfig(source=f"glue:{glue}", vocab=vocab)
