"""Checking files against the digests the Hub lists for them: whole downloads here, streamed
range reads through :func:`new_hash` (see :mod:`hfsoup.io.streaming`).

The Hub lists a sha256 for every LFS file and a git blob id (sha1) for every other file
(``model_info(files_metadata=True)``); ``huggingface_hub`` itself does not compare a download
with either, so a damaged or tampered file would otherwise be used as it came.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

Digest = tuple[str, str]  # ("sha256" | "git-sha1", hex digest)


_HEX = {"sha256": re.compile(r"[0-9a-fA-F]{64}"), "git-sha1": re.compile(r"[0-9a-fA-F]{40}")}


def from_siblings(siblings: list[Any]) -> dict[str, Digest]:
    """What the Hub says each file hashes to: sha256 for LFS files, the git blob id for others.

    Digests are compared in lower case.

    Raises:
        ValueError: a digest is not hex of its length (64 for sha256, 40 for a blob id).
    """
    out: dict[str, Digest] = {}
    for s in siblings:
        lfs = getattr(s.lfs, "sha256", None)
        kind, value = ("sha256", lfs) if lfs else ("git-sha1", s.blob_id)
        if not value:
            continue
        if not isinstance(value, str) or not _HEX[kind].fullmatch(value):
            raise ValueError(
                f"the Hub lists {s.rfilename!r} with {kind} {repr(value)[:80]}, which is not "
                f"{'64' if kind == 'sha256' else '40'} hex digits"
            )
        out[s.rfilename] = (kind, value.lower())
    return out


def new_hash(digest: Digest, size: int) -> Any:
    """A hash object to feed a file's bytes to, start to end, and compare with ``digest``.

    ``size`` (the whole file's) is part of a git blob id; a sha256 ignores it.
    """
    kind, _ = digest
    if kind == "sha256":
        return hashlib.sha256()
    h = hashlib.sha1(usedforsecurity=False)  # a git blob id: sha1 over "blob <size>\0" + content
    h.update(f"blob {size}\0".encode())
    return h


def matches(path: Path, digest: Digest | None) -> bool:
    """Whether ``path`` hashes to ``digest``; ``True`` when the Hub listed none."""
    if digest is None:
        return True
    h = new_hash(digest, path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == digest[1]


def discard(path: Path) -> None:
    """Remove a cached download: the snapshot link and the blob it points to."""
    blob = path.resolve()
    for p in (path, blob):
        p.unlink(missing_ok=True)
