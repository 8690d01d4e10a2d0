"""Reporting scores: the comparison table, its markdown, the greedy trajectory plot, model-index.

Pure functions of the measured numbers: no network, no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

Scores = dict[str, dict[str, float]]
METHOD_NAMES = {
    "best_individual": "best individual",
    "uniform_soup": "uniform soup",
    "greedy_soup": "greedy soup",
    "greedy_soup_random_order": "greedy soup (random order)",
    "pretrained_base": "pretrained base (zero-shot head)",
    "learned_soup": "learned soup",
    "learned_soup_by_layer": "learned soup (by layer)",
    "ensemble": "ensemble (k× cost)",
    "greedy_ensemble": "greedy ensemble",
}
TRAJECTORY_PNG = "greedy_trajectory.png"


def markdown_table(table: dict[str, Scores], *, selection_split: str) -> str:
    """One row per method, one column per (split, metric); the selection split is marked."""
    columns = [(s, m) for s, metrics in next(iter(table.values())).items() for m in metrics]
    head = ["method"] + [
        f"{s}{' (selection)' if s == selection_split else ''} {m}" for s, m in columns
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, scores in table.items():
        cells = [
            f"{scores[s][m]:.4f}" if scores.get(s, {}).get(m) is not None else ""
            for s, m in columns
        ]
        lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(table: dict[str, Scores], *, selection_split: str) -> str:
    """The comparison table for a terminal."""
    columns = [(s, m) for s, metrics in next(iter(table.values())).items() for m in metrics]
    head = ["method"] + [f"{s}{'*' if s == selection_split else ''}:{m}" for s, m in columns]
    rows = [
        [METHOD_NAMES.get(k, k)] + [f"{v[s][m]:.4f}" for s, m in columns] for k, v in table.items()
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    note = "(* = selection split, used to choose; report the others)"
    return "\n".join([fmt.format(*head), *(fmt.format(*r) for r in rows), note])


def plot_trajectory(
    path: Path,
    trace: Sequence[dict[str, Any]],
    *,
    metric: str,
    best_individual: float,
    uniform: float,
) -> None:
    """Greedy soup score vs ingredients considered, with best individual and uniform as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, incumbent = [], [], None
    for i, step in enumerate(trace, 1):
        if step["accepted"] and step["score"] is not None:
            # An early acceptance whose exact score was never needed (None) is at least as
            # good as the incumbent: the line stays flat there.
            incumbent = step["score"]
        xs.append(i)
        ys.append(incumbent)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.step(xs, ys, where="post", marker="o", label="greedy soup", color="tab:green")
    rejected = [
        (i, s["score"])
        for i, s in enumerate(trace, 1)
        if not s["accepted"] and s["score"] is not None
    ]
    if rejected:
        ax.scatter(
            *zip(*rejected, strict=True), marker="x", color="tab:red", label="rejected candidate"
        )
    ax.axhline(best_individual, linestyle="--", color="tab:blue", label="best individual")
    ax.axhline(uniform, linestyle=":", color="tab:orange", label="uniform soup")
    ax.set_xlabel("ingredients considered")
    ax.set_ylabel(f"selection {metric}")
    ax.set_xticks(xs)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_index(
    name: str, table: dict[str, Scores], method: str, *, dataset: str, config: str | None,
    report_splits: Sequence[str], task_type: str | None, revision: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """``model-index`` eval results for the soup on the report splits (huggingface_hub's format).

    ``dataset`` is a Hub dataset ID and ``revision`` the commit its scores were read from.
    """
    from huggingface_hub import EvalResult, ModelCardData

    results = [
        EvalResult(
            task_type=task_type or "text-classification",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_config=config,
            dataset_split=split,
            dataset_revision=revision,
            metric_type=metric,
            metric_value=value,
        )
        for split in report_splits
        for metric, value in table[method].get(split, {}).items()
    ]
    if not results:
        return []
    return ModelCardData(model_name=name, eval_results=results).to_dict()["model-index"]


def plot_search(path: Path, search: Sequence[dict[str, Any]], *, metric: str) -> None:
    """The coefficient search's curve: selection score against the scale (λ or α), one line per
    density; early-rejected points (no score) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = "alpha" if "alpha" in search[0]["params"] else "lambda"
    lines: dict[Any, list] = {}
    for r in search:
        if r["score"] is not None:
            lines.setdefault(r["params"].get("density"), []).append(
                (r["params"][scale], r["score"])
            )
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for density, pts in lines.items():
        label = f"density {density:g}" if density is not None else None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel(scale)
    ax.set_ylabel(f"selection {metric}")
    if any(d is not None for d in lines):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
