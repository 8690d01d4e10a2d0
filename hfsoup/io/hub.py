"""Everything that talks to the Hub: resolving ingredients, reading bytes, pushing a soup.

This is the only module of hfsoup that makes HTTP calls of its own (through huggingface_hub's
session and ``HfApi``): resolving, reading ingredient bytes, downloading, committing a push;
:mod:`hfsoup.io.hubcalls` wraps each call in hfsoup's retries and waits, and
:mod:`hfsoup.io.sources` is the interface a Hub repo's :class:`HubSource` shares with a local
folder (no HTTP). An
ingredient is resolved once to a commit SHA and every later read goes through a :class:`Source`
pinned to that SHA, so a branch that moves while a soup is being made cannot mix two versions of
one ingredient.

Elsewhere, the libraries hfsoup calls fetch what they are asked for, through their own caches:
``transformers``' ``from_pretrained`` (the tokenizer, image processor and config a task scores
with: :mod:`hfsoup.tasks.preprocess`, :mod:`hfsoup.tasks.classification`; the base model of
:mod:`hfsoup.sweep`), ``datasets.load_dataset`` (:mod:`hfsoup.tasks.data`, :mod:`hfsoup.sweep`)
and ``evaluate.load`` of a Hub metric (:mod:`hfsoup.tasks.metrics`); :mod:`hfsoup.demo` publishes
its models and data to the loopback Hub it starts with ``HfApi``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from hfsoup.errors import (
    CorruptWeightsError,
    HfsoupError,
    HubConnectionError,
    HubResponseError,
    IngredientNotFoundError,
    IngredientSpecError,
    PushError,
)
from hfsoup.ingredients import (
    IngredientSpec,
    _invalid_repo_id,
    looks_like_path,
    parse_ingredient,  # noqa: F401  (re-exported)
)
from hfsoup.io import checksums, hfcache, hubcalls
from hfsoup.io.hubcalls import (
    MIN_BYTES_PER_S,
    RETRIES,
    Retryable,
    Waits,
    _retry_after,  # noqa: F401  (re-exported)
    call_hub,
    gave_up,
    hub_endpoint,
    is_network_error,
    max_retry_wait,  # noqa: F401  (re-exported)
    network_problem,
    protocol_problem,
    raise_for_status,
)
from hfsoup.io.sources import (
    MAX_LOCAL_DEPTH,  # noqa: F401  (re-exported)
    MAX_LOCAL_ENTRIES,  # noqa: F401  (re-exported)
    LocalSource,
    Source,
    read_buffer,
    read_file_range,
)

T = TypeVar("T")
log = logging.getLogger("hfsoup")


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
        buf = read_buffer(out, start, end)
        cached = self.cached_path(filename)
        if cached is not None:
            if not read_file_range(cached, start, buf):
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
        waits = Waits(where)
        for attempt in range(RETRIES + 1):
            # Resume from the last byte received, so a dropped connection costs only a retry.
            headers["Range"] = f"bytes={start + got}-{end - 1}"
            try:
                with get_session().stream(
                    "GET", self._url(filename), headers=headers, follow_redirects=True,
                    timeout=timeout,
                ) as response:  # fmt: skip
                    raise_for_status(response, where)
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
                                raise Retryable(
                                    f"the Hub sent only {got - window_got} bytes in "
                                    f"{elapsed:.1f}s (slower than {MIN_BYTES_PER_S} bytes/s)"
                                )
                            window_start, window_got = time.monotonic(), got
                if got == len(buf):
                    return buf
                raise Retryable(f"connection closed after {got} of {len(buf)} bytes")
            except Retryable as exc:
                problem, cause, asked, status = str(exc), exc, exc.retry_after, exc.status
            except Exception as exc:  # network errors from the HTTP client
                broken = protocol_problem(exc)
                if broken is not None:
                    raise HubResponseError(f"{where}: {broken}") from exc
                if not is_network_error(exc):
                    raise
                problem, cause, asked, status = network_problem(exc, timeout), exc, None, None
            if attempt == RETRIES or not waits.wait(
                hubcalls.BACKOFF_S * 2**attempt, asked=asked, status=status
            ):
                raise HubConnectionError(f"{where}: {problem} ({gave_up(attempt)})") from cause
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
            call_hub(
                lambda: hf_hub_download(
                    self.repo, filename, revision=self.sha, token=self._token,
                    force_download=force, cache_dir=where,
                ),
                what=f"{self.repo}/{filename}",
            )
        )  # fmt: skip


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
        info = call_hub(lambda: _model_info(HfApi(token=token), spec), what=spec.label)
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
    if is_network_error(exc):
        return f"cannot reach the Hub at {hub_endpoint()}"
    return type(exc).__name__
