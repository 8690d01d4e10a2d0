"""F1 score, as an ``evaluate`` module: the harmonic mean of precision and recall.

hfsoup's bundled copy, used when the Hub's ``evaluate-metric/f1`` cannot be reached.
Plain numpy; a class with no predicted and no true examples scores 0.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall), per class or averaged."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): Predicted labels.
    references (list of int): Ground-truth labels.
    labels (list of int): Classes to average over (default: every class seen).
    pos_label (int): The positive class for average="binary" (default 1).
    average (str): "binary" (default), "micro", "macro", "weighted", or None (per class).
    sample_weight (list of float): Per-example weights (optional).
Returns:
    f1 (float, or array of float when average is None).
Examples:
    >>> f1 = evaluate.load("hfsoup/metrics/f1")
    >>> f1.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'f1': 0.6666666666666666}
"""

_CITATION = "hfsoup bundled metric (numpy implementation of the standard definition)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
    ):
        pred = np.asarray(predictions)
        true = np.asarray(references)
        weights = np.ones(len(true)) if sample_weight is None else np.asarray(sample_weight, float)
        if average == "binary":
            classes = np.asarray([pos_label])
        elif labels is not None:
            classes = np.asarray(labels)
        else:
            classes = np.union1d(pred, true)
        hit = pred == true
        tp = np.array([weights[hit & (true == c)].sum() for c in classes])
        fp = np.array([weights[~hit & (pred == c)].sum() for c in classes])
        fn = np.array([weights[~hit & (true == c)].sum() for c in classes])
        if average == "micro":
            return {"f1": _f1(tp.sum(), fp.sum(), fn.sum())}
        per_class = np.array([_f1(*counts) for counts in zip(tp, fp, fn, strict=True)])
        if average is None:
            return {"f1": per_class}
        if average in ("binary", "macro"):
            return {"f1": float(per_class.mean())}
        if average == "weighted":
            support = tp + fn
            total = support.sum()
            return {"f1": float(np.dot(per_class, support) / total) if total else 0.0}
        raise ValueError(f"unknown average {average!r}")


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0
