"""What the installed hfsoup offers the page, asked in the worker process.

The merge methods come from hfsoup's method registry (so a method registered there is offered
without a change here); a release without the registry, or without learned soups, gets the
page's older defaults.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def supports_learned() -> bool:
    """Whether the installed hfsoup makes learned soups.

    Releases without them refuse a learned recipe up front with "not available"; one with them
    gets further and fails on the probe's missing local ingredient. Nothing is read or written.
    """
    from hfsoup import api
    from hfsoup.errors import HfsoupError, RecipeError
    from hfsoup.recipe import Recipe

    with tempfile.TemporaryDirectory() as tmp:
        probe = Recipe(
            method="learned",
            ingredients=[{"repo": str(Path(tmp, "missing"))}],
            output={"dir": str(Path(tmp, "out"))},
        )
        try:
            api.run(probe, progress=False, device="cpu")
        except RecipeError as exc:
            return "not available" not in str(exc)
        except HfsoupError:
            return True
    return True


def registered_methods(learned: bool) -> list[dict[str, Any]]:
    """The merge methods of hfsoup's registry that the page can set up (``learned`` only when
    it makes learned soups; methods that need a base model wait for a base input on the page)."""
    try:
        from hfsoup.registry import get_method, method_names
    except ImportError:  # a release without the registry: the page's own default list
        return []
    methods = [get_method(name) for name in method_names()]
    return [
        {"name": m.name, "summary": m.summary, "needs_task": m.needs_task}
        for m in methods
        if (m.name != "learned" or learned) and not getattr(m, "needs_base", False)
    ]


def needs_task(method: str) -> bool:
    """Whether ``method`` scores on a task (from the registry; any but uniform without one)."""
    try:
        from hfsoup.registry import get_method
    except ImportError:
        return method != "uniform"
    return get_method(method).needs_task
