"""What the scored methods (greedy, learned) and ``hfsoup.evaluate`` share, so that no method
imports another's module (the card's model-index of a scored soup is
:func:`hfsoup.report.model_index.task_model_index`)."""

from __future__ import annotations

from typing import Any

from hfsoup.compute.distributed import Processes
from hfsoup.io.refs import IngredientIndex
from hfsoup.tasks.kinds import TaskScorer, get_kind
from hfsoup.tasks.output_cache import attach


def make_scorer(
    task: Any,
    first: IngredientIndex,
    *,
    progress: bool,
    processes: Processes | None = None,
    cache: bool | None = None,
) -> TaskScorer:
    """A scorer using the first ingredient's tokenizer / image processor (pinned to its SHA).

    With several processes the main one loads (and caches) the data first, the others then
    read it from the cache. The scorer gets an outputs cache across runs
    (:mod:`hfsoup.tasks.output_cache`), disabled by ``cache=False`` (``--no-cache``) and
    under ``accelerate launch``.
    """
    procs = processes or Processes()
    if first.adapter is not None:  # a LoRA adapter: the tokenizer and labels are its base's
        first = first.adapter.base
    spec = first.ingredient.spec
    source = str(spec.path) if spec.path is not None else spec.repo
    if not procs.is_main:
        procs.barrier()
    scorer = get_kind(task.kind).prepare(
        task, source, revision=first.ingredient.sha, progress=progress, processes=procs
    )
    if procs.is_main:
        procs.barrier()
    attach(scorer, enabled=cache is not False and not procs.distributed)
    return scorer
