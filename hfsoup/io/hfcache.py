"""The Hugging Face cache as hfsoup reads it: cached files of a pinned commit, offline listings.

Files already in the HF cache (``HF_HUB_CACHE``, ``models--org--name/snapshots/SHA/...``) for
the commit an ingredient is pinned to are read from disk, whoever put them there (``hf
download``, ``snapshot_download``, ``from_pretrained``, an earlier hfsoup run). A cached file is
used only when its size is the one the Hub lists and, where its blob's name is a digest (the ETag
huggingface_hub stored it under: the sha256 of an LFS file, the git blob id of another), that
digest is the one the Hub lists; its bytes are then hashed against that digest as any download
is (:mod:`hfsoup.io.checksums`, :mod:`hfsoup.io.integrity`).

With ``HF_HUB_OFFLINE=1`` (or ``huggingface_hub.constants.HF_HUB_OFFLINE``) an ingredient is
resolved from the cache alone (:func:`offline_listing`): a branch or tag through the cache's
``refs/NAME``, a commit SHA as itself; the files are the ones in that snapshot, their digests
the names of their blobs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from hfsoup.errors import IngredientNotFoundError
from hfsoup.io import checksums

log = logging.getLogger("hfsoup")

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_BLOB_DIGEST = {64: "sha256", 40: "git-sha1"}
_HEX = re.compile(r"[0-9a-f]+")
# Bounds on an offline listing: a snapshot is a model's files, not a disk.
_MAX_FILES = 10_000


def offline() -> bool:
    """Whether the Hub must not be contacted: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)
    as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    raw = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return raw.strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """The HF cache folder huggingface_hub downloads into (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo: str) -> Path:
    """The cache folder of a model repo: ``HF_HUB_CACHE/models--org--name``."""
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def blob_digest(path: Path) -> checksums.Digest | None:
    """The digest a cached file's blob is named by (huggingface_hub names blobs by the Hub's
    ETag: sha256 for LFS files, the git blob id for others); None for any other name (a copy
    where symlinks are unavailable, a local folder)."""
    try:
        name = path.resolve().name
    except OSError:
        return None
    kind = _BLOB_DIGEST.get(len(name))
    if kind is None or not _HEX.fullmatch(name) or path.resolve().parent.name != "blobs":
        return None
    return (kind, name)


def cached_file(
    repo: str, sha: str, filename: str, size: int | None, digest: checksums.Digest | None
) -> Path | None:
    """The cached copy of ``filename`` at commit ``sha``, or None when there is none to use.

    A copy whose size differs from ``size``, or whose blob is named by another digest than
    ``digest`` (when both are known), is another file: it is not used (a notice says so).
    """
    snapshot = repo_folder(repo) / "snapshots" / sha
    path = snapshot.joinpath(*filename.split("/"))
    try:
        if not path.is_file():
            return None
        found = path.stat().st_size
    except (OSError, ValueError):
        return None
    named = blob_digest(path)
    if (size is not None and found != size) or (
        digest is not None and named is not None and named[0] == digest[0] and named != digest
    ):
        log.warning(
            "%s/%s: the HF cache holds another file under this commit (%d bytes%s); "
            "not used, read from the Hub instead",
            repo,
            filename,
            found,
            f", blob {named[1][:12]}..." if named else "",
        )
        return None
    return path


def resolve_revision(repo: str, revision: str | None) -> str:
    """The commit SHA ``revision`` names in the cache: a SHA itself (when its snapshot is
    cached), a branch or tag through ``refs/NAME``; default ``main``.

    Raises:
        IngredientNotFoundError: the repo, the ref or the snapshot is not in the cache; one line
            saying how to fetch it before going offline.
    """
    folder = repo_folder(repo)
    label = f"{repo}@{revision}" if revision else repo
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    hint = f"HF_HUB_OFFLINE=1 forbids downloading it; fetch it first with `{fetch}`"
    if not folder.is_dir():
        raise IngredientNotFoundError(f"{label}: not in the HF cache ({cache_dir()}); {hint}")
    name = revision or "main"
    if _COMMIT_SHA.fullmatch(name):
        sha = name
    else:
        ref = folder / "refs" / name
        try:
            sha = ref.read_text().strip() if ref.is_file() else ""
        except OSError:
            sha = ""
        if not _COMMIT_SHA.fullmatch(sha):
            raise IngredientNotFoundError(
                f"{label}: the HF cache has no commit for revision {name!r} "
                f"(no {folder.name}/refs/{name}); {hint}"
            )
    if not (folder / "snapshots" / sha).is_dir():
        raise IngredientNotFoundError(
            f"{label}: commit {sha[:12]} is not in the HF cache ({cache_dir()}); {hint}"
        )
    return sha


def offline_listing(
    repo: str, revision: str | None
) -> tuple[str, dict[str, int | None], dict[str, checksums.Digest]]:
    """Resolve a Hub ingredient from the cache alone: ``(sha, files, digests)``.

    ``files`` are the snapshot's files (name -> size): only what was downloaded, so a file the
    repo holds but the cache does not is simply not listed. ``digests`` come from the blob names.

    Raises:
        IngredientNotFoundError: see :func:`resolve_revision`.
    """
    sha = resolve_revision(repo, revision)
    root = repo_folder(repo) / "snapshots" / sha
    files: dict[str, int | None] = {}
    digests: dict[str, checksums.Digest] = {}
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            try:
                size = path.stat().st_size
            except OSError:
                continue  # a dangling link: its blob was removed
            rel = path.relative_to(root).as_posix()
            files[rel] = size
            digest = blob_digest(path)
            if digest is not None:
                digests[rel] = digest
            if len(files) > _MAX_FILES:
                break
    for name in _indexed_shards(root, files):
        files.setdefault(name, None)  # named by a cached index, not cached: "not in the cache"
    return sha, dict(sorted(files.items())), digests


_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _indexed_shards(root: Path, files: dict[str, int | None]) -> list[str]:
    """The weight files a cached weight index names (the repo holds them, cached or not).

    Only names that are plain relative paths are taken; the index itself is checked in full
    when it is read (:mod:`hfsoup.io.tensors`).
    """
    import json

    out: list[str] = []
    for index in _INDEXES:
        size = files.get(index)
        if size is None or size > 64 * 2**20:
            continue
        try:
            weight_map = json.loads((root / index).read_bytes()).get("weight_map")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(weight_map, dict):
            out.extend(
                v
                for v in set(weight_map.values())
                if isinstance(v, str) and v and ".." not in v.split("/") and not v.startswith("/")
            )
    return sorted(out)


def write_ref(repo: str, revision: str | None, sha: str) -> None:
    """Record in the cache that ``revision`` (default ``main``) named ``sha``, as
    huggingface_hub does for its own downloads, so that a later offline run resolves it.

    hfsoup downloads by SHA (huggingface_hub then writes no ref). Best effort: a read-only or
    shared cache is left as it is.
    """
    name = revision or "main"
    if name == sha or _COMMIT_SHA.fullmatch(name) or ".." in name.split("/"):
        return
    ref = repo_folder(repo) / "refs" / name
    try:
        if ref.is_file() and ref.read_text().strip() == sha:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(sha)
        os.replace(tmp, ref)
    except OSError as exc:
        log.debug("could not record %s -> %s in the HF cache: %s", name, sha, exc)


def not_cached(repo: str, sha: str, filename: str) -> IngredientNotFoundError:
    """The one-line error for a file an offline run needs and the cache does not hold."""
    return IngredientNotFoundError(
        f"{repo}/{filename}: not in the HF cache for commit {sha[:12]} ({cache_dir()}), and "
        f"HF_HUB_OFFLINE=1 forbids downloading it; fetch it first with "
        f"`hf download {repo} {filename} --revision {sha}`"
    )


class CacheSink:
    """Writes one file into the HF cache as its bytes stream past, start to end (``--cache``).

    The bytes go to a temporary file beside the cache's blobs; :meth:`commit` (called once the
    whole file matched the Hub's digest) moves it to ``blobs/DIGEST`` and links it from
    ``snapshots/SHA/FILENAME``, as huggingface_hub lays out its own downloads. A sink never
    committed (a failed digest, an interrupted run) leaves nothing: its temporary file is
    removed when the sink is dropped, or at exit. Failing to write (a full or read-only disk)
    only stops the caching, with a notice; the soup goes on.
    """

    def __init__(self, repo: str, sha: str, filename: str, digest: checksums.Digest) -> None:
        import tempfile
        import weakref

        self.repo, self.sha, self.filename, self.digest = repo, sha, filename, digest
        self._file = None
        blobs = repo_folder(repo) / "blobs"
        try:
            blobs.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=blobs, prefix=f".{digest[1][:16]}.", suffix=".hfsoup")
        except OSError as exc:
            self._give_up(exc)
            return
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._cleanup = weakref.finalize(self, _remove, self._file, self._tmp)

    def write(self, data: memoryview) -> None:
        """Append ``data`` (the next bytes of the file)."""
        if self._file is None:
            return
        try:
            self._file.write(data)
        except OSError as exc:
            self._cleanup()
            self._file = None
            self._give_up(exc)

    def commit(self) -> None:
        """The file is whole and verified: put it in the cache (best effort)."""
        if self._file is None:
            return
        blob = self._tmp.parent / self.digest[1]
        link = repo_folder(self.repo) / "snapshots" / self.sha / Path(*self.filename.split("/"))
        try:
            self._file.close()
            self._cleanup.detach()
            if blob.exists():
                self._tmp.unlink()
            else:
                os.replace(self._tmp, blob)
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                try:
                    link.symlink_to(os.path.relpath(blob, link.parent))
                except OSError:  # no symlinks here (as huggingface_hub does then: a copy)
                    import shutil

                    shutil.copyfile(blob, link)
        except OSError as exc:
            _remove(None, self._tmp)
            self._give_up(exc)
        self._file = None

    def _give_up(self, exc: OSError) -> None:
        log.warning(
            "%s/%s: not written into the HF cache (%s); the soup goes on",
            self.repo,
            self.filename,
            exc.strerror or exc,
        )


def _remove(file: object, path: Path) -> None:
    close = getattr(file, "close", None)
    if close is not None:
        close()
    path.unlink(missing_ok=True)
