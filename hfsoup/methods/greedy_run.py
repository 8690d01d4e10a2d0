"""A greedy soup run: score, choose, write the weights; the card's scores section and the
results (the pipeline writes them). Registered in :mod:`hfsoup.methods.greedy_soup`."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hfsoup.errors import NothingToResumeError, TaskError
from hfsoup.io.tensors import IngredientIndex, output_dtype
from hfsoup.io.writer import partial_dir
from hfsoup.methods.context import MethodContext, MethodOutcome
from hfsoup.methods.greedy import (
    STATE_FILE,
    GreedyResult,
    SoupSession,
    run_greedy,
    saved_fingerprint,
)
from hfsoup.methods.shared import make_scorer
from hfsoup.recipe import Recipe
from hfsoup.registry import get_method
from hfsoup.report.model_index import task_model_index
from hfsoup.report.outputs import Scores, SoupResults, hardware_record
from hfsoup.report.summary import TRAJECTORY_PNG, markdown_table, plot_trajectory
from hfsoup.tasks.kinds import TaskScorer

# Progress lines: the CLI and the Space show them as "hfsoup: ..." lines.
_notices = logging.getLogger("hfsoup")


def fingerprint(
    recipe: Recipe, indexes: Sequence[IngredientIndex], base: IngredientIndex | None = None
) -> str:
    """Identifies a greedy run: a saved state is only resumed by the same run (with
    ``combine``, the same operator, coefficients and base too)."""
    data: dict[str, Any] = {
        "ingredients": [ix.ingredient.sha or str(ix.ingredient.spec.path) for ix in indexes],
        "task": recipe.task.model_dump(mode="json"),
        "accept": recipe.accept,
        "order": recipe.order,
        "seed": recipe.seed,
    }
    if combines(recipe):
        data["combine"] = {
            **combine_record(recipe),
            "base": base.ingredient.sha or str(base.ingredient.spec.path) if base else None,
        }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def comparison_table(result: GreedyResult, selection: str, metric: str) -> dict[str, Any]:
    """The paper's side-by-side: best individual, uniform and greedy soups, ensembles."""
    best = result.best  # in the task kind's direction
    return {
        "best_individual": result.individual[best],
        "uniform_soup": result.uniform,
        "greedy_soup": result.greedy,
        "ensemble": result.ensemble,
        "greedy_ensemble": result.greedy_ensemble,
    }


def prepare(ctx: MethodContext) -> TaskScorer:
    """Before the output is staged: check a resume can happen, load the task (timed as
    ``load_task``).

    Raises:
        NothingToResumeError: ``resume`` and no interrupted run of this recipe was found.
    """
    if ctx.resume and ctx.processes.is_main:
        _check_resumable(ctx.recipe, ctx.indexes, ctx.target, ctx.base)
    t0 = time.perf_counter()
    scorer = make_scorer(ctx.recipe.task, ctx.indexes[0], progress=ctx.progress,
                         processes=ctx.processes, cache=ctx.cache)  # fmt: skip
    ctx.timings["load_task"] = time.perf_counter() - t0
    return scorer


def run_greedy_soup(ctx: MethodContext) -> MethodOutcome:
    """Run a greedy soup and write its weights to ``ctx.folder`` (the staged output, kept on
    failure so that a rerun resumes from the state saved there).

    Under ``accelerate launch`` every process takes the same decisions (scoring is split
    between them) and only the main one (``ctx.folder`` set) writes.
    """
    procs, scorer, tmp, labels = ctx.processes, ctx.state, ctx.folder, ctx.labels
    chatty = ctx.progress and procs.is_main
    log = _notices.info if chatty else (lambda _: None)
    session, config = _session(ctx), ctx.config
    try:
        result = run_greedy(
            session, scorer, labels=labels, state_dir=tmp,
            fingerprint=fingerprint(ctx.recipe, ctx.indexes, ctx.base), strict=config.accept == ">",
            order=config.order, seed=config.seed, log=log, processes=procs,
        )  # fmt: skip
    except TaskError:
        # Not an interruption (every ingredient scoring NaN, labels the outputs cannot be
        # scored against): a resume would meet it again, so no state is kept to resume.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    ctx.timings.update(result.timings)
    if combines(ctx.recipe):  # the pinned recipe embeds the coefficients used: a rebuild matches
        ctx.recipe = ctx.recipe.model_copy(update=_used(ctx.recipe, config))
    hardware = hardware_record(procs, ctx.placement)
    n = len(result.accepted)
    weights = [1.0 / n if i in result.accepted else 0.0 for i in range(len(ctx.indexes))]
    if tmp is None:  # not the main process: it scored its share; the main one writes
        return MethodOutcome(replace(ctx.results(weights, hardware), recipe=ctx.recipe))
    first, dtype = ctx.indexes[0].tensors, ctx.dtype
    ctx.write_weights(
        lambda names: session.soup_tensors(names, lambda n: output_dtype(first[n], dtype))
    )
    sel, metric = scorer.selection_split, scorer.selection_metric
    table = comparison_table(result, sel, metric)
    scores = Scores(ctx.recipe.task, result.individual, table,
                    [labels[i] for i in result.ensemble_members], (sel, metric))  # fmt: skip
    record = {
        "trace": result.trace,
        "accepted": [labels[i] for i in result.accepted],
        "accept": config.accept,
        "order": config.order,
        "examples_scored": result.examples_scored,
        "examples_full_evaluation": result.examples_full,
        "examples_saved": result.examples_full - result.examples_scored,
        "examples_saved_rejections": result.saved_rejections,
        "examples_saved_acceptances": result.saved_acceptances,
    }
    if combines(ctx.recipe):
        record["combine"] = combine_record(ctx.recipe)
    results = ctx.results(weights, hardware, scores=scores, record=record)
    plot_trajectory(
        tmp / TRAJECTORY_PNG, result.trace, metric=metric,
        best_individual=table["best_individual"][sel][metric],
        uniform=table["uniform_soup"][sel][metric],
    )  # fmt: skip
    index = task_model_index(ctx.recipe, ctx.target, table, "greedy_soup", ctx.indexes[0].config)
    sections = [_card_section(results, sel, metric, scorer.direction.higher_is_better)]
    if combines(ctx.recipe):
        sections.insert(0, _combine_section(ctx, session))
    return MethodOutcome(
        results, sections=sections,
        model_index=index or None, scratch=["logits", STATE_FILE],
    )  # fmt: skip


