"""The greedy soup (Wortsman et al. 2022, Recipe 1) as a registered method.

The run itself is :mod:`hfsoup.methods.greedy_run` (it loads a task: transformers, datasets),
imported when the method runs, so listing the methods stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from hfsoup.registry import MergeMethod, register

if TYPE_CHECKING:
    from hfsoup.check.estimates import EstimateInput, Peak
    from hfsoup.methods.context import MethodContext, MethodOutcome


class GreedyConfig(BaseModel):
    """The greedy soup's options (the recipe's top-level ``accept``, ``order`` and ``seed``)."""

    model_config = ConfigDict(extra="forbid")

    accept: Literal[">=", ">"] = ">="
    order: Literal["score", "random"] = "score"
    seed: int = 0


def prepare(ctx: MethodContext) -> Any:
    """Check a resume can happen and load the task (before the output is staged)."""
    from hfsoup.methods import greedy_run

    return greedy_run.prepare(ctx)


def run(ctx: MethodContext) -> MethodOutcome:
    """Score, choose and write the greedy soup (see :func:`greedy_run.run_greedy_soup`)."""
    from hfsoup.methods import greedy_run

    return greedy_run.run_greedy_soup(ctx)


def estimate(given: EstimateInput) -> Peak:
    """Its peak memory for ``hfsoup inspect`` (:func:`hfsoup.check.estimates.greedy_peak`)."""
    from hfsoup.check.estimates import greedy_peak

    return greedy_peak(given)


GREEDY = register(
    MergeMethod(
        "greedy",
        "keep an ingredient only if the held-out score does not drop",
        run=run,
        prepare=prepare,
        card=(
            "greedy soup (Wortsman et al. 2022, Recipe 1): ingredients sorted by held-out score, "
            "each kept only if the soup with it does not score worse"
        ),
        needs_task=True,
        chooses_weights="chooses its ingredients",
        rejects=True,
        config=GreedyConfig,
        run_options=frozenset({"resume"}),
        estimate=estimate,
    )
)
