"""Everything that talks to the Hub: resolving ingredients, reading bytes, pushing a soup.

This is the only module that makes HTTP calls. An ingredient is resolved once to a commit SHA and
every later read goes through a :class:`Source` pinned to that SHA, so a branch that moves while
a soup is being made cannot mix two versions of one ingredient.
"""

from __future__ import annotations

import json
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hfsoup import checksums
from hfsoup.errors import (
    AccessDeniedError,
    CorruptWeightsError,
    HubConnectionError,
    IngredientNotFoundError,
    IngredientSpecError,
    PushError,
)

T = TypeVar("T")

# A Hub repo ID: optional namespace, then a name; '@' separates an optional revision.
_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_RETRIES = 5
_BACKOFF_S = 0.5
# A server may ask for any Retry-After; past this we retry anyway rather than hang for an hour.
_MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class IngredientSpec:
    """What the user asked for: a repo ID with an optional revision, or a local directory."""

    repo: str | None = None
    revision: str | None = None
    path: Path | None = None
    weight: float | None = None

    @property
    def label(self) -> str:
        """How the ingredient is named in messages, tables and cards."""
        if self.path is not None:
            return str(self.path)
        return f"{self.repo}@{self.revision}" if self.revision else str(self.repo)


def parse_ingredient(text: str, *, weight: float | None = None) -> IngredientSpec:
    """Parse ``org/name``, ``org/name@revision`` or a local directory.

    Args:
        text: the ingredient as the user wrote it.
        weight: optional mixing weight, carried along unchanged.

    Returns:
        An :class:`IngredientSpec`.

    Raises:
        IngredientSpecError: the string is neither a repo ID nor an existing directory.
        IngredientNotFoundError: it looks like a path but no such directory exists.

    Example:
        >>> parse_ingredient("org/ft-1@v2").revision
        'v2'
    """
    text = text.strip()
    local = Path(text).expanduser()
    if local.is_dir():
        return IngredientSpec(path=local.resolve(), weight=weight)
    repo, sep, revision = text.partition("@")
    # A revision may hold slashes (refs/pr/1, feature/x); only the repo part may not.
    if text.startswith((".", "/", "~")) or repo.count("/") > 1:
        raise IngredientNotFoundError(f"ingredient {text!r}: no such local directory")
    if not _REPO_RE.match(repo) or (sep and not revision) or ".." in repo:
        raise IngredientSpecError(
            f"ingredient {text!r} is not 'org/name', 'org/name@revision' or a local directory"
        )
    return IngredientSpec(repo=repo, revision=revision or None, weight=weight)


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
    # ``out`` may also be an anonymous mmap or a view of a pinned tensor (hfsoup.streaming).
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
    """An ingredient that is a directory on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = {
            p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(root).parts
        }

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
        path = (self.root / filename).resolve()
        if not path.is_relative_to(self.root):
            raise IngredientNotFoundError(f"{filename!r} points outside {self.root}")
        return path


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
    ):
        self.repo, self.sha, self.files, self._token = repo, sha, files, token
        self.digests = digests or {}
        self._verified: dict[str, Path] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def where(self, filename: str) -> str:
        return f"{self.repo}/{filename}"

    def _url(self, filename: str) -> str:
        from huggingface_hub import constants, hf_hub_url

        return hf_hub_url(self.repo, filename, revision=self.sha, endpoint=constants.ENDPOINT)

    def read_range(
        self, filename: str, start: int, end: int, out: bytearray | None = None
    ) -> bytearray:
        from huggingface_hub import constants, get_session
        from huggingface_hub.utils import build_hf_headers

        buf = _buffer(out, start, end)
        got = 0
        headers = build_hf_headers(token=self._token, library_name="hfsoup")
        # HF_HUB_DOWNLOAD_TIMEOUT, as for huggingface_hub's own downloads: the longest wait for
        # the next byte before a stalled read is abandoned and retried.
        timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        for attempt in range(_RETRIES + 1):
            # Resume from the last byte received, so a dropped connection costs only a retry.
            headers["Range"] = f"bytes={start + got}-{end - 1}"
            try:
                with get_session().stream(
                    "GET", self._url(filename), headers=headers, follow_redirects=True,
                    timeout=timeout,
                ) as response:  # fmt: skip
                    _raise_for_status(response, f"{self.repo}/{filename}")
                    if response.status_code != 206 and start + got != 0:
                        raise HubConnectionError(
                            f"{self.repo}/{filename}: the server ignored a range request"
                        )
                    # As the bytes arrive (no re-chunking): a fixed chunk size would buffer,
                    # and lose on a drop, up to a chunk of bytes already received.
                    for chunk in response.iter_bytes():
                        take = min(len(chunk), len(buf) - got)
                        buf[got : got + take] = chunk[:take]
                        got += take
                        if got == len(buf):
                            break
                if got == len(buf):
                    return buf
                raise _Retryable(f"connection closed after {got} of {len(buf)} bytes")
            except _Retryable as exc:
                if attempt == _RETRIES:
                    raise HubConnectionError(
                        f"{self.repo}/{filename}: {exc} (gave up after {_RETRIES} retries)"
                    ) from exc
                time.sleep(exc.retry_after or _BACKOFF_S * 2**attempt)
            except Exception as exc:  # network errors from the HTTP client
                if not _is_network_error(exc):
                    raise
                if attempt == _RETRIES:
                    raise HubConnectionError(
                        f"{self.repo}/{filename}: {_network_problem(exc, timeout)} "
                        f"(gave up after {_RETRIES} retries)"
                    ) from exc
                time.sleep(_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

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
        path = self._download(filename, force=False)
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
        from huggingface_hub import hf_hub_download

        return Path(
            _call_hub(
                lambda: hf_hub_download(
                    self.repo, filename, revision=self.sha, token=self._token,
                    force_download=force,
                ),
                what=f"{self.repo}/{filename}",
            )
        )  # fmt: skip


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _is_network_error(exc: BaseException) -> bool:
    import httpx2

    return isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError)


def _network_problem(exc: BaseException, timeout: float) -> str:
    import httpx2

    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return f"no answer from the Hub at {_endpoint()} within {timeout:g}s"
    if isinstance(exc, httpx2.ConnectError | ConnectionRefusedError):
        return f"cannot reach the Hub at {_endpoint()}"
    return f"the connection to the Hub at {_endpoint()} broke ({type(exc).__name__})"


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait (``Retry-After: N``), bounded; None if not said."""
    value = (headers.get("Retry-After") or "").strip() if headers is not None else ""
    return min(float(value), _MAX_RETRY_AFTER_S) if value.isdigit() else None


