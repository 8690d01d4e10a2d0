"""The learned soup (mixing weights α and temperature β learned on a held-out split) as a
registered method.

The run itself is :mod:`hfsoup.methods.learned_run` (it loads a task: transformers,
datasets), imported when the method runs, so listing the methods stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hfsoup.recipe import LearnedConfig
from hfsoup.registry import MergeMethod, register

if TYPE_CHECKING:
    from hfsoup.check.estimates import EstimateInput, Peak
    from hfsoup.methods.context import MethodContext, MethodOutcome


def prepare(ctx: MethodContext) -> Any:
    """Choose the path (memory or stream) and load the task (before the output is staged)."""
    from hfsoup.methods import learned_run

    return learned_run.prepare(ctx)


def run(ctx: MethodContext) -> MethodOutcome:
    """Learn the mixing weights and write the soup (see :func:`learned_run.run_learned_soup`)."""
    from hfsoup.methods import learned_run

    return learned_run.run_learned_soup(ctx)


def estimate(given: EstimateInput) -> Peak:
    """Its peak memory for ``hfsoup inspect`` (:func:`hfsoup.check.estimates.learned_peak`)."""
    from hfsoup.check.estimates import learned_peak

    return learned_peak(given)


LEARNED = register(
    MergeMethod(
        "learned",
        "mixing weights learned on the held-out split",
        run=run,
        prepare=prepare,
        card="learned soup: mixing weights learned on a held-out split",
        needs_task=True,
        chooses_weights="learns the weights",
        config=LearnedConfig,
        options_key="learned",
        run_options=frozenset({"memory_budget", "resume"}),
        one_device=True,
        estimate=estimate,
    )
)
