"""Learned soups (Wortsman et al. 2022, Appendix I): mixing weights α and a temperature β.

The soup is ``θ_l = Σ_i w_il θ_il`` for every parameter group ``l`` (one group for the whole
model, or one per layer), where ``w = softmax(α)`` over the ingredients (or ``w = α``, "free"),
starting from uniform weights. α and β minimise the task kind's loss of ``β · f(x, θ)`` on the
selection split with Adam (classification: the cross-entropy; ``TaskScorer.loss``). Two paths compute the same gradients:

- **memory**: every ingredient resident on the device in float32; the mixture is formed inside
  ``torch.func.functional_call``, so autograd reaches α directly. About ``k + 3`` models.
- **stream**: one live model and its gradient, whatever ``k``. Through the mixture,
  ``dL/dw_il = <∇_θl L, θ_il>``: the parameter gradient at the current mixture is accumulated
  over the batches of a step, each ingredient is streamed once (from the local cache) for the
  per-group dot products, α and β take their step, and the next mixture is formed by streaming
  again as a running weighted sum into the live model. About 2 models.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hfsoup.check.estimates import (  # noqa: F401  (re-exported: learned_run and callers use them here)
    activation_bytes,
    available_memory,
    human_bytes,
    path_needs,
    read_ahead_bytes,
)
from hfsoup.errors import InsufficientMemoryError
from hfsoup.io.streaming import iter_tensors
from hfsoup.methods.greedy import SoupSession
from hfsoup.tasks.kinds import TaskScorer
from hfsoup.tasks.preprocess import PreparedSplit

WHOLE_MODEL = "all"
_BLOCK = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")
_HEAD = re.compile(r"(?:^|\.)(?:classifier|pre_classifier|pooler|score|qa_outputs|lm_head|head)\.")
_EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.")
_GROUP_ORDER = {"embeddings": 0, "other": 2, "head": 3}

Piece = tuple[int, int, int]  # (prepared batch, first row, end row)


def layer_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Group checkpoint tensor names into layers: ``embeddings``, ``layer.N``, ``other``, ``head``.

    ``layer.N`` is any numbered block (``encoder.layer.N.``, GPT-2's ``h.N.``, ``layers.N.``,
    ``blocks.N.``); ``head`` is the classifier, pooler or output head; ``other`` is what is
    left (final layer norms).

    Example:
        >>> layer_groups(["bert.embeddings.word_embeddings.weight", "classifier.weight",
        ...               "bert.encoder.layer.0.output.dense.weight"])  # doctest: +SKIP
        {'embeddings': [...], 'layer.0': [...], 'head': [...]}
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_group_of(name), []).append(name)

    def order(group: str) -> tuple[int, int]:
        if group.startswith("layer."):
            return 1, int(group.removeprefix("layer."))
        return _GROUP_ORDER[group], 0

    return {g: groups[g] for g in sorted(groups, key=order)}


def _group_of(name: str) -> str:
    if block := _BLOCK.search(name):
        return f"layer.{block.group(1)}"
    if _HEAD.search(name):
        return "head"
    return "embeddings" if _EMBEDDING.search(name) else "other"


@dataclass(frozen=True)
class PathPlan:
    """Which path runs and why, from the memory each needs and the memory available."""

    path: str
    reason: str
    needs: dict[str, int]  # bytes per path
    available: int
    available_from: str


def plan_path(
    *, k: int, model_bytes: int, read_ahead: int, activations: int,
    available: int, available_from: str, forced: str = "auto",
) -> PathPlan:  # fmt: skip
    """Choose the memory path when it fits (no re-reads), else the stream path.

    Args:
        k: number of ingredients.
        model_bytes: one model in float32 (its float tensors).
        read_ahead: bytes of streamed reads in flight (stream path).
        activations: forward + backward activations of one step.
        available: bytes available on the device.
        available_from: where ``available`` comes from, for messages.
        forced: ``"memory"`` or ``"stream"`` to force a path, else ``"auto"``.

    Raises:
        InsufficientMemoryError: the forced path, or both paths, need more than is available.
    """
    needs = path_needs(k=k, model_bytes=model_bytes, read_ahead=read_ahead, activations=activations)
    have = f"{human_bytes(available)} available ({available_from})"
    if forced != "auto":
        if needs[forced] > available:
            raise InsufficientMemoryError(
                f"learned soup, {forced} path: needs ~{human_bytes(needs[forced])}, {have}"
            )
        return PathPlan(forced, "asked for", needs, available, available_from)
    if needs["memory"] <= available:
        path, reason = "memory", f"all {k} ingredients fit"
    elif needs["stream"] <= available:
        path, reason = "stream", f"{k} ingredients do not fit, one model and its gradient do"
    else:
        raise InsufficientMemoryError(
            f"learned soup of {k} ingredients does not fit: memory path needs "
            f"~{human_bytes(needs['memory'])}, stream path ~{human_bytes(needs['stream'])}; {have}"
        )
    return PathPlan(path, reason, needs, available, available_from)


def estimate_seconds(*, steps: int, step_seconds: float, read_seconds: float) -> dict[str, float]:
    """Rough wall time per path: the memory path reads every ingredient once, then runs the
    steps; the stream path reads every ingredient twice per step."""
    return {
        "memory": read_seconds + steps * step_seconds,
        "stream": steps * (step_seconds + 2 * read_seconds),
    }


@dataclass
class LearnedResult:
    """What a learned soup learned."""

    weights: torch.Tensor  # (k, groups): the normalised mixing weights, on the CPU
    beta: float
    groups: dict[str, list[str]]
    path: str
    losses: list[float]  # mean selection loss per epoch, at the weights each step started from
    steps: int


def mixing_weights(raw: torch.Tensor, param: str) -> torch.Tensor:
    """The mixing weights a parametrisation gives: softmax over ingredients, or α itself."""
    return torch.softmax(raw, dim=0) if param == "softmax" else raw


def learn(
    session: SoupSession,
    scorer: TaskScorer,
    *,
    groups: dict[str, list[str]],
    path: str,
    epochs: int = 3,
    lr: float = 0.05,
    batch_size: int = 32,
    param: str = "softmax",
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
    resume_from: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> LearnedResult:
    """Learn α and β on the selection split; leaves the live model holding the learned soup.

    Args:
        session: the live model over the ingredients (read from the local cache).
        scorer: the task's scorer; its selection split is the training data.
        groups: ``{group: float tensor names}``; one α per ingredient and group.
        path: ``"memory"`` or ``"stream"`` (see the module docstring; same gradients).
        epochs / lr / batch_size: Adam on α and β, ``batch_size`` examples per step; the
            split is cut into fixed steps, visited in a seeded random order each epoch.
        param: ``"softmax"`` (weights positive, summing to 1 per group) or ``"free"``.
        resume_from: a checkpoint ``on_epoch`` was given (an interrupted run): training goes
            on from the end of its epoch, with its α, β, Adam state and step order, so it ends
            where the uninterrupted run would have.
        on_epoch: called after every epoch with the checkpoint to resume from (tensors,
            numbers and lists only: it loads with ``torch.load(weights_only=True)``).

    Raises:
        TaskError: a task the kind cannot learn on (classification: a regression task).
    """
    check_task(scorer)
    split = scorer.split(scorer.selection_split)
    k, device = len(session.indexes), session.device
    raw = torch.zeros(k, len(groups)) if param == "softmax" else torch.full((k, len(groups)), 1 / k)
    raw = raw.to(device).requires_grad_()
    beta = torch.ones((), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([raw, beta], lr=lr)
    session.show(0)  # integer buffers come from the first ingredient
    mixer = (_Resident if path == "memory" else _Streamed)(session, groups, scorer.loss)
    steps, labels = _steps(split, batch_size), split.label_batches()
    rng, losses, start = random.Random(seed), [], 0
    if resume_from is not None:
        start, losses = _restore(resume_from, raw, beta, optimizer, rng)
        log(f"learned soup: resuming after epoch {start}/{epochs}")
    if path == "stream":
        mixer.show(mixing_weights(raw, param).detach())
    for epoch in range(start, epochs):
        total = 0.0
        for s in rng.sample(range(len(steps)), len(steps)):
            optimizer.zero_grad()
            pieces = [_piece(split.batches, labels, p, device) for p in steps[s]]
            total += mixer.step(mixing_weights(raw, param), beta, pieces)
            optimizer.step()
            if path == "stream":
                mixer.show(mixing_weights(raw, param).detach())
        losses.append(total / split.size)
        log(f"learned soup: epoch {epoch + 1}/{epochs}, selection loss {losses[-1]:.4f}")
        if on_epoch is not None:
            on_epoch(_checkpoint(epoch + 1, losses, raw, beta, optimizer, rng))
    weights = mixing_weights(raw, param).detach()
    if path == "memory":
        mixer.show(weights)
    return LearnedResult(weights.cpu(), beta.item(), groups, path, losses, epochs * len(steps))


def _checkpoint(
    epoch: int, losses: list[float], raw: torch.Tensor, beta: torch.Tensor,
    optimizer: torch.optim.Optimizer, rng: random.Random,
) -> dict[str, Any]:  # fmt: skip
    version, state, gauss = rng.getstate()
    return {
        "epoch": epoch,
        "losses": list(losses),
        "raw": raw.detach().cpu().clone(),
        "beta": beta.detach().cpu().clone(),
        "optimizer": optimizer.state_dict(),
        "rng": [version, torch.tensor(state, dtype=torch.int64), gauss],
    }


def _restore(
    saved: dict[str, Any], raw: torch.Tensor, beta: torch.Tensor,
    optimizer: torch.optim.Optimizer, rng: random.Random,
) -> tuple[int, list[float]]:  # fmt: skip
    """Put a checkpoint's α, β, Adam state and step order back; returns (epoch, losses)."""
    with torch.no_grad():
        raw.copy_(saved["raw"])
        beta.copy_(saved["beta"])
    optimizer.load_state_dict(saved["optimizer"])
    version, state, gauss = saved["rng"]
    rng.setstate((version, tuple(int(x) for x in state.tolist()), gauss))
    return int(saved["epoch"]), [float(x) for x in saved["losses"]]


