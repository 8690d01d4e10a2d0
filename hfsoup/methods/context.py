"""What the pipeline hands a merge method (:class:`MethodContext`) and what it hands back
(:class:`MethodOutcome`), with the two ways a method writes its weights: streamed through
per-tensor accumulators (:meth:`MethodContext.stream_soup`) or from tensors it holds
(:meth:`MethodContext.write_weights`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfsoup.compute.distributed import Processes
from hfsoup.compute.placement import Placement
from hfsoup.ingredients import IngredientEntry
from hfsoup.io.tensors import IngredientIndex
from hfsoup.recipe import Recipe
from hfsoup.report.outputs import SoupResults, pin_recipe

if TYPE_CHECKING:
    from pydantic import BaseModel

    from hfsoup.compute.combine import Accumulator


@dataclass
class MethodContext:
    """Everything a method's ``run`` may use; the pipeline fills it (see :mod:`hfsoup.pipeline`).

    Attributes:
        recipe: the recipe as run (revisions not yet pinned; see :attr:`pinned`).
        indexes: the ingredients, resolved, indexed and checked compatible (labels aligned).
        shards: the output shard plan (tensor names per shard).
        target: the output folder asked for; ``folder`` is where to write (staged).
        weights: the user's mixing weights, normalised (uniform when none were given).
        config: the method's options (:meth:`MergeMethod.read_config`).
        dtype: output dtype for float tensors (None: the ingredients' own).
        placement: the device map; ``device`` its main device.
        accumulate: the running sums' dtype.
        timings: wall seconds per phase, filled as the run goes.
        state: what the method's ``prepare`` returned.
        base: the base model θ₀ (``needs_base`` methods), resolved, indexed and checked.
    """

    recipe: Recipe
    indexes: Sequence[IngredientIndex]
    shards: Sequence[Sequence[str]]
    target: Path
    weights: list[float]
    config: BaseModel | None
    dtype: torch.dtype | None
    placement: Placement
    device: torch.device
    accumulate: torch.dtype
    processes: Processes
    progress: bool = True
    overwrite: bool = False
    resume: bool = False
    max_in_flight: int | None = None
    memory_budget: str | int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None
    state: Any = None
    base: IngredientIndex | None = None
    cache: bool | None = None  # False: --no-cache (also no outputs cache across runs)

    @property
    def pinned(self) -> Recipe:
        """The recipe with every revision replaced by the commit SHA read (what the soup records),
        the base's too (LoRA adapters': the base they were applied to, so a rebuild reads the
        same commit)."""
        pinned = pin_recipe(self.recipe, self.indexes)
        adapter = self.indexes[0].adapter
        theta0 = adapter.base if adapter is not None else self.base
        entry = self.recipe.base
        if theta0 is not None and entry is None and adapter is not None:
            spec = theta0.ingredient.spec
            entry = IngredientEntry(repo=spec.repo or str(spec.path), revision=spec.revision)
        if theta0 is None or entry is None:
            return pinned
        with_base = self.recipe.model_copy(update={"ingredients": [entry]})
        (base,) = pin_recipe(with_base, [theta0]).ingredients
        return pinned.model_copy(update={"base": base})

    @property
    def labels(self) -> list[str]:
        """The ingredients' labels, in order."""
        return [ix.ingredient.label for ix in self.indexes]

    def results(
        self, weights: Sequence[float], hardware: dict[str, Any], **more: Any
    ) -> SoupResults:
        """The soup's :class:`SoupResults` (pinned recipe, this run's timings); ``more``:
        ``scores``, ``record``."""
        return SoupResults(self.pinned, self.indexes, list(weights), self.timings, self.shards,
                           hardware, **more)  # fmt: skip

    def stream_soup(self, accumulator: Callable[[], Accumulator], *, base: bool = False) -> None:
        """Write the soup streamed through ``accumulator()`` per tensor (see
        :func:`hfsoup.compute.combine.stream_combine`), with its config and the first
        ingredient's tokenizer/processor files; timed as ``stream``. With ``base``, the base
        model θ₀ is streamed as slot 0, before the ingredients (slots 1..k), in every pass."""
        from hfsoup.compute.combine import fetch_plan_bytes, stream_combine
        from hfsoup.io.writer import ShardWriter, copy_aux_files, write_config

        folder, indexes = self._folder(), list(self.indexes)
        if base:
            if self.base is None:
                raise RuntimeError("no base model was resolved for this run")
            indexes = [self.base, *indexes]
        t0 = time.perf_counter()
        writer = ShardWriter(folder, len(self.shards), allow_nonfinite=self.recipe.allow_nonfinite)
        probe = accumulator()
        total = fetch_plan_bytes(indexes, self.shards, probe.passes,
                                 getattr(probe, "whole_tensors", False))  # fmt: skip
        with _bar(total, "Fetching + averaging", self.progress) as bar:
            stream_combine(
                indexes, self.shards, accumulator, on_shard=writer.write, dtype=self.dtype,
                placement=self.placement, on_bytes=bar.update, max_in_flight=self.max_in_flight,
                allow_nonfinite=self.recipe.allow_nonfinite,
            )  # fmt: skip
        writer.finish()
        self.timings["stream"] = time.perf_counter() - t0
        write_config(folder, self.indexes[0].config, self.dtype)
        copy_aux_files(folder, self.indexes[0].ingredient)

    def write_weights(self, tensors_of: Callable[[Sequence[str]], dict[str, torch.Tensor]]) -> None:
        """Write the soup from ``tensors_of(names)`` per shard (CPU tensors in output dtypes),
        with its config and tokenizer/processor files; timed as ``write``."""
        from hfsoup.report.outputs import write_weights

        t0 = time.perf_counter()
        write_weights(self._folder(), self.indexes, self.shards, tensors_of, self.dtype,
                      allow_nonfinite=self.recipe.allow_nonfinite)  # fmt: skip
        self.timings["write"] = time.perf_counter() - t0

    def _folder(self) -> Path:
        if self.folder is None:
            raise RuntimeError("only the main process writes the soup")
        return self.folder


@dataclass
class MethodOutcome:
    """What a method's ``run`` returns: the results, and what the card says beyond them.

    Attributes:
        results: the soup's results (results.json is their serialisation).
        sections: the card's method sections (scores, figures), in order.
        model_index: the card's ``model-index`` (the Hub's evaluation results), if any.
        scratch: names in the staged folder (resume state) removed once the soup is written.
    """

    results: SoupResults
    sections: list[str] = field(default_factory=list)
    model_index: list[dict] | None = None
    scratch: list[str] = field(default_factory=list)

    @property
    def weights(self) -> list[float]:
        return list(self.results.weights)


def _bar(total: int, desc: str, enabled: bool):
    from huggingface_hub.utils import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled
    )
