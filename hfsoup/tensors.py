"""What the ingredients hold, from safetensors headers and config.json alone.

No weight byte is read here: an :class:`IngredientIndex` maps every tensor name to its file,
dtype, shape and absolute byte range, which is enough to check compatibility and to plan output
shards before anything heavy starts.
"""

from __future__ import annotations

import json
import posixpath
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hfsoup.errors import (
    CorruptWeightsError,
    IncompatibleIngredientsError,
    UnsafeWeightsError,
)
from hfsoup.hub import Ingredient

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_HEADER_PROBE = 64 * 1024
_MAX_HEADER = 100 * 1024 * 1024
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live in one ingredient."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class IngredientIndex:
    """Every tensor of one ingredient, plus its config.json."""

    ingredient: Ingredient
    tensors: dict[str, TensorRef]
    config: dict
    pickle: bool = False
    # Set when this ingredient names the reference's labels in another order: head rows are
    # read as ``rows[row_perm]`` for the tensors in ``head_tensors``.
    row_perm: list[int] | None = None
    head_tensors: frozenset[str] = frozenset()

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def parse_header(
    raw: bytes | bytearray, *, file: str, file_size: int | None, where: str = ""
) -> dict[str, TensorRef]:
    """Parse a safetensors header (the 8-byte length and the JSON that follows).

    Args:
        raw: the file's first bytes, at least the whole header.
        file: the file's name in its repo, recorded in each :class:`TensorRef`.
        file_size: the file's size, if known, to check that every tensor fits.
        where: how messages name the file (e.g. ``"org/ft-1: model.safetensors"``).

    Raises:
        CorruptWeightsError: truncated header, offsets out of range or overlapping, unknown dtype,
            or a byte range that does not match the shape.
    """
    where = where or file
    if len(raw) < 8:
        raise CorruptWeightsError(f"{where}: truncated safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or len(raw) < 8 + n:
        raise CorruptWeightsError(f"{where}: safetensors header claims {n} bytes, file is shorter")
    try:
        header = json.loads(bytes(raw[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptWeightsError(f"{where}: safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{where}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + n
    refs: dict[str, TensorRef] = {}
    try:
        for name, info in header.items():
            dtype, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if dtype not in DTYPES:
                raise CorruptWeightsError(f"{where}: tensor {name!r} has unsupported dtype {dtype}")
            ref = TensorRef(name, file, dtype, shape, base + lo, base + hi)
            itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
            if lo < 0 or hi < lo or ref.nbytes != ref.numel * itemsize:
                raise CorruptWeightsError(f"{where}: tensor {name!r} has a bad byte range")
            refs[name] = ref
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptWeightsError(f"{where}: malformed safetensors header entry") from exc
    ordered = sorted(refs.values(), key=lambda r: r.start)
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.start < prev.end:
            raise CorruptWeightsError(f"{where}: tensors {prev.name!r} and {cur.name!r} overlap")
    if ordered and file_size is not None and ordered[-1].end > file_size:
        raise CorruptWeightsError(
            f"{where}: tensor {ordered[-1].name!r} ends past the end of the file"
        )
    return refs


def _read_header(ingredient: Ingredient, file: str) -> dict[str, TensorRef]:
    size = ingredient.files.get(file)
    probe = _HEADER_PROBE if size is None else min(size, _HEADER_PROBE)
    raw = ingredient.source.read_range(file, 0, probe)
    if len(raw) >= 8:
        (n,) = struct.unpack("<Q", raw[:8])
        if n <= _MAX_HEADER and 8 + n > len(raw) and (size is None or 8 + n <= size):
            raw += ingredient.source.read_range(file, len(raw), 8 + n)
    return parse_header(raw, file=file, file_size=size, where=f"{ingredient.label}: {file}")


def _weight_files(ingredient: Ingredient, *, allow_pickle: bool) -> tuple[list[str], bool]:
    files = ingredient.files
    if "model.safetensors.index.json" in files:
        weight_map = ingredient.source.read_json("model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptWeightsError(f"{ingredient.label}: index has no weight_map")
        return _checked_paths(ingredient, set(weight_map.values())), False
    if "model.safetensors" in files:
        return ["model.safetensors"], False
    if any(f in files for f in PICKLE_FILES):
        if not allow_pickle:
            raise UnsafeWeightsError(
                f"{ingredient.label} has only pickle weights (pytorch_model.bin); pickle can run "
                "code when loaded. Pass --allow-pickle to load it with torch.load(weights_only=True)"
            )
        if "pytorch_model.bin.index.json" in files:
            weight_map = ingredient.source.read_json("pytorch_model.bin.index.json")["weight_map"]
            return _checked_paths(ingredient, set(weight_map.values())), True
        return ["pytorch_model.bin"], True
    raise IncompatibleIngredientsError(
        f"{ingredient.label} holds no model weights (no model.safetensors)"
    )


def _checked_paths(ingredient: Ingredient, paths: set[str]) -> list[str]:
    for p in paths:
        norm = posixpath.normpath(p)
        if norm.startswith(("../", "/")) or norm == ".." or p not in ingredient.files:
            raise CorruptWeightsError(
                f"{ingredient.label}: weight index names {p!r}, which is not a file of the repo"
            )
    return sorted(paths)


def index_ingredient(ingredient: Ingredient, *, allow_pickle: bool = False) -> IngredientIndex:
    """Read config.json and the safetensors headers of one ingredient (no weights).

    Raises:
        UnsafeWeightsError: only pickle weights and ``allow_pickle`` is False.
        CorruptWeightsError: a malformed header or index.
    """
    if "config.json" not in ingredient.files:
        raise IncompatibleIngredientsError(f"{ingredient.label} has no config.json")
    config = ingredient.source.read_json("config.json")
    files, pickle = _weight_files(ingredient, allow_pickle=allow_pickle)
    tensors: dict[str, TensorRef] = {}
    if pickle:
        from hfsoup.pickled import pickle_refs

        tensors = pickle_refs(ingredient, files)
    else:
        for f in files:
            tensors.update(_read_header(ingredient, f))
    return IngredientIndex(ingredient=ingredient, tensors=tensors, config=config, pickle=pickle)


def check_compatible(indexes: Sequence[IngredientIndex]) -> None:
    """Check every ingredient against the first: architecture, labels, tensor names and shapes.

    Raises:
        IncompatibleIngredientsError: naming the ingredient and the first differing field or
            tensors.
    """
    first = indexes[0]
    for other in indexes[1:]:
        who = f"{other.ingredient.label} differs from {first.ingredient.label}"
        for key in ("model_type", "architectures"):
            if first.config.get(key) != other.config.get(key):
                raise IncompatibleIngredientsError(
                    f"{who}: {key} {other.config.get(key)!r} != {first.config.get(key)!r}"
                )
        a, b = _labels(first.config), _labels(other.config)
        if a != b:
            _align_labels(first, other, who)
        missing = sorted(first.tensors.keys() - other.tensors.keys())
        extra = sorted(other.tensors.keys() - first.tensors.keys())
        if missing or extra:
            parts = [
                f"missing {_few(missing)}" if missing else "",
                f"extra {_few(extra)}" if extra else "",
            ]
            raise IncompatibleIngredientsError(
                f"{who}: tensor names: {'; '.join(p for p in parts if p)}"
            )
        for name, ref in first.tensors.items():
            o = other.tensors[name]
            if o.shape != ref.shape:
                raise IncompatibleIngredientsError(
                    f"{who}: tensor {name!r} has shape {list(o.shape)}, expected {list(ref.shape)}"
                )
            if (o.dtype in FLOAT_DTYPES) != (ref.dtype in FLOAT_DTYPES) or (
                ref.dtype not in FLOAT_DTYPES and o.dtype != ref.dtype
            ):
                raise IncompatibleIngredientsError(
                    f"{who}: tensor {name!r} has dtype {o.dtype}, expected {ref.dtype}"
                )


_HEAD_PARTS = ("classifier", "score", "head")


def _align_labels(first: IngredientIndex, other: IngredientIndex, who: str) -> None:
    """Same label names in another order: permute the head's rows; anything else: refuse."""
    from hfsoup.evaluation.labels import label_permutation

    a, b = _labels(first.config), _labels(other.config)
    if a is None or b is None:
        raise IncompatibleIngredientsError(f"{who}: id2label {b} != {a}")
    try:
        perm = label_permutation(a, b)
    except IncompatibleIngredientsError as exc:
        raise IncompatibleIngredientsError(f"{who}: id2label {b} != {a} ({exc})") from exc
    heads = frozenset(
        name
        for name, ref in other.tensors.items()
        if ref.shape and ref.shape[0] == len(a) and any(p in name.split(".") for p in _HEAD_PARTS)
    )
    if not heads:
        raise IncompatibleIngredientsError(
            f"{who}: labels are ordered differently and no classification head was found to align"
        )
    other.row_perm, other.head_tensors = perm, heads


def _labels(config: dict) -> dict[str, str] | None:
    labels = config.get("id2label")
    return {str(k): v for k, v in labels.items()} if isinstance(labels, dict) else None


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


# The largest size accepted (8 PiB): more is a typo, and would overflow what it is used for.
MAX_SIZE = 2**53


def parse_size(value: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MiB"`` -> 524_288_000; ints pass through (bytes).

    Raises:
        ValueError: unreadable, not positive, or larger than :data:`MAX_SIZE`.
    """
    if isinstance(value, bool):
        raise ValueError(f"cannot read {value!r} as a size in bytes (e.g. 5GB, 500MiB)")
    if isinstance(value, int):
        size = value
    else:
        units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "PB": 10**15, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
                 "PIB": 2**50}  # fmt: skip
        text = str(value).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTPIB")
        unit = text[len(number) :]
        try:
            amount = float(number) * units[unit]
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"cannot read {value!r} as a size in bytes (e.g. 5GB, 500MiB)"
            ) from exc
        if not amount > 0:  # negative, zero or NaN
            raise ValueError(f"size must be positive, got {value!r}")
        # Compared as a float: int() of an overflowing value (1e400GB is inf) would raise.
        size = int(amount) if amount <= MAX_SIZE else MAX_SIZE + 1
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    if size > MAX_SIZE:
        raise ValueError(f"size {value!r} is too large (at most 8PiB)")
    return size


def output_dtype(ref: TensorRef, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: ``dtype`` for float tensors if given, else its own."""
    return dtype if dtype is not None and ref.dtype in FLOAT_DTYPES else DTYPES[ref.dtype]


def plan_shards(
    index: IngredientIndex, *, max_shard_size: int, dtype: torch.dtype | None = None
) -> list[list[str]]:
    """Group tensor names into output shards of at most ``max_shard_size`` bytes each.

    The plan follows the first ingredient's layout (its reads stay sequential) and is
    independent of how the other ingredients are sharded. A tensor larger than the limit gets
    a shard of its own, as ``transformers`` does.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for ref in sorted(index.tensors.values(), key=lambda r: (r.file, r.start)):
        nbytes = ref.numel * torch.empty((), dtype=output_dtype(ref, dtype)).element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(ref.name)
        size += nbytes
    return shards