def check_task(scorer: TaskScorer) -> None:
    """Refuse a task whose kind has no loss to learn on (classification: regression tasks).

    Raises:
        TaskError: the task cannot be learned on (``TaskScorer.check_learnable``).
    """
    scorer.check_learnable()


def _steps(split: PreparedSplit, batch_size: int) -> list[list[Piece]]:
    """Cut the split into steps of ``batch_size`` consecutive examples, as pieces of batches."""
    steps: list[list[Piece]] = [[]]
    room = batch_size
    for b, labels in enumerate(split.label_batches()):
        start = 0
        while start < len(labels):
            if room == 0:
                steps.append([])
                room = batch_size
            end = min(len(labels), start + room)
            steps[-1].append((b, start, end))
            room -= end - start
            start = end
    return [s for s in steps if s]


def _piece(batches: list[dict], labels: list[torch.Tensor], piece: Piece, device: torch.device):
    b, start, end = piece
    batch = {key: v[start:end].to(device) for key, v in batches[b].items()}
    return batch, labels[b][start:end].to(device)


Loss = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]  # (output, β, targets) -> sum


class _Mixer:
    """The float tensors being mixed, each once (tied names share one tensor), and their group."""

    def __init__(self, session: SoupSession, groups: dict[str, list[str]], loss: Loss) -> None:
        self.session, self.live, self.loss = session, session.live, loss
        self.group_of: dict[str, int] = {}
        seen: set[int] = set()
        for g, names in enumerate(groups.values()):
            for name in names:
                if id(self.live.targets[name]) not in seen:
                    seen.add(id(self.live.targets[name]))
                    self.group_of[name] = g
        self.names = list(self.group_of)


