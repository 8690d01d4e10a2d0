"""Pearson correlation coefficient, as an ``evaluate`` module (regression, e.g. STS-B).

hfsoup's bundled copy, used when the Hub's ``evaluate-metric/pearsonr`` cannot be reached.
Plain numpy, so no p-value (that needs scipy's t distribution); NaN for constant inputs.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Pearson correlation: the linear correlation in [-1, 1] of predictions and references."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): Predicted values.
    references (list of float): Ground-truth values.
Returns:
    pearsonr (float): In [-1, 1].
Examples:
    >>> pearsonr = evaluate.load("hfsoup/metrics/pearsonr")
    >>> pearsonr.compute(predictions=[1.0, 2.0, 3.0], references=[2.0, 4.0, 6.0])
    {'pearsonr': 1.0}
"""

_CITATION = "Pearson, K. (1895)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pearsonr(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float"), "references": datasets.Value("float")}
            ),
        )

    def _compute(self, predictions, references):
        pred = np.asarray(predictions, dtype=np.float64)
        true = np.asarray(references, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"pearsonr": float(np.corrcoef(pred, true)[0, 1])}
