"""Integrity of streamed files: each Hub file a soup reads is hashed as its ranges stream past.

The Hub lists a digest per file (sha256 for LFS files, a git blob id for others), never per
range. So when a stream of fetches reads a file start to end, in order, the gaps between its
tensors (and its header and tail) are read along, every byte is fed to a hash in the order it is
consumed, and the digest is compared when the last byte has passed, before the soup can be
finished. The header bytes in that stream are parsed again and must describe the tensors the
index was built from, so the offsets used are the ones hashed.

A file the stream reads out of order (an ingredient sharded unlike the first one, whose order the
output follows) cannot be hashed that way within bounded memory: it is downloaded whole into the
HF cache, checked there (:meth:`hfsoup.io.hub.HubSource.local_file`), and its ranges are read from
disk. A file for which the Hub lists no digest or size is read unverified, with a notice.
Local folders and files already verified on disk are not hashed again.

A Hub file already in the HF cache for the pinned commit is read from disk (no HTTP request) and
hashed the same way, whoever downloaded it: huggingface_hub checks only a download's size, so
its bytes are compared with the digest here. With ``--cache`` a file streamed whole is also
written into the HF cache on the way, and committed there only once its digest matched
(:class:`hfsoup.io.hfcache.CacheSink`).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hfsoup.errors import CorruptWeightsError
from hfsoup.io import checksums
from hfsoup.io.hub import HubSource
from hfsoup.io.refs import Fetch, IngredientIndex
from hfsoup.io.tensors import parse_header

_LOG = logging.getLogger("hfsoup")
# Bytes between two reads of one file (or after its last tensor) up to this size are read as
# part of the neighbouring read; larger stretches get reads of their own, only hashed.
_MERGE = 256 * 1024
# A file whose first tensor starts further in than this (a header of 100 MiB at most, then an
# odd gap) is not re-read from byte 0 in the stream but downloaded whole and checked.
_MAX_LEAD = 128 * 1024 * 1024


@dataclass
class _Running:
    """The hash of one file so far: every byte before ``pos`` has been fed to ``hash``."""

    index: IngredientIndex
    file: str
    digest: checksums.Digest
    size: int
    hash: Any
    pos: int = 0
    sink: Any = None  # a hfsoup.io.hfcache.CacheSink: the file written through into the cache


@dataclass(frozen=True)
class Read:
    """One read of a checked stream: the fetch performed, and the fetch the consumer is shown
    (``None``: a stretch read only to be hashed)."""

    fetch: Fetch
    shown: Fetch | None


class StreamCheck:
    """The hashing plan of one stream of fetches, and the running hashes while it is consumed.

    Args:
        fetches: the fetches, in the order they will be consumed.
        max_chunk: the largest read made for a stretch that is only hashed.
        notice: called with a message for each file that is downloaded whole or not verified.
        passes: how many times over the stream reads each file (a fetch's pass is its ``tag``
            modulo ``passes``, as :func:`hfsoup.compute.combine.stream_combine` tags them):
            each pass is hashed as a stream of its own, so bytes read again are checked again.
    """

    def __init__(
        self,
        fetches: Sequence[Fetch],
        *,
        max_chunk: int,
        notice: Callable[[str], None] | None = None,
        passes: int = 1,
    ) -> None:
        self._notice = notice or _LOG.warning
        self._passes = max(1, passes)
        self._running: dict[tuple[int, str, int], _Running] = {}
        self.reads = self._plan(list(fetches), max_chunk)

    def _key(self, f: Fetch) -> tuple[int, str, int]:
        return (id(f.index.ingredient.source), f.file, f.tag % self._passes)

    def _plan(self, fetches: list[Fetch], max_chunk: int) -> list[Read]:
        by_file: dict[tuple[int, str, int], list[int]] = {}
        for i, f in enumerate(fetches):
            if not f.index.pickle and isinstance(f.index.ingredient.source, HubSource):
                by_file.setdefault(self._key(f), []).append(i)
        before: dict[int, list[Fetch]] = {}  # hash-only reads, by the fetch they precede
        after: dict[int, list[Fetch]] = {}  # ... and follow
        reads: dict[int, Fetch] = {}
        out_of_order: dict[str, list[str]] = {}
        for key, positions in by_file.items():
            first = fetches[positions[0]]
            source: HubSource = first.index.ingredient.source
            label = f"{first.index.ingredient.label}: {first.file}"
            digest, size = source.digests.get(first.file), source.files.get(first.file)
            if digest is None or size is None:
                if key[2] == 0:
                    self._notice(
                        f"{label}: the Hub lists no digest for it; its bytes are used unverified"
                    )
                continue
            ordered = all(
                fetches[b].start >= fetches[a].end
                for a, b in zip(positions, positions[1:], strict=False)
            )
            if not ordered or first.start > _MAX_LEAD:
                for p in positions:
                    reads[p] = dataclasses.replace(fetches[p], disk=True)
                if key[2] == 0:
                    out_of_order.setdefault(first.index.ingredient.label, []).append(first.file)
                continue
            self._running[key] = _Running(
                first.index, first.file, digest, size, checksums.new_hash(digest, size),
                sink=source.cache_sink(first.file) if key[2] == 0 else None,
            )  # fmt: skip
            pos = 0
            for j, p in enumerate(positions):
                f = fetches[p]
                if j == 0 or f.start - pos <= _MERGE:
                    read = dataclasses.replace(f, start=pos)
                else:
                    before[p] = _stretch(f, pos, f.start, max_chunk)
                    read = f
                if j == len(positions) - 1:
                    if size - f.end <= _MERGE:
                        read = dataclasses.replace(read, end=size)
                    else:
                        after[p] = _stretch(f, f.end, size, max_chunk)
                reads[p] = read
                pos = f.end
        for label, files in out_of_order.items():
            self._notice(
                f"{label}: {', '.join(files)} would stream in another order than stored (sharded "
                "unlike the first ingredient), so it cannot be hashed on the way: downloading it "
                "whole to check its sha256"
            )
        planned: list[Read] = []
        for i, f in enumerate(fetches):
            planned.extend(Read(s, None) for s in before.get(i, ()))
            planned.append(Read(reads.get(i, f), f))
            planned.extend(Read(s, None) for s in after.get(i, ()))
        return planned

    def consume(self, fetch: Fetch, buf: Any) -> None:
        """Feed the bytes of ``fetch`` (read into ``buf``) to its file's hash, in stream order.

        Raises:
            CorruptWeightsError: the header streamed differs from the one indexed, or the file,
                once streamed whole, does not match the Hub's digest.
        """
        if fetch.disk:
            return
        running = self._running.get(self._key(fetch))
        if running is None:
            return
        data = memoryview(buf.numpy()) if isinstance(buf, torch.Tensor) else memoryview(buf)
        if fetch.start != running.pos:  # by construction; a planning bug must not pass silently
            raise AssertionError(f"{fetch.file}: read at {fetch.start}, hashed to {running.pos}")
        if fetch.start == 0:
            _check_header(running, data)
        running.hash.update(data)
        if running.sink is not None:
            running.sink.write(data)
        running.pos = fetch.end
        if running.pos != running.size:
            return
        if running.hash.hexdigest() != running.digest[1]:
            kind, expected = running.digest
            cached = fetch.index.ingredient.source.cached_path(running.file)
            where = f"in the HF cache ({cached})" if cached else "streamed from the Hub"
            ing = fetch.index.ingredient
            again = f"hf download {ing.spec.repo} {running.file} --revision {ing.sha}"
            why = (
                f"damaged on disk: fetch it again with `{again} --force-download`"
                if cached
                else "damaged in transit, or the server is faulty"
            )
            raise CorruptWeightsError(
                f"{running.index.ingredient.label}: {running.file}: the bytes {where} do not "
                f"match its {kind} {expected[:12]}...; refused ({why})"
            )
        if running.sink is not None:  # whole and verified: into the HF cache (--cache)
            running.sink.commit()
            running.sink = None


def _stretch(like: Fetch, start: int, end: int, max_chunk: int) -> list[Fetch]:
    """Hash-only reads covering ``[start, end)`` of ``like``'s file, at most ``max_chunk`` each."""
    return [
        dataclasses.replace(like, start=a, end=min(a + max_chunk, end), refs=())
        for a in range(start, end, max_chunk)
    ]


def _check_header(running: _Running, data: memoryview) -> None:
    """The header at the start of the stream must describe the tensors that were indexed."""
    where = f"{running.index.ingredient.label}: {running.file}"
    indexed = {k: r for k, r in running.index.tensors.items() if r.file == running.file}
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    try:
        streamed = parse_header(
            data[: 8 + n], file=running.file, file_size=running.size, where=where
        )
    except CorruptWeightsError:
        streamed = None
    if streamed != indexed:
        raise CorruptWeightsError(
            f"{where}: the header streamed from the Hub differs from the one read when indexing; "
            "refused (the server is serving changing bytes)"
        )
