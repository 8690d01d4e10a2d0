"""What the scored methods (greedy, learned) and ``hfsoup.evaluate`` share, so that no method
imports another's module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hfsoup.compute.distributed import Processes
from hfsoup.io.refs import IngredientIndex
from hfsoup.recipe import Recipe
from hfsoup.report.summary import model_index
from hfsoup.tasks.scorer import Scorer


def make_scorer(
    task: Any, first: IngredientIndex, *, progress: bool, processes: Processes | None = None
) -> Scorer:
    """A scorer using the first ingredient's tokenizer / image processor (pinned to its SHA).

    With several processes the main one loads (and caches) the data first, the others then
    read it from the cache.
    """
    procs = processes or Processes()
    spec = first.ingredient.spec
    source = str(spec.path) if spec.path is not None else spec.repo
    if not procs.is_main:
        procs.barrier()
    scorer = Scorer.from_pretrained(
        task, source, revision=first.ingredient.sha, progress=progress, processes=procs
    )
    if procs.is_main:
        procs.barrier()
    return scorer


def task_model_index(
    recipe: Recipe, target: Path, table: dict[str, Any], method: str, config: dict
) -> list[dict[str, Any]]:
    """``model-index`` results of ``method``'s row of ``table`` on the task's report splits.

    Only for a Hub dataset, with the commit it points at (else the revision asked for): the
    Hub's model-index names datasets by Hub ID, so local data files give none.
    """
    from hfsoup.io.hub import dataset_commit, hub_dataset
    from hfsoup.report.card import pipeline_tag

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
