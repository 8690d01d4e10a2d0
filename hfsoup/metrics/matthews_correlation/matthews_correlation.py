"""Matthews correlation coefficient, as an ``evaluate`` module (binary and multi-class).

hfsoup's bundled copy, used when the Hub's ``evaluate-metric/matthews_correlation`` cannot be
reached. Plain numpy, from the confusion matrix (Gorodkin's multi-class form); 0 when undefined.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Matthews correlation: a correlation in [-1, 1] between predicted and true classes."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): Predicted labels.
    references (list of int): Ground-truth labels.
    sample_weight (list of float): Per-example weights (optional).
Returns:
    matthews_correlation (float): 1 is perfect, 0 no better than chance, -1 inverse.
Examples:
    >>> mcc = evaluate.load("hfsoup/metrics/matthews_correlation")
    >>> mcc.compute(predictions=[0, 1, 1, 0], references=[0, 1, 1, 0])
    {'matthews_correlation': 1.0}
"""

_CITATION = "Matthews, B. W. (1975); Gorodkin, J. (2004), multi-class form."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MatthewsCorrelation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None):
        pred = np.asarray(predictions)
        true = np.asarray(references)
        weights = np.ones(len(true)) if sample_weight is None else np.asarray(sample_weight, float)
        classes, index = np.unique(np.concatenate([true, pred]), return_inverse=True)
        confusion = np.zeros((len(classes), len(classes)))
        np.add.at(confusion, (index[: len(true)], index[len(true) :]), weights)
        true_per_class = confusion.sum(axis=1)
        pred_per_class = confusion.sum(axis=0)
        correct = np.trace(confusion)
        total = confusion.sum()
        covariance = correct * total - np.dot(true_per_class, pred_per_class)
        spread_pred = total**2 - np.dot(pred_per_class, pred_per_class)
        spread_true = total**2 - np.dot(true_per_class, true_per_class)
        if spread_pred == 0 or spread_true == 0:
            return {"matthews_correlation": 0.0}
        return {"matthews_correlation": float(covariance / np.sqrt(spread_pred * spread_true))}
