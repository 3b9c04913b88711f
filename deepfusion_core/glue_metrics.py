"""GLUE scores of decoded text, as T5 computes them (`t5.evaluation.metrics` after its
postprocessors), with scikit-learn and scipy doing the arithmetic.

Targets and predictions are both text. A class task maps each text to its class id, a text
that names no class to -1 (always wrong); F1 counts such a prediction as the wrong class.
STS-B reads each text as a number, a text that is none as -1. Every metric is in [-100, 100]
(the correlations can be negative).
"""

from __future__ import annotations

import numpy as np
import scipy.stats
from sklearn import metrics as sk

from deepfusion_core.glue import GlueTask, task


def class_ids(spec: GlueTask, texts: list[str]) -> np.ndarray:
    """T5's `string_label_to_class_id`: the class id of each text, -1 where it names none."""
    names = {name: i for i, name in enumerate(spec.label_names)}
    return np.array([names.get(t, -1) for t in texts], dtype=np.int64)


def scores(texts: list[str]) -> np.ndarray:
    """T5's `string_to_float`: each text as a number, -1 where it is none."""
    def number(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return -1.0
    return np.array([number(t) for t in texts], dtype=np.float64)


def task_metrics(name: str, targets: list[str], predictions: list[str]) -> dict[str, float]:
    """The task's metrics (its `GlueTask.metrics`) of decoded `predictions` against `targets`."""
    spec = task(name)
    if len(targets) != len(predictions) or not targets:
        raise ValueError(f"{name}: {len(targets)} targets and {len(predictions)} predictions")
    if spec.label_names is None:
        want, got = scores(targets), scores(predictions)
        if np.ptp(got) == 0 or np.ptp(want) == 0:
            # A constant answer (an untrained model's) has no correlation to measure: scored
            # 0, as sklearn's Matthews correlation scores a constant class, not NaN, which
            # would make the GLUE average NaN.
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": 100 * float(scipy.stats.pearsonr(want, got)[0]),
                "spearman": 100 * float(scipy.stats.spearmanr(want, got)[0])}
    want, got = class_ids(spec, targets), class_ids(spec, predictions)
    computed = {}
    for metric in spec.metrics:
        if metric == "accuracy":
            computed[metric] = 100 * float(sk.accuracy_score(want, got))
        elif metric == "matthews_corrcoef":
            computed[metric] = 100 * float(sk.matthews_corrcoef(want, got))
        elif metric == "f1":  # T5's f1_score_with_invalid: an invalid answer is the wrong one
            binary = np.where((got == 0) | (got == 1), got, 1 - want)
            computed[metric] = 100 * float(sk.f1_score(want, binary))
    return computed


def glue_average(per_task: dict[str, dict[str, float]], tasks: list[str]) -> float:
    """The GLUE score over `tasks`, those fine-tuned on: each task's metrics averaged, then
    the tasks averaged. A task only scored zero-shot is no part of it (the paper averages
    the tasks it fine-tuned on)."""
    if not tasks:
        raise ValueError("no GLUE task to average")
    missing = [t for t in tasks if t not in per_task]
    if missing:
        raise ValueError(f"no scores for {', '.join(missing)}")
    return float(np.mean([np.mean(list(per_task[t].values())) for t in tasks]))
