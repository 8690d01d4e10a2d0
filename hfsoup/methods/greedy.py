"""Greedy soup (Wortsman et al. 2022, Recipe 1) and the paper's baselines, in bounded memory.

One live model and one float32 running sum ``S`` of the accepted ingredients: a candidate ``j``
is shown to the live model as ``(S + θj) / (n + 1)`` by streaming ``θj``; a rejected candidate
is undone by writing ``S / n`` back (bit for bit the previous soup: the same arithmetic on the
same ``S``); an accepted one is added into ``S`` by streaming ``θj`` once more from the local
cache. Never more than the live model, ``S`` and one streamed tensor group are held.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hfsoup.compute.distributed import Processes
from hfsoup.compute.live import LiveModel, build_model
from hfsoup.compute.placement import Placement
from hfsoup.errors import TaskError
from hfsoup.io.streaming import iter_tensors
from hfsoup.io.tensors import FLOAT_DTYPES, IngredientIndex
from hfsoup.tasks.kinds import Direction, Tally, TaskScorer
from hfsoup.tasks.output_cache import ingredient_outputs
from hfsoup.tasks.output_cache import record as record_cache

Scores = dict[str, dict[str, float]]  # {split: {metric: value}}
# Private switch for benchmarks/greedy_cost.py: score candidates on the examples the
# ingredients get wrong first (a scorer with ``put_hardest_first``), or in the split's order.
_HARDEST_FIRST = True
STATE_FILE = "greedy_state.json"


class SoupSession:
    """The live model, the running sum of accepted ingredients, and how to stream into them."""

    def __init__(
        self,
        indexes: Sequence[IngredientIndex],
        *,
        device: torch.device | str = "cpu",
        accumulate: torch.dtype = torch.float32,
        allow_nonfinite: bool = False,
        placement: Placement | None = None,
    ) -> None:
        """
        Args:
            indexes: the ingredients, checked compatible.
            device: where the model and the running sum live (when no ``placement``).
            accumulate: dtype of the running sum (float32, or float64).
            allow_nonfinite: accept NaN/Inf weights.
            placement: the model's device map and scoring dtype; each running-sum tensor lives
                on the device of the parameter it is the sum of.
        """
        # Greedy reads each ingredient several times: whole files once, then ranges from disk.
        self.indexes = [
            replace(ix, ingredient=replace(ix.ingredient, source=ix.ingredient.source.cached()))
            for ix in indexes
        ]
        first = self.indexes[0]
        self.floats = {n for n, r in first.tensors.items() if r.dtype in FLOAT_DTYPES}
        self.placement = placement or Placement.single(device)
        model = build_model(first.config, placement=self.placement)
        self.live = LiveModel(model, set(first.tensors))
        self.device, self.accumulate = self.placement.main_device, accumulate
        self._gpus = sorted(
            {t.device for t in self.live.targets.values() if t.device.type == "cuda"}, key=str
        )
        self.sum: dict[str, torch.Tensor] = {}
        self.count = 0
        self.allow_nonfinite = allow_nonfinite
        self._checked: set[int] = set()

    @property
    def model(self) -> torch.nn.Module:
        return self.live.model

    def _stream(self, i: int):
        # Refuse NaN/Inf (unless allowed) the first time each ingredient is read in full.
        check = not self.allow_nonfinite and i not in self._checked
        yield from iter_tensors(self.indexes[i], check=check, gpus=self._gpus)
        self._checked.add(i)

    def show(self, i: int) -> None:
        """Set the live model to ingredient ``i`` alone (the running sum is untouched)."""
        for name, t in self._stream(i):
            self.live.set(name, t)

    def restart(self, i: int) -> None:
        """Start the running sum from ingredient ``i`` and show it."""
        self.sum, self.count = {}, 1
        for name, t in self._stream(i):
            device = self.live.targets[name].device
            if name in self.floats:
                self.sum[name] = t.to(device, self.accumulate, copy=True, non_blocking=True)
            else:
                self.sum[name] = t.to(device, copy=True)
        self.show_sum()

    def add(self, i: int) -> None:
        """Add ingredient ``i`` into the running sum (an accepted candidate)."""
        for name, t in self._stream(i):
            if name in self.floats:
                s = self.sum[name]
                s.add_(t.to(s.device, self.accumulate, non_blocking=True))
        self.count += 1

    def show_candidate(self, i: int) -> None:
        """Show ``(S + θi) / (n + 1)`` without changing ``S``."""
        for name, t in self._stream(i):
            if name in self.floats:
                s = self.sum[name]
                self.live.set(
                    name,
                    (s + t.to(s.device, self.accumulate, non_blocking=True)) / (self.count + 1),
                )

    def show_sum(self) -> None:
        """Show the current soup ``S / n``."""
        for name, s in self.sum.items():
            self.live.set(name, s / self.count if name in self.floats else s)

    def averaging(self) -> SoupSession:
        """The session whose running sum forms the plain average (the uniform soup): itself."""
        return self

    def drop_sum(self) -> None:
        """Free the running sum; the live model keeps showing what it shows."""
        self.sum, self.count = {}, 0

    def soup_tensors(self, names: Sequence[str], dtype_of: Callable[[str], torch.dtype]) -> dict:
        """The current soup's tensors ``names`` in their output dtypes, on the CPU."""
        out = {}
        for name in names:
            s = self.sum[name]
            out[name] = (s / self.count if name in self.floats else s).to(dtype_of(name)).cpu()
        return out


