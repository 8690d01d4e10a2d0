"""Greedy soups merged with a task-vector operator (``combine``: task_arithmetic, ties,
dare_ties) instead of the plain average, in bounded memory.

The accepted set ``A`` is merged with the operator of :mod:`hfsoup.methods.task_vectors` over
weights ``1/|A|`` (the average's weights): with ``task_arithmetic`` and λ = 1 that is the plain
average (today's greedy soup, up to float error); TIES and DARE-TIES take their disjoint mean,
which does not depend on the weights' scale. A set of one ingredient is that ingredient itself,
as Recipe 1 starts from the best model, so the soup never scores below the best individual on
the selection split.

Memory: the live model, θ₀ in float32 and, per tensor group (at most :data:`GROUP_BYTES` of
float32), the operator's accumulators and one ingredient's copy of the group. Nothing the size
of the model is kept per ingredient, so a candidate is shown by streaming the accepted
ingredients and the candidate again from the local cache, group by group, through the
operator: each step reads ``n + 1`` ingredients (twice over for TIES' two passes), where the
average's running sum reads one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from hfsoup.check.estimates import COMBINE_GROUP_BYTES
from hfsoup.compute.placement import Placement
from hfsoup.io.streaming import iter_tensors
from hfsoup.io.tensors import IngredientIndex
from hfsoup.methods.greedy import SoupSession
from hfsoup.methods.task_vectors import _ACCUMULATORS, _FORMULAS

# The float32 bytes of one tensor group: the unit the accepted set is streamed in (the
# memory estimate counts the same group).
GROUP_BYTES = COMBINE_GROUP_BYTES


class CombineSession(SoupSession):
    """A :class:`SoupSession` whose soup is ``combine`` over the accepted set (see the module).

    The running sum of the parent class still serves the uniform-soup baseline
    (:meth:`averaging`); the greedy loop's ``restart``/``add``/``show_candidate``/``show_sum``
    act on the accepted set.
    """

    def __init__(
        self,
        indexes: Sequence[IngredientIndex],
        base: IngredientIndex,
        *,
        combine: str,
        cfg: Any,
        placement: Placement | None = None,
        allow_nonfinite: bool = False,
        accumulate: torch.dtype = torch.float32,
    ) -> None:
        """
        Args:
            indexes: the ingredients, checked compatible.
            base: the base model θ₀, checked to hold the ingredients' tensors.
            combine: ``task_arithmetic``, ``ties`` or ``dare_ties``.
            cfg: the coefficients (``lambda_``, ``density``, ``seed``).
            placement, allow_nonfinite, accumulate: as for :class:`SoupSession`.
        """
        super().__init__(indexes, placement=placement, allow_nonfinite=allow_nonfinite,
                         accumulate=accumulate)  # fmt: skip
        self.operator, self.cfg = _ACCUMULATORS[combine], cfg
        self.combine = combine
        base = replace(base, ingredient=replace(base.ingredient,
                                                source=base.ingredient.source.cached()))  # fmt: skip
        self.theta0 = {
            name: t.to(self.live.targets[name].device, torch.float32, copy=True)
            for name, t in iter_tensors(base, sorted(self.floats), check=not allow_nonfinite)
        }
        self.groups = _groups(self.indexes[0], sorted(self.floats))
        self.accepted: list[int] = []
        self._shown: tuple[int, ...] = ()

    @property
    def formula(self) -> str:
        """The operator's formula, as the task-vector merges state it."""
        return _FORMULAS[self.combine]

    def averaging(self) -> SoupSession:
        """The plain average over the same live model (for the uniform-soup baseline)."""
        return _Averaging(self)

    def restart(self, i: int) -> None:
        """Start the accepted set from ingredient ``i`` and show it (the ingredient itself)."""
        self.drop_sum()  # the uniform baseline's running sum is not needed any more
        self.accepted = [i]
        self.show(i)
        self._shown = (i,)

    def add(self, i: int) -> None:
        """Accept ingredient ``i`` (after :meth:`show_candidate`, the live model shows it)."""
        self.accepted.append(i)

    def show_candidate(self, i: int) -> None:
        """Show ``combine`` over the accepted set plus ``i``, leaving the set unchanged."""
        self._show([*self.accepted, i])

    def show_sum(self) -> None:
        """Show the current soup: ``combine`` over the accepted set."""
        self._show(self.accepted)

    def soup_tensors(self, names: Sequence[str], dtype_of: Callable[[str], torch.dtype]) -> dict:
        """The current soup's tensors ``names`` in their output dtypes, on the CPU."""
        floats = [n for n in names if n in self.floats]
        out = {n: t.to(dtype_of(n)).cpu() for n, t in self.merged(self.accepted, floats)}
        others = [n for n in names if n not in self.floats]
        if others:  # integer buffers, from the first accepted ingredient
            for name, t in iter_tensors(self.indexes[self.accepted[0]], others):
                out[name] = t.to(dtype_of(name)).clone()
        return out

    def _show(self, members: Sequence[int]) -> None:
        if tuple(members) == self._shown:
            return
        for name, value in self.merged(members, sorted(self.floats)):
            self.live.set(name, value)
        self._shown = tuple(members)

    def merged(
        self, members: Sequence[int], names: Sequence[str]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of ``combine`` over ``members`` (one: that ingredient itself),
        streamed group by group; float32 tensors on each parameter's device."""
        wanted = set(names)
        if len(members) == 1:
            for name, t in self._stream(members[0]):
                if name in wanted:
                    yield name, t.to(self.live.targets[name].device, torch.float32)
            return
        weights = [0.0] * len(self.indexes)
        for i in members:
            weights[i] = 1.0 / len(members)
        for group in self.groups:
            group = [n for n in group if n in wanted]
            if group:
                yield from self._merge_group(members, weights, group).items()

    def _merge_group(
        self, members: Sequence[int], weights: list[float], group: list[str]
    ) -> dict[str, torch.Tensor]:
        acc = {}
        for name in group:
            acc[name] = self.operator(weights, self.cfg)
            acc[name].start(name, self.theta0[name], self.theta0[name].device)
        for pass_index in range(acc[group[0]].passes):
            for name in group:
                acc[name].add(pass_index, 0, self.theta0[name])
            for i in members:  # slot i + 1: the DARE mask of ingredient i is always the same
                for name, t in self._stream_group(i, group):
                    acc[name].add(pass_index, i + 1, t)
        return {name: a.result() for name, a in acc.items()}

    def _stream_group(self, i: int, group: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        check = not self.allow_nonfinite and i not in self._checked
        yield from iter_tensors(self.indexes[i], group, check=check, gpus=self._gpus)


class _Averaging:
    """The parent class's plain running sum on a :class:`CombineSession`'s live model."""

    def __init__(self, session: CombineSession) -> None:
        self.session, self.indexes = session, session.indexes

    @property
    def model(self) -> torch.nn.Module:
        return self.session.model

    def restart(self, i: int) -> None:
        SoupSession.restart(self.session, i)
        self.session._shown = ()

    def add(self, i: int) -> None:
        SoupSession.add(self.session, i)

    def show_sum(self) -> None:
        SoupSession.show_sum(self.session)


def _groups(index: IngredientIndex, names: Sequence[str]) -> list[list[str]]:
    """``names`` in groups of at most :data:`GROUP_BYTES` of float32 (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = 4 * math.prod(index.tensors[name].shape)
        if groups[-1] and size + nbytes > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return [g for g in groups if g]
