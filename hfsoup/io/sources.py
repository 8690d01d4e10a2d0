"""Where an ingredient's bytes are read from: the :class:`Source` interface and the local
folder (:class:`LocalSource`, a listing bounded in size and depth). No HTTP here: a Hub repo's
source is :class:`hfsoup.io.hub.HubSource`."""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from hfsoup.errors import (
    CorruptWeightsError,
    IngredientNotFoundError,
    IngredientSpecError,
)

log = logging.getLogger("hfsoup")


# A local ingredient is a model folder: listing stops (with an error) past these bounds, so a
# folder such as / or ~ fails in a moment rather than walking a whole disk.
MAX_LOCAL_ENTRIES = 10_000
MAX_LOCAL_DEPTH = 8
_UNLISTED_DIRS = {".git", ".cache"}  # version control, huggingface_hub's download metadata


class Source(ABC):
    """Read access to one pinned ingredient: byte ranges of its files, and whole small files."""

    files: dict[str, int | None]

    @abstractmethod
    def read_range(
        self, filename: str, start: int, end: int, out: bytearray | None = None
    ) -> bytearray:
        """Bytes ``[start, end)`` of ``filename``, into ``out`` when given (of that length)."""

    @abstractmethod
    def local_file(self, filename: str) -> Path:
        """A local path holding the whole file (downloaded into the HF cache if needed)."""

    # Caps on the JSON files an ingredient holds (config.json, weight indexes); see read_json.
    MAX_JSON_BYTES = 64 * 2**20
    MAX_JSON_DEPTH = 100

    def read_json(self, filename: str, *, unique_keys: bool = False) -> dict[str, Any]:
        """A JSON object file of the ingredient (config.json, a weight index, ...).

        The file must be UTF-8, at most 64 MiB (``MAX_JSON_BYTES``; no config or index comes
        near, and a larger one is refused before it is downloaded when the Hub lists its size)
        and nested at most 100 levels deep (``MAX_JSON_DEPTH``).

        Args:
            filename: the file's name in the ingredient.
            unique_keys: refuse an object that names a key twice (``json`` silently keeps the
                last), as a weight index must.

        Raises:
            CorruptWeightsError: the file is too large, cannot be read, is not UTF-8, not valid
                JSON, nested too deeply, not a JSON object, or (``unique_keys``) repeats a key;
                the message names the file.
        """
        where = self.where(filename)
        limit = f"more than the {self.MAX_JSON_BYTES // 2**20} MiB hfsoup reads for a JSON file"
        size = self.files.get(filename)
        if size is not None and size > self.MAX_JSON_BYTES:
            raise CorruptWeightsError(f"{where}: {size} bytes, {limit}")
        path = self.local_file(filename)
        try:
            with open(path, "rb") as f:
                raw = f.read(self.MAX_JSON_BYTES + 1)
        except OSError as exc:
            raise CorruptWeightsError(f"{where}: cannot be read ({exc.strerror})") from exc
        if len(raw) > self.MAX_JSON_BYTES:
            raise CorruptWeightsError(f"{where}: {limit}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptWeightsError(
                f"{where}: not UTF-8 text (invalid byte at offset {exc.start})"
            ) from exc
        repeated: list[str] = []

        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            obj = dict(items)
            if len(obj) != len(items):
                seen: set[str] = set()
                repeated.extend(k for k, _ in items if k in seen or seen.add(k))
            return obj

        try:
            data = json.loads(text, object_pairs_hook=pairs if unique_keys else None)
        except RecursionError as exc:
            raise CorruptWeightsError(
                f"{where}: JSON nested more than {self.MAX_JSON_DEPTH} levels deep"
            ) from exc
        except ValueError as exc:
            raise CorruptWeightsError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise CorruptWeightsError(f"{where}: a JSON object was expected")
        # How deeply lists and objects nest, without recursion (transformers and json.dump
        # recurse, and would fail far from here).
        deepest, stack = 0, [(data, 1)]
        while stack and deepest <= self.MAX_JSON_DEPTH:
            item, depth = stack.pop()
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
        if deepest > self.MAX_JSON_DEPTH:
            raise CorruptWeightsError(
                f"{where}: JSON nested more than {self.MAX_JSON_DEPTH} levels deep"
            )
        if repeated:
            shown = ", ".join(repr(k)[:120] for k in sorted(set(repeated))[:3])
            more = len(set(repeated)) - 3
            raise CorruptWeightsError(
                f"{where}: names {shown}{f' and {more} more' if more > 0 else ''} more than once"
            )
        return data

    def where(self, filename: str) -> str:
        """How ``filename`` is named in messages (with its repo or folder)."""
        return filename

    def cached(self) -> Source:
        """A source that downloads each file whole once, then reads ranges from disk.

        For runs that read an ingredient several times (greedy, learned soups).
        """
        return _DiskCached(self)


