"""Ingredients: what the user names, as a recipe writes it and as hfsoup reads it.

An ingredient is written ``org/name``, ``org/name@revision`` (a branch, tag, commit or
``refs/pr/1``), a local directory, or in a recipe ``{repo, revision, weight}``. Two classes,
one the serialised form of the other:

- :class:`IngredientEntry` is only the written form: a recipe's ``ingredients`` item (pydantic,
  so a recipe and a card's pinned ``{repo, revision, weight}`` validate with it) and what
  :func:`to_entry` writes back;
- :class:`IngredientSpec` is the one type hfsoup works with once an entry is read: a Hub repo at
  an optional revision, or a local directory (with the folder a repo ID may fall back to), with
  its weight. :func:`hfsoup.io.hub.resolve` takes it.

:func:`to_spec` is the one conversion (an entry, a dict, a string or a path to a spec), through
:func:`parse_ingredient`; :func:`split_revision` is the one place an ``@`` is read. Nothing here
talks to the Hub: :func:`hfsoup.io.hub.resolve` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from hfsoup.errors import IngredientNotFoundError, IngredientSpecError

HPARAMS_FILE = "hfsoup_hparams.json"
"""The hyperparameters an ``hfsoup sweep`` ingredient records (shown in a soup's card)."""

# A Hub repo ID: optional namespace, then a name; '@' separates an optional revision.
_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
# How a local folder is written: ./x, ../x, /abs, ~/x, ~user, . or .., C:\x; any backslash.
_PATH_RE = re.compile(r"^(?:\.\.?(?:[/\\]|$)|[/\\~]|[A-Za-z]:[/\\])")


@dataclass(frozen=True)
class IngredientSpec:
    """What the user asked for: a repo ID with an optional revision, or a local directory.

    ``local_fallback`` is a folder in the working directory named like the repo ID: it is read
    only when the Hub has no such repo (see :func:`hfsoup.io.hub.resolve`).
    """

    repo: str | None = None
    revision: str | None = None
    path: Path | None = None
    weight: float | None = None
    local_fallback: Path | None = None

    @property
    def label(self) -> str:
        """How the ingredient is named in messages, tables and cards."""
        if self.path is not None:
            return str(self.path)
        return f"{self.repo}@{self.revision}" if self.revision else str(self.repo)


def looks_like_path(text: str) -> bool:
    """Whether ``text`` is written as a path (``./x``, ``../x``, ``/abs``, ``~/x``, ``.``, a
    Windows drive or backslash path) rather than as a Hub repo ID."""
    return bool(_PATH_RE.match(text)) or "\\" in text


def parse_ingredient(text: str, *, weight: float | None = None) -> IngredientSpec:
    """Parse ``org/name``, ``org/name@revision`` or a local directory.

    A string written as a path (:func:`looks_like_path`) is a local directory. A string shaped
    like a repo ID names the Hub repo, even when a folder of that name exists in the working
    directory: that folder is only a fallback, used (with a warning) if the Hub has no such
    repo. Any other string is a local directory if one exists.

    Args:
        text: the ingredient as the user wrote it.
        weight: optional mixing weight, carried along unchanged.

    Returns:
        An :class:`IngredientSpec`.

    Raises:
        IngredientSpecError: the string is neither a repo ID nor an existing directory.
        IngredientNotFoundError: it looks like a path but no such directory exists.

    Example:
        >>> parse_ingredient("org/ft-1@v2").revision
        'v2'
        >>> parse_ingredient("./org/ft-1").path is not None  # doctest: +SKIP
        True
    """
    text = text.strip()
    if not text:
        raise IngredientSpecError("empty ingredient: give 'org/name' or a local directory")
    local = Path(text).expanduser()
    if looks_like_path(text):
        if not _is_dir(local):
            raise IngredientNotFoundError(f"ingredient {text!r}: no such local directory")
        return IngredientSpec(path=local.resolve(), weight=weight)
    repo, revision = split_revision(text)
    # A revision may hold slashes (refs/pr/1, feature/x); only the repo part may not.
    if _REPO_RE.match(repo) and revision != "" and ".." not in repo:
        invalid = _invalid_repo_id(repo)
        if invalid is None:
            fallback = local.resolve() if _is_dir(local) else None
            return IngredientSpec(
                repo=repo, revision=revision or None, weight=weight, local_fallback=fallback
            )
        if not _is_dir(local):  # a folder of that name is meant: no Hub repo can have it
            shown = text if len(text) <= 120 else f"{text[:100]}... ({len(text)} characters)"
            raise IngredientSpecError(f"ingredient {shown!r} is not a valid Hub repo ID: {invalid}")
    if _is_dir(local):  # not a repo ID, so it cannot hide one
        return IngredientSpec(path=local.resolve(), weight=weight)
    if text.startswith(".") or repo.count("/") > 1:
        raise IngredientNotFoundError(f"ingredient {text!r}: no such local directory")
    raise IngredientSpecError(
        f"ingredient {text!r} is not 'org/name', 'org/name@revision' or a local directory"
    )


def _invalid_repo_id(repo: str) -> str | None:
    """Why the Hub would refuse ``repo`` as a repo ID (huggingface_hub's rules), or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        # huggingface_hub quotes the ID again at the end; once (in the caller) is enough.
        reason = " ".join(str(exc).split())
        return reason.replace(f": '{repo}'", "").replace(f"'{repo}'", "it").rstrip(" .:")
    return None


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, False for a name the system cannot even look up (too long, NUL)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def split_revision(text: str) -> tuple[str, str | None]:
    """``"org/name@v2"`` -> ``("org/name", "v2")``; no ``@``: revision ``None``; a trailing
    ``@``: revision ``""`` (which :func:`parse_ingredient` refuses and a recipe drops)."""
    repo, sep, revision = text.partition("@")
    return repo, revision if sep else None


class IngredientEntry(BaseModel):
    """One ingredient as a recipe writes it: a repo ID (or local directory), an optional
    revision and weight. A string item (``org/name@v2``) is read into ``repo`` and ``revision``."""

    model_config = ConfigDict(extra="forbid")

    repo: str
    revision: str | None = None
    weight: float | None = None

    @property
    def text(self) -> str:
        """``org/name@revision`` (or ``org/name``), as it is given to :func:`parse_ingredient`."""
        return f"{self.repo}@{self.revision}" if self.revision else self.repo

    @classmethod
    def from_item(cls, value: Any) -> Any:
        """A recipe item as the model validates it: a string becomes ``{repo, revision}``;
        anything else is left for validation to judge."""
        if isinstance(value, str):
            repo, revision = split_revision(value)
            return {"repo": repo, "revision": revision or None}
        return value


IngredientLike = str | Path | IngredientSpec | IngredientEntry | dict
"""Anything the Python API accepts as an ingredient."""


def to_spec(item: IngredientLike) -> IngredientSpec:
    """The :class:`IngredientSpec` an API argument names (a string, a local folder as a
    :class:`~pathlib.Path`, an entry or its dict, or a spec, returned as it is).

    Raises:
        IngredientSpecError, IngredientNotFoundError: as :func:`parse_ingredient`.
        pydantic.ValidationError: a dict that is not an entry.
    """
    if isinstance(item, IngredientSpec):
        return item
    if isinstance(item, dict):
        item = IngredientEntry.model_validate(item)
    if isinstance(item, IngredientEntry):
        return parse_ingredient(item.text, weight=item.weight)
    return parse_ingredient(str(item))  # a string, or a local folder as a Path


def to_entry(item: IngredientLike) -> dict[str, Any]:
    """The recipe entry (``{repo, revision, weight}``) of an API argument, read and checked as
    :func:`to_spec` reads it; a local folder's ``repo`` is its absolute path."""
    spec = to_spec(item)
    repo = spec.repo if spec.path is None else str(spec.path)
    return {"repo": repo, "revision": spec.revision, "weight": spec.weight}
