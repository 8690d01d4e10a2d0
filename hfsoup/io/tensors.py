"""What the ingredients hold, from safetensors headers and config.json alone.

No weight byte is read here: an :class:`IngredientIndex` maps every tensor name to its file,
dtype, shape and absolute byte range, which is enough to check compatibility and to plan output
shards before anything heavy starts.
"""

from __future__ import annotations

import json
import posixpath
import struct

import torch

# Re-exported under the names the rest of hfsoup reads them by (the table is hfsoup.dtypes').
from hfsoup.dtypes import CODE_OF as DTYPE_NAMES  # noqa: F401
from hfsoup.dtypes import FLOAT_CODES as FLOAT_DTYPES
from hfsoup.dtypes import SAFETENSORS as DTYPES
from hfsoup.errors import (
    CorruptWeightsError,
    IncompatibleIngredientsError,
    UnsafeWeightsError,
)
from hfsoup.io.hub import Ingredient
from hfsoup.io.refs import IngredientIndex, TensorRef
from hfsoup.io.refs import brief as _brief
from hfsoup.io.refs import few as _few

_HEADER_PROBE = 64 * 1024
_MAX_HEADER = 100 * 1024 * 1024
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# No file, tensor or byte offset can be larger than this (what a signed 64-bit size can hold).
_MAX_BYTES = 2**63 - 1
_MAX_NDIM = 64