def read_buffer(out: bytearray | None, start: int, end: int) -> bytearray:
    # ``out`` may also be an anonymous mmap or a view of a pinned tensor (hfsoup.io.streaming).
    if out is None:
        return bytearray(end - start)
    if len(out) != end - start:
        raise ValueError(f"buffer of {len(out)} bytes for a read of {end - start}")
    return out


def read_file_range(path: Path, start: int, buf: bytearray) -> bool:
    """Fill ``buf`` from ``path`` at ``start``; False when the file ends first."""
    with open(path, "rb") as f:
        f.seek(start)
        return f.readinto(buf) == len(buf)


class _DiskCached(Source):
    def __init__(self, inner: Source) -> None:
        self.inner, self.files = inner, inner.files

    def read_range(
        self, filename: str, start: int, end: int, out: bytearray | None = None
    ) -> bytearray:
        buf = read_buffer(out, start, end)
        if not read_file_range(self.local_file(filename), start, buf):
            raise CorruptWeightsError(f"{filename}: cached file shorter than its header says")
        return buf

    def local_file(self, filename: str) -> Path:
        return self.inner.local_file(filename)

    def where(self, filename: str) -> str:
        return self.inner.where(filename)

    def cached(self) -> Source:
        return self


class LocalSource(Source):
    """An ingredient that is a directory on disk.

    Only regular files inside the folder are read: a file that is a symlink is followed only
    when it stays inside the folder (:meth:`local_file`), symlinked folders are not listed, and
    the listing is bounded (:data:`MAX_LOCAL_ENTRIES`, :data:`MAX_LOCAL_DEPTH`).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = _list_folder(root)

    def read_range(
        self, filename: str, start: int, end: int, out: bytearray | None = None
    ) -> bytearray:
        buf = read_buffer(out, start, end)
        if not read_file_range(self.local_file(filename), start, buf):
            raise IngredientNotFoundError(f"{self.root}/{filename}: file shorter than expected")
        return buf

    def cached(self) -> Source:
        return self

    def where(self, filename: str) -> str:
        return f"{self.root}/{filename}"

    def local_file(self, filename: str) -> Path:
        """The file's path, after checking it is a regular file inside the folder.

        Raises:
            IngredientNotFoundError: the name, or a symlink on the way, points outside the
                folder, or it is not a regular file.
        """
        path = (self.root / filename).resolve()
        if not path.is_relative_to(self.root):
            raise IngredientNotFoundError(f"{filename!r} points outside {self.root}")
        if not path.is_file():
            raise IngredientNotFoundError(f"{self.root}/{filename}: not a regular file")
        return path


def _list_folder(root: Path) -> dict[str, int | None]:
    """Regular files under ``root`` (relative POSIX names -> sizes), without following
    symlinked folders or entering .git / .cache.

    Raises:
        IngredientSpecError: more than :data:`MAX_LOCAL_ENTRIES` entries, or folders nested
            deeper than :data:`MAX_LOCAL_DEPTH`: not a model folder.
    """
    files: dict[str, int | None] = {}
    seen = 0
    pending = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            entries = os.scandir(folder)
        except OSError as exc:
            if folder == root:
                raise IngredientNotFoundError(f"{root}: cannot list ({exc.strerror})") from exc
            continue  # an unreadable subfolder holds nothing we could read either
        with entries:
            for entry in entries:
                seen += 1
                if seen > MAX_LOCAL_ENTRIES:
                    raise IngredientSpecError(
                        f"ingredient {root}: more than {MAX_LOCAL_ENTRIES:,} files and folders; "
                        "not a model folder"
                    )
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name in _UNLISTED_DIRS:
                            continue
                        if depth + 1 > MAX_LOCAL_DEPTH:
                            raise IngredientSpecError(
                                f"ingredient {root}: folders nested more than {MAX_LOCAL_DEPTH} "
                                "deep; not a model folder"
                            )
                        pending.append((Path(entry.path), depth + 1))
                    elif entry.is_file():  # a regular file, or a symlink to one
                        name = Path(entry.path).relative_to(root).as_posix()
                        files[name] = entry.stat().st_size
                except OSError:
                    continue  # vanished or unreadable: not a file of the model
    return dict(sorted(files.items()))
