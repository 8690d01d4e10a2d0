"""The merge-method registry: a method is a value, registered by name.

Everything that lists or describes methods (the CLI's ``--method`` choices, the recipe's
``method`` values, the card's method text, the Space's method list) reads this registry, so a
new method is one file that calls :func:`register` plus one import line in
:mod:`hfsoup.methods`.

>>> from hfsoup.methods.registry import get_method, method_names
>>> method_names()[:3]
['uniform', 'greedy', 'learned']
>>> get_method("greedy").needs_task
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from hfsoup.errors import RecipeError


@dataclass(frozen=True)
class MergeMethod:
    """One way of turning ingredients into a soup.

    Attributes:
        name: The ``--method`` / recipe ``method`` value.
        summary: One line for ``--help``, the Space and the card.
        needs_task: Whether it scores on a task (greedy, learned) or not (uniform).
        needs_base: Whether it needs a base model (task-vector methods).
        config: Its options, a pydantic model with ``extra="forbid"`` (None: no options).
        run: ``run(ctx) -> outcome``: runs the method inside the pipeline (see
            :mod:`hfsoup.pipeline`).
    """

    name: str
    summary: str
    needs_task: bool = False
    needs_base: bool = False
    config: type[BaseModel] | None = None
    run: Callable[..., Any] | None = None


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` under its name (a second registration of a name replaces the first)."""
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests register toy methods and take them away again)."""
    _METHODS.pop(name, None)


def method_names() -> list[str]:
    """The registered methods' names, in registration order."""
    _load_builtin()
    return list(_METHODS)


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``.

    Raises:
        RecipeError: no method of that name, naming the known ones.
    """
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown method {name!r} (use {', '.join(_METHODS)})") from None


def _load_builtin() -> None:
    import hfsoup.methods  # noqa: F401  (registers the built-in methods on import)
