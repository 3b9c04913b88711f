"""GLUE in T5's text-to-text form, from the real GLUE files in ../shared/data/glue, and its
metrics. The expected strings are written from T5's rules (`t5.data.preprocessors.glue` and
`stsb`): the task's name, then `feature: text` in sorted feature order, joined by single
spaces; the label's name, or STS-B's score rounded to 0.2 with one decimal."""

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as sk

from deepfusion_core.glue import GlueError, read_examples, to_text
from deepfusion_core.glue_metrics import glue_average, task_metrics


@pytest.fixture(scope="module")
def glue(shared_data):
    return shared_data / "glue"


@pytest.mark.parametrize("name,split,idx,inputs,targets", [
    # CoLA: no header; the first row is example 0.
    ("cola", "validation", 0, "cola sentence: The sailors rode the breeze clear of the rocks.",
     "acceptable"),
    # ... and its last row, which has no final newline.
    ("cola", "validation", 1042, "cola sentence: John talked to Bill about himself.",
     "acceptable"),
    # SST-2 keeps the sentence's trailing space.
    ("sst2", "validation", 0, "sst2 sentence: it 's a charming and often affecting journey . ",
     "positive"),
    # MRPC: a BOM before the header; a sentence that starts with a bare quote.
    ("mrpc", "validation", 0,
     "mrpc sentence1: He said the foodservice pie business doesn 't fit the company 's "
     "long-term growth strategy . sentence2: \" The foodservice pie business does not fit our "
     "long-term growth strategy .", "equivalent"),
    ("mrpc", "validation", 1,
     "mrpc sentence1: Magnarelli said Racicot hated the Iraqi regime and looked forward to "
     "using his long years of training in the war . sentence2: His wife said he was \" 100 "
     "percent behind George Bush \" and looked forward to using his years of training in the "
     "war .", "not_equivalent"),
    ("stsb", "validation", 0, "stsb sentence1: A man with a hard hat is dancing. "
     "sentence2: A man wearing a hard hat is dancing.", "5.0"),
    ("stsb", "validation", 1, "stsb sentence1: A young child is riding a horse. "
     "sentence2: A child is riding a horse.", "4.8"),  # 4.750
    ("stsb", "validation", 50, "stsb sentence1: Two little girls are talking on the phone. "
     "sentence2: A little girl is walking down the street.", "0.4"),  # 0.500: half to even
    ("rte", "validation", 0, "rte sentence1: Dana Reeve, the widow of the actor Christopher "
     "Reeve, has died of lung cancer at age 44, according to the Christopher Reeve Foundation. "
     "sentence2: Christopher Reeve had an accident.", "not_entailment"),
    ("wnli", "validation", 0, "wnli sentence1: The drain is clogged with hair. It has to be "
     "cleaned. sentence2: The hair has to be cleaned.", "not_entailment"),  # label 0
    ("qnli", "validation", 0, "qnli question: What came into force after the new constitution "
     "was herald? sentence: As of that day, the new constitution heralding the Second Republic "
     "came into force.", "entailment"),
])
def test_real_rows_become_t5s_text_to_text_examples(glue, name, split, idx, inputs, targets):
    example = read_examples(glue, name, split)[idx]
    assert example["idx"] == idx
    assert to_text(name, example) == (inputs, targets)


@pytest.mark.parametrize("name,rows", [("cola", 1043), ("sst2", 872), ("mrpc", 408),
                                       ("stsb", 1500), ("rte", 277), ("wnli", 71),
                                       ("qnli", 5463)])
def test_every_dev_row_is_read(glue, name, rows):
    examples = read_examples(glue, name, "validation")
    assert len(examples) == rows  # the official counts: no header row read, none dropped
    assert all(to_text(name, e)[0].startswith(f"{name} ") for e in examples)


