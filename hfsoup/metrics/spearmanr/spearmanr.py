"""Spearman rank correlation, as an ``evaluate`` module (regression, e.g. STS-B).

hfsoup's bundled copy, used when the Hub's ``evaluate-metric/spearmanr`` cannot be reached.
Plain numpy: the Pearson correlation of the ranks, ties sharing their average rank; no p-value.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Spearman correlation: the Pearson correlation of the ranks of the two inputs."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): Predicted values.
    references (list of float): Ground-truth values.
Returns:
    spearmanr (float): In [-1, 1].
Examples:
    >>> spearmanr = evaluate.load("hfsoup/metrics/spearmanr")
    >>> spearmanr.compute(predictions=[1.0, 5.0, 3.0], references=[1.0, 9.0, 4.0])
    {'spearmanr': 1.0}
"""

_CITATION = "Spearman, C. (1904)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Spearmanr(evaluate.Metric):
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
        pred = _average_ranks(np.asarray(predictions, dtype=np.float64))
        true = _average_ranks(np.asarray(references, dtype=np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"spearmanr": float(np.corrcoef(pred, true)[0, 1])}


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; equal values share the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    is_start = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    starts = np.flatnonzero(is_start)
    ends = np.r_[starts[1:], len(values)]
    group_rank = (starts + ends + 1) / 2
    ranks = np.empty(len(values))
    ranks[order] = group_rank[np.cumsum(is_start) - 1]
    return ranks
