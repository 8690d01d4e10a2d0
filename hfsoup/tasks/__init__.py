"""Scoring for greedy soups and the paper's baselines: tasks, data, metrics, scorer, ensembles.

- :mod:`~hfsoup.tasks.task`: what to score on (:class:`Task`, GLUE presets, hygiene).
- :mod:`~hfsoup.tasks.data`: load the splits, carve the holdout, apply ``limit``.
- :mod:`~hfsoup.tasks.preprocess`: tokenize / process images once per split.
- :mod:`~hfsoup.tasks.metrics`: ``evaluate`` metrics with bundled fallbacks.
- :mod:`~hfsoup.tasks.kinds`: the task-kind protocol and registry, which way is better.
- :mod:`~hfsoup.tasks.batches`: run a model over a split's batches (alone or data-parallel).
- :mod:`~hfsoup.tasks.classification`: the classification kind (outputs, scores, exact
  early rejection, the learned soup's loss).
- :mod:`~hfsoup.tasks.ensemble`: ensemble and greedy ensemble of cached outputs.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> defining module. Imported on first use, so that the light modules (task,
# kinds) do not pull in datasets, evaluate and transformers.
_EXPORTS = {
    "holdout_indices": "data",
    "load_task_splits": "data",
    "ensemble": "ensemble",
    "greedy_ensemble": "ensemble",
    "reaches": "ensemble",
    "compute": "metrics",
    "is_mean_over_examples": "metrics",
    "load_metric": "metrics",
    "PreparedSplit": "preprocess",
    "load_preprocessor": "preprocess",
    "prepare_split": "preprocess",
    "Scorer": "classification",
    "required_count": "classification",
    "Direction": "kinds",
    "EarlyStop": "kinds",
    "Tally": "kinds",
    "TaskKind": "kinds",
    "TaskScorer": "kinds",
    "get_kind": "kinds",
    "kind_names": "kinds",
    "register_kind": "kinds",
    "unregister_kind": "kinds",
    "PRESETS": "task",
    "Holdout": "task",
    "Task": "task",
    "glue_task": "task",
    "resolve_task": "task",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
