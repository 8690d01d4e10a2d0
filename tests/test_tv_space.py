"""The Space and the methods that need a base model θ₀ (issue 17): the page has no base field,
so the task-vector merges are not offered (any registered method that needs a base, too), and
the greedy soup it offers is the plain average (no ``combine``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "space_app"))

from capabilities import registered_methods  # noqa: E402  (space_app is run as a folder)
from logic import method_choices  # noqa: E402

from hfsoup.registry import MergeMethod, get_method, method_names, register, unregister  # noqa: E402


def test_no_method_that_needs_a_base_is_offered():
    needing = {n for n in method_names() if get_method(n).needs_base}
    assert {"task_arithmetic", "ties", "dare_linear", "dare_ties", "wise_ft"} <= needing
    offered = {m.name for m in method_choices({"methods": registered_methods(learned=True)})}
    assert offered and not offered & needing
    assert {"uniform", "greedy", "learned"} <= offered


def test_a_method_registered_with_needs_base_is_hidden_too():
    register(MergeMethod("toy-base", "a toy method that needs a base", needs_base=True))
    try:
        offered = [m["name"] for m in registered_methods(learned=False)]
    finally:
        unregister("toy-base")
    assert "toy-base" not in offered


def test_the_greedy_soup_the_page_runs_takes_no_base():
    from hfsoup.recipe import Recipe

    # The page sends no combine: greedy's base_for says no base is needed (nor taken).
    recipe = Recipe.model_validate({"method": "greedy", "ingredients": ["org/a", "org/b"]})
    assert get_method("greedy").base_for(recipe) is False
