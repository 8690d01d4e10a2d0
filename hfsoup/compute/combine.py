"""The arithmetic of a soup: per-piece accumulators (a weighted running sum in float32 for the
uniform soup), fed by streamed chunks.

This module is deliberately short. Scheduling and I/O live in :mod:`hfsoup.io.streaming`, the
chunk plan and the hand-over to the writer in :mod:`hfsoup.io.chunks`; here each streamed
piece is handed to its accumulator and each finished chunk is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from hfsoup.compute.placement import Placement
from hfsoup.errors import RecipeError
from hfsoup.io.chunks import Chunk, _as_writer, _piece_ref, _Shards, plan_chunks
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


class Accumulator(Protocol):
    """How a streamed method combines one piece of one tensor across the ingredients.

    The streaming code cuts the output into chunks (a few tensors, or rows of a large one, of at
    most :data:`~hfsoup.io.chunks.CHUNK_BYTES` of float32) and makes one accumulator per float
    piece of the current chunk: it calls :meth:`start` once, then :meth:`add` with every
    ingredient's copy of the piece, ``passes`` times over (pass 0 for every ingredient, then
    pass 1, ...), and finally takes :meth:`result`. A one-pass method is a running sum; a
    two-pass one (TIES: elect signs in pass 0, average the agreeing values in pass 1) keeps what
    pass 0 found for pass 1. Memory is one chunk plus the reads in flight, whatever the model.
    A method that needs a statistic of the whole tensor (a magnitude quantile) sets
    ``whole_tensors = True`` (an optional attribute, False when absent): its pieces are then
    whole tensors, never slices of rows, so memory is one tensor per accumulator at most.
    """

    passes: int
    whole_tensors: bool

    def start(self, name: str, like: torch.Tensor, device: torch.device | str) -> None:
        """Make the state for the piece of tensor ``name`` shaped like ``like`` on ``device``."""

    def add(self, pass_index: int, slot: int, tensor: torch.Tensor) -> None:
        """Take ingredient ``slot``'s copy of the piece in pass ``pass_index``."""

    def result(self) -> torch.Tensor:
        """The combined piece (any float dtype; the caller casts it to the output's)."""


class WeightedSum:
    """The uniform (weighted) soup: ``sum_i w_i * theta_i``, accumulated in ``dtype`` (float32,
    or float64 on request) in the order the ingredients arrive."""

    passes = 1
    whole_tensors = False

    def __init__(self, weights: Sequence[float], dtype: torch.dtype = torch.float32) -> None:
        self.weights, self.dtype = weights, dtype

    def start(self, name: str, like: torch.Tensor, device: torch.device | str) -> None:
        self.sum = torch.zeros(like.shape, dtype=self.dtype, device=device)

    def add(self, pass_index: int, slot: int, tensor: torch.Tensor) -> None:
        moved = tensor.to(device=self.sum.device, dtype=self.dtype, non_blocking=True)
        self.sum.add_(moved, alpha=self.weights[slot])

    def result(self) -> torch.Tensor:
        return self.sum


def stream_average(
    indexes: Sequence[IngredientIndex],
    weights: Sequence[float],
    shards: Sequence[Sequence[str]],
    *,
    accumulate: torch.dtype = torch.float32,
    **options: Any,
) -> None:
    """The uniform soup: :func:`stream_combine` with a :class:`WeightedSum` per piece.

    ``weights`` are the normalised mixing weights, one per ingredient; ``accumulate`` the
    running sums' dtype; ``options`` as for :func:`stream_combine`.
    """
    stream_combine(indexes, shards, lambda: WeightedSum(weights, accumulate), **options)


