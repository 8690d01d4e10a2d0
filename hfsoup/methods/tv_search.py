"""Task-vector merges scored on a task: coefficients chosen from a grid by the selection-split
score (``lambda: auto``, ``density: auto``, ``alpha: auto``), and the merged model's row in the
comparison table beside the paper's baselines.

For each value of the coefficients that change τ (``density``; ``seed`` is fixed) the merged
task vector τ is streamed once, from the local cache, into float32 tensors beside θ₀; each
value of the scale (λ, or α for WiSE-FT) is then the cheap ``θ₀ + λ·τ`` (``(1 − α)·θ₀ + α·soup``)
set in the live model. Memory: θ₀ and τ in float32 plus the live model. The grid is walked
density-major, scale-minor; every candidate after the first is scored with exact early
rejection against the best so far and replaces it only when strictly better, so ties keep the
earlier grid point.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from hfsoup.compute.combine import stream_combine
from hfsoup.methods.context import MethodContext
from hfsoup.methods.greedy import SoupSession, score_ensembles, score_ingredients, score_uniform
from hfsoup.report.outputs import Scores
from hfsoup.tasks.kinds import TaskScorer

DEFAULT_GRID = {
    "lambda": [round(0.1 * i, 1) for i in range(1, 16)],
    "density": [0.1, 0.3, 0.5, 0.7, 0.9],
    "alpha": [round(0.1 * i, 1) for i in range(11)],
}
_ATTR = {"lambda": "lambda_", "density": "density", "alpha": "alpha"}
SEARCH_PNG = "coefficient_search.png"


def grid_points(cfg: Any, grid: dict[str, list[float]] | None) -> list[dict[str, float]]:
    """Every candidate's coefficients, density-major (the order ties are broken in)."""
    given = grid or {}
    axes = []
    for key in ("density", "lambda", "alpha"):
        attr = _ATTR[key]
        if hasattr(cfg, attr):
            value = getattr(cfg, attr)
            axes.append([(attr, v) for v in given.get(key, DEFAULT_GRID[key])]
                        if value == "auto" else [(attr, value)])  # fmt: skip
    return [dict(point) for point in itertools.product(*axes)]


def merged_vector(ctx: MethodContext, accumulator_cls: type, weights: Sequence[float], cfg: Any):
    """θ₀ and the merged τ for ``cfg``, per tensor in float32 (integer buffers from θ₀), streamed
    from the ingredients' local copies."""
    base_out: dict[str, torch.Tensor] = {}
    tau: dict[str, torch.Tensor] = {}

    class Capture(accumulator_cls):
        whole_tensors = True

        def result(self) -> torch.Tensor:
            base_out[self.name], tau[self.name] = self.base, self.merged()
            return self.base

    def keep(_: int, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name not in tau:
                base_out[name] = t

    cached = [replace(ix, ingredient=replace(ix.ingredient, source=ix.ingredient.source.cached()))
              for ix in [ctx.base, *ctx.indexes]]  # fmt: skip
    stream_combine(cached, ctx.shards, lambda: Capture(weights, cfg), on_shard=keep,
                   dtype=torch.float32, placement=ctx.placement)  # fmt: skip
    # Capture (a class made here) sits in a reference cycle holding these dicts through its
    # closure until the cyclic GC runs: hand over new dicts and empty these, so that θ₀ and τ
    # are freed as soon as the caller drops them (measured: a second density held two pairs).
    out = dict(base_out), dict(tau)
    base_out.clear()
    tau.clear()
    return out


def _show(session: SoupSession, cls: type, base: dict, tau: dict, scale: float) -> None:
    for name, b in base.items():
        session.live.set(name, cls.apply(b, tau[name], scale) if name in tau else b)


def search(
    ctx: MethodContext, cls: type, weights: Sequence[float], cfg: Any, scorer: TaskScorer,
    session: SoupSession,
) -> tuple[Any, list[dict[str, Any]]]:  # fmt: skip
    """Walk the grid; returns the chosen config and the ``search`` records. Leaves the chosen
    candidate shown in ``session``'s live model."""
    sel, direction = scorer.selection_split, scorer.direction
    worst = float("-inf") if direction.higher_is_better else float("inf")
    records: list[dict[str, Any]] = []
    best, best_score, tau_key, held = None, worst, None, None
    for point in grid_points(cfg, ctx.recipe.grid):
        candidate = cfg.model_copy(update=point)
        key = {k: v for k, v in point.items() if k != cls.scale_key}
        if key != tau_key:
            held = None  # one θ₀ and τ at a time: the old pair goes before the new is streamed
            held, tau_key = merged_vector(ctx, cls, weights, candidate), key
        _show(session, cls, *held, point[cls.scale_key])
        out = scorer.score_with_early_stop(session.model, sel, best_score, strict=True)
        shown = {k.rstrip("_"): v for k, v in point.items()}
        records.append(
            {"params": shown, "score": out.score, "examples_scored": out.examples_scored}
        )
        if best is None or direction.reaches(out.score, best_score, strict=True):
            best = candidate
            if out.score is not None:
                best_score = out.score
    chosen = {k: v for k, v in best.model_dump().items() if k != cls.scale_key}
    if chosen != {k: v for k, v in candidate.model_dump().items() if k != cls.scale_key}:
        held = None
        held = merged_vector(ctx, cls, weights, best)
    _show(session, cls, *held, getattr(best, cls.scale_key))
    return best, records


def scored_run(
    ctx: MethodContext, cls: type, weights: Sequence[float], cfg: Any
) -> tuple[Any, list[dict[str, Any]], Scores]:
    """The search (a single point when no coefficient is ``auto``), then the comparison table:
    best individual, uniform soup, ensemble, greedy ensemble and the merged model's row."""
    scorer: TaskScorer = ctx.state
    session = SoupSession(ctx.indexes, accumulate=ctx.accumulate,
                          allow_nonfinite=ctx.recipe.allow_nonfinite, placement=ctx.placement)  # fmt: skip
    individual = score_ingredients(session, scorer, labels=ctx.labels)
    uniform = score_uniform(session, scorer)
    session.drop_sum()
    ensemble, greedy_ensemble, members = score_ensembles(scorer, len(ctx.indexes))
    best, records = search(ctx, cls, weights, cfg, scorer, session)
    splits = scorer.task.splits
    merged = {s: scorer.scores(scorer.outputs(session.model, s), s) for s in splits}
    sel, metric = scorer.selection_split, scorer.selection_metric
    top = scorer.direction.best_index([r[sel][metric] for r in individual])
    table = {"best_individual": individual[top], "uniform_soup": uniform, "ensemble": ensemble,
             "greedy_ensemble": greedy_ensemble, ctx.recipe.method: merged}  # fmt: skip
    scores = Scores(ctx.recipe.task, individual, table, [ctx.labels[i] for i in members],
                    (sel, metric))  # fmt: skip
    return best, records, scores
