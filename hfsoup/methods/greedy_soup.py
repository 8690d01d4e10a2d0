"""The greedy soup (Wortsman et al. 2022, Recipe 1) as a registered method.

The run itself is :mod:`hfsoup.methods.greedy_run` (it loads a task: transformers, datasets),
imported when the method runs, so listing the methods stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hfsoup.errors import RecipeError
from hfsoup.registry import MergeMethod, register

if TYPE_CHECKING:
    from hfsoup.check.estimates import EstimateInput, Peak
    from hfsoup.methods.context import MethodContext, MethodOutcome
    from hfsoup.recipe import Recipe

Combine = Literal["average", "task_arithmetic", "ties", "dare_ties"]
# The operators greedy can merge the accepted set with (the CLI's --combine choices).
COMBINE_OPERATORS: tuple[str, ...] = get_args(Combine)


class GreedyConfig(BaseModel):
    """The greedy soup's options (the recipe's top-level ``accept``, ``order``, ``seed``, and
    ``combine`` with its coefficients ``lambda`` and ``density``; None: these defaults)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    accept: Literal[">=", ">"] = ">="
    order: Literal["score", "random"] = "score"
    seed: int = 0
    combine: Combine = "average"
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False)
    density: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


_DEFAULTS = {"lambda": GreedyConfig.model_fields["lambda_"].default,
             "density": GreedyConfig.model_fields["density"].default}  # fmt: skip


def combines(recipe: Recipe) -> bool:
    """Whether ``recipe``'s greedy soup merges with a task-vector operator (it needs a base)."""
    return recipe.combine not in (None, "average")


def check_combine(recipe: Recipe) -> None:
    """Refuse coefficients and a base that the greedy soup's ``combine`` does not take.

    Raises:
        RecipeError: a base, ``lambda`` or ``density`` without a task-vector ``combine``;
            ``density`` with ``combine: task_arithmetic``; ``lambda`` or ``density`` ``auto``
            (the greedy loop merges with fixed coefficients: a search per candidate would
            score every grid point for each one, and the accepted set depends on them).
    """
    if not combines(recipe):
        for key, given in (("base", recipe.base), ("lambda", recipe.lambda_),
                           ("density", recipe.density)):  # fmt: skip
            if given is not None:
                raise RecipeError(
                    f"{key} applies to a greedy soup only with combine (task_arithmetic, ties "
                    "or dare_ties); set combine or drop " + key,
                    options=[key, "combine"],
                )
    elif recipe.combine == "task_arithmetic" and recipe.density is not None:
        raise RecipeError(
            "density applies to combine ties and dare_ties, not task_arithmetic",
            options=["density"],
        )
    for key, given in (("lambda", recipe.lambda_), ("density", recipe.density)):
        if given == "auto":
            raise RecipeError(
                f"{key} auto is not searched by a greedy soup: combine merges with fixed "
                f"coefficients; give {key} a number (default {_DEFAULTS[key]:g}), or search it "
                f"with method {recipe.combine} on the ingredients greedy keeps",
                options=[key],
            )


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
        base_for=combines,
        check=check_combine,
    )
)
