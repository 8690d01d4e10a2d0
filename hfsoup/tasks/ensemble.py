"""Output ensembles: the uniform ensemble and the paper's greedy ensemble.

Both work on outputs already computed (cached per ingredient), so they cost no forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hfsoup.tasks.kinds import HIGHER, Direction


def ensemble(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average the outputs of several models on the same examples.

    Classification outputs ``(n, classes)`` are logits: the ensemble is the mean of their
    softmax probabilities. Regression outputs ``(n, 1)`` are averaged as they are.

    Args:
        outputs: One ``(n, c)`` tensor per model, same shape.

    Returns:
        ``(n, c)`` float32: mean probabilities (classification) or mean outputs (regression).
        Its argmax / squeeze gives the ensemble's predictions.

    Example:
        ```py
        >>> ensemble([torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])]).argmax(-1)
        tensor([0])
        ```
    """
    if not outputs:
        raise ValueError("an ensemble needs at least one model's outputs")
    stacked = torch.stack([o.float() for o in outputs])
    if stacked.shape[-1] == 1:
        return stacked.mean(dim=0)
    return stacked.softmax(dim=-1).mean(dim=0)


def reaches(
    score: float | None, threshold: float, *, strict: bool = False, direction: Direction = HIGHER
) -> bool:
    """The acceptance rule: ``score >= threshold`` (``>`` when ``strict``; ``<=`` / ``<`` for a
    lower-is-better ``direction``); None and NaN never reach. See :meth:`Direction.reaches`."""
    return direction.reaches(score, threshold, strict=strict)


def greedy_ensemble(
    outputs: Sequence[Any],
    score: Callable[[Any], float],
    *,
    strict: bool = False,
    direction: Direction = HIGHER,
    combine: Callable[[Sequence[Any]], Any] = ensemble,
) -> list[int]:
    """The paper's greedy ensemble: add models by individual score while the score holds.

    Models are sorted by their own score, best first (ties keep the given order; NaN scores
    last). Starting from the best, each next model's outputs join the ensemble if the
    ensemble's score does not get worse (``>=``; ``>`` when ``strict``; the other way round
    for a lower-is-better ``direction``).

    Args:
        outputs: Each model's outputs on the selection split.
        score: Selection score of outputs or of an ensemble of them.
        strict: Require a strict improvement to add a model.
        direction: Which way the score is better (the task kind's).
        combine: Forms an ensemble's outputs (the task kind's; default :func:`ensemble`).

    Returns:
        Indices into ``outputs`` of the chosen models, in the order they were added.
    """
    if not outputs:
        raise ValueError("a greedy ensemble needs at least one model's outputs")
    individual = [score(combine([o])) for o in outputs]
    order = direction.ranking(individual)
    chosen = [order[0]]
    best = individual[order[0]]
    for index in order[1:]:
        candidate = score(combine([outputs[i] for i in [*chosen, index]]))
        if direction.reaches(candidate, best, strict=strict):
            chosen.append(index)
            best = candidate
    return chosen