@dataclass
class GreedyResult:
    """Everything a greedy run measured."""

    individual: list[Scores]
    uniform: Scores
    greedy: Scores
    ensemble: Scores
    greedy_ensemble: Scores
    trace: list[dict[str, Any]]
    accepted: list[int]
    ensemble_members: list[int]
    examples_scored: int
    examples_full: int
    timings: dict[str, float] = field(default_factory=dict)
    best: int = 0  # the best individual ingredient, in the task's direction
    saved_rejections: int = 0  # candidate examples not scored thanks to early rejections
    saved_acceptances: int = 0  # ... thanks to early acceptances


class _State:
    """Decisions so far, in a JSON file in the output's temporary folder (for resuming).

    Only the main process keeps the files (``folder`` is None elsewhere); under
    ``accelerate launch`` the others receive what it resumes from, so all replay alike.
    """

    def __init__(self, folder: Path | None, fingerprint: str, processes: Processes) -> None:
        self.processes = processes
        self.path = folder / STATE_FILE if folder is not None else None
        self.logits_dir = folder / "logits" if folder is not None else None
        data = processes.broadcast(_read_state(folder) if folder is not None else {})
        if data.get("fingerprint") != fingerprint:
            data = {"fingerprint": fingerprint, "individual": {}, "trace": []}
        self.data = data
        self.resumed = bool(data["individual"])

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def save_logits(self, i: int, logits: dict[str, torch.Tensor]) -> None:
        if self.logits_dir is None:
            return
        self.logits_dir.mkdir(exist_ok=True)
        torch.save(logits, self.logits_dir / f"{i}.pt")

    def load_logits(self, i: int) -> dict[str, torch.Tensor]:
        logits = None
        if self.logits_dir is not None:
            logits = torch.load(self.logits_dir / f"{i}.pt", weights_only=True)
        return self.processes.broadcast(logits)


def _read_state(folder: Path) -> dict[str, Any]:
    """The saved decisions in ``folder``; empty when there are none or the file is damaged
    (a damaged state is not resumed: the run starts afresh)."""
    try:
        data = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def saved_fingerprint(folder: Path) -> str | None:
    """The fingerprint of the interrupted run whose decisions ``folder`` holds, or None."""
    return _read_state(folder).get("fingerprint")