class _JsonObject(dict):
    """A JSON object that remembers the keys it named more than once (``json`` keeps the last)."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, object]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    obj.duplicates = []
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
    return obj


def _is_count(value: object) -> bool:
    # bool is a subclass of int: ``true`` is not a dimension.
    return type(value) is int and 0 <= value <= _MAX_BYTES


def parse_header(
    raw: bytes | bytearray, *, file: str, file_size: int | None, where: str = ""
) -> dict[str, TensorRef]:
    """Parse a safetensors header (the 8-byte length and the JSON that follows).

    Every entry is checked before it is used: a JSON object with a string ``dtype`` hfsoup
    knows, a ``shape`` of at most 64 non-negative integers, ``data_offsets`` a pair of
    non-negative integers whose range holds exactly the shape's bytes; sizes beyond
    ``2**63 - 1`` bytes are refused. ``__metadata__``, if present, must map strings to strings.

    Args:
        raw: the file's first bytes, at least the whole header.
        file: the file's name in its repo, recorded in each :class:`TensorRef`.
        file_size: the file's size, if known, to check that every tensor fits.
        where: how messages name the file (e.g. ``"org/ft-1: model.safetensors"``).

    Raises:
        CorruptWeightsError: truncated header, a header that is not UTF-8 JSON or names a tensor
            twice, no tensors at all, a malformed entry, offsets out of range or overlapping,
            unknown dtype, or a byte range that does not match the shape.
    """
    where = where or file
    if len(raw) < 8:
        raise CorruptWeightsError(f"{where}: truncated safetensors header")
    (n,) = struct.unpack("<Q", raw[:8])
    if (file_size is not None and 8 + n > file_size) or (n <= _MAX_HEADER and len(raw) < 8 + n):
        raise CorruptWeightsError(f"{where}: safetensors header claims {n} bytes, file is shorter")
    if n > _MAX_HEADER:
        raise CorruptWeightsError(
            f"{where}: safetensors header claims {n} bytes, more than the "
            f"{_MAX_HEADER // 2**20} MiB hfsoup accepts"
        )
    try:
        text = bytes(raw[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptWeightsError(f"{where}: safetensors header is not UTF-8 text") from exc
    try:
        header = json.loads(text, object_pairs_hook=_object)
    except RecursionError as exc:
        raise CorruptWeightsError(f"{where}: safetensors header is nested too deeply") from exc
    except ValueError as exc:
        raise CorruptWeightsError(f"{where}: safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{where}: safetensors header is not a JSON object")
    if header.duplicates:
        raise CorruptWeightsError(
            f"{where}: safetensors header names {_few(header.duplicates)} more than once"
        )
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CorruptWeightsError(
            f"{where}: __metadata__ must be a JSON object of strings, got {_brief(metadata)}"
        )
    if not header:
        raise CorruptWeightsError(f"{where}: holds no tensors (an empty safetensors header)")
    base = 8 + n
    refs = {name: _entry(name, info, base=base, file=file, where=where)
            for name, info in header.items()}  # fmt: skip
    ordered = sorted(refs.values(), key=lambda r: r.start)
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.start < prev.end:
            raise CorruptWeightsError(
                f"{where}: tensors {_brief(prev.name)} and {_brief(cur.name)} overlap"
            )
    if ordered and file_size is not None and ordered[-1].end > file_size:
        raise CorruptWeightsError(
            f"{where}: tensor {_brief(ordered[-1].name)} ends past the end of the file"
        )
    return refs


def _entry(name: str, info: object, *, base: int, file: str, where: str) -> TensorRef:
    """One checked header entry; every way it can be malformed is a CorruptWeightsError."""
    who = f"{where}: tensor {_brief(name)}"
    if not isinstance(info, dict):
        raise CorruptWeightsError(f"{who}: header entry is not a JSON object ({_brief(info)})")
    if info.duplicates:
        raise CorruptWeightsError(f"{who}: header entry names {_few(info.duplicates)} twice")
    absent = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if absent:
        raise CorruptWeightsError(f"{who}: header entry has no {', '.join(absent)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise CorruptWeightsError(f"{who}: dtype {_brief(dtype)} is not a string")
    if dtype not in DTYPES:
        raise CorruptWeightsError(f"{who} has unsupported dtype {_brief(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CorruptWeightsError(
            f"{who}: shape {_brief(shape)} is not a list of non-negative integers"
        )
    if len(shape) > _MAX_NDIM:
        raise CorruptWeightsError(f"{who}: shape has {len(shape)} dimensions (at most 64)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CorruptWeightsError(
            f"{who}: data_offsets {_brief(offsets)} is not a pair of non-negative integers"
        )
    itemsize = DTYPES[dtype].itemsize
    # What torch's strides span (a zero dimension empties a tensor, not its strides).
    span = itemsize
    for d in shape:
        span *= max(d, 1)
        if span > _MAX_BYTES:
            raise CorruptWeightsError(
                f"{who}: shape {_brief(shape)} is larger than any tensor can be"
            )
    lo, hi = offsets
    numel = 0 if 0 in shape else span // itemsize
    if hi < lo or hi - lo != numel * itemsize or base + hi > _MAX_BYTES:
        raise CorruptWeightsError(
            f"{who} has a bad byte range: data_offsets [{lo}, {hi}] for {dtype} of shape "
            f"{_brief(shape)} ({numel * itemsize} bytes)"
        )
    return TensorRef(name, file, dtype, tuple(shape), base + lo, base + hi)


def _read_header(ingredient: Ingredient, file: str) -> dict[str, TensorRef]:
    where = f"{ingredient.label}: {file}"
    size = ingredient.files.get(file)
    if size is not None and size < 8:
        raise CorruptWeightsError(f"{where}: truncated safetensors header ({size} bytes)")
    probe = _HEADER_PROBE if size is None else min(size, _HEADER_PROBE)
    raw = ingredient.source.read_range(file, 0, probe)
    if len(raw) >= 8:
        (n,) = struct.unpack("<Q", raw[:8])
        if n <= _MAX_HEADER and 8 + n > len(raw) and (size is None or 8 + n <= size):
            raw += ingredient.source.read_range(file, len(raw), 8 + n)
    return parse_header(raw, file=file, file_size=size, where=where)


def read_safetensors_header(ingredient: Ingredient, file: str) -> dict[str, TensorRef]:
    """The checked header of one safetensors file of ``ingredient`` (see :func:`parse_header`)."""
    return _read_header(ingredient, file)


_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_INDEX = "pytorch_model.bin.index.json"


def _weight_files(
    ingredient: Ingredient, *, allow_pickle: bool
) -> tuple[list[str], bool, dict[str, str] | None]:
    """The weight files to read, whether they are pickles, and the index's weight map if any."""
    files = ingredient.files
    if _SAFETENSORS_INDEX in files:
        weight_map = _read_index(ingredient, _SAFETENSORS_INDEX)
        return _checked_paths(ingredient, set(weight_map.values())), False, weight_map
    if "model.safetensors" in files:
        return ["model.safetensors"], False, None
    if any(f in files for f in PICKLE_FILES):
        if not allow_pickle:
            raise UnsafeWeightsError(
                f"{ingredient.label} has only pickle weights (pytorch_model.bin); pickle can run "
                "code when loaded. Set allow_pickle to load it with torch.load(weights_only=True)",
                options=["allow_pickle"],
            )
        if _PICKLE_INDEX in files:
            weight_map = _read_index(ingredient, _PICKLE_INDEX)
            return _checked_paths(ingredient, set(weight_map.values())), True, weight_map
        return ["pytorch_model.bin"], True, None
    raise IncompatibleIngredientsError(
        f"{ingredient.label} holds no model weights (no model.safetensors)"
    )


