"""Load a task's splits with ``datasets``: holdout carving, ``limit`` and column checks.

The result maps each split a task scores (selection first, then report splits) to a
``datasets.Dataset``. Nothing here knows about models or tokenizers; see
:mod:`hfsoup.tasks.preprocess`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError

from hfsoup.errors import HubConnectionError, TaskError
from hfsoup.tasks.task import HOLDOUT_SPLIT, Task


def load_task_splits(task: Task) -> dict[str, datasets.Dataset]:
    """Every split ``task`` scores, ready to preprocess.

    Each needed dataset split is loaded once with ``datasets.load_dataset`` (a Hub ID goes
    through ``HF_ENDPOINT``; a mapping is passed as keyword arguments, e.g. local parquet files).
    With ``task.holdout``, the selection split is carved out of ``holdout.from`` and a report
    split of that name gets only the remaining rows. Then ``limit`` keeps the first rows of each
    split, and the input and label columns are checked.

    Args:
        task: The task.

    Returns:
        ``{split name: dataset}`` in the order of ``task.splits`` (selection first).

    Raises:
        TaskError: A split cannot be loaded, or lacks a column the task names.
        HubConnectionError: The Hub could not be reached.

    Example:
        ```py
        >>> splits = load_task_splits(resolve_task("glue/sst2", limit=100))
        >>> list(splits), len(splits["validation"])
        (['holdout', 'validation'], 100)
        ```
    """
    sources = {name: _load_split(task, name) for name in task.source_splits()}
    out: dict[str, datasets.Dataset] = {}
    if task.holdout is not None:
        source = task.holdout.from_
        held, rest = split_holdout(sources[source], task.holdout.fraction, task.holdout.seed)
        out[HOLDOUT_SPLIT] = held
        sources[source] = rest
    for name in task.splits:
        out.setdefault(name, sources.get(name))
    for name, dataset in out.items():
        if task.limit is not None and len(dataset) > task.limit:
            dataset = out[name] = dataset.select(range(task.limit))
        check_columns(dataset, task.data_columns, split=name)
    return out


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of a seeded holdout of ``n`` rows: (held out, remaining), each ascending.

    ``round(fraction * n)`` rows are held out (at least one, and at least one remains). The
    choice depends only on ``(n, fraction, seed)``: numpy's PCG64 permutation of ``range(n)``.

    Raises:
        TaskError: Fewer than two rows to split.
    """
    if n < 2:
        raise TaskError(f"cannot hold out a part of a split with {n} row(s)")
    k = min(max(round(fraction * n), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[:k].tolist()), sorted(order[k:].tolist())


def split_holdout(
    dataset: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``dataset`` into (held out, remaining) with :func:`holdout_indices`."""
    held, rest = holdout_indices(len(dataset), fraction, seed)
    return dataset.select(held), dataset.select(rest)


def check_columns(dataset: datasets.Dataset, columns: list[str], *, split: str) -> None:
    """Raise TaskError naming the first of ``columns`` that ``dataset`` lacks, and what it has."""
    for column in columns:
        if column not in dataset.column_names:
            names = dataset.column_names
            shown = ", ".join(names[:20]) + (
                f" (and {len(names) - 20} more)" if len(names) > 20 else ""
            )
            raise TaskError(
                f"column {column!r} not found in split {split!r}; its columns are: {shown}"
            )


def _load_split(task: Task, split: str) -> datasets.Dataset:
    kwargs: dict[str, Any] = (
        dict(task.dataset) if isinstance(task.dataset, dict) else {"path": task.dataset}
    )
    if task.config is not None:
        kwargs.setdefault("name", task.config)
    label = kwargs["path"] if isinstance(task.dataset, str) else f"{kwargs['path']} files"
    try:
        # datasets logs a failure to read a file at ERROR level before it raises: the error
        # below says it once, on one line, with the cause datasets wraps.
        with _datasets_quiet():
            return datasets.load_dataset(**kwargs, split=split)
    except ConnectionError as err:
        from hfsoup.io.hfcache import offline

        if offline():
            raise HubConnectionError(
                f"dataset {label!r} is not in the datasets cache, and HF_HUB_OFFLINE=1 forbids "
                "downloading it; load it once where the Hub can be reached (datasets.load_dataset)"
            ) from err
        raise HubConnectionError(
            f"cannot reach the Hub for dataset {label!r}: {_line(err)}"
        ) from err
    except Exception as err:  # datasets raises many types (ValueError, DatasetNotFoundError, ...)
        raise TaskError(f"cannot load split {split!r} of dataset {label!r}: {_line(err)}") from err


@contextmanager
def _datasets_quiet() -> Iterator[None]:
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _line(err: BaseException) -> str:
    # DatasetGenerationError says only "An error occurred while generating the dataset": the
    # cause (a file that does not parse, columns that disagree between files) is what helps.
    cause = err.__cause__
    if isinstance(err, DatasetGenerationError) and cause is not None:
        return f"{_first_line(err)}: {_first_line(cause)}"
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 300 else line[:300] + "..."
