"""The merge-method registry: a method is a value, registered by name.

Everything that lists or describes methods (the CLI's ``--method`` choices, the recipe's
``method`` values, the card's method text, the Space's method list) reads this registry, so a
new method is one file that calls :func:`register` plus one import line in
:mod:`hfsoup.methods`. What the pipeline hands a method, and what it hands back, is in
:mod:`hfsoup.methods.context`.

>>> from hfsoup.registry import get_method, method_names
>>> method_names()[:3]
['uniform', 'greedy', 'learned']
>>> get_method("greedy").needs_task
True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from hfsoup.errors import RecipeError

if TYPE_CHECKING:
    from hfsoup.check.estimates import EstimateInput, Peak
    from hfsoup.recipe import Recipe

# A method's ``run(ctx)`` / ``prepare(ctx)`` take a hfsoup.methods.context.MethodContext; the
# registry sits below the methods (the recipe and the card read it), so it names no type of theirs.
MethodContext = MethodOutcome = Any


@dataclass(frozen=True)
class MergeMethod:
    """One way of turning ingredients into a soup.

    Attributes:
        name: The ``--method`` / recipe ``method`` value.
        summary: One line for ``--help`` and the Space.
        run: ``run(ctx) -> MethodOutcome``: inside the staged output folder ``ctx.folder``,
            write the soup's weights and return its results (see :mod:`hfsoup.methods.context`).
        card: The card's "Method:" sentence (default: ``summary``).
        needs_task: Whether it scores on a task (greedy, learned) or not (uniform).
        needs_base: Whether it needs a base model (task-vector methods).
        chooses_weights: How it sets the mixing weights itself (``"learns the weights"``);
            empty when it takes the user's weights.
        rejects: A weight of 0 means it left the ingredient out (the card marks it rejected).
        config: Its options, a pydantic model with ``extra="forbid"`` (None: no options).
        options_key: The recipe block that holds ``config`` (``"learned"``); None: the config's
            fields are read from the recipe's top-level keys of the same names.
        run_options: The :func:`hfsoup.run` options that apply only to methods naming them
            (``"resume"``, ``"memory_budget"``).
        one_device: It runs in one process on one device in float32.
        estimate: ``estimate(EstimateInput) -> Peak``: its peak memory, from headers alone, for
            ``hfsoup inspect`` (see :mod:`hfsoup.check.estimates`); None: no estimate yet.
        prepare: ``prepare(ctx) -> state``, run before the output folder is staged (load the
            task, plan memory): what fails there leaves nothing on disk. Its value is
            ``ctx.state`` when ``run`` is called.
        base_for: ``base_for(recipe) -> bool``: whether this recipe of the method needs a base
            (greedy does with ``combine``); None: ``needs_base`` says.
        check: ``check(recipe)``: the method's own refusals of option combinations, raising
            :class:`RecipeError` (run before the base and coefficient checks).
    """

    name: str
    summary: str
    run: Callable[[MethodContext], MethodOutcome] | None = None
    card: str = ""
    needs_task: bool = False
    needs_base: bool = False
    chooses_weights: str = ""
    rejects: bool = False
    config: type[BaseModel] | None = None
    options_key: str | None = None
    run_options: frozenset[str] = frozenset()
    one_device: bool = False
    prepare: Callable[[MethodContext], Any] | None = None
    estimate: Callable[[EstimateInput], Peak] | None = None
    base_for: Callable[[Recipe], bool] | None = None
    check: Callable[[Recipe], None] | None = None

    @property
    def card_text(self) -> str:
        """The card's sentence about this method."""
        return self.card or self.summary

    def check_coefficients(self, recipe: Recipe, *, adapters: bool | None = False) -> None:
        """Refuse a base model for a method that takes none (or none for one that needs it),
        and a task-vector coefficient (``lambda``, ``density``, ``alpha``) it does not take.

        ``adapters``: whether the ingredients are LoRA adapters, whose base is always welcome
        (it is what they are applied to) and never needed (they name their own); ``None``: not
        known yet (before they are resolved), so the base is not judged.

        Raises:
            RecipeError: naming the option.
        """
        takes = set(self.config.model_fields) if self.config else set()
        if getattr(recipe, "combine", None) is not None and "combine" not in takes:
            raise RecipeError(f"combine does not apply to method {self.name!r}",
                              options=["combine"])  # fmt: skip
        if self.check is not None:
            self.check(recipe)
        needs_base = self.base_for(recipe) if self.base_for is not None else self.needs_base
        if adapters is False and needs_base != (recipe.base is not None):
            raise RecipeError(
                f"method {self.name!r} needs a base model θ₀: set base" if needs_base
                else f"method {self.name!r} takes no base model; drop base",
                options=["base"],
            )  # fmt: skip
        for key, attr in (("lambda", "lambda_"), ("density", "density"), ("alpha", "alpha")):
            if getattr(recipe, attr) is not None and attr not in takes:
                raise RecipeError(f"{key} does not apply to method {self.name!r}", options=[key])
        _check_search(recipe, self.name)

    def read_config(self, recipe: Recipe) -> BaseModel | None:
        """This method's options as ``recipe`` gives them (defaults where it gives none)."""
        if self.config is None:
            return None
        if self.options_key is not None:
            block = getattr(recipe, self.options_key, None)
            return self.config.model_validate(block.model_dump() if block is not None else {})
        fields = {k: getattr(recipe, k) for k in self.config.model_fields if hasattr(recipe, k)}
        return self.config.model_validate(fields)


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


def methods() -> list[MergeMethod]:
    """The registered methods, in registration order."""
    _load_builtin()
    return list(_METHODS.values())


def estimable_methods() -> list[str]:
    """The registered methods ``hfsoup inspect`` can estimate (those with an ``estimate``)."""
    return [m.name for m in methods() if m.estimate is not None]


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
    # The built-in methods register themselves when their package is imported. The registry is
    # a lower layer than the methods (the recipe validates against it), so it loads them by
    # name, as a plugin, when first asked what is registered.
    importlib.import_module("hfsoup.methods")


_RANGES = {"lambda": (float("-inf"), float("inf")), "density": (0.0, 1.0),
           "alpha": (float("-inf"), float("inf"))}  # fmt: skip


def _check_search(recipe: Recipe, name: str) -> None:
    """Refuse ``auto`` without a task, and a grid for a coefficient that is not ``auto`` (so the
    method does not take it) or with a value outside its range (density in (0, 1])."""
    auto = {k for k, a in (("lambda", "lambda_"), ("density", "density"), ("alpha", "alpha"))
            if getattr(recipe, a, None) == "auto"}  # fmt: skip
    if auto and recipe.task is None:
        first = sorted(auto)[0]
        raise RecipeError(f"{first} auto is chosen on a task's selection split: set a task",
                          options=["task", first])  # fmt: skip
    for key, values in (getattr(recipe, "grid", None) or {}).items():
        if key not in auto:
            raise RecipeError(f"grid {key}: method {name!r} searches no {key} here (set {key} "
                              "auto, or drop it from the grid)", options=["grid"])  # fmt: skip
        low, high = _RANGES[key]
        bad = [v for v in values if not (v == v and low < v <= high) or abs(v) == float("inf")]
        if not values or bad:
            raise RecipeError(f"grid {key}: {bad[0] if bad else 'no values'} is outside its "
                              f"range{' (0, 1]' if key == 'density' else ''}", options=["grid"])  # fmt: skip