def _read_index(ingredient: Ingredient, name: str) -> dict[str, str]:
    """An index's ``weight_map``: a non-empty JSON object from tensor names to file names.

    A name listed twice is refused (``json`` would silently keep the last).
    """
    index = ingredient.source.read_json(name, unique_keys=True)
    where = f"{ingredient.label}: {name}"
    if "weight_map" not in index:
        raise CorruptWeightsError(f"{where}: index has no weight_map")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CorruptWeightsError(
            f"{where}: weight_map is not a JSON object ({_brief(weight_map)})"
        )
    if not weight_map:
        raise CorruptWeightsError(f"{where}: weight_map is empty: the ingredient has no tensors")
    bad = sorted(k for k, v in weight_map.items() if not isinstance(v, str))
    if bad:
        raise CorruptWeightsError(
            f"{where}: weight_map must map tensor names to file names, but {_few(bad)} "
            f"map to {_brief(weight_map[bad[0]])}"
        )
    return weight_map


def _check_index(
    ingredient: Ingredient, index_name: str, weight_map: dict[str, str],
    per_file: dict[str, dict[str, TensorRef]],
) -> None:  # fmt: skip
    """The index and the shards' own headers must agree, tensor for tensor.

    Raises:
        CorruptWeightsError: a tensor held by two shards, listed by the index but held by no
            shard, held by another shard than the index names, or not listed at all.
    """
    label = ingredient.label
    holders: dict[str, list[str]] = {}
    for file, refs in per_file.items():
        for name in refs:
            holders.setdefault(name, []).append(file)
    twice = sorted(n for n, fs in holders.items() if len(fs) > 1)
    if twice:
        raise CorruptWeightsError(
            f"{label}: {len(twice)} tensor(s) in more than one shard: "
            + _few([f"{_brief(n)} ({', '.join(holders[n])})" for n in twice], quote=False)
        )
    absent = sorted(n for n in weight_map if n not in holders)
    if absent:
        raise CorruptWeightsError(
            f"{label}: {index_name} lists {len(absent)} tensor(s) that no shard holds: "
            + _few([f"{_brief(n)} (listed for {weight_map[n]})" for n in absent], quote=False)
        )
    misplaced = sorted(n for n, fs in holders.items() if n in weight_map and weight_map[n] != fs[0])
    if misplaced:
        raise CorruptWeightsError(
            f"{label}: {len(misplaced)} tensor(s) not in the shard {index_name} names: "
            + _few(
                [
                    f"{_brief(n)} (listed for {weight_map[n]}, in {holders[n][0]})"
                    for n in misplaced
                ],
                quote=False,
            )
        )
    unlisted = sorted(n for n in holders if n not in weight_map)
    if unlisted:
        raise CorruptWeightsError(
            f"{label}: {len(unlisted)} tensor(s) in a shard that {index_name} does not list: "
            + _few([f"{_brief(n)} (in {holders[n][0]})" for n in unlisted], quote=False)
        )