def test_bad_glue_input_is_one_line_naming_it(glue, tmp_path):
    with pytest.raises(GlueError, match=r"/nowhere/CoLA/dev.tsv: no such GLUE file"):
        read_examples(tmp_path / "nowhere", "cola", "validation")
    with pytest.raises(GlueError, match=r"GLUE task 'colaa' does not exist \(tasks: cola, "):
        read_examples(glue, "colaa", "validation")
    bad = tmp_path / "RTE"
    bad.mkdir()
    (bad / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n"
                                 "0\ta\tb\tentailment\n1\tonly two\n")
    with pytest.raises(GlueError, match=r"RTE/dev.tsv:3: 2 columns, rte needs 4"):
        read_examples(tmp_path, "rte", "validation")
    (bad / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(GlueError, match=r"RTE/dev.tsv:2: label 'maybe' is not one of rte's"):
        read_examples(tmp_path, "rte", "validation")


def test_class_metrics_equal_scikit_learns_with_invalid_answers_wrong():
    targets = ["equivalent", "equivalent", "not_equivalent", "not_equivalent", "equivalent"]
    predictions = ["equivalent", "not_equivalent", "not_equivalent", "banana", "banana"]
    got = task_metrics("mrpc", targets, predictions)
    # An answer that names no class is the wrong class: the last two become 1 and 0.
    want_ids, as_f1 = [1, 1, 0, 0, 1], [1, 0, 0, 1, 0]
    assert got["f1"] == pytest.approx(100 * sk.f1_score(want_ids, as_f1))
    assert got["f1"] == pytest.approx(40.0)  # precision 1/2, recall 1/3: 2PR / (P + R)
    assert got["accuracy"] == pytest.approx(40.0)  # two of five right
    cola = task_metrics("cola", ["acceptable", "unacceptable", "acceptable", "unacceptable"],
                        ["acceptable", "unacceptable", "unacceptable", "unacceptable"])
    assert cola["matthews_corrcoef"] == pytest.approx(
        100 * sk.matthews_corrcoef([1, 0, 1, 0], [1, 0, 0, 0]))
    assert cola["matthews_corrcoef"] == pytest.approx(100 / np.sqrt(3))


def test_stsb_metrics_equal_scipys_and_a_non_number_counts_as_minus_one():
    targets = ["5.0", "4.8", "0.4", "2.2", "3.0"]
    predictions = ["4.6", "4.8", "1.0", "nonsense", "2.6"]
    got = task_metrics("stsb", targets, predictions)
    want, pred = [5.0, 4.8, 0.4, 2.2, 3.0], [4.6, 4.8, 1.0, -1.0, 2.6]
    assert got["pearson"] == pytest.approx(100 * scipy.stats.pearsonr(want, pred)[0])
    assert got["spearman"] == pytest.approx(100 * scipy.stats.spearmanr(want, pred)[0])


def test_a_constant_stsb_answer_scores_zero_not_nan():
    # scipy leaves the correlation of a constant undefined (NaN, with a warning); a NaN
    # would make the GLUE average NaN for every untrained model.
    targets = ["5.0", "4.8", "0.4"]
    assert task_metrics("stsb", targets, ["2.0", "2.0", "2.0"]) == {"pearson": 0.0,
                                                                    "spearman": 0.0}
    assert task_metrics("stsb", targets, ["x", "y", "z"]) == {"pearson": 0.0, "spearman": 0.0}


def test_the_glue_average_averages_each_tasks_metrics_first():
    per_task = {"mrpc": {"f1": 80.0, "accuracy": 70.0}, "cola": {"matthews_corrcoef": 30.0},
                "stsb": {"pearson": 90.0, "spearman": 88.0}}
    # (75 + 30 + 89) / 3, not the mean of the five numbers (71.6).
    assert glue_average(per_task, ["mrpc", "cola", "stsb"]) == pytest.approx(194 / 3)
    # Only the tasks named (those fine-tuned on): a task only scored zero-shot is left out.
    assert glue_average({**per_task, "qnli": {"accuracy": 0.0}},
                        ["mrpc", "cola", "stsb"]) == pytest.approx(194 / 3)
    with pytest.raises(ValueError, match="no scores for rte"):
        glue_average(per_task, ["cola", "rte"])


@pytest.fixture(scope="module")
def tfds_glue(glue, tmp_path_factory):
    """A TFDS data_dir with glue/cola, glue/stsb and glue/rte prepared by TFDS's own GLUE
    builder from the real files (GLUE's zips are not here: its download step is pointed at a
    copy of them, with a test split GLUE's builder insists on)."""
    from unittest import mock

    import tensorflow_datasets as tfds

    tsv = tmp_path_factory.mktemp("glue_tsv")
    for directory in ("CoLA", "STS-B", "RTE"):
        (tsv / directory).mkdir()
        for split in ("train", "dev"):
            (tsv / directory / f"{split}.tsv").write_bytes(
                (glue / directory / f"{split}.tsv").read_bytes())
        (tsv / directory / "test.tsv").write_text("index\tsentence1\tsentence2\tsentence\n"
                                                  "0\ta\tb\tc\n")
    data_dir = tmp_path_factory.mktemp("tensorflow_datasets")
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                           lambda self, url: str(tsv)):
        for name in ("cola", "stsb", "rte"):
            tfds.builder(f"glue/{name}", data_dir=str(data_dir)).download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


@pytest.mark.parametrize("name", ["cola", "stsb", "rte"])
def test_a_tfds_data_dir_gives_the_examples_the_tsv_files_give(glue, tfds_glue, name):
    for split in ("train", "validation"):
        from_tsv, from_tfds = read_examples(glue, name, split), read_examples(tfds_glue, name, split)
        assert from_tfds == from_tsv, (name, split)  # every feature, label and idx, in order
        assert all(type(a["label"]) is type(b["label"]) for a, b in zip(from_tfds, from_tsv))


def test_a_tfds_data_dir_without_the_task_or_split_is_one_line(tfds_glue):
    with pytest.raises(GlueError, match=r"no such GLUE file \(expected the GLUE layout, or "
                                        r"TFDS's prepared glue/mnli with a train split"):
        read_examples(tfds_glue, "mnli", "train")
    with pytest.raises(GlueError, match=r"glue/rte with a validation_matched split"):
        read_examples(tfds_glue, "rte", "validation_matched")
