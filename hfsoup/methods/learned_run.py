"""A learned soup run: choose the path, score, learn α and β, write the weights; the card's
sections and the results (the pipeline writes them). Registered in
:mod:`hfsoup.methods.learned_soup`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hfsoup.compute.distributed import Processes
from hfsoup.compute.placement import Placement
from hfsoup.errors import RecipeError, TaskError
from hfsoup.io.tensors import FLOAT_DTYPES, IngredientIndex, output_dtype
from hfsoup.methods.context import MethodContext, MethodOutcome
from hfsoup.methods.greedy import (
    SoupSession,
    best_index,
    score_ensembles,
    score_ingredients,
    score_uniform,
)
from hfsoup.methods.learned import (
    WHOLE_MODEL,
    LearnedResult,
    PathPlan,
    activation_bytes,
    available_memory,
    check_task,
    estimate_seconds,
    human_bytes,
    layer_groups,
    learn,
    plan_path,
    read_ahead_bytes,
    steps_per_epoch,
)
from hfsoup.methods.learned_state import LEARNED_STATE, LearnedState, check_resumable, fingerprint
from hfsoup.methods.shared import make_scorer
from hfsoup.recipe import LearnedConfig
from hfsoup.report.model_index import task_model_index
from hfsoup.report.outputs import Scores, SoupResults, hardware_record
from hfsoup.report.summary import markdown_table
from hfsoup.tasks.classification import Scorer
from hfsoup.tasks.output_cache import record as record_cache
from hfsoup.units import parse_size

ALPHA_PNG = "learned_alpha.png"


# Progress lines: the CLI and the Space show them as "hfsoup: ..." lines.
_notices = logging.getLogger("hfsoup")


def plan_learned(
    config: LearnedConfig,
    indexes: Sequence[IngredientIndex],
    *,
    max_length: int,
    device: torch.device,
    memory_budget: str | int | None = None,
) -> PathPlan:
    """Estimate each path's memory and pick one, before any weight is read.

    Raises:
        InsufficientMemoryError: neither path (or the forced one) fits.
    """
    first = indexes[0]
    floats = [r for r in first.tensors.values() if r.dtype in FLOAT_DTYPES]
    if memory_budget is None:
        available, where = available_memory(device)
    else:
        try:
            available, where = parse_size(memory_budget), "memory_budget"
        except ValueError as exc:
            raise RecipeError(f"memory_budget: {exc}") from exc
    largest = max(ix.nbytes for ix in indexes)
    return plan_path(
        k=len(indexes), model_bytes=4 * sum(r.numel for r in floats),
        read_ahead=read_ahead_bytes(largest),
        activations=activation_bytes(first.config, batch_size=config.batch_size,
                                     max_length=max_length),
        available=available, available_from=where, forced=config.path,
    )  # fmt: skip


def prepare(ctx: MethodContext) -> tuple[PathPlan, Scorer]:
    """Before the output is staged: choose the path (refusing one that cannot fit) and load the
    task (timed as ``load_task``).

    Raises:
        RecipeError: an infinite learning rate.
        InsufficientMemoryError: neither path (or the forced one) fits.
    """
    config, task = ctx.config, ctx.recipe.task
    if not math.isfinite(config.lr):  # pydantic's gt=0 lets inf through
        raise RecipeError(f"learned.lr: must be a finite positive number, got {config.lr}")
    plan = plan_learned(config, ctx.indexes, max_length=task.max_length, device=ctx.device,
                        memory_budget=ctx.memory_budget)  # fmt: skip
    if ctx.resume:
        check_resumable(ctx.target, fingerprint(ctx.recipe, ctx.indexes, config, plan.path))
    t0 = time.perf_counter()
    scorer = make_scorer(task, ctx.indexes[0], progress=ctx.progress, cache=ctx.cache)
    ctx.timings["load_task"] = time.perf_counter() - t0
    check_task(scorer)
    return plan, scorer


def run_learned_soup(ctx: MethodContext) -> MethodOutcome:
    """Score the ingredients and their uniform soup, learn α and β, write the weights."""
    log = _notices.info if ctx.progress else (lambda _: None)
    (plan, scorer), config, k, timings = ctx.state, ctx.config, len(ctx.indexes), ctx.timings
    first = ctx.indexes[0].tensors
    floats = [n for n, r in first.items() if r.dtype in FLOAT_DTYPES]
    groups = layer_groups(floats) if config.by_layer else {WHOLE_MODEL: floats}
    labels, sel, metric = ctx.labels, scorer.selection_split, scorer.selection_metric
    session = SoupSession(
        ctx.indexes, device=ctx.device, allow_nonfinite=ctx.recipe.allow_nonfinite
    )
    t0 = time.perf_counter()
    individual = score_ingredients(session, scorer, labels=labels, log=log)
    timings["score_ingredients"] = time.perf_counter() - t0
    record_cache(scorer, timings)
    t0 = time.perf_counter()
    log("scoring the uniform soup")
    uniform = score_uniform(session, scorer)
    session.drop_sum()
    timings["uniform_soup"] = time.perf_counter() - t0

    seconds = _estimate_seconds(scorer, config, k, timings)
    log(_plan_line(plan, seconds))
    t0 = time.perf_counter()
    checkpoints = LearnedState(ctx.folder, fingerprint(ctx.recipe, ctx.indexes, config, plan.path))
    result = learn(
        session, scorer, groups=groups, path=plan.path, epochs=config.epochs, lr=config.lr,
        batch_size=config.batch_size, param=config.param, seed=ctx.recipe.seed, log=log,
        resume_from=checkpoints.load(), on_epoch=checkpoints.save,
    )  # fmt: skip
    timings["learn"] = time.perf_counter() - t0
    _check_converged(result, config)
    method = "learned_soup_by_layer" if config.by_layer else "learned_soup"
    learned = {
        s: scorer.scores(scorer.outputs(session.model, s), s) for s in ctx.recipe.task.splits
    }
    ensemble, greedy_ensemble, members = score_ensembles(scorer, k)
    best = best_index([scores[sel][metric] for scores in individual], scorer.direction)
    table = {"best_individual": individual[best], "uniform_soup": uniform, method: learned,
             "ensemble": ensemble, "greedy_ensemble": greedy_ensemble}  # fmt: skip
    targets, dtype = session.live.targets, ctx.dtype
    ctx.write_weights(
        lambda names: {
            n: targets[n].detach().to(output_dtype(first[n], dtype), copy=True).cpu() for n in names
        }
    )
    scores = Scores(ctx.recipe.task, individual, table, [labels[i] for i in members], (sel, metric))
    results = ctx.results(
        ingredient_weights(result, ctx.indexes[0]), hardware_record(Processes(), Placement.single(ctx.device)),
        scores=scores, record=_learned_record(result, config, plan, seconds),
    )  # fmt: skip
    if config.by_layer:
        plot_alpha(ctx.folder / ALPHA_PNG, result.weights, ingredients=labels, groups=list(groups))
    index = task_model_index(ctx.recipe, ctx.target, table, method, ctx.indexes[0].config)
    section = _card_section(results, labels, sel)
    return MethodOutcome(results, sections=[section], model_index=index or None,
                         scratch=[LEARNED_STATE])  # fmt: skip


def _check_converged(result: LearnedResult, config: LearnedConfig) -> None:
    if not (all(math.isfinite(x) for x in result.losses) and result.weights.isfinite().all()
            and math.isfinite(result.beta)):  # fmt: skip
        raise TaskError(
            f"the learned soup diverged (selection loss {result.losses[-1]}) with learning "
            f"rate {config.lr:g}; give a smaller learned.lr",
            options=["learned.lr"],
        )


def ingredient_weights(result: LearnedResult, first: IngredientIndex) -> list[float]:
    """One weight per ingredient: its α, or by layer its α averaged over parameters."""
    sizes = torch.tensor(
        [sum(first.tensors[n].numel for n in names) for names in result.groups.values()],
        dtype=torch.float64,
    )
    return (result.weights.double() @ sizes / sizes.sum()).tolist()


def _estimate_seconds(
    scorer: Any, config: LearnedConfig, k: int, timings: dict[str, Any]
) -> dict[str, float]:
    # A training step costs about three forward passes; one model was scored k times per split.
    examples = sum(scorer.split(s).size for s in scorer.task.splits)
    scored = k - timings.get("cache", {}).get("hits", 0)  # outputs not from the cache
    if scored > 0:
        forward = timings["score_ingredients"] / max(scored * examples, 1)
        read = max(timings["uniform_soup"] - timings["score_ingredients"] / scored, 0.0)
    else:  # every ingredient's outputs came from the cache: the uniform soup's pass bounds it
        forward, read = timings["uniform_soup"] / max(examples, 1), 0.0
    steps = config.epochs * steps_per_epoch(scorer.split(scorer.selection_split).size,
                                            config.batch_size)  # fmt: skip
    return estimate_seconds(
        steps=steps, step_seconds=3 * forward * config.batch_size, read_seconds=read
    )


def _plan_line(plan: PathPlan, seconds: dict[str, float]) -> str:
    other = "stream" if plan.path == "memory" else "memory"
    return (
        f"learned soup: {plan.path} path ({plan.reason}): needs ~{human_bytes(plan.needs[plan.path])}"
        f" of {human_bytes(plan.available)} ({plan.available_from}), ~{seconds[plan.path]:.0f} s; "
        f"{other} path: ~{human_bytes(plan.needs[other])}, ~{seconds[other]:.0f} s"
    )


def _learned_record(
    result: LearnedResult, config: LearnedConfig, plan: PathPlan, seconds: dict[str, float]
) -> dict[str, Any]:
    rows = result.weights.tolist()
    if config.by_layer:
        alpha: list = [dict(zip(result.groups, row, strict=True)) for row in rows]
    else:
        alpha = [row[0] for row in rows]
    estimate: dict[str, Any] = {
        path: {"bytes": plan.needs[path], "seconds": round(seconds[path], 3)} for path in plan.needs
    }
    estimate.update(
        available_bytes=plan.available, available_from=plan.available_from, reason=plan.reason
    )
    return {
        "alpha": alpha,
        "beta": result.beta,
        "groups": result.groups,
        "path": result.path,
        "by_layer": config.by_layer,
        "param": config.param,
        "epochs": config.epochs,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "steps": result.steps,
        "loss": result.losses,
        "estimate": estimate,
    }


def _card_section(results: SoupResults, labels: Sequence[str], sel: str) -> str:
    learned = results.record
    by_layer = learned["by_layer"]
    groups = list(learned["groups"]) if by_layer else ["α"]
    rows = learned["alpha"] if by_layer else [{"α": a} for a in learned["alpha"]]
    head = "| ingredient | " + " | ".join(groups) + " |"
    lines = [head, "|" + "---|" * (len(groups) + 1)]
    for label, row in zip(labels, rows, strict=True):
        lines.append(f"| `{label}` | " + " | ".join(f"{row[g]:.3f}" for g in groups) + " |")
    parametrisation = "softmax over ingredients" if learned["param"] == "softmax" else "free"
    text = [
        "## Scores",
        "",
        f"Mixing weights learned on split `{sel}`; the other splits are the report.",
        "",
        markdown_table(results.scores.table, selection_split=sel),
        "",
        "## Learned mixing weights",
        "",
        f"α ({parametrisation}, {'one per ingredient and layer' if by_layer else 'one per ingredient'}) "
        f"and temperature β = {learned['beta']:.3f} minimise the cross-entropy of β · logits on "
        f"`{sel}`: {learned['epochs']} epochs of Adam (lr {learned['lr']}, batch size "
        f"{learned['batch_size']}) from uniform weights, on the {learned['path']} path. "
        "The soup is Σ α_i θ_i.",
        "",
        *lines,
    ]
    if by_layer:
        text += ["", f"![learned α by layer]({ALPHA_PNG})"]
    return "\n".join(text)


def plot_alpha(
    path: Path, weights: torch.Tensor, *, ingredients: Sequence[str], groups: Sequence[str]
) -> None:
    """Heatmap of the learned α: ingredients down, layers across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, g = weights.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * g + 2.5), max(2.2, 0.45 * k + 1.2)), dpi=110)
    image = ax.imshow(weights.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(g), groups, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), ingredients, fontsize=8)
    middle = float(weights.min() + weights.max()) / 2  # viridis is dark below, light above
    if k * g <= 200:
        for i in range(k):
            for j in range(g):
                value = float(weights[i, j])
                dark = value < middle
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="α")
    ax.set_title("learned α by layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
