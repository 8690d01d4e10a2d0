"""Everything that talks to the Hub: resolving ingredients, reading bytes, pushing a soup.

This is the only module of hfsoup that makes HTTP calls of its own (through huggingface_hub's
session and ``HfApi``): resolving, reading ingredient bytes, downloading, committing a push. An
ingredient is resolved once to a commit SHA and every later read goes through a :class:`Source`
pinned to that SHA, so a branch that moves while a soup is being made cannot mix two versions of
one ingredient.

Elsewhere, the libraries hfsoup calls fetch what they are asked for, through their own caches:
``transformers``' ``from_pretrained`` (the tokenizer, image processor and config a task scores
with: :mod:`hfsoup.tasks.preprocess`, :mod:`hfsoup.tasks.scorer`; the base model of
:mod:`hfsoup.sweep`), ``datasets.load_dataset`` (:mod:`hfsoup.tasks.data`, :mod:`hfsoup.sweep`)
and ``evaluate.load`` of a Hub metric (:mod:`hfsoup.tasks.metrics`); :mod:`hfsoup.demo` publishes
its models and data to the loopback Hub it starts with ``HfApi``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from hfsoup.errors import (
    AccessDeniedError,
    CorruptWeightsError,
    HfsoupError,
    HubConnectionError,
    HubResponseError,
    IngredientNotFoundError,
    IngredientSpecError,
    PushError,
    RecipeError,
    scrub,
)
from hfsoup.ingredients import (
    IngredientSpec,
    _invalid_repo_id,
    looks_like_path,
    parse_ingredient,  # noqa: F401  (re-exported)
)
from hfsoup.io import checksums, hfcache

T = TypeVar("T")
log = logging.getLogger("hfsoup")

_RETRIES = 5
_BACKOFF_S = 0.5
# The longest one request may spend waiting in all (Retry-After waits and back-off together), so
# that a server asking for an hour fails the run at once instead of holding it.
MAX_RETRY_WAIT_VARIABLE = "HFSOUP_MAX_RETRY_WAIT"
DEFAULT_MAX_RETRY_WAIT_S = 60.0
# A range read slower than this over a whole HF_HUB_DOWNLOAD_TIMEOUT is abandoned and retried
# (from the last byte received), as a stalled one is: a server sending a byte a second would
# otherwise hold a run for hours without ever tripping the read timeout.
MIN_BYTES_PER_S = 1024
# Answers worth retrying: timeouts, rate limits, server errors.
_TRANSIENT = (408, 429)


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


def _buffer(out: bytearray | None, start: int, end: int) -> bytearray:
    # ``out`` may also be an anonymous mmap or a view of a pinned tensor (hfsoup.io.streaming).
    if out is None:
        return bytearray(end - start)
    if len(out) != end - start:
        raise ValueError(f"buffer of {len(out)} bytes for a read of {end - start}")
    return out


def _read_file_range(path: Path, start: int, buf: bytearray) -> bool:
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
        buf = _buffer(out, start, end)
        if not _read_file_range(self.local_file(filename), start, buf):
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
        buf = _buffer(out, start, end)
        if not _read_file_range(self.local_file(filename), start, buf):
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


class HubSource(Source):
    """An ingredient on the Hub, pinned to one commit SHA; reads are HTTP range requests.

    Whole files (configs, tokenizers, the weights of greedy runs) are downloaded into the HF
    cache and checked against the digest the Hub lists for them (``digests``: filename ->
    ``("sha256", hex)`` for LFS files, ``("git-sha1", hex)`` for the others).
    """

    def __init__(
        self,
        repo: str,
        sha: str,
        files: dict[str, int | None],
        token: str | None,
        digests: dict[str, checksums.Digest] | None = None,
        cache: bool | None = None,
    ):
        self.repo, self.sha, self.files, self._token = repo, sha, files, token
        self.digests = digests or {}
        self.cache = cache
        self._scratch: Any = None  # cache=False: a temporary folder for whole downloads
        self._verified: dict[str, Path] = {}
        self._on_disk: dict[str, Path | None] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def cached_path(self, filename: str) -> Path | None:
        """The copy of ``filename`` in the HF cache for this commit, if there is one to use
        (:func:`hfsoup.io.hfcache.cached_file`); looked up once per file.

        Raises:
            IngredientNotFoundError: offline (``HF_HUB_OFFLINE``) and the file is not cached.
        """
        if filename not in self._on_disk:
            self._on_disk[filename] = hfcache.cached_file(
                self.repo, self.sha, filename, self.files.get(filename), self.digests.get(filename)
            )
        path = self._on_disk[filename]
        if path is None and hfcache.offline():
            raise hfcache.not_cached(self.repo, self.sha, filename)
        return path

    def where(self, filename: str) -> str:
        return f"{self.repo}/{filename}"

    def cache_sink(self, filename: str) -> hfcache.CacheSink | None:
        """Where a stream reading ``filename`` whole, in order, writes it into the HF cache:
        only with ``cache=True`` (``--cache``), online, for a file with a digest that is not
        cached yet."""
        digest = self.digests.get(filename)
        if self.cache is not True or digest is None or hfcache.offline():
            return None
        if self.cached_path(filename) is not None:
            return None
        return hfcache.CacheSink(self.repo, self.sha, filename, digest)

    def _url(self, filename: str) -> str:
        from huggingface_hub import constants, hf_hub_url

        return hf_hub_url(self.repo, filename, revision=self.sha, endpoint=constants.ENDPOINT)

    def read_range(
        self, filename: str, start: int, end: int, out: bytearray | None = None
    ) -> bytearray:
        """Bytes ``[start, end)`` of ``filename``: from the HF cache when it holds the file
        (:meth:`cached_path`), else by HTTP range requests.

        A dropped connection resumes from the last byte received; 429/5xx answers are retried
        within :func:`max_retry_wait` seconds of waiting in all.

        Raises:
            HubConnectionError: the Hub kept failing, asked to wait longer than allowed, or
                answered another range than the one asked (``Content-Range``).
            IngredientNotFoundError: offline, and the file is not cached.
        """
        buf = _buffer(out, start, end)
        cached = self.cached_path(filename)
        if cached is not None:
            if not _read_file_range(cached, start, buf):
                raise CorruptWeightsError(
                    f"{self.where(filename)}: the copy in the HF cache ({cached}) is shorter than "
                    "its header says"
                )
            return buf
        return self._read_remote(filename, start, end, buf)

    def _read_remote(self, filename: str, start: int, end: int, buf: bytearray) -> bytearray:
        from huggingface_hub import constants, get_session
        from huggingface_hub.utils import build_hf_headers

        got = 0
        where = self.where(filename)
        headers = build_hf_headers(token=self._token, library_name="hfsoup")
        # HF_HUB_DOWNLOAD_TIMEOUT, as for huggingface_hub's own downloads: the longest wait for
        # the next byte before a stalled read is abandoned and retried.
        timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        waits = _Waits(where)
        for attempt in range(_RETRIES + 1):
            # Resume from the last byte received, so a dropped connection costs only a retry.
            headers["Range"] = f"bytes={start + got}-{end - 1}"
            try:
                with get_session().stream(
                    "GET", self._url(filename), headers=headers, follow_redirects=True,
                    timeout=timeout,
                ) as response:  # fmt: skip
                    _raise_for_status(response, where)
                    self._check_range(response, filename, start + got, end)
                    # As the bytes arrive (no re-chunking): a fixed chunk size would buffer,
                    # and lose on a drop, up to a chunk of bytes already received.
                    window_start, window_got = time.monotonic(), got
                    for chunk in response.iter_bytes():
                        take = min(len(chunk), len(buf) - got)
                        buf[got : got + take] = chunk[:take]
                        got += take
                        if got == len(buf):
                            break
                        # A server trickling bytes never trips the read timeout: each window
                        # of that length must bring MIN_BYTES_PER_S, or the read is retried.
                        elapsed = time.monotonic() - window_start
                        if elapsed >= timeout:
                            if got - window_got < MIN_BYTES_PER_S * elapsed:
                                raise _Retryable(
                                    f"the Hub sent only {got - window_got} bytes in "
                                    f"{elapsed:.1f}s (slower than {MIN_BYTES_PER_S} bytes/s)"
                                )
                            window_start, window_got = time.monotonic(), got
                if got == len(buf):
                    return buf
                raise _Retryable(f"connection closed after {got} of {len(buf)} bytes")
            except _Retryable as exc:
                problem, cause, asked, status = str(exc), exc, exc.retry_after, exc.status
            except Exception as exc:  # network errors from the HTTP client
                broken = _protocol_problem(exc)
                if broken is not None:
                    raise HubResponseError(f"{where}: {broken}") from exc
                if not _is_network_error(exc):
                    raise
                problem, cause, asked, status = _network_problem(exc, timeout), exc, None, None
            if attempt == _RETRIES or not waits.wait(
                _BACKOFF_S * 2**attempt, asked=asked, status=status
            ):
                raise HubConnectionError(f"{where}: {problem} ({_gave_up(attempt)})") from cause
        raise AssertionError("unreachable")

    def _check_range(self, response: Any, filename: str, first: int, end: int) -> None:
        """Refuse an answer that is not bytes ``[first, end)`` of the file.

        A 206 must say ``Content-Range: bytes first-(end-1)/SIZE`` with the size the Hub lists;
        a 200 (the server ignored the range) is the whole file, usable only from byte 0. A server
        answering another range is broken, not busy: no retry.
        """
        size = self.files.get(filename)
        asked = f"bytes {first}-{end - 1}/{size if size is not None else '*'}"
        if response.status_code != 206:
            if first != 0:
                raise HubConnectionError(
                    f"{self.where(filename)}: the server ignored a range request ({asked})"
                )
            self._check_length(response, filename, size)
            return
        self._check_length(response, filename, end - first)
        said = response.headers.get("Content-Range")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (said or "").strip())
        if (
            match is None
            or (int(match[1]), int(match[2])) != (first, end - 1)
            or (size is not None and match[3] != str(size))
        ):
            received = f"Content-Range {said.strip()!r}" if said else "no Content-Range"
            raise HubConnectionError(
                f"{self.where(filename)}: asked the Hub for {asked} and got {received}; "
                "the server answered another range than the one asked"
            )

    def _check_length(self, response: Any, filename: str, expected: int | None) -> None:
        """Refuse a body whose ``Content-Length`` is not the length of what was asked (the
        range, or for a 200 the whole file): it would be cut short, or would never end."""
        said = response.headers.get("Content-Length")
        encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
        if said is None or expected is None or encoding not in ("", "identity"):
            return
        if said.strip() != str(expected):
            raise HubResponseError(
                f"{self.where(filename)}: the Hub announced a body of {said.strip()[:40]!r} bytes "
                f"for {expected} bytes asked; the server is not answering as the Hub does"
            )

    def local_file(self, filename: str) -> Path:
        """Download ``filename`` whole (once) and check it against the Hub's digest.

        Raises:
            CorruptWeightsError: the bytes fail the digest twice (a second download is tried in
                case the first was damaged in transit); the bad copy is removed from the cache.
        """
        with self._locks_guard:
            lock = self._locks.setdefault(filename, threading.Lock())
        with lock:
            if filename not in self._verified:
                self._verified[filename] = self._download_verified(filename)
            return self._verified[filename]

    def _download_verified(self, filename: str) -> Path:
        cached = self.cached_path(filename)  # offline: the cached copy or a one-line error
        if cached is not None and hfcache.offline():
            if checksums.matches(cached, self.digests.get(filename)):
                return cached
            kind, expected = self.digests[filename]
            raise CorruptWeightsError(
                f"{self.where(filename)}: the copy in the HF cache ({cached}) does not match its "
                f"{kind} {expected[:12]}...; refused (HF_HUB_OFFLINE=1 forbids fetching it again: "
                f"`hf download {self.repo} {filename} --revision {self.sha} --force-download`)"
            )
        path = cached or self._download(filename, force=False)
        if checksums.matches(path, self.digests.get(filename)):
            return path
        path = self._download(filename, force=True)
        if checksums.matches(path, self.digests.get(filename)):
            return path
        checksums.discard(path)
        kind, expected = self.digests[filename]
        raise CorruptWeightsError(
            f"{self.repo}/{filename}: the downloaded bytes do not match the Hub's {kind} "
            f"{expected[:12]}... (twice); refused and removed from the cache"
        )

    def _download(self, filename: str, *, force: bool) -> Path:
        """Download into the HF cache, or with ``cache=False`` into a temporary folder that
        goes when this source does."""
        import tempfile

        from huggingface_hub import hf_hub_download

        if self.cache is False and self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="hfsoup-no-cache-")
        where = self._scratch.name if self._scratch is not None else None
        return Path(
            _call_hub(
                lambda: hf_hub_download(
                    self.repo, filename, revision=self.sha, token=self._token,
                    force_download=force, cache_dir=where,
                ),
                what=f"{self.repo}/{filename}",
            )
        )  # fmt: skip


class _Retryable(Exception):
    def __init__(
        self, message: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


def max_retry_wait() -> float:
    """Seconds one request may spend waiting in all: ``HFSOUP_MAX_RETRY_WAIT``, default 60.

    Raises:
        RecipeError: the variable is not a number of seconds >= 0.
    """
    raw = os.environ.get(MAX_RETRY_WAIT_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_MAX_RETRY_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise RecipeError(
            f"{MAX_RETRY_WAIT_VARIABLE} must be a number of seconds >= 0, got {raw!r}"
        )
    return value


class _Waits:
    """The waiting budget of one request: what servers ask for and back-off, together."""

    def __init__(self, what: str) -> None:
        self.what, self.limit = what, max_retry_wait()
        self.left = self.limit

    def wait(self, backoff: float, *, asked: float | None, status: int | None) -> bool:
        """Sleep before a retry: ``asked`` seconds when the server said, else ``backoff``.

        Returns:
            False when the back-off would overrun the budget (the caller gives up).

        Raises:
            HubConnectionError: the server asked for more than is left; saying what it asked.
        """
        if asked is not None and asked > self.left:
            raise HubConnectionError(
                f"{self.what}: the Hub answered {status} and asked to retry after {asked:g} s; "
                f"hfsoup waits at most {self.limit:g} s in all ({MAX_RETRY_WAIT_VARIABLE})"
            )
        seconds = asked if asked is not None else backoff
        if seconds > self.left:
            return False
        self.left -= seconds
        time.sleep(seconds)
        return True


def _gave_up(retries: int) -> str:
    return f"gave up after {retries} {'retry' if retries == 1 else 'retries'}"


def _endpoint() -> str:
    """The Hub's address for messages, without any credentials written into it."""
    from huggingface_hub import constants

    return scrub(constants.ENDPOINT)


