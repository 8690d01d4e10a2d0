"""The unit of a uniform soup's work: a chunk of tensors, and the hand-over to the output files.

A :class:`Chunk` is a few whole tensors of one output shard, or some rows of one large tensor,
sized so that its float32 accumulators stay within :data:`CHUNK_BYTES`. Each chunk is read from
every ingredient (row ranges are plain byte ranges of a safetensors file), averaged, and written
at its offset in its output file (:class:`hfsoup.io.shards.ShardWriter`), so memory holds one
chunk, never a shard or a whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hfsoup.io.shards import ShardWriter, Spec
from hfsoup.io.tensors import IngredientIndex, TensorRef, output_dtype

# Accumulator bytes of one chunk (float32): tensors larger than this are split into rows.
CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """Rows ``[row, row + rows)`` of tensor ``name`` (``rows`` None: the whole tensor)."""

    name: str
    row: int = 0
    rows: int | None = None


@dataclass(frozen=True)
class Chunk:
    """What is averaged at once: pieces of tensors of output shard ``shard``."""

    shard: int
    pieces: tuple[Piece, ...]


def plan_chunks(
    indexes: Sequence[IngredientIndex],
    shards: Sequence[Sequence[str]],
    *,
    chunk_bytes: int | None = None,
    itemsize: int = 4,
    whole_tensors: bool = False,
) -> list[Chunk]:
    """Cut the shard plan into chunks of at most ``chunk_bytes`` (default :data:`CHUNK_BYTES`)
    of accumulator each.

    Small tensors are grouped (in the shard's order, the first ingredient's file order, so reads
    stay sequential); a tensor larger than ``chunk_bytes`` is split into row ranges, unless it
    cannot be read by rows: a classification head whose rows are reordered (``row_perm``), or
    a tensor of one row, or ``whole_tensors`` is set (a method that needs a statistic of the
    whole tensor: TIES' magnitude threshold). With a pickled ingredient each output shard is one
    chunk.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if any(ix.pickle for ix in indexes):
        # A pickled file is loaded whole (memory-mapped, a cache of two): one chunk per output
        # shard keeps the loads to one per ingredient and shard, as before chunking.
        return [Chunk(i, tuple(Piece(n) for n in names)) for i, names in enumerate(shards)]
    first = indexes[0].tensors
    whole = set().union(*(ix.head_tensors for ix in indexes))
    chunks: list[Chunk] = []
    for shard, names in enumerate(shards):
        group: list[Piece] = []
        size = 0
        for name in names:
            ref = first[name]
            acc = ref.numel * itemsize
            if (
                acc > chunk_bytes
                and not whole_tensors
                and name not in whole
                and len(ref.shape) >= 1
                and ref.shape[0] > 1
            ):
                if group:
                    chunks.append(Chunk(shard, tuple(group)))
                    group, size = [], 0
                per = max(1, chunk_bytes // (acc // ref.shape[0]))
                for row in range(0, ref.shape[0], per):
                    rows = min(per, ref.shape[0] - row)
                    chunks.append(Chunk(shard, (Piece(name, row, rows),)))
                continue
            if group and size + acc > chunk_bytes:
                chunks.append(Chunk(shard, tuple(group)))
                group, size = [], 0
            group.append(Piece(name))
            size += acc
        if group:
            chunks.append(Chunk(shard, tuple(group)))
    return chunks


def _piece_ref(ref: TensorRef, piece: Piece) -> TensorRef:
    """The byte range of ``piece`` in one ingredient's file, as a ref of its rows."""
    if piece.rows is None:
        return ref
    row_bytes = ref.nbytes // ref.shape[0]
    start = ref.start + piece.row * row_bytes
    shape = (piece.rows, *ref.shape[1:])
    return TensorRef(ref.name, ref.file, ref.dtype, shape, start, start + piece.rows * row_bytes)


class _Collect:
    """A writer-like sink that assembles each shard in memory and hands it to a callable
    (``on_shard(i, tensors)``, the interface before chunked writing)."""

    def __init__(self, on_shard: Callable[[int, dict[str, torch.Tensor]], None]) -> None:
        self.on_shard = on_shard
        self.shard, self.tensors = 0, {}

    def begin(self, i: int, specs: Mapping[str, Spec]) -> None:
        self.shard = i
        self.tensors = {n: torch.empty(shape, dtype=dt) for n, (dt, shape) in specs.items()}

    def write_chunk(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        out = self.tensors[name]
        if out.dim() == 0:
            out.copy_(tensor)
        else:
            out[row : row + tensor.shape[0]] = tensor

    def end(self) -> None:
        tensors, self.tensors = self.tensors, {}
        self.on_shard(self.shard, tensors)

    def abort(self) -> None:
        self.tensors = {}


def _as_writer(on_shard: Callable | ShardWriter) -> ShardWriter | _Collect:
    """The sink for ``on_shard``: a :class:`ShardWriter` (given itself or its bound ``write``)
    gets chunks; any other callable gets whole shards (:class:`_Collect`)."""
    owner = getattr(on_shard, "__self__", None)
    if isinstance(owner, ShardWriter) and getattr(on_shard, "__func__", None) is ShardWriter.write:
        return owner
    return on_shard if isinstance(on_shard, ShardWriter) else _Collect(on_shard)


class _Shards:
    """Opens the output shards in order and writes each finished chunk into its shard."""

    def __init__(
        self,
        writer: ShardWriter | _Collect,
        first: IngredientIndex,
        shards: Sequence[Sequence[str]],
        dtype: torch.dtype | None,
    ) -> None:
        self.writer, self.first, self.shards, self.dtype = writer, first.tensors, shards, dtype
        self.open = -1  # the shard open now (-1: none yet)

    def _advance(self, shard: int) -> None:
        while self.open < shard:
            if self.open >= 0:
                self.writer.end()
            self.open += 1
            specs = {
                n: (output_dtype(self.first[n], self.dtype), self.first[n].shape)
                for n in self.shards[self.open]
            }
            self.writer.begin(self.open, specs)

    def put(self, chunk: Chunk, tensors: dict[str, torch.Tensor]) -> None:
        """Write the finished ``tensors`` (output dtypes, CPU) of ``chunk``."""
        self._advance(chunk.shard)
        for piece in chunk.pieces:
            self.writer.write_chunk(piece.name, tensors[piece.name], piece.row)

    def close(self) -> None:
        """Open any shard not reached yet (a shard plan without tensors), then end the last."""
        self._advance(len(self.shards) - 1)
        self.writer.end()

    def abort(self) -> None:
        self.writer.abort()


__all__ = ["CHUNK_BYTES", "Chunk", "Piece", "plan_chunks"]
