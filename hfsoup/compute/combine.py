"""The arithmetic of a soup: a weighted running sum in float32, fed by streamed tensors.

This module is deliberately short. Scheduling and I/O live in :mod:`hfsoup.io.streaming`, the
chunk plan and the hand-over to the writer in :mod:`hfsoup.compute.chunks`; here each streamed
chunk is added into its accumulator and each finished chunk is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from hfsoup.compute.chunks import Chunk, _as_writer, _piece_ref, _Shards, plan_chunks
from hfsoup.compute.placement import Placement
from hfsoup.errors import RecipeError
from hfsoup.io.shards import ShardWriter
from hfsoup.io.streaming import (
    Fetch,
    check_finite,
    map_large_allocations,
    plan_ref_fetches,
    prefetch,
)
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
    on_shard: Callable[[int, dict[str, torch.Tensor]], None] | ShardWriter,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    accumulate: torch.dtype = torch.float32,
    on_bytes: Callable[[int], None] | None = None,
    max_in_flight: int | None = None,
    allow_nonfinite: bool = False,
    placement: Placement | None = None,
) -> None:
    """Average the ingredients chunk by chunk and write (or hand on) each output shard.

    The tensors are cut into chunks (:func:`plan_chunks`: a few small tensors, or rows of a
    large one, of at most :data:`CHUNK_BYTES` of accumulator); each chunk is streamed in from
    every ingredient, added, weighted, into float32 accumulators on ``device``, cast to the
    output dtype and written at its place in its output file. Memory holds one chunk's
    accumulators plus the bytes in flight, whatever the model, shard size or number of
    ingredients. Non-float tensors (integer buffers) are taken from the first ingredient.

    Args:
        indexes: the ingredients' indexes, checked compatible.
        weights: normalised mixing weights, one per ingredient.
        shards: the output shard plan (tensor names per shard).
        on_shard: a :class:`ShardWriter` (or its bound ``write``), which gets each chunk as it
            is done; or any callable, which gets ``(shard_number, tensors_in_output_dtype)``
            per whole shard (the shard is then assembled in memory).
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
    chunks = plan_chunks(indexes, shards)
    map_large_allocations()  # freed chunks go back to the OS, so the peak does not creep
    sink = _Shards(_as_writer(on_shard), indexes[0], shards, dtype)
    with _one_cpu_thread(placement.main_device if not gpus else "cuda"):
        stream = prefetch(_fetches(indexes, chunks), **kwargs)
        current, acc = 0, {}
        try:
            for fetch, tensors in stream:
                if fetch.tag != current:
                    sink.put(chunks[current], _finish(acc, first, dtype))
                    current, acc = fetch.tag, {}
                w = weights[fetch.slot]
                for name, t in tensors.items():
                    if first[name].dtype not in FLOAT_DTYPES:
                        acc[name] = t.clone()
                        continue
                    if not allow_nonfinite:
                        check_finite(fetch.index, name, t)
                    if name not in acc:
                        acc[name] = _start(t.shape, placement.device_for(name), accumulate)
                    _add(acc[name], t, w)
                if on_bytes:
                    on_bytes(fetch.nbytes)
            if chunks:
                sink.put(chunks[current], _finish(acc, first, dtype))
            sink.close()
        except BaseException:
            sink.abort()
            raise


# --- The arithmetic of a uniform soup: the one place it happens (one chunk of one or more
# tensors at a time). ``_start`` makes a chunk's accumulator, ``_add`` adds an ingredient's
# chunk with its weight, ``_finish`` casts the sums to the output dtypes on the CPU. ---


def _start(shape: torch.Size, device: torch.device | str, accumulate: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=accumulate, device=device)


def _add(acc: torch.Tensor, t: torch.Tensor, w: float) -> None:
    acc.add_(t.to(device=acc.device, dtype=acc.dtype, non_blocking=True), alpha=w)


def _finish(acc: dict[str, torch.Tensor], first: dict, dtype: torch.dtype | None) -> dict:
    return {name: t.to(output_dtype(first[name], dtype)).cpu() for name, t in acc.items()}


# --- end of the arithmetic ---


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


def _fetches(indexes: Sequence[IngredientIndex], chunks: Sequence[Chunk]) -> Iterator[Fetch]:
    """Each chunk's reads, ingredient by ingredient; the fetch's tag is the chunk's number."""
    first = indexes[0].tensors
    for tag, chunk in enumerate(chunks):
        for slot, index in enumerate(indexes):
            # Integer buffers are read once, from the first ingredient.
            pieces = [p for p in chunk.pieces if slot == 0 or first[p.name].dtype in FLOAT_DTYPES]
            refs = [_piece_ref(index.tensors[p.name], p) for p in pieces]
            yield from plan_ref_fetches(index, refs, slot=slot, tag=tag)


def fetch_plan_bytes(indexes: Sequence[IngredientIndex], shards: Sequence[Sequence[str]]) -> int:
    """How many bytes :func:`stream_average` will read (for progress bars and benchmarks)."""
    return sum(f.nbytes for f in _fetches(indexes, plan_chunks(indexes, shards)))


__all__ = ["Fetch", "fetch_plan_bytes", "normalise_weights", "stream_average"]
