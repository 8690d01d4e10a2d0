"""A greedy soup run end to end: score, choose, write the soup, its card and results.json."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from hfsoup.compute.distributed import Processes
from hfsoup.compute.placement import Placement
from hfsoup.errors import NothingToResumeError, TaskError
from hfsoup.io.tensors import IngredientIndex, output_dtype
from hfsoup.io.writer import partial_dir, staged_output
from hfsoup.methods.greedy import (
    STATE_FILE,
    GreedyResult,
    SoupSession,
    run_greedy,
    saved_fingerprint,
)
from hfsoup.methods.shared import make_scorer
from hfsoup.recipe import Recipe
from hfsoup.report.model_index import task_model_index
from hfsoup.report.outputs import (
    hardware_record,
    pin_recipe,
    results_base,
    scored_results,
    write_soup_files,
    write_weights,
)
from hfsoup.report.summary import TRAJECTORY_PNG, markdown_table, plot_trajectory


def fingerprint(recipe: Recipe, indexes: Sequence[IngredientIndex]) -> str:
    """Identifies a greedy run: a saved state is only resumed by the same run."""
    data = {
        "ingredients": [ix.ingredient.sha or str(ix.ingredient.spec.path) for ix in indexes],
        "task": recipe.task.model_dump(mode="json"),
        "accept": recipe.accept,
        "order": recipe.order,
        "seed": recipe.seed,
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


def run_greedy_soup(
    recipe: Recipe,
    indexes: Sequence[IngredientIndex],
    shards: Sequence[Sequence[str]],
    *,
    target: Path,
    overwrite: bool,
    dtype: torch.dtype | None,
    placement: Placement,
    accumulate: torch.dtype,
    progress: bool,
    timings: dict[str, float],
    resume: bool = False,
    processes: Processes | None = None,
) -> dict[str, Any]:
    """Run a greedy soup and write it to ``target``; returns the results.json content.

    An interrupted run of the same recipe continues from the state in the output's partial
    folder; ``resume=True`` insists on it. Under ``accelerate launch`` every process takes the
    same decisions (scoring is split between them) and only the main one writes.

    Raises:
        NothingToResumeError: ``resume`` and no interrupted run of this recipe was found.
    """
    procs = processes or Processes()
    if resume and procs.is_main:
        _check_resumable(recipe, indexes, target)
    chatty = progress and procs.is_main
    log = (lambda msg: print(f"hfsoup: {msg}", file=sys.stderr)) if chatty else (lambda _: None)
    labels = [ix.ingredient.label for ix in indexes]
    task = recipe.task
    t0 = time.perf_counter()
    scorer = make_scorer(task, indexes[0], progress=progress, processes=procs)
    timings["load_task"] = time.perf_counter() - t0
    output = staged_output(target, overwrite=overwrite, keep_partial=True)
    with output if procs.is_main else nullcontext() as tmp:
        session = SoupSession(
            indexes, accumulate=accumulate, allow_nonfinite=recipe.allow_nonfinite,
            placement=placement,
        )  # fmt: skip
        try:
            result = run_greedy(
                session, scorer, labels=labels, state_dir=tmp,
                fingerprint=fingerprint(recipe, indexes), strict=recipe.accept == ">",
                order=recipe.order, seed=recipe.seed, log=log, processes=procs,
            )  # fmt: skip
        except TaskError:
            # Not an interruption (every ingredient scoring NaN, labels the outputs cannot be
            # scored against): a resume would meet it again, so no state is kept to resume.
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        timings.update(result.timings)
        hardware = hardware_record(procs, placement)
        n = len(result.accepted)
        weights = [1.0 / n if i in result.accepted else 0.0 for i in range(len(indexes))]
        if tmp is None:  # not the main process: it scored its share; the main one writes
            return results_base(recipe, indexes, weights, timings, shards, hardware)
        t0 = time.perf_counter()
        first = indexes[0].tensors
        write_weights(
            tmp, indexes, shards,
            lambda names: session.soup_tensors(names, lambda n: output_dtype(first[n], dtype)),
            dtype,
            allow_nonfinite=recipe.allow_nonfinite,
        )  # fmt: skip
        timings["write"] = time.perf_counter() - t0

        pinned = pin_recipe(recipe, indexes)
        sel, metric = scorer.selection_split, scorer.selection_metric
        table = comparison_table(result, sel, metric)
        results = scored_results(
            pinned, indexes, weights, timings=timings, shards=shards, hardware=hardware,
            individual=result.individual, table=table,
            ensemble_members=[labels[i] for i in result.ensemble_members], selection=(sel, metric),
        )  # fmt: skip
        results["greedy"] = {
            "trace": result.trace,
            "accepted": [labels[i] for i in result.accepted],
            "accept": recipe.accept,
            "order": recipe.order,
            "examples_scored": result.examples_scored,
            "examples_full_evaluation": result.examples_full,
            "examples_saved": result.examples_full - result.examples_scored,
        }
        plot_trajectory(
            tmp / TRAJECTORY_PNG, result.trace, metric=metric,
            best_individual=table["best_individual"][sel][metric],
            uniform=table["uniform_soup"][sel][metric],
        )  # fmt: skip
        index = task_model_index(recipe, target, table, "greedy_soup", indexes[0].config)
        write_soup_files(
            tmp, pinned, indexes, weights, results,
            sections=[_card_section(results, sel, metric)], model_index=index or None,
        )  # fmt: skip
        # Only now that everything is written: a failed write above keeps the run resumable.
        shutil.rmtree(tmp / "logits", ignore_errors=True)
        (tmp / STATE_FILE).unlink(missing_ok=True)
    return results


def _check_resumable(recipe: Recipe, indexes: Sequence[IngredientIndex], target: Path) -> None:
    folder = partial_dir(target.expanduser().resolve())
    saved = saved_fingerprint(folder)
    if saved is None:
        raise NothingToResumeError(
            f"nothing to resume: no interrupted greedy run of {target} (looked in {folder})"
        )
    if saved != fingerprint(recipe, indexes):
        raise NothingToResumeError(
            f"cannot resume: the run interrupted in {folder} had other ingredients, task or "
            "rules; run without --resume to start afresh"
        )


def _card_section(results: dict[str, Any], sel: str, metric: str) -> str:
    g = results["greedy"]
    saved = g["examples_saved"]
    full = g["examples_full_evaluation"]
    pct = f" ({100 * saved / full:.0f}%)" if full else ""
    return "\n".join([
        "## Scores",
        "",
        f"Chosen on split `{sel}` by `{metric}`; the other splits are the report. "
        f"Greedy acceptance rule: `{g['accept']}`, order: `{g['order']}`.",
        "",
        markdown_table(results["table"], selection_split=sel),
        "",
        f"Kept {len(g['accepted'])} of {len(g['trace'])} ingredients: "
        + ", ".join(f"`{r}`" for r in g["accepted"]) + ". "
        f"Exact early rejection scored {g['examples_scored']} of {full} candidate examples "
        f"(saved {saved}{pct}); the decisions equal a full evaluation's.",
        "",
        f"![greedy trajectory]({TRAJECTORY_PNG})",
    ])  # fmt: skip
