"""Output shards written in constant memory: the header first, then each tensor's bytes in place.

A safetensors file is an 8-byte header length, a JSON header (names, dtypes, shapes, byte
offsets) and the tensors' bytes. The header depends only on the names, dtypes and shapes, all
known from the shard plan before any weight byte is read, so :class:`SafetensorsOut` writes it
first and then takes a tensor's bytes a chunk (rows) at a time, at their final offsets. The file
is byte for byte what ``safetensors.torch.save_file`` writes for the same tensors (the same
order: by dtype as safetensors ranks them, then by name; the same compact JSON; the header
padded with spaces to a multiple of 8 bytes).
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hfsoup.errors import NonFiniteWeightsError
from hfsoup.io.tensors import DTYPE_NAMES, DTYPES, all_finite

INDEX_NAME = "model.safetensors.index.json"
METADATA = {"format": "pt"}
Spec = tuple[torch.dtype, tuple[int, ...]]


def shard_filename(i: int, n: int) -> str:
    """``model.safetensors`` for a single shard, ``model-0000i-of-0000n.safetensors`` otherwise."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


@dataclass(frozen=True)
class Slot:
    """Where one tensor goes in the data section of an output file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (index along the first dimension; the whole tensor if 0-dim)."""
        rows = self.shape[0] if self.shape else 1
        return (self.end - self.start) // rows if rows else 0


@functools.cache
def _dtype_rank() -> dict[str, int]:
    """The order safetensors writes dtypes in (asked of safetensors itself, once)."""
    from safetensors.torch import save

    probe = {str(i): torch.zeros(1, dtype=DTYPES[n]) for i, n in enumerate(DTYPES)}
    raw = save(probe)
    (n,) = struct.unpack("<Q", raw[:8])
    order = [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]
    names = list(DTYPES)
    return {names[int(k)]: rank for rank, k in enumerate(order)}


def plan_file(
    specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = METADATA
) -> tuple[bytes, dict[str, Slot]]:
    """The header bytes (length prefix included) and each tensor's slot, for ``specs``."""
    rank = _dtype_rank()
    order = sorted(specs, key=lambda k: (rank[DTYPE_NAMES[specs[k][0]]], k.encode()))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    slots: dict[str, Slot] = {}
    pos = 0
    for name in order:
        dtype, shape = specs[name]
        numel = 1
        for d in shape:
            numel *= d
        end = pos + numel * dtype.itemsize
        slots[name] = Slot(dtype, tuple(shape), pos, end)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [pos, end],
        }
        pos = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, slots


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw (little-endian, C-order) bytes of a CPU tensor, without a copy when contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class SafetensorsOut:
    """One safetensors file, written header first, then tensor rows at their offsets.

    Args:
        path: the file to create (in the staging folder).
        specs: ``{name: (dtype, shape)}`` of every tensor the file will hold.
    """

    def __init__(self, path: Path, specs: Mapping[str, Spec]) -> None:
        header, self.slots = plan_file(specs)
        self.path, self.base = path, len(header)
        self.size = sum(s.end - s.start for s in self.slots.values())
        self.written = 0
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            self._put(0, memoryview(header))
        except BaseException:
            self._file.close()
            raise

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write ``tensor`` as rows ``row ...`` of ``name`` (the whole tensor when ``row`` is 0
        and the shapes agree)."""
        slot = self.slots[name]
        if tensor.dtype != slot.dtype or tuple(tensor.shape[1:]) != slot.shape[1:]:
            raise ValueError(f"{name}: chunk {tensor.dtype} {tuple(tensor.shape)} does not fit")
        data = tensor_bytes(tensor)
        offset = slot.start + row * slot.row_bytes
        if offset + len(data) > slot.end:
            raise ValueError(f"{name}: rows from {row} run past the tensor's end")
        self._put(self.base + offset, data)
        self.written += len(data)

    def _put(self, offset: int, data: memoryview) -> None:
        self._file.seek(offset)
        while data:
            n = self._file.write(data)
            data = data[n:]

    def close(self) -> None:
        """Close the file; every byte of every tensor must have been written."""
        self._file.close()
        if self.written != self.size:  # a planning bug must not leave zeros in a soup
            raise AssertionError(f"{self.path.name}: {self.written} of {self.size} bytes written")

    def abort(self) -> None:
        self._file.close()


class ShardWriter:
    """Writes output shards, header first and tensor by tensor (or chunk by chunk), then the
    weight index.

    Every method's output tensors pass through :meth:`write_chunk` (directly, or through
    :meth:`write` for a whole shard), in the dtype they are written in, so this is where a soup
    is checked finite: an average can overflow where no ingredient holds NaN or Inf (float32
    ingredients written as float16 whose mean exceeds 65504).
    """

    def __init__(self, folder: Path, num_shards: int, *, allow_nonfinite: bool = False) -> None:
        self.folder, self.num_shards = folder, num_shards
        self.allow_nonfinite = allow_nonfinite
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._open: SafetensorsOut | None = None

    def begin(self, i: int, specs: Mapping[str, Spec]) -> None:
        """Start output shard ``i``, holding ``specs`` (``{name: (dtype, shape)}``)."""
        if self._open is not None:
            raise RuntimeError(f"shard {self._open.path.name} is still open")
        name = shard_filename(i, self.num_shards)
        self._open = SafetensorsOut(self.folder / name, specs)
        for key in specs:
            self.weight_map[key] = name

    def write_chunk(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write rows ``row ...`` of the open shard's tensor ``name`` (CPU, output dtype).

        Raises:
            NonFiniteWeightsError: the chunk holds NaN or Inf (unless ``allow_nonfinite``).
        """
        if not self.allow_nonfinite and not all_finite(tensor):
            raise NonFiniteWeightsError(
                f"the soup's tensor {name!r} holds NaN or Inf values as {_dtype_name(tensor)} "
                "(its average overflows that dtype); write a wider dtype (float32), or "
                "set allow_nonfinite to write it anyway",
                options=["allow_nonfinite"],
            )
        if self._open is None:
            raise RuntimeError("no shard is open")
        self._open.write(name, tensor, row)

    def end(self) -> None:
        """Finish the open shard (every byte of it written)."""
        out, self._open = self._open, None
        if out is not None:
            out.close()
            self.total_size += out.size

    def abort(self) -> None:
        """Close the open shard after a failure (the staging folder is removed anyway)."""
        out, self._open = self._open, None
        if out is not None:
            out.abort()

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write output shard ``i`` whole.

        Raises:
            NonFiniteWeightsError: a float tensor of the soup holds NaN or Inf (unless
                ``allow_nonfinite``); nothing of the shard is written.
        """
        if not self.allow_nonfinite:
            for key, t in tensors.items():
                if not all_finite(t):
                    self.write_chunk(key, t)  # raises, naming the tensor
        self.begin(i, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
        try:
            for key, t in tensors.items():
                self._open.write(key, t)
        except BaseException:
            self.abort()
            raise
        self.end()

    def finish(self) -> None:
        """Write the weight index (more than one shard)."""
        if self.num_shards > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


__all__ = ["INDEX_NAME", "SafetensorsOut", "ShardWriter", "plan_file", "shard_filename"]