def _is_network_error(exc: BaseException) -> bool:
    import httpx2

    return isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError)


def _protocol_problem(exc: BaseException) -> str | None:
    """What is wrong when the server answered in a way no retry will mend (a redirect loop, a
    redirect to no HTTP address, a body that cannot be decoded); None for other errors."""
    import httpx2

    if isinstance(exc, httpx2.TooManyRedirects):
        return f"the Hub at {_endpoint()} redirected the request in a loop (too many redirects)"
    if isinstance(exc, httpx2.UnsupportedProtocol | httpx2.InvalidURL):
        return f"the Hub at {_endpoint()} redirected the request to an address that is not http(s)"
    if isinstance(exc, httpx2.DecodingError):
        return f"the Hub at {_endpoint()} sent a body that cannot be decoded ({exc})"[:300]
    return None


def _network_problem(exc: BaseException, timeout: float) -> str:
    import httpx2

    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return f"no answer from the Hub at {_endpoint()} within {timeout:g}s"
    if isinstance(exc, httpx2.ConnectError | ConnectionRefusedError):
        return f"cannot reach the Hub at {_endpoint()}"
    return f"the connection to the Hub at {_endpoint()} broke ({type(exc).__name__})"


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait, None if it did not say (or said something
    unreadable): ``Retry-After`` (seconds or an HTTP date) first, else the Hub's ``RateLimit``
    header (``"api";r=0;t=55``: no requests left in this window, which resets in 55 s)."""
    if headers is None:
        return None
    value = (headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        when = None
    if when is not None and when.tzinfo is not None:  # RFC 9110 dates are GMT
        return float(max(0, math.ceil(when.timestamp() - time.time())))
    return _ratelimit_reset(headers)


def _ratelimit_reset(headers: Any) -> float | None:
    """Seconds until the rate-limit window resets, when the ``RateLimit`` header says that no
    request is left in it; None otherwise."""
    from huggingface_hub.utils import parse_ratelimit_headers

    try:
        info = parse_ratelimit_headers(headers)
    except (TypeError, ValueError):  # a header the parser cannot read says nothing
        return None
    if info is None or info.remaining > 0 or info.reset_in_seconds < 0:
        return None
    return float(info.reset_in_seconds)


def _is_transient(status: int | None) -> bool:
    return status is None or status in _TRANSIENT or status >= 500


def _raise_for_status(response: Any, what: str) -> None:
    status = response.status_code
    if status < 400:
        return
    if _is_transient(status):
        raise _Retryable(
            f"the Hub answered {status}", retry_after=_retry_after(response.headers), status=status
        )
    if status in (401, 403):
        raise AccessDeniedError(f"{what}: access denied ({status}); {_LOGIN_HINT}")
    raise IngredientNotFoundError(f"{what}: the Hub answered {status}")


_LOGIN_HINT = "set HF_TOKEN or run `hf auth login` with an account that can read it"


def _call_hub(fn: Callable[[], T], *, what: str) -> T:
    """Run one huggingface_hub call, turning its errors into hfsoup's one-line errors.

    429/5xx answers are retried here, within :func:`max_retry_wait` seconds of waiting in all:
    huggingface_hub's own retries (``hf_hub_download``) would wait as long as a server asks,
    so while the call runs such an answer is raised out of it at once (:func:`_hook_session`).
    """
    from huggingface_hub import errors

    waits = _Waits(what)
    for attempt in range(_RETRIES + 1):
        _hook_session()  # each attempt: huggingface_hub replaces its client after a connect error
        _IN_CALL.active = True
        try:
            return fn()
        except _Retryable as exc:
            problem, cause, asked, status = str(exc), exc, exc.retry_after, exc.status
        except errors.GatedRepoError as exc:
            raise AccessDeniedError(f"{what} is gated or private; {_LOGIN_HINT}") from exc
        except errors.RevisionNotFoundError as exc:
            raise IngredientNotFoundError(f"{what}: revision not found") from exc
        except errors.RepositoryNotFoundError as exc:
            raise IngredientNotFoundError(
                f"{what}: repository not found (or private: {_LOGIN_HINT})"
            ) from exc
        except errors.LocalEntryNotFoundError as exc:
            # A subclass of EntryNotFoundError: the file is not cached and the Hub could not be
            # reached. hf_hub_download has retried already; another loop would only wait longer.
            raise HubConnectionError(f"{what}: cannot reach the Hub at {_endpoint()}") from exc
        except errors.EntryNotFoundError as exc:
            raise IngredientNotFoundError(f"{what}: file not found") from exc
        except errors.HfHubHTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else None
            if status in (401, 403):
                raise AccessDeniedError(f"{what}: access denied; {_LOGIN_HINT}") from exc
            if not _is_transient(status):
                raise HubConnectionError(f"{what}: the Hub answered {status}") from exc
            asked = _retry_after(response.headers) if response is not None else None
            problem, cause = f"the Hub answered {status}", exc
        except Exception as exc:
            broken = _protocol_problem(exc)
            if broken is not None:
                raise HubResponseError(f"{what}: {broken}") from exc
            if not _is_network_error(exc):
                raise
            problem, cause, asked, status = (
                f"cannot reach the Hub at {_endpoint()}",
                exc,
                None,
                None,
            )
        finally:
            _IN_CALL.active = False
        if attempt == _RETRIES or not waits.wait(
            _BACKOFF_S * 2**attempt, asked=asked, status=status
        ):
            raise HubConnectionError(f"{what}: {problem} ({_gave_up(attempt)})") from cause
    raise AssertionError("unreachable")


# Set while :func:`_call_hub` runs a huggingface_hub call on this thread.
_IN_CALL = threading.local()


def _leave_on_retryable(response: Any) -> None:
    """Response hook: inside :func:`_call_hub`, a 408/429/5xx answer ends the library call.

    huggingface_hub retries such answers itself, sleeping whatever ``Retry-After`` says (an hour
    if asked); raised here, the answer reaches hfsoup's loop, which keeps to its budget.
    """
    if getattr(_IN_CALL, "active", False) and _is_transient(response.status_code):
        status = response.status_code
        raise _Retryable(
            f"the Hub answered {status}", retry_after=_retry_after(response.headers), status=status
        )


def _bound_slow_bodies(response: Any) -> None:
    """Response hook: inside :func:`_call_hub`, a body arriving slower than
    :data:`MIN_BYTES_PER_S` over a whole ``HF_HUB_DOWNLOAD_TIMEOUT`` ends the library call.

    huggingface_hub's downloads time out only when no byte comes at all, and resume (with fresh
    retries) whenever some did: a server trickling bytes would hold the run for hours. Raised
    here, the slow answer reaches hfsoup's loop, which retries within its bounds.
    """
    if getattr(_IN_CALL, "active", False):
        response.stream = _min_rate(response.stream)


def _min_rate_stream_class() -> type:
    import httpx2
    from huggingface_hub import constants

    class MinRateStream(httpx2.SyncByteStream):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __iter__(self) -> Any:
            timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
            start, got = time.monotonic(), 0
            for chunk in self.inner:
                got += len(chunk)
                yield chunk
                elapsed = time.monotonic() - start
                if elapsed >= timeout:
                    if got < MIN_BYTES_PER_S * elapsed:
                        raise _Retryable(
                            f"the Hub sent only {got} bytes in {elapsed:.1f}s "
                            f"(slower than {MIN_BYTES_PER_S} bytes/s)"
                        )
                    start, got = time.monotonic(), 0

        def close(self) -> None:
            close = getattr(self.inner, "close", None)
            if close is not None:
                close()

    return MinRateStream


def _min_rate(inner: Any) -> Any:
    """``inner`` (an httpx2 byte stream) wrapped in the stream class, made on first use."""
    global _MIN_RATE_STREAM
    if _MIN_RATE_STREAM is None:
        _MIN_RATE_STREAM = _min_rate_stream_class()
    return _MIN_RATE_STREAM(inner)


_MIN_RATE_STREAM: type | None = None


def _hook_session() -> None:
    """Add :func:`_leave_on_retryable` and :func:`_bound_slow_bodies` to huggingface_hub's HTTP
    client (once per client; the hooks do nothing outside hfsoup's calls)."""
    from huggingface_hub import get_session

    hooks = get_session().event_hooks["response"]
    for hook in (_leave_on_retryable, _bound_slow_bodies):
        if hook not in hooks:
            hooks.append(hook)


@dataclass
class Ingredient:
    """An ingredient resolved to a commit: where to read it, and what it holds."""

    spec: IngredientSpec
    sha: str | None
    source: Source
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def files(self) -> dict[str, int | None]:
        return self.source.files


def resolve(
    spec: IngredientSpec, *, token: str | None = None, cache: bool | None = None
) -> Ingredient:
    """Pin an ingredient to a commit SHA and list its files.

    Offline (``HF_HUB_OFFLINE``) it is resolved from the HF cache alone (see
    :mod:`hfsoup.io.hfcache`); online, files already cached for the SHA are read from disk.

    Args:
        spec: the parsed ingredient.
        token: a Hub token; ``None`` uses ``HF_TOKEN`` or the stored login.
        cache: ``True``: files a stream reads whole are also written into the HF cache;
            ``None`` (default): only files downloaded whole go there; ``False``: nothing is
            written into it (whole downloads go to a temporary folder).

    Returns:
        An :class:`Ingredient` whose every later read uses the resolved SHA.

    Raises:
        IngredientNotFoundError: no such repo, revision or directory.
        AccessDeniedError: the repo is private or gated and the token cannot read it.
        HubConnectionError: the Hub cannot be reached.
    """
    if spec.path is not None:
        source: Source = LocalSource(spec.path)
        card = _front_matter(source.local_file("README.md")) if "README.md" in source.files else {}
        return Ingredient(spec=spec, sha=None, source=source, card=card)

    from huggingface_hub import HfApi

    if hfcache.offline():
        return _resolve_offline(spec, token, cache)
    try:
        info = _call_hub(lambda: _model_info(HfApi(token=token), spec), what=spec.label)
    except HfsoupError as exc:
        if spec.local_fallback is None:
            raise
        return _resolve_fallback(spec, exc)
    sha, files, digests = _checked_listing(spec.label, info)
    if cache is not False:  # so that an offline run finds the commit
        hfcache.write_ref(spec.repo, spec.revision, sha)
    source = HubSource(spec.repo, sha, files, token, digests=digests, cache=cache)
    card = _card_data(info)
    if not card and "README.md" in files:
        card = _front_matter(source.local_file("README.md"))
    return Ingredient(spec=spec, sha=sha, source=source, card=card)


def _resolve_offline(spec: IngredientSpec, token: str | None, cache: bool | None) -> Ingredient:
    """Resolve from the HF cache alone (``HF_HUB_OFFLINE``): see :mod:`hfsoup.io.hfcache`.

    Raises:
        IngredientNotFoundError: the repo or revision is not cached (with a hint at the local
            folder of that name, when there is one), or the snapshot holds no weights file.
    """
    try:
        sha, files, digests = hfcache.offline_listing(spec.repo, spec.revision)
    except IngredientNotFoundError as exc:
        if spec.local_fallback is None:
            raise
        written = f"./{spec.label}"
        raise IngredientNotFoundError(
            f"{exc} (a local folder {written} exists: write {written} to use it)"
        ) from exc
    if not any(_WEIGHTS_RE.search(name) for name in files):
        raise IngredientNotFoundError(
            f"{spec.label}: the HF cache holds no weights of commit {sha[:12]} "
            f"({', '.join(sorted(files)[:5]) or 'no files'}), and HF_HUB_OFFLINE=1 forbids "
            f"downloading them; fetch them first with `hf download {spec.repo} --revision {sha}`"
        )
    source = HubSource(spec.repo, sha, files, token, digests=digests, cache=cache)
    card = _front_matter(source.local_file("README.md")) if "README.md" in files else {}
    return Ingredient(spec=spec, sha=sha, source=source, card=card)


# The weight files an ingredient may hold (see hfsoup.io.tensors): one is needed offline.
_WEIGHTS_RE = re.compile(r"(^|/)[^/]*\.(safetensors|bin)(\.index\.json)?$")

_NOT_A_HUB = "the server at HF_ENDPOINT does not answer as the Hub does"


def _model_info(api: Any, spec: IngredientSpec) -> Any:
    """``model_info`` with file metadata; an answer huggingface_hub cannot read (not JSON, not
    an object, fields missing or of the wrong type) is one line, not the parser's traceback."""
    from huggingface_hub.errors import HFValidationError

    try:
        return api.model_info(spec.repo, revision=spec.revision, files_metadata=True)
    except HFValidationError as exc:
        raise IngredientSpecError(f"ingredient {spec.label!r}: {exc}") from exc
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        # JSONDecodeError is a ValueError; ModelInfo(**data) fails with the others.
        raise HubResponseError(
            f"{spec.label}: the Hub's answer about the repo cannot be read "
            f"({type(exc).__name__}: {str(exc)[:100]}); {_NOT_A_HUB}"
        ) from exc


_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def _checked_listing(
    label: str, info: Any
) -> tuple[str, dict[str, int | None], dict[str, checksums.Digest]]:
    """The commit SHA, files (name -> size) and digests of a ``model_info`` answer, checked.

    Every later read is pinned to the SHA, so an answer without a well-formed one cannot be
    used (reads would follow the branch). File names must be relative paths inside the repo,
    each listed once; sizes non-negative integers; digests hex of the right length.

    Raises:
        HubResponseError: any of these does not hold; naming the field.
    """
    sha = info.sha
    if not isinstance(sha, str) or not _COMMIT_SHA.fullmatch(sha):
        shown = "none" if sha is None else repr(sha)[:60]
        raise HubResponseError(
            f"{label}: the Hub's answer names no commit SHA (40 hex digits) to pin the "
            f"ingredient to (sha: {shown}); {_NOT_A_HUB}"
        )
    siblings = info.siblings or []
    files: dict[str, int | None] = {}
    for s in siblings:
        name = getattr(s, "rfilename", None)
        if not _is_repo_path(name):
            raise HubResponseError(
                f"{label}: the Hub lists a file named {repr(name)[:120]}, which is not a path "
                f"inside a repo; {_NOT_A_HUB}"
            )
        if name in files:
            raise HubResponseError(
                f"{label}: the Hub lists the file {name!r} more than once; {_NOT_A_HUB}"
            )
        size = s.size
        if size is not None and (type(size) is not int or size < 0):
            raise HubResponseError(
                f"{label}: the Hub lists {name!r} with size {repr(size)[:40]}, not a number of "
                f"bytes; {_NOT_A_HUB}"
            )
        files[name] = size
    try:
        digests = checksums.from_siblings(siblings)
    except ValueError as exc:
        raise HubResponseError(f"{label}: {exc}; {_NOT_A_HUB}") from exc
    return sha, files, digests


def _is_repo_path(name: Any) -> bool:
    """Whether ``name`` is a file path a repo can hold: relative, '/'-separated, no empty,
    '.' or '..' part, no backslash or control character."""
    if not isinstance(name, str) or not name or len(name) > 4096:
        return False
    if "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _card_data(info: Any) -> dict[str, Any]:
    """The card metadata the Hub parsed, or {} when it sent none or something that is not one
    (the README's front matter is read instead)."""
    from huggingface_hub import ModelCardData

    data = info.card_data
    if not isinstance(data, ModelCardData):
        return {}
    try:
        return dict(data.to_dict())
    except Exception:  # metadata is a nicety: a strange one must not stop a soup
        return {}


def _resolve_fallback(spec: IngredientSpec, exc: HfsoupError) -> Ingredient:
    """A repo-shaped name the Hub does not have, read from the local folder of that name.

    Only "repository not found" falls back: on any other failure (network, access, revision)
    the error stands, with a hint that the folder can be named as a path.
    """
    from huggingface_hub import errors

    folder = spec.local_fallback
    written = f"./{spec.label}"
    missing = isinstance(exc.__cause__, errors.RepositoryNotFoundError) and not isinstance(
        exc.__cause__, errors.GatedRepoError
    )
    if not missing:
        hint = f" (a local folder {written} exists: write {written} to use it)"
        raise type(exc)(f"{exc}{hint}") from exc
    log.warning(
        "no Hub repo %s; using the local folder %s — write %s to say so",
        spec.repo,
        written,
        written,
    )
    return resolve(IngredientSpec(path=folder, weight=spec.weight))


def hub_dataset(dataset: str | dict[str, Any]) -> tuple[str, str | None] | None:
    """The Hub dataset a task reads, as ``(repo ID, requested revision)``; None when it reads
    local files (a packaged builder such as ``csv`` or ``parquet``, or a local folder).

    ``dataset`` is a task's dataset: a Hub ID or ``datasets.load_dataset`` keyword arguments.
    """
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    kwargs = dataset if isinstance(dataset, dict) else {"path": dataset}
    path, revision = kwargs.get("path"), kwargs.get("revision")
    if not isinstance(path, str) or path in _PACKAGED_DATASETS_MODULES or looks_like_path(path):
        return None
    if _invalid_repo_id(path) is not None or Path(path).expanduser().exists():
        return None
    return path, revision if isinstance(revision, str) else None


def dataset_commit(
    repo: str, revision: str | None = None, *, token: str | None = None
) -> str | None:
    """The commit SHA a Hub dataset's ``revision`` (default branch if None) points at now;
    None when the Hub cannot say (offline, unreachable, no access): a card then names the
    revision asked for, or none. One request, no retries: it only labels a card.
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return HfApi(token=token).dataset_info(repo, revision=revision).sha
    except Exception:  # any failure only leaves the revision unpinned
        return None


# A card's metadata is read from at most this many bytes (front matter comes first).
_MAX_CARD_BYTES = 1 << 20


def _front_matter(path: Path) -> dict[str, Any]:
    import yaml

    try:
        with open(path, "rb") as f:
            text = f.read(_MAX_CARD_BYTES).decode("utf-8-sig", errors="replace")
        # As huggingface_hub's metadata_load finds it: a YAML block between --- lines, first.
        match = re.match(r"\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.DOTALL)
        data = yaml.safe_load(match.group(1)) if match else None
    except Exception:  # a malformed card should not stop a soup: its metadata is a nicety
        return {}
    return data if isinstance(data, dict) else {}


def commit_files(
    repo_id: str,
    contents: dict[str, bytes | BinaryIO],
    *,
    replaces: Callable[[str], bool],
    message: str,
    folder: Path,
    retry: str,
    private: bool = False,
    token: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``contents`` (repo path -> bytes or an open
    file) as one commit, which also deletes the remote files ``replaces`` claims that are not
    among them (what hfsoup owns: :func:`hfsoup.report.pushplan.is_soup_file`). Other remote
    files are kept. :func:`hfsoup.report.pushplan.push_folder` chooses and opens the files.

    Args:
        folder: the local folder the files come from, for messages.
        retry: how to retry, appended to a failure's message.

    Returns:
        The URL of the commit.

    Raises:
        PushError: a path the Hub cannot hold (refused before anything is sent), or the upload
            failed; the message says how to retry.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    adds = []
    for f, content in contents.items():
        try:
            adds.append(CommitOperationAdd(f, content))
        except ValueError as exc:  # a name the Hub cannot hold
            raise PushError(f"cannot push {folder / f}: {exc}; nothing was uploaded") from exc
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        head = api.model_info(repo_id)
        remote = [s.rfilename for s in head.siblings or []]
        stale = sorted(p for p in remote if replaces(p) and p not in contents)
        info = api.create_commit(
            repo_id,
            [*adds, *(CommitOperationDelete(p) for p in stale)],
            commit_message=message,
            parent_commit=head.sha,  # a commit made meanwhile fails this one, never mixes in
        )
    except Exception as exc:
        reason = _push_reason(exc)
        raise PushError(
            f"push to {repo_id} failed ({reason}); the soup is intact in {folder}; {retry}"
        ) from exc
    return info.commit_url


def refuse_push_offline(repo_id: str, folder: Path | None = None) -> None:
    """Refuse a push while ``HF_HUB_OFFLINE`` is set (nothing is sent).

    Raises:
        PushError: offline; saying how to push later.
    """
    if not hfcache.offline():
        return
    kept = f"; the soup is intact in {folder}" if folder is not None else ""
    raise PushError(
        f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 is set{kept}; push it later from a machine "
        f"that can reach the Hub with `hfsoup push {folder or 'SOUP_DIR'} {repo_id}`"
    )


def _push_reason(exc: BaseException) -> str:
    from huggingface_hub import errors

    # huggingface_hub wraps a failed LFS upload in a RuntimeError: the HTTP answer is its cause.
    while isinstance(exc, RuntimeError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return "access denied; set HF_TOKEN or run `hf auth login` with a write token"
        if status == 412:
            return "the repo changed while pushing (412); nothing of this push was committed"
        return f"the Hub answered {status}"
    if _is_network_error(exc):
        return f"cannot reach the Hub at {_endpoint()}"
    return type(exc).__name__
