"""Task kinds: what a task prepares, computes, scores and optimises, registered by name.

A task kind is a value (:class:`TaskKind`) registered under a name; a recipe's ``task: {kind:
...}`` picks it (default ``classification``). Its :meth:`TaskKind.prepare` returns a
:class:`TaskScorer` bound to one task and one model's preprocessor: the greedy, learned and
evaluation runners talk to that protocol alone, and ask its :attr:`TaskScorer.direction` which
way is better, so a lower-is-better kind (perplexity) ranks, picks and accepts the lowest.

This module is light (no torch, datasets or transformers at import): :class:`~hfsoup.tasks.task.Task`
validates its ``kind`` against :func:`kind_names`; the built-in kinds are imported on first use.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from hfsoup.errors import TaskError

if TYPE_CHECKING:
    from hfsoup.compute.distributed import Processes
    from hfsoup.tasks.task import Task

DEFAULT_KIND = "classification"
"""The kind of a task that names none (every task before kinds existed)."""

# Built-in kinds: name -> "module:attribute", imported when first asked for.
_BUILTIN: dict[str, str] = {
    "classification": "hfsoup.tasks.classification:KIND",
    "causal-lm": "hfsoup.tasks.causal_lm:KIND",
}
_KINDS: dict[str, TaskKind] = {}


@dataclass(frozen=True)
class Direction:
    """Which way a score is better; NaN and None always rank worst and never reach.

    Attributes:
        higher_is_better: True for accuracy-like scores, False for losses and perplexity.
    """

    higher_is_better: bool = True

    def better(self, a: float | None, b: float | None) -> bool:
        """Whether ``a`` is strictly better than ``b`` (a real score beats NaN / None)."""
        if not _comparable(a):
            return False
        if not _comparable(b):
            return True
        return a > b if self.higher_is_better else a < b

    def reaches(self, score: float | None, threshold: float, *, strict: bool = False) -> bool:
        """The acceptance rule: ``score`` at least as good as ``threshold`` (strictly better
        when ``strict``); None (stopped early) and NaN never reach."""
        if not _comparable(score):
            return False
        if self.higher_is_better:
            return score > threshold if strict else score >= threshold
        return score < threshold if strict else score <= threshold

    def key(self, value: float | None) -> tuple[bool, float]:
        """A sort key putting the best first and NaN / None last."""
        if not _comparable(value):
            return True, 0.0
        return False, -value if self.higher_is_better else value

    def ranking(self, scores: Sequence[float | None]) -> list[int]:
        """Positions of ``scores``, best first; ties keep the given order; NaN / None last."""
        return sorted(range(len(scores)), key=lambda i: self.key(scores[i]))

    def best_index(self, scores: Sequence[float | None]) -> int:
        """The position of the best score (the first on ties; 0 when none is a number)."""
        return self.ranking(scores)[0]


HIGHER = Direction(True)
LOWER = Direction(False)


def _comparable(value: float | None) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


class Tally(NamedTuple):
    """What is known of a mean-over-examples score (accuracy) after a prefix of a split.

    Attributes:
        hits: Examples counted correct among the first ``scored``.
        scored: Examples run through the model so far (whole batches, in batch order).
        total: Examples in the split.
    """

    hits: int
    scored: int
    total: int

    @property
    def known(self) -> bool:
        """Whether every example has been scored (the count is exact)."""
        return self.scored >= self.total

    @property
    def high(self) -> int:
        """The most hits still possible: every unscored example counted correct."""
        return self.hits + self.total - self.scored


class EarlyStop(NamedTuple):
    """The outcome of :meth:`TaskScorer.score_with_early_stop` (and of ``score_against``).

    Attributes:
        score: The selection score over the whole split, or ``None`` when scoring stopped
            early (out of reach; or, from ``score_against``, certain to reach).
        examples_scored: Examples actually run through the model.
        tally: From ``score_against``: the counts so far (None from other scorers).
        accepted: From ``score_against``: the decision, or None when it needs the incumbent's
            exact count (the candidate is then scored in full).
    """

    score: float | None
    examples_scored: int
    tally: Tally | None = None
    accepted: bool | None = None


@runtime_checkable
class TaskScorer(Protocol):
    """A task prepared for scoring: what the runners (greedy, learned, evaluate) use.

    ``outputs`` are whatever the kind computes per example (classification: logits); they are
    opaque to the runners, which only cache them, ensemble them and score them.
    """

    task: Task
    cache: dict[tuple[str, str], Any]
    """``{(model key, split): outputs}``, filled by :meth:`outputs` when given a key."""

    @property
    def selection_split(self) -> str:
        """The split that ranks and accepts."""

    @property
    def selection_metric(self) -> str:
        """The metric that ranks and accepts."""

    @property
    def direction(self) -> Direction:
        """Which way the selection metric is better."""

    def split(self, name: str) -> Any:
        """The prepared split ``name``: ``size``, ``batches`` and ``label_batches()``."""

    def outputs(self, model: Any, split: str, *, key: str | None = None) -> Any:
        """The model's outputs on every example of ``split``, cached under ``(key, split)``."""

    def scores(self, outputs: Any, split: str) -> dict[str, float]:
        """Every metric of the task for ``outputs`` on ``split``, selection metric first."""

    def selection_score(self, outputs: Any, split: str | None = None) -> float:
        """The selection metric for ``outputs`` (default split: the selection split)."""

    def score_with_early_stop(
        self, model: Any, split: str, threshold: float, *, strict: bool = False
    ) -> EarlyStop:
        """Score ``model``, stopping once it cannot reach ``threshold``. The stop must be
        exact: ``direction.reaches(result.score, threshold, strict=strict)`` is what a full
        evaluation would decide."""

    # Optional, for exact early decisions both ways (a kind without them scores candidates
    # in full when accepted; runners test ``hasattr(scorer, "score_against")``):
    #   tally(outputs, split) -> Tally | None: the exact counts of full outputs (None: the
    #       selection metric is not a mean over examples).
    #   score_against(model, split, incumbent: Tally, *, strict) -> EarlyStop: score until
    #       the decision against an incumbent known only as a Tally is certain either way.
    #   finish(model, split, tally: Tally) -> Tally: score the examples a Tally has not seen.
    # Optional, for fewer examples per decision (greedy calls it when present):
    #   put_hardest_first(outputs, split=None): re-batch the split so that the examples the
    #       ingredients' ``outputs`` get wrong are scored first (decisions stay the same).

    def ensemble(self, outputs: Sequence[Any]) -> Any:
        """The outputs of an ensemble of the models whose ``outputs`` are given."""

    def greedy_ensemble(
        self, outputs: Sequence[Any], split: str | None = None, *, strict: bool = False
    ) -> list[int]:
        """The greedy ensemble's members (indices into ``outputs``), in the order added."""

    def check_learnable(self) -> None:
        """Raise :class:`~hfsoup.errors.TaskError` when a learned soup cannot train on it."""

    def loss(self, output: Any, beta: Any, targets: Any) -> Any:
        """The loss a learned soup minimises: summed over the examples of a batch, for the
        model's raw ``output`` at temperature ``beta`` against ``targets`` (a label batch)."""