def _checked_paths(ingredient: Ingredient, paths: set[str]) -> list[str]:
    for p in paths:
        norm = posixpath.normpath(p)
        if norm.startswith(("../", "/")) or norm == ".." or p not in ingredient.files:
            raise CorruptWeightsError(
                f"{ingredient.label}: weight index names {_brief(p)}, which is not a file of the "
                "repo"
            )
    return sorted(paths)


def index_ingredient(ingredient: Ingredient, *, allow_pickle: bool = False) -> IngredientIndex:
    """Read config.json and the safetensors headers of one ingredient (no weights).

    Raises:
        UnsafeWeightsError: only pickle weights and ``allow_pickle`` is False.
        CorruptWeightsError: a malformed header or index, an index that disagrees with its
            shards, or an ingredient without a single tensor.
    """
    if "config.json" not in ingredient.files:
        raise IncompatibleIngredientsError(f"{ingredient.label} has no config.json")
    config = ingredient.source.read_json("config.json")
    _check_config(config, ingredient.source.where("config.json"))
    files, pickle, weight_map = _weight_files(ingredient, allow_pickle=allow_pickle)
    if pickle:
        from hfsoup.io.pickled import pickle_refs

        per_file = {f: pickle_refs(ingredient, f) for f in files}
    else:
        per_file = {f: _read_header(ingredient, f) for f in files}
    if weight_map is not None:
        _check_index(ingredient, _PICKLE_INDEX if pickle else _SAFETENSORS_INDEX, weight_map,
                     per_file)  # fmt: skip
    tensors: dict[str, TensorRef] = {}
    for refs in per_file.values():
        tensors.update(refs)
    if not tensors:
        raise CorruptWeightsError(f"{ingredient.label} holds no tensors")
    return IngredientIndex(ingredient=ingredient, tensors=tensors, config=config, pickle=pickle)


def _check_config(config: dict, where: str) -> None:
    """The config fields hfsoup itself reads (to compare ingredients, tag and label the card)
    must have the types ``transformers`` writes: ``model_type`` a string, ``architectures`` a
    list of strings, ``id2label`` an object from integer ids to strings, ``label2id`` an object.

    Raises:
        CorruptWeightsError: naming the file and the field.
    """

    def refuse(key: str, expected: str) -> None:
        raise CorruptWeightsError(f"{where}: {key} must be {expected}, got {_brief(config[key])}")

    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        refuse("model_type", "a string")
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        refuse("architectures", "a list of strings")
    labels = config.get("id2label")
    if labels is not None and not (
        isinstance(labels, dict)
        and all(isinstance(v, str) for v in labels.values())
        and all(map(_is_id, labels))
    ):
        refuse("id2label", "an object from integer ids to label names")
    if config.get("label2id") is not None and not isinstance(config["label2id"], dict):
        refuse("label2id", "an object from label names to ids")


def _is_id(key: str) -> bool:
    # transformers reads id2label keys with int().
    try:
        int(key)
    except ValueError:
        return False
    return True


def output_dtype(ref: TensorRef, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: ``dtype`` for float tensors if given, else its own."""
    return dtype if dtype is not None and ref.dtype in FLOAT_DTYPES else DTYPES[ref.dtype]


_FINITE_CHUNK = 1 << 24


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf (integer tensors always do).

    torch has no ``isfinite`` for most float8 dtypes, so those are widened to float32 a chunk
    at a time (a whole float32 copy would be four times the tensor).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() > 1:
        # NaN propagates through min and max, and an infinity is one of them: one pass that
        # allocates nothing, ~13x faster than ``isfinite(t).all()`` (bfloat16, one thread).
        low, high = torch.aminmax(tensor.reshape(-1))
        return bool(torch.isfinite(low) and torch.isfinite(high))
    flat = tensor.reshape(-1)
    return all(
        bool(torch.isfinite(flat[i : i + _FINITE_CHUNK].float()).all())
        for i in range(0, flat.numel(), _FINITE_CHUNK)
    )


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