def _raise_for_status(response: Any, what: str) -> None:
    status = response.status_code
    if status < 400:
        return
    if status == 429 or status >= 500:
        raise _Retryable(f"the Hub answered {status}", retry_after=_retry_after(response.headers))
    if status in (401, 403):
        raise AccessDeniedError(f"{what}: access denied ({status}); {_LOGIN_HINT}")
    raise IngredientNotFoundError(f"{what}: the Hub answered {status}")


_LOGIN_HINT = "set HF_TOKEN or run `hf auth login` with an account that can read it"


def _call_hub(fn: Callable[[], T], *, what: str) -> T:
    """Run one huggingface_hub call, turning its errors into hfsoup's one-line errors."""
    from huggingface_hub import errors

    for attempt in range(_RETRIES + 1):
        try:
            return fn()
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
            transient = status is None or status == 429 or status >= 500
            if transient and attempt < _RETRIES:
                wait = _retry_after(response.headers) if response is not None else None
                time.sleep(wait or _BACKOFF_S * 2**attempt)
                continue
            raise HubConnectionError(
                f"{what}: the Hub answered {status}"
                + (f" (gave up after {_RETRIES} retries)" if transient else "")
            ) from exc
        except Exception as exc:
            if not _is_network_error(exc):
                raise
            if attempt < _RETRIES:
                time.sleep(_BACKOFF_S * 2**attempt)
                continue
            raise HubConnectionError(
                f"{what}: cannot reach the Hub at {_endpoint()} (gave up after {_RETRIES} retries)"
            ) from exc
    raise AssertionError("unreachable")


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


def resolve(spec: IngredientSpec, *, token: str | None = None) -> Ingredient:
    """Pin an ingredient to a commit SHA and list its files.

    Args:
        spec: the parsed ingredient.
        token: a Hub token; ``None`` uses ``HF_TOKEN`` or the stored login.

    Returns:
        An :class:`Ingredient` whose every later read uses the resolved SHA.

    Raises:
        IngredientNotFoundError: no such repo, revision or directory.
        AccessDeniedError: the repo is private or gated and the token cannot read it.
        HubConnectionError: the Hub cannot be reached.
    """
    if spec.path is not None:
        source: Source = LocalSource(spec.path)
        card = _front_matter(spec.path / "README.md") if "README.md" in source.files else {}
        return Ingredient(spec=spec, sha=None, source=source, card=card)

    from huggingface_hub import HfApi

    info = _call_hub(
        lambda: HfApi(token=token).model_info(
            spec.repo, revision=spec.revision, files_metadata=True
        ),
        what=spec.label,
    )
    files = {s.rfilename: s.size for s in info.siblings or []}
    source = HubSource(
        spec.repo, info.sha, files, token, digests=checksums.from_siblings(info.siblings or [])
    )
    card = dict(info.card_data.to_dict()) if info.card_data else {}
    if not card and "README.md" in files:
        card = _front_matter(source.local_file("README.md"))
    return Ingredient(spec=spec, sha=info.sha, source=source, card=card)


def _front_matter(path: Path) -> dict[str, Any]:
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(path) or {}
    except Exception:  # a malformed card should not stop a soup: its metadata is a nicety
        return {}


def push_folder(
    folder: Path, repo_id: str, *, private: bool = False, token: str | None = None, message: str
) -> str:
    """Create ``repo_id`` if needed and upload everything in ``folder`` as one commit.

    Returns:
        The URL of the commit.

    Raises:
        PushError: anything failed; the message says how to retry. ``folder`` is left intact.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    retry = f"retry with: hfsoup push {folder} {repo_id}" + (" --private" if private else "")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    except Exception as exc:
        reason = _push_reason(exc)
        raise PushError(
            f"push to {repo_id} failed ({reason}); the soup is intact in {folder}; {retry}"
        ) from exc
    return info.commit_url


def _push_reason(exc: BaseException) -> str:
    from huggingface_hub import errors

    # huggingface_hub wraps a failed LFS upload in a RuntimeError: the HTTP answer is its cause.
    while isinstance(exc, RuntimeError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return "access denied; set HF_TOKEN or run `hf auth login` with a write token"
        return f"the Hub answered {status}"
    if _is_network_error(exc):
        return f"cannot reach the Hub at {_endpoint()}"
    return type(exc).__name__