class TaskKind(Protocol):
    """A kind of task, registered by :attr:`name`."""

    name: str

    def prepare(
        self,
        task: Task,
        source: str,
        *,
        revision: str | None = None,
        device: Any = None,
        progress: bool = True,
        processes: Processes | None = None,
    ) -> TaskScorer:
        """Load and preprocess ``task``'s splits with model ``source``'s preprocessor.

        Raises:
            TaskError: the data cannot be loaded or does not fit the kind or the model.
        """


def register_kind(kind: TaskKind, *, replace: bool = False) -> TaskKind:
    """Register ``kind`` under ``kind.name`` (refused when taken, unless ``replace``).

    Returns:
        ``kind``, so that a module can write ``KIND = register_kind(MyKind())``.
    """
    name = kind.name
    if not replace and (name in _KINDS or name in _BUILTIN):
        raise ValueError(f"task kind {name!r} is already registered")
    _KINDS[name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind registered with :func:`register_kind` (built-in kinds stay)."""
    _KINDS.pop(name, None)


def kind_names() -> list[str]:
    """Every registered kind's name, built-in kinds included, sorted."""
    return sorted({*_BUILTIN, *_KINDS})


def get_kind(name: str) -> TaskKind:
    """The kind registered as ``name``.

    Raises:
        TaskError: no kind has that name.
    """
    if name in _KINDS:
        return _KINDS[name]
    if name in _BUILTIN:
        module, attribute = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), attribute)
    raise TaskError(f"unknown task kind {name!r}; task kinds: {', '.join(kind_names())}")
