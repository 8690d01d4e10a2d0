"""The ``model-index`` of a scored soup's card: its scores on the task's report splits.

The one report step that talks to the Hub (through :func:`hfsoup.io.hub.dataset_commit`): a
Hub dataset is named at the commit its revision points at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hfsoup.io.hub import dataset_commit, hub_dataset
from hfsoup.recipe import Recipe
from hfsoup.report.card import pipeline_tag
from hfsoup.report.summary import model_index


def task_model_index(
    recipe: Recipe, target: Path, table: dict[str, Any], method: str, config: dict
) -> list[dict[str, Any]]:
    """``model-index`` results of ``method``'s row of ``table`` on the task's report splits.

    Only for a Hub dataset, with the commit it points at (else the revision asked for): the
    Hub's model-index names datasets by Hub ID, so local data files give none.
    """
    task = recipe.task
    found = hub_dataset(task.dataset)
    if found is None:
        return []
    dataset, revision = found
    return model_index(
        recipe.name or target.name, table, method, dataset=dataset, config=task.config,
        report_splits=task.report_splits, task_type=pipeline_tag(config),
        revision=dataset_commit(dataset, revision) or revision,
    )  # fmt: skip