def stream_combine(
    indexes: Sequence[IngredientIndex],
    shards: Sequence[Sequence[str]],
    accumulator: Callable[[], Accumulator],
    *,
    on_shard: Callable[[int, dict[str, torch.Tensor]], None] | ShardWriter,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    on_bytes: Callable[[int], None] | None = None,
    max_in_flight: int | None = None,
    allow_nonfinite: bool = False,
    placement: Placement | None = None,
) -> None:
    """Combine the ingredients chunk by chunk and write (or hand on) each output shard.

    The tensors are cut into chunks (:func:`plan_chunks`: a few small tensors, or rows of a
    large one, of at most :data:`CHUNK_BYTES` of accumulator); each chunk is streamed in from
    every ingredient (``passes`` times over), fed to one ``accumulator()`` per float piece on
    the device its block is placed on, cast to the output dtype and written at its place in
    its output file. Memory holds one chunk's accumulators plus the bytes in flight, whatever
    the model, shard size or number of ingredients. Integer buffers come from the first one.

    Args:
        indexes: the ingredients' indexes, checked compatible.
        shards: the output shard plan (tensor names per shard).
        accumulator: makes a fresh :class:`Accumulator` (it allocates in ``start``).
        on_shard: a :class:`ShardWriter` (or its bound ``write``), which gets each chunk as it
            is done; or any callable, which gets ``(shard_number, tensors_in_output_dtype)``
            per whole shard (the shard is then assembled in memory).
        dtype: output dtype for float tensors; ``None`` keeps the first ingredient's.
        device: where the arithmetic runs (when no ``placement``).
        on_bytes: progress callback, called with the size of each completed read.
        allow_nonfinite: combine tensors holding NaN/Inf instead of refusing them.
        placement: a device map: each accumulator lives on the device of its block, and reads
            go through pinned buffers when a GPU is among them (asynchronous copies).

    Raises:
        NonFiniteWeightsError: an ingredient's float tensor holds NaN or Inf (checked as it
            streams in; the staged writer removes what was written).
    """
    first = indexes[0].tensors
    placement = placement or Placement.single(device)
    gpus = sorted(
        {torch.device(d) for d in placement.devices.values() if torch.device(d).type == "cuda"},
        key=str,
    )
    passes, whole = (probe := accumulator()).passes, getattr(probe, "whole_tensors", False)
    kwargs: dict = {"gpus": gpus, "passes": passes}
    if max_in_flight is not None:
        kwargs["max_in_flight"] = max_in_flight
    chunks = plan_chunks(indexes, shards, whole_tensors=whole)
    map_large_allocations()  # freed chunks go back to the OS, so the peak does not creep
    sink = _Shards(_as_writer(on_shard), indexes[0], shards, dtype)
    with _one_cpu_thread(placement.main_device if not gpus else "cuda"):
        stream = prefetch(_fetches(indexes, chunks, passes), **kwargs)
        current, acc = 0, {}
        try:
            for fetch, tensors in stream:
                chunk, pass_index = divmod(fetch.tag, passes)
                if chunk != current:
                    sink.put(chunks[current], _finish(acc, first, dtype))
                    current, acc = chunk, {}
                for name, t in tensors.items():
                    if first[name].dtype not in FLOAT_DTYPES:
                        acc[name] = t.clone()
                        continue
                    if not allow_nonfinite and pass_index == 0:
                        check_finite(fetch.index, name, t)
                    if name not in acc:
                        acc[name] = accumulator()
                        acc[name].start(name, t, placement.device_for(name))
                    acc[name].add(pass_index, fetch.slot, t)
                if on_bytes:
                    on_bytes(fetch.nbytes)
            if chunks:
                sink.put(chunks[current], _finish(acc, first, dtype))
            sink.close()
        except BaseException:
            sink.abort()
            raise


# --- The hand-over to the writer: each accumulator's result cast to its output dtype, on the
# CPU (integer buffers, copied from the first ingredient, pass as they are). ---


def _finish(acc: dict[str, Any], first: dict, dtype: torch.dtype | None) -> dict:
    out = {}
    for name, value in acc.items():
        t = value if isinstance(value, torch.Tensor) else value.result()
        out[name] = t.to(output_dtype(first[name], dtype)).cpu()
    return out


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


one_cpu_thread = _one_cpu_thread  # for the other CPU-bound loops (hfsoup.compute.lora_writer)


def _fetches(
    indexes: Sequence[IngredientIndex], chunks: Sequence[Chunk], passes: int = 1
) -> Iterator[Fetch]:
    """Each chunk's reads, pass by pass, ingredient by ingredient; a fetch's tag is
    ``chunk * passes + pass``."""
    first = indexes[0].tensors
    for number, chunk in enumerate(chunks):
        for pass_index in range(passes):
            tag = number * passes + pass_index
            for slot, index in enumerate(indexes):
                # Integer buffers are read once, from the first ingredient in pass 0.
                pieces = [p for p in chunk.pieces if first[p.name].dtype in FLOAT_DTYPES
                          or (slot == 0 and pass_index == 0)]  # fmt: skip
                refs = [_piece_ref(index.tensors[p.name], p) for p in pieces]
                yield from plan_ref_fetches(index, refs, slot=slot, tag=tag)


def fetch_plan_bytes(
    indexes: Sequence[IngredientIndex], shards: Sequence[Sequence[str]], passes: int = 1,
    whole_tensors: bool = False,
) -> int:  # fmt: skip
    """How many bytes :func:`stream_combine` will read (for progress bars and benchmarks)."""
    chunks = plan_chunks(indexes, shards, whole_tensors=whole_tensors)
    return sum(f.nbytes for f in _fetches(indexes, chunks, passes))


__all__ = [
    "Accumulator",
    "Fetch",
    "WeightedSum",
    "fetch_plan_bytes",
    "normalise_weights",
    "stream_average",
    "stream_combine",
]
