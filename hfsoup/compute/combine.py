"""The arithmetic of a soup: a weighted running sum in float32, fed by streamed tensors.

This module is deliberately short. Scheduling and I/O live in :mod:`hfsoup.io.streaming`; here
each streamed tensor is added into its accumulator and each finished output shard is handed on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from hfsoup.compute.placement import Placement
from hfsoup.errors import RecipeError
from hfsoup.io.streaming import Fetch, check_finite, plan_fetches, prefetch
from hfsoup.io.tensors import FLOAT_DTYPES, IngredientIndex, output_dtype


def normalise_weights(k: int, weights: Sequence[float] | None) -> list[float]:
    """Uniform ``1/k`` weights, or the given ones scaled to sum to 1.

    Raises:
        RecipeError: wrong count, a negative weight, or a zero sum.
    """
    if weights is None:
        return [1.0 / k] * k
    if len(weights) != k:
        raise RecipeError(f"got {len(weights)} weights for {k} ingredients")
    if any(not math.isfinite(w) or w < 0 for w in weights) or max(weights) <= 0:
        raise RecipeError(
            f"weights must be finite and >= 0 with a positive sum, got {list(weights)}"
        )
    # Scaled by the largest first: each is then <= 1 and their sum <= k, so weights that are
    # each finite cannot overflow the sum (1e308 + 1e308 is inf, and w / inf is 0).
    largest = float(max(weights))
    scaled = [float(w) / largest for w in weights]
    total = sum(scaled)
    return [w / total for w in scaled]


def stream_average(
    indexes: Sequence[IngredientIndex],
    weights: Sequence[float],
    shards: Sequence[Sequence[str]],
    *,
    on_shard: Callable[[int, dict[str, torch.Tensor]], None],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    accumulate: torch.dtype = torch.float32,
    on_bytes: Callable[[int], None] | None = None,
    max_in_flight: int | None = None,
    allow_nonfinite: bool = False,
    placement: Placement | None = None,
) -> None:
    """Average the ingredients shard by shard and pass each finished shard to ``on_shard``.

    For each output shard the ingredients' tensors are streamed in and added, weighted, into
    float32 accumulators on ``device``; memory holds one output shard plus the bytes in flight.
    Non-float tensors (integer buffers) are taken from the first ingredient.

    Args:
        indexes: the ingredients' indexes, checked compatible.
        weights: normalised mixing weights, one per ingredient.
        shards: the output shard plan (tensor names per shard).
        on_shard: called with ``(shard_number, tensors_in_output_dtype)``.
        dtype: output dtype for float tensors; ``None`` keeps the first ingredient's.
        device: where the arithmetic runs (when no ``placement``).
        accumulate: accumulator dtype (float32, or float64 on request).
        on_bytes: progress callback, called with the size of each completed read.
        allow_nonfinite: average tensors holding NaN/Inf instead of refusing them.
        placement: a device map: each accumulator lives on the device of its block, and reads
            go through pinned buffers when a GPU is among them (asynchronous copies).

    Raises:
        NonFiniteWeightsError: an ingredient's float tensor holds NaN or Inf (checked as it
            streams in, before it is added; the staged writer removes any shard already written).
    """
    first = indexes[0].tensors
    placement = placement or Placement.single(device)
    gpus = sorted(
        {torch.device(d) for d in placement.devices.values() if torch.device(d).type == "cuda"},
        key=str,
    )
    kwargs: dict = {"gpus": gpus}
    if max_in_flight is not None:
        kwargs["max_in_flight"] = max_in_flight
    with _one_cpu_thread(placement.main_device if not gpus else "cuda"):
        stream = prefetch(_fetches(indexes, shards), **kwargs)
        current, acc = 0, {}
        for fetch, tensors in stream:
            if fetch.tag != current:
                on_shard(current, _finish(acc, first, dtype))
                current, acc = fetch.tag, {}
            w = weights[fetch.slot]
            for name, t in tensors.items():
                if first[name].dtype not in FLOAT_DTYPES:
                    acc[name] = t.clone()
                    continue
                if not allow_nonfinite:
                    check_finite(fetch.index, name, t)
                if name not in acc:
                    target = placement.device_for(name)
                    acc[name] = torch.zeros(t.shape, dtype=accumulate, device=target)
                a = acc[name]
                a.add_(t.to(device=a.device, dtype=accumulate, non_blocking=True), alpha=w)
            if on_bytes:
                on_bytes(fetch.nbytes)
        on_shard(current, _finish(acc, first, dtype))


@contextmanager
def _one_cpu_thread(device: torch.device | str) -> Iterator[None]:
    """Run the CPU arithmetic on one torch thread, restoring the setting afterwards.

    The sum is memory-bound, so more threads gain little; and between the many small ``add_``
    calls torch's OpenMP threads spin-wait, taking the CPU the fetch threads need to receive
    bytes (BENCHMARKS.md: beside 3 busy processes, removing the spin-wait took hfsoup's core
    time at k=8 from 5.65 s to 3.46 s).
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fetches(indexes: Sequence[IngredientIndex], shards: Sequence[Sequence[str]]):
    first = indexes[0].tensors
    for tag, names in enumerate(shards):
        floats = [n for n in names if first[n].dtype in FLOAT_DTYPES]
        for slot, index in enumerate(indexes):
            # Integer buffers are read once, from the first ingredient.
            wanted = names if slot == 0 else floats
            yield from plan_fetches(index, wanted, slot=slot, tag=tag)


def _finish(acc: dict[str, torch.Tensor], first: dict, dtype: torch.dtype | None) -> dict:
    return {name: t.to(output_dtype(first[name], dtype)).cpu() for name, t in acc.items()}


def fetch_plan_bytes(indexes: Sequence[IngredientIndex], shards: Sequence[Sequence[str]]) -> int:
    """How many bytes :func:`stream_average` will read (for progress bars and benchmarks)."""
    return sum(f.nbytes for f in _fetches(indexes, shards))


__all__ = ["Fetch", "fetch_plan_bytes", "normalise_weights", "stream_average"]
