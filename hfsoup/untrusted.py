"""What a recipe read from a soup may make hfsoup do: read what it names, nothing else unasked.

A soup's card (and the ``hfsoup_recipe.yaml`` beside its weights) is written by whoever pushed
the soup. Rebuilding from it must not write or publish anywhere the user did not name, nor read
the user's own files. So a recipe from a soup (:attr:`hfsoup.recipe.Recipe.from_soup`):

- chooses no output folder, push target or privacy (:func:`hfsoup.recipe.load_recipe` drops
  them; the caller gives ``output`` and, to push, ``push_to``);
- may not name local things without ``allow_local``: ingredient folders, a local dataset
  (a folder, or files on this machine or storage other than the Hub and http(s) URLs), dataset
  options other than ``path``, ``name``, ``revision``, ``data_files`` and ``data_dir``
  (``cache_dir`` writes, ``storage_options`` reaches other storage), local metric scripts;
- may not name community metrics (code from a Space): copy the recipe into a file of your own;
- is announced before anything is read: :func:`plan_lines`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hfsoup.errors import HfsoupError, RecipeError
from hfsoup.ingredients import IngredientEntry, to_spec
from hfsoup.recipe import Recipe

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_REMOTE = ("hf://", "http://", "https://")
# Keys of a task's dataset mapping a soup's recipe may set (all others need allow_local).
_DATASET_KEYS = {"path", "name", "revision", "data_files", "data_dir"}
_CANONICAL_METRICS = "evaluate-metric/"
_SHOWN = 8  # ingredients named in the plan line before "and N more"


def check_soup_recipe(recipe: Recipe, *, allow_local: bool = False) -> None:
    """Refuse what a recipe from a soup may not do unasked; nothing for other recipes.

    Raises:
        RecipeError: the recipe names something local (without ``allow_local``) or a community
            metric, saying which and where it came from.
    """
    if recipe.from_soup is None:
        return
    if not allow_local:
        for what in local_reads(recipe):
            raise RecipeError(
                f"the recipe from {recipe.from_soup} names {what}; a soup's recipe reads only "
                "from the Hub unless allow_local is set",
                options=["allow_local"],
            )
    for metric in recipe.task.metrics if recipe.task is not None else ():
        if "/" in metric and not _is_path(metric) and not metric.startswith(_CANONICAL_METRICS):
            raise RecipeError(
                f"the recipe from {recipe.from_soup} names the community metric {metric!r}, "
                "which runs code from that Space; copy the recipe into a file of your own to use it"
            )


def check_resolved(
    recipe: Recipe, labels: Sequence[tuple[str, bool]], *, allow_local: bool
) -> None:
    """Refuse a soup's recipe whose ingredients resolved to local folders (``(label, local)``).

    :func:`check_soup_recipe` refuses what is written as a path; this catches any ingredient
    that resolution itself turned into a local folder.
    """
    if recipe.from_soup is None or allow_local:
        return
    for label, local in labels:
        if local:
            raise RecipeError(
                f"the recipe from {recipe.from_soup} names the local folder {label} as an "
                "ingredient; a soup's recipe reads only from the Hub unless allow_local is set",
                options=["allow_local"],
            )


def local_reads(recipe: Recipe) -> list[str]:
    """What in ``recipe`` would be read from this machine (or set dataset options), in words."""
    found = [
        f"the local folder {entry.repo!r} as an ingredient"
        for entry in recipe.ingredients
        if _local_ingredient(entry)
    ]
    if recipe.base is not None and _local_ingredient(recipe.base):
        found.append(f"the local folder {recipe.base.repo!r} as the base model")
    task = recipe.task
    if task is None:
        return found
    dataset = task.dataset
    if isinstance(dataset, str):
        if _local_path(dataset):
            found.append(f"the local dataset {dataset!r}")
    else:
        path = str(dataset.get("path", ""))
        in_repo = _HUB_ID.match(path) is not None and not _local_path(path)
        if _local_path(path):
            found.append(f"the local dataset {path!r}")
        for key in sorted(set(dataset) - _DATASET_KEYS):
            found.append(f"the dataset option task.dataset.{key}")
        for key in ("data_files", "data_dir"):
            for value in _strings(dataset.get(key)):
                if _local_file(value, in_repo=in_repo):
                    found.append(f"the local data file {value!r} (task.dataset.{key})")
    found += [f"the local metric script {m!r}" for m in task.metrics if _is_path(m)]
    return found


def plan_lines(
    recipe: Recipe, *, output: str | Path, push_to: str | None, private: bool
) -> list[str]:
    """What a soup's recipe will read and write, in two lines (for a notice before the run)."""
    source = recipe.from_soup
    names = [e.text for e in recipe.ingredients]
    shown = ", ".join(names[:_SHOWN]) + (
        f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    )
    reads = f"recipe from {source}: reads {shown}"
    if recipe.base is not None:
        reads += f"; base {recipe.base.text}"
    if recipe.task is not None:
        reads += f"; dataset {_describe_dataset(recipe.task)}"
    if recipe.allow_nonfinite:
        reads += "; averages NaN/Inf weights (allow_nonfinite)"
    if push_to:
        pushes = f"pushes to {push_to}" + (" (private)" if private else "")
    else:
        named = recipe.soup_output.push_to if recipe.soup_output else None
        pushes = "pushes nowhere " + (
            f"(the card's push_to {named} is not used; --push-to to push)"
            if named
            else "(--push-to to push)"
        )
    return [reads, f"recipe from {source}: writes {output}; {pushes}"]


def _describe_dataset(task: Any) -> str:
    dataset = task.dataset
    if isinstance(dataset, str):
        return dataset + (f" ({task.config})" if task.config else "")
    files = [*_strings(dataset.get("data_files")), *_strings(dataset.get("data_dir"))]
    return f"{dataset.get('path')} files {', '.join(files[:_SHOWN])}".rstrip()


def _local_ingredient(entry: IngredientEntry) -> bool:
    """Written as a path (as hfsoup reads ingredients), or a folder of that name exists."""
    text = entry.text
    repo = text.partition("@")[0]
    if _is_path(text) or "\\" in text or repo.count("/") > 1 or ".." in Path(repo).parts:
        return True
    try:
        return to_spec(entry).path is not None
    except HfsoupError:  # malformed: the run reports it in its own words
        return False


def _is_path(text: str) -> bool:
    """Written as a path: absolute, or starting with ``.``, ``~`` (what hfsoup reads as local)."""
    return text.startswith((".", "/", "~")) or Path(text).is_absolute()


def _local_path(text: str) -> bool:
    """A dataset ``path`` that ``datasets`` would read from this machine."""
    if not text or _is_path(text) or "\\" in text:
        return bool(text)
    try:
        return Path(text).expanduser().exists()
    except OSError:
        return True


def _local_file(value: str, *, in_repo: bool) -> bool:
    """A ``data_files``/``data_dir`` entry outside the Hub (inside the repo when ``in_repo``)."""
    if value.startswith(_REMOTE):
        return False
    if "://" in value or _is_path(value) or "\\" in value:
        return True
    return not in_repo or ".." in Path(value).parts


def _strings(value: Any) -> Iterator[str]:
    """Every string in a ``data_files``-like value (a string, a list, or a mapping of them)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif value is not None:
        yield str(value)
