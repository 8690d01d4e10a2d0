"""Accuracy, as an ``evaluate`` module: the share of predictions equal to their reference.

hfsoup's bundled copy, used when the Hub's ``evaluate-metric/accuracy`` cannot be reached.
Plain numpy. The unweighted value is ``correct / n`` as one correctly rounded float division,
which hfsoup's exact early rejection relies on.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the proportion of predictions that equal their reference label."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): Predicted labels.
    references (list of int): Ground-truth labels.
    normalize (bool): Return the proportion (default) or the number of correct predictions.
    sample_weight (list of float): Per-example weights (optional).
Returns:
    accuracy (float): In [0, 1] when normalized.
Examples:
    >>> accuracy = evaluate.load("hfsoup/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = "hfsoup bundled metric (numpy implementation of the standard definition)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        if sample_weight is None:
            count = int(np.count_nonzero(correct))
            return {"accuracy": count / len(correct) if normalize else float(count)}
        weights = np.asarray(sample_weight, dtype=np.float64)
        total = float(np.dot(correct, weights))
        return {"accuracy": total / float(weights.sum()) if normalize else total}
