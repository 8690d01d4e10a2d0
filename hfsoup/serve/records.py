"""What the local Hub stores, as values: files, commits, commit operations, and its HTTP error.

Standard library only; :mod:`hfsoup.serve.hubstore` persists them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

# Files the Hub stores with Git LFS whatever their size (a subset of its default .gitattributes).
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".parquet", ".arrow", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
    ".onnx", ".npy", ".npz", ".pkl", ".pickle", ".joblib", ".model", ".gguf", ".tflite", ".ot",
    ".gz", ".zip", ".tar", ".zst", ".7z", ".bz2", ".xz",
)  # fmt: skip
LFS_MIN_SIZE = 10 * 1024 * 1024


class HubError(Exception):
    """A failure with an HTTP status; ``code`` becomes the ``X-Error-Code`` header the clients map."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot: where its bytes are and the ids the clients check."""

    sha256: str
    size: int
    git_sha1: str
    lfs: bool

    @property
    def lfs_pointer(self) -> bytes:
        """The Git LFS pointer file git would hold instead of the content."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
        ).encode()

    @property
    def oid(self) -> str:
        """The git blob id: of the pointer for LFS files, as on the Hub, else of the content."""
        return git_blob_sha1(self.lfs_pointer) if self.lfs else self.git_sha1

    @property
    def etag(self) -> str:
        """What ``resolve`` sends as ETag: sha256 for LFS files, git blob sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_sha1


@dataclass(frozen=True)
class Commit:
    """An immutable full snapshot of a repo."""

    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]

    def to_json(self) -> dict[str, Any]:
        """The commit as stored in ``commits/{id}.json``."""
        return {
            "id": self.id,
            "parents": list(self.parents),
            "title": self.title,
            "message": self.message,
            "date": self.date,
            "files": {p: asdict(e) for p, e in sorted(self.files.items())},
        }

    @cached_property
    def folders(self) -> frozenset[str]:
        """Every folder of the snapshot, as paths without a trailing slash."""
        out: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return frozenset(out)

    def under(self, folder: str) -> list[tuple[str, FileEntry]]:
        """The files below ``folder``, sorted by path."""
        return sorted((p, e) for p, e in self.files.items() if p.startswith(folder + "/"))

    def tree_oid(self, folder: str) -> str:
        """A folder id: not git's tree hash, but it changes exactly when the folder's files do."""
        return hashlib.sha1(
            "\n".join(f"{p} {e.oid}" for p, e in self.under(folder)).encode()
        ).hexdigest()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        """Read back what :meth:`to_json` wrote."""
        files = {p: FileEntry(**e) for p, e in data["files"].items()}
        return cls(
            data["id"], tuple(data["parents"]), data["title"], data["message"], data["date"], files
        )


@dataclass(frozen=True)
class Operation:
    """One line of a commit: ``add`` (bytes or an uploaded LFS blob) or ``delete`` (file or folder)."""

    kind: str  # "add" | "delete_file" | "delete_folder"
    path: str
    content: bytes | None = None  # regular file
    lfs_oid: str | None = None  # LFS file already uploaded


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs_path(path: str, size: int, sample: bytes = b"") -> bool:
    """Whether the Hub would store this file with LFS: binary suffix, large, or binary sample."""
    if size == 0:
        return False  # the client always commits empty files as regular ones
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


def now_iso() -> str:
    """The current UTC time as the Hub writes it (ISO 8601, milliseconds, ``Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