class _Resident(_Mixer):
    """Memory path: all ingredients stacked on the device, mixed inside the forward pass."""

    def __init__(self, session: SoupSession, groups: dict[str, list[str]], loss: Loss) -> None:
        super().__init__(session, groups, loss)
        model, k = self.live.model, len(session.indexes)
        self.stacks = {
            n: torch.empty((k, *self.live.targets[n].shape), device=session.device)
            for n in self.names
        }
        for i, index in enumerate(session.indexes):
            for name, t in iter_tensors(index, self.names):
                self.stacks[name][i].copy_(t)
        tensors = [*model.named_parameters(), *model.named_buffers()]
        module_name = {id(t): n for n, t in tensors}
        self.module_name = {n: module_name[id(self.live.targets[n])] for n in self.names}
        params = {id(p) for p in model.parameters()}
        # Float buffers (norm statistics) are mixed too, but carry no gradient, as when streamed.
        self.buffers = {n for n in self.names if id(self.live.targets[n]) not in params}
        model.requires_grad_(False)

    def _mixture(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            wg = w[:, self.group_of[n]]
            out[self.module_name[n]] = torch.tensordot(
                wg.detach() if n in self.buffers else wg, self.stacks[n], dims=1
            )
        return out

    def step(self, w: torch.Tensor, beta: torch.Tensor, pieces: Sequence) -> float:
        params = self._mixture(w)
        n = sum(len(labels) for _, labels in pieces)
        loss = sum(
            self.loss(torch.func.functional_call(self.live.model, params, kwargs=batch), beta, y)
            for batch, y in pieces
        )
        (loss / n).backward()
        return loss.item()

    @torch.no_grad()
    def show(self, w: torch.Tensor) -> None:
        for n in self.names:
            self.live.set(n, torch.tensordot(w[:, self.group_of[n]], self.stacks[n], dims=1))


class _Streamed(_Mixer):
    """Stream path: the live model and its gradient; ingredients are streamed for each step."""

    def __init__(self, session: SoupSession, groups: dict[str, list[str]], loss: Loss) -> None:
        super().__init__(session, groups, loss)
        self.live.model.requires_grad_(True)

    def step(self, w: torch.Tensor, beta: torch.Tensor, pieces: Sequence) -> float:
        model = self.live.model
        model.zero_grad(set_to_none=True)
        n = sum(len(labels) for _, labels in pieces)
        total = 0.0
        for batch, y in pieces:  # gradients accumulate over the batches of the step
            loss = self.loss(model(**batch), beta, y)
            (loss / n).backward()
            total += loss.item()
        dots = torch.zeros(w.shape, dtype=torch.float64, device=self.session.device)
        with torch.no_grad():
            for i, index in enumerate(self.session.indexes):
                for name, t in iter_tensors(index, self.names):
                    grad = self.live.targets[name].grad
                    if grad is not None:
                        t = t.to(grad.device, torch.float32)
                        dots[i, self.group_of[name]] += torch.vdot(grad.reshape(-1), t.reshape(-1))
        w.backward(dots.to(w.dtype))  # through the softmax, when there is one
        model.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def show(self, w: torch.Tensor) -> None:
        """Form ``Σ_i w_i θ_i`` in the live model as a running weighted sum, streamed."""
        weights = w.tolist()
        for i, index in enumerate(self.session.indexes):
            for name, t in iter_tensors(index, self.names):
                target, wi = self.live.targets[name], weights[i][self.group_of[name]]
                if i == 0:
                    target.copy_(t).mul_(wi)
                else:
                    target.add_(t.to(target.device, target.dtype), alpha=wi)


def steps_per_epoch(size: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over ``size`` examples."""
    return math.ceil(size / batch_size)