def run_greedy(
    session: SoupSession,
    scorer: TaskScorer,
    *,
    labels: Sequence[str],
    state_dir: Path | None,
    fingerprint: str,
    strict: bool = False,
    order: str = "score",
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
    processes: Processes | None = None,
) -> GreedyResult:
    """Score each ingredient, then build the greedy soup and the baselines beside it.

    Args:
        session: the live model and running sum over the ingredients.
        scorer: the task's scorer (its cache keeps each ingredient's outputs); its
            ``direction`` says which way is better, for the order and the acceptance.
        labels: how each ingredient is named in the trace.
        state_dir: where decisions are kept so an interrupted run resumes (None: nowhere; the
            processes other than the main one).
        fingerprint: identifies the run (pinned SHAs, task, rule); a state file with another
            fingerprint is ignored.
        strict: accept only on strictly better (the original code's ``>``) instead of at
            least as good.
        order: ``"score"`` (best first, the paper's Recipe 1) or ``"random"`` (seeded).
        processes: the processes scoring together (as the scorer's); default this one alone.
    """
    k, sel = len(session.indexes), scorer.selection_split
    state = _State(state_dir, fingerprint, processes or Processes())
    if state.resumed:
        log(f"resuming: {len(state.data['individual'])} ingredients scored, "
            f"{len(state.data['trace'])} greedy decisions kept")  # fmt: skip
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    individual = score_ingredients(session, scorer, labels=labels, state=state, log=log)
    timings["score_ingredients"] = time.perf_counter() - t0
    record_cache(scorer, timings)
    if _HARDEST_FIRST and hasattr(scorer, "put_hardest_first"):
        # Candidates' misses first: rejections are decided on fewer examples (exact anyway).
        t0 = time.perf_counter()
        scorer.put_hardest_first([scorer.cache[(str(i), sel)] for i in range(k)])
        timings["order_examples"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("scoring the uniform soup")
    uniform_outputs: dict[str, Any] = {}
    uniform = score_uniform(session.averaging(), scorer, keep=uniform_outputs)
    timings["uniform_soup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sel_scores = [individual[i][sel][scorer.selection_metric] for i in range(k)]
    ranking = _ranking(sel_scores, order, seed, scorer.direction)
    trace = _choose(session, scorer, ranking, sel_scores, labels, state, strict=strict, log=log)
    accepted = [ranking[p] for p, step in enumerate(trace) if step["accepted"]]
    session.show_sum()
    greedy, greedy_sel = _score_greedy(session, scorer, accepted, individual, uniform,
                                       uniform_outputs)  # fmt: skip
    _fill_last(trace, scorer, greedy_sel, greedy[sel][scorer.selection_metric])
    timings["greedy_soup"] = time.perf_counter() - t0

    ensemble, greedy_ensemble, members = score_ensembles(scorer, k, strict=strict)
    return GreedyResult(
        individual=individual,
        uniform=uniform,
        greedy=greedy,
        ensemble=ensemble,
        greedy_ensemble=greedy_ensemble,
        trace=trace,
        accepted=accepted,
        ensemble_members=members,
        examples_scored=sum(step["examples_scored"] for step in trace[1:]),
        examples_full=scorer.split(sel).size * (k - 1),
        timings=timings,
        best=best_index(sel_scores, scorer.direction),
        saved_rejections=_saved(trace[1:], scorer.split(sel).size, accepted=False),
        saved_acceptances=_saved(trace[1:], scorer.split(sel).size, accepted=True),
    )


def _saved(steps: Sequence[dict[str, Any]], total: int, *, accepted: bool) -> int:
    return sum(total - step["examples_scored"] for step in steps if step["accepted"] == accepted)


def _score_greedy(
    session: SoupSession,
    scorer: TaskScorer,
    accepted: Sequence[int],
    individual: Sequence[Scores],
    uniform: Scores,
    uniform_outputs: dict[str, Any],
) -> tuple[Scores, Any]:
    """The greedy soup's scores on every split, and its selection outputs.

    Reused rather than re-scored when the soup is provably the same model bit for bit: one
    ingredient (``S / 1`` is the ingredient's own values: float32 holds every bfloat16 and
    float16 value, and dividing by 1 is exact), or every ingredient added in index order
    (the same sums in the same order as the uniform soup's; not under a ``--combine``
    operator, whose merge of all is not the average). Otherwise scored live.
    """
    sel, k = scorer.selection_split, len(session.indexes)
    splits = scorer.task.splits
    if len(accepted) == 1 and all((str(accepted[0]), s) in scorer.cache for s in splits):
        return individual[accepted[0]], scorer.cache[(str(accepted[0]), sel)]
    averaging = session.averaging() is session  # not a --combine operator
    if averaging and list(accepted) == list(range(k)) and sel in uniform_outputs:
        return uniform, uniform_outputs[sel]
    keep: dict[str, Any] = {}
    return _score_live(session, scorer, splits, keep=keep), keep[sel]


def _fill_last(trace: list[dict[str, Any]], scorer: TaskScorer, outputs: Any, score: float) -> None:
    """The last accepted step is the greedy soup: an early acceptance's score, unknown until
    now, is the greedy soup's selection score (scored on every split anyway)."""
    last = max(p for p, step in enumerate(trace) if step["accepted"])
    step = trace[last]
    if step["score"] is None:
        step["score"] = score
        step["score_from"] = "greedy soup"
        tally = scorer.tally(outputs) if hasattr(scorer, "tally") else None
        if tally is not None:
            step["tally"] = list(tally)


def _choose(
    session: SoupSession,
    scorer: TaskScorer,
    ranking: Sequence[int],
    sel_scores: Sequence[float],
    labels: Sequence[str],
    state: _State,
    *,
    strict: bool,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The greedy loop: try each ingredient in ``ranking`` order into the running sum.

    A candidate is accepted when its selection score reaches the incumbent's in the task's
    direction; decisions already in ``state`` (an interrupted run) are replayed, not re-scored.
    With a counting scorer (``score_against``), a candidate stops as soon as either decision
    is certain; an incumbent accepted early is known as a tally and finished (on the
    remaining examples only) when a later decision needs its exact count.
    Leaves the running sum holding the accepted ingredients; returns the trace.
    """
    sel = scorer.selection_split
    trace = state.data["trace"]
    session.restart(ranking[0])
    if not trace:
        trace.append(_step(labels, ranking[0], sel_scores[ranking[0]], True, 0))
    counting = hasattr(scorer, "score_against")
    if counting and "tally" not in trace[0]:
        tally = scorer.tally(scorer.cache[(str(ranking[0]), sel)], sel)
        counting = tally is not None
        if counting:
            trace[0]["tally"] = list(tally)
    last = 0  # the incumbent's step
    for position, j in enumerate(ranking[1:], start=1):
        if position < len(trace):  # decided before an interruption: replay, do not re-score
            if trace[position]["accepted"]:
                session.add(j)
                last = position
            continue
        log(f"greedy: trying {labels[j]}")
        session.show_candidate(j)
        if counting:
            step = _decide_counting(session, scorer, trace, last, labels, j, strict=strict)
        else:
            step = _decide_full(session, scorer, trace[last]["score"], labels, j, strict=strict)
        if step["accepted"]:
            session.add(j)
            last = position
        trace.append(step)
        state.save()
    return trace


def _decide_full(
    session: SoupSession, scorer: TaskScorer, incumbent: float, labels: Sequence[str], j: int,
    *, strict: bool,
) -> dict[str, Any]:  # fmt: skip
    """A scorer without counts: exact early rejection only (acceptances scored in full)."""
    sel = scorer.selection_split
    outcome = scorer.score_with_early_stop(session.model, sel, incumbent, strict=strict)
    accepted = scorer.direction.reaches(outcome.score, incumbent, strict=strict)
    return _step(labels, j, outcome.score, accepted, outcome.examples_scored)


def _decide_counting(
    session: SoupSession, scorer: Any, trace: list[dict[str, Any]], last: int,
    labels: Sequence[str], j: int, *, strict: bool,
) -> dict[str, Any]:  # fmt: skip
    """Candidate ``j`` (shown) against the incumbent of step ``last``, both ways early."""
    sel = scorer.selection_split
    incumbent = Tally(*trace[last]["tally"])
    outcome = scorer.score_against(session.model, sel, incumbent, strict=strict)
    accepted = outcome.accepted
    if accepted is None:  # needs the incumbent's exact count: S / n is it, bit for bit
        session.show_sum()
        exact = scorer.finish(session.model, sel, incumbent)
        inc = trace[last]
        inc["examples_scored"] += exact.scored - incumbent.scored
        inc["examples_finished_later"] = exact.scored - incumbent.scored
        inc["tally"], inc["score"] = list(exact), exact.hits / exact.total
        accepted = scorer.direction.reaches(outcome.score, inc["score"], strict=strict)
    step = _step(labels, j, outcome.score, accepted, outcome.examples_scored)
    step["tally"] = list(outcome.tally)
    if outcome.score is None:
        step["stopped_early"] = "accepted" if accepted else "rejected"
    return step


def score_ingredients(
    session: SoupSession,
    scorer: TaskScorer,
    *,
    labels: Sequence[str],
    state: _State | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[Scores]:
    """Score every ingredient on every split; outputs land in ``scorer.cache`` under ``"i"``.

    Outputs found in the scorer's outputs cache across runs (:mod:`hfsoup.tasks.output_cache`)
    are taken from there instead of scoring the ingredient; new ones are stored there."""
    individual: list[Scores] = []
    splits = scorer.task.splits
    disk = ingredient_outputs(scorer)  # the outputs cache across runs, if the scorer has one
    for i in range(len(session.indexes)):
        if state is not None and str(i) in state.data["individual"]:
            for split, logits in state.load_logits(i).items():
                scorer.cache[(str(i), split)] = logits
            individual.append(state.data["individual"][str(i)])
            continue
        logits = disk.load(session, scorer, i) if disk is not None else None
        if logits is None:
            log(f"scoring ingredient {i + 1}/{len(session.indexes)}: {labels[i]}")
            session.show(i)
            logits = {s: scorer.outputs(session.model, s, key=str(i)) for s in splits}
            if disk is not None:
                disk.store(session, scorer, i, logits)
        else:
            log(f"ingredient {i + 1}/{len(session.indexes)}: {labels[i]}: outputs from the cache")
            for split, outputs in logits.items():
                scorer.cache[(str(i), split)] = outputs
        individual.append({s: scorer.scores(logits[s], s) for s in splits})
        if state is not None:
            state.save_logits(i, logits)
            state.data["individual"][str(i)] = individual[-1]
            state.save()
    check_decidable(individual, scorer.selection_split, scorer.selection_metric)
    return individual


def check_decidable(individual: Sequence[Scores], split: str, metric: str) -> None:
    """Refuse a run in which no ingredient has a selection score to rank or accept by.

    NaN compares false both ways: with every ingredient at NaN (a metric undefined on the
    split, e.g. a correlation of constant predictions, or a split too small for it) the
    order and every acceptance would be arbitrary, and the soup meaningless.

    Raises:
        TaskError: every ingredient's selection score is NaN (or missing).
    """
    values = [scores.get(split, {}).get(metric) for scores in individual]
    if values and not any(_finite_or_inf(v) for v in values):
        raise TaskError(
            f"every ingredient scores NaN on selection split {split!r} by {metric!r}: the "
            "metric is undefined there (constant predictions or labels, too few examples?), "
            "so there is nothing to choose by; use another metric or split"
        )


def best_index(scores: Sequence[float | None], direction: Direction) -> int:
    """The position of the best score in the task's ``direction`` (the scorer's), NaN and
    None counting as worst (the first on ties)."""
    return direction.best_index(scores)


def _finite_or_inf(value: float | None) -> bool:
    return isinstance(value, (int, float)) and value == value  # not NaN


def score_uniform(
    session: SoupSession, scorer: TaskScorer, *, keep: dict[str, Any] | None = None
) -> Scores:
    """Form the uniform soup in the running sum, show it, and score it on every split
    (its outputs per split go into ``keep`` when given)."""
    session.restart(0)
    for i in range(1, len(session.indexes)):
        session.add(i)
    session.show_sum()
    return _score_live(session, scorer, scorer.task.splits, keep=keep)


def score_ensembles(
    scorer: TaskScorer, k: int, *, strict: bool = False
) -> tuple[Scores, Scores, list[int]]:
    """The ensemble and greedy ensemble of the ``k`` cached ingredients' outputs, on every split.

    Returns:
        ``(ensemble scores, greedy ensemble scores, greedy ensemble members)``.
    """
    splits = scorer.task.splits
    outputs = {s: [scorer.cache[(str(i), s)] for i in range(k)] for s in splits}
    members = scorer.greedy_ensemble(outputs[scorer.selection_split], strict=strict)
    ensemble = {s: scorer.scores(scorer.ensemble(outputs[s]), s) for s in splits}
    greedy = {
        s: scorer.scores(scorer.ensemble([outputs[s][i] for i in members]), s) for s in splits
    }
    return ensemble, greedy, members


def _score_live(
    session: SoupSession,
    scorer: TaskScorer,
    splits: Sequence[str],
    *,
    keep: dict[str, Any] | None = None,
) -> Scores:
    keep = {} if keep is None else keep
    for s in splits:
        keep[s] = scorer.outputs(session.model, s)
    return {s: scorer.scores(keep[s], s) for s in splits}


def _ranking(scores: Sequence[float], order: str, seed: int, direction: Direction) -> list[int]:
    if order == "random":
        ranking = list(range(len(scores)))
        random.Random(seed).shuffle(ranking)
        return ranking
    # Best first; ties keep the given order; NaN (a broken ingredient) last.
    return direction.ranking(scores)


def _step(labels: Sequence[str], i: int, score: float | None, accepted: bool, n: int) -> dict:
    return {
        "repo": labels[i],
        "index": i,
        "score": score,
        "accepted": accepted,
        "examples_scored": n,
    }