def _check_resumable(
    recipe: Recipe, indexes: Sequence[IngredientIndex], target: Path,
    base: IngredientIndex | None = None,
) -> None:  # fmt: skip
    folder = partial_dir(target.expanduser().resolve())
    saved = saved_fingerprint(folder)
    if saved is None:
        raise NothingToResumeError(
            f"nothing to resume: no interrupted greedy run of {target} (looked in {folder})"
        )
    if saved != fingerprint(recipe, indexes, base):
        raise NothingToResumeError(
            f"cannot resume: the run interrupted in {folder} had other ingredients, task or "
            "rules; run without resume to start afresh",
            options=["resume"],
        )


def _card_section(results: SoupResults, sel: str, metric: str, higher: bool = True) -> str:
    g = results.record
    kind = results.scores.task.kind if results.scores is not None else "classification"
    better = "higher" if higher else "lower"
    saved = g["examples_saved"]
    full = g["examples_full_evaluation"]
    pct = f" ({100 * saved / full:.0f}%)" if full else ""
    return "\n".join([
        "## Scores",
        "",
        f"Chosen on split `{sel}` by `{metric}` (task kind `{kind}`, {better} is better); "
        "the other splits are the report. "
        f"Greedy acceptance rule: `{g['accept']}`, order: `{g['order']}`.",
        "",
        markdown_table(results.scores.table, selection_split=sel),
        "",
        f"Kept {len(g['accepted'])} of {len(g['trace'])} ingredients: "
        + ", ".join(f"`{r}`" for r in g["accepted"]) + ". "
        f"Exact early decisions scored {g['examples_scored']} of {full} candidate examples "
        f"(saved {saved}{pct}: {g.get('examples_saved_rejections', saved)} by early "
        f"rejections, {g.get('examples_saved_acceptances', 0)} by early acceptances); "
        "the decisions equal a full evaluation's.",
        "",
        f"![greedy trajectory]({TRAJECTORY_PNG})",
    ])  # fmt: skip


def combines(recipe: Recipe) -> bool:
    """Whether ``recipe``'s greedy soup merges with a task-vector operator (its config's
    ``combine``, read through the registry: this module is below the method's file)."""
    return get_method("greedy").read_config(recipe).combine != "average"


def _session(ctx: MethodContext) -> SoupSession:
    """The plain greedy's session, or with ``combine`` one merging with that operator."""
    options = dict(accumulate=ctx.accumulate, allow_nonfinite=ctx.recipe.allow_nonfinite,
                   placement=ctx.placement)  # fmt: skip
    if not combines(ctx.recipe):
        return SoupSession(ctx.indexes, **options)
    from hfsoup.methods.greedy_combine import CombineSession

    if ctx.base is None:
        raise RuntimeError("no base model was resolved for this run")
    return CombineSession(ctx.indexes, ctx.base, combine=ctx.config.combine, cfg=ctx.config,
                          **options)  # fmt: skip


def _used(recipe: Recipe, config: Any) -> dict[str, Any]:
    """The coefficients the operator used, as recipe fields (density only where it applies)."""
    used = {"lambda_": config.lambda_}
    if config.combine != "task_arithmetic":
        used["density"] = config.density
    return used


def combine_record(recipe: Recipe) -> dict[str, Any]:
    """The operator and its coefficients (defaults filled in), as results.json records them."""
    cfg = get_method("greedy").read_config(recipe)
    record: dict[str, Any] = {"operator": cfg.combine, "lambda": cfg.lambda_}
    if cfg.combine != "task_arithmetic":
        record["density"] = cfg.density
    if cfg.combine == "dare_ties":
        record["seed"] = cfg.seed
    return record


def _combine_section(ctx: MethodContext, session: Any) -> str:
    base = ctx.base.ingredient if ctx.base is not None else None
    where = f"`{base.label}`" + (f" at commit `{base.sha}`" if base and base.sha else "")
    coefficients = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                             for k, v in combine_record(ctx.recipe).items() if k != "operator")  # fmt: skip
    return (
        f"## Greedy soup merged with {ctx.config.combine}\n\n"
        f"Each candidate was scored as {session.formula}, over the accepted ingredients and the "
        "candidate with equal weights wᵢ = 1/n, τᵢ = θᵢ − θ₀ per tensor in float32 (a set of "
        "one ingredient is that ingredient itself).\n\n"
        f"- base θ₀: {where}\n- coefficients: {coefficients}\n"
    )
