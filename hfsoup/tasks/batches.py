"""Run a model over a prepared split's batches: in order, or shared between processes.

Kind-independent: a task kind gives a ``forward(model, batch) -> outputs`` and gets the
outputs of every batch, with the progress bar, eval mode and the data-parallel split of
``accelerate launch`` (:mod:`hfsoup.compute.distributed`) handled here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from huggingface_hub.utils import tqdm

from hfsoup.compute.distributed import Processes
from hfsoup.tasks.preprocess import PreparedSplit

Forward = Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any]


class BatchRunner:
    """Runs ``forward`` over a split's batches, alone or as one of several processes.

    Args:
        processes: The processes scoring together; each runs every ``world``-th batch and
            the outputs are gathered, so every process gets every batch's outputs.
        progress: Show a progress bar per pass (on the main process only).
    """

    def __init__(self, processes: Processes | None = None, *, progress: bool = True) -> None:
        self.processes = processes or Processes()
        self.progress = progress and self.processes.is_main

    def run(
        self, forward: Forward, model: torch.nn.Module, prepared: PreparedSplit, split: str
    ) -> list[Any]:
        """Every batch's outputs, in batch order (in eval mode)."""
        with evaluating(model):
            if not self.processes.distributed:
                return [forward(model, batch) for batch in self._bar(prepared.batches, split)]
            mine = {
                i: forward(model, prepared.batches[i])
                for i in self._bar(self.processes.shard(len(prepared.batches)), split)
            }
            everyone: dict[int, Any] = {}
            for part in self.processes.gather(mine):
                everyone.update(part)
            return [everyone[i] for i in range(len(prepared.batches))]

    def in_order(
        self,
        forward: Forward,
        model: torch.nn.Module,
        prepared: PreparedSplit,
        split: str,
        *,
        start: int = 0,
    ) -> Iterator[Any]:
        """The outputs of each batch in turn; with several processes, a round at a time.

        In a round every process runs one batch (process ``r`` the ``r``-th of the round) and
        the outputs are gathered; the consumer then sees them in batch order, exactly as a
        single process would, and may stop between any two (the batches already run beyond
        that point are wasted, never counted). The caller keeps the model in eval mode
        (:func:`evaluating`). ``start``: the first batch to run (those before it are skipped).
        """
        if not self.processes.distributed:
            with self._bar(prepared.batches[start:], split) as batches:
                for batch in batches:
                    yield forward(model, batch)
            return
        n, world, rank = len(prepared.batches), self.processes.world, self.processes.rank
        for first in self._bar(range(start, n, world), split):
            mine = first + rank
            output = forward(model, prepared.batches[mine]) if mine < n else None
            yield from self.processes.gather(output)[: n - first]

    def _bar(self, items: Iterable, split: str) -> Any:
        return tqdm(items, desc=f"scoring {split}", disable=not self.progress, leave=False)


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration; the model's own mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def to_device(
    batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``; its float tensors (pixel values) in ``dtype`` when given."""
    return {
        key: value.to(device, dtype) if dtype and value.is_floating_point() else value.to(device)
        for key, value in batch.items()
    }
