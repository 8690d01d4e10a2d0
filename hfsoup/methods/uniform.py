"""The uniform soup: the (weighted) average of every ingredient, streamed tensor by tensor.

The arithmetic is :class:`hfsoup.compute.combine.WeightedSum`, one accumulator per tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfsoup.registry import MergeMethod, register

if TYPE_CHECKING:
    from hfsoup.check.estimates import EstimateInput, Peak
    from hfsoup.methods.context import MethodContext, MethodOutcome


def run(ctx: MethodContext) -> MethodOutcome:
    """Stream the weighted sum of the ingredients into ``ctx.folder``."""
    from hfsoup.compute.combine import WeightedSum
    from hfsoup.compute.distributed import Processes
    from hfsoup.methods.context import MethodOutcome
    from hfsoup.report.outputs import hardware_record

    ctx.stream_soup(lambda: WeightedSum(ctx.weights, ctx.accumulate))
    # The main process alone streams a uniform soup: its hardware is its own.
    hardware = hardware_record(Processes(), ctx.placement)
    return MethodOutcome(ctx.results(ctx.weights, hardware))


def estimate(given: EstimateInput) -> Peak:
    """Its peak memory for ``hfsoup inspect`` (:func:`hfsoup.check.estimates.uniform_peak`)."""
    from hfsoup.check.estimates import uniform_peak

    return uniform_peak(given)


UNIFORM = register(
    MergeMethod(
        "uniform",
        "the (weighted) average of every ingredient",
        run=run,
        card="uniform soup: the plain average of all ingredients' weights",
        estimate=estimate,
    )
)
