"""On-disk storage behind the local Hub: content-addressed blobs plus per-repo JSON for commits and refs.

Standard library only. Layout under ``root``::

    blobs/ab/abcdef...            file contents, named by their sha256
    repos/{type}s/{ns}/{name}/repo.json          type, privacy, branches, tags
    repos/{type}s/{ns}/{name}/commits/{id}.json  one full snapshot per commit

Every commit is a full snapshot ``{path: {sha256, size, git_sha1, lfs}}`` so that any revision is
answered from one JSON file, and a served folder can be reopened by a later server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hfsoup.serve.records import (
    LFS_SUFFIXES,
    Commit,
    FileEntry,
    HubError,
    Operation,
    git_blob_sha1,
    now_iso,
)

REPO_TYPES = ("model", "dataset", "space")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _gitattributes() -> bytes:
    lines = [f"*{s} filter=lfs diff=lfs merge=lfs -text" for s in LFS_SUFFIXES]
    return ("\n".join(lines) + "\n").encode()


def _write_json(path: Path, data: Any) -> None:
    # Atomic replace, so a concurrent reader or a crash never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


class HubStore:
    """Repos, revisions and blobs of the test Hub, persisted under ``root``; thread-safe."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._commits: dict[Path, Commit] = {}  # commits are immutable: cache them forever

    # -- blobs ---------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (it may not exist)."""
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        """Whether the blob has been uploaded."""
        return bool(_HEX64.match(sha256)) and self.blob_path(sha256).is_file()

    def put_blob(
        self, chunks: Iterable[bytes], expected_sha256: str | None = None
    ) -> tuple[str, int]:
        """Store a stream of bytes by its sha256, never holding it whole in memory.

        Raises ``HubError(400)`` when ``expected_sha256`` is given and the bytes do not match.
        """
        digest = hashlib.sha256()
        size = 0
        tmp_dir = self.root / "blobs" / "tmp"
        tmp_dir.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            sha = digest.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256:
                raise HubError(400, f"sha256 mismatch: expected {expected_sha256}, got {sha}")
            final = self.blob_path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            return sha, size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _entry_for_bytes(self, data: bytes, lfs: bool) -> FileEntry:
        sha, size = self.put_blob([data])
        return FileEntry(sha, size, git_blob_sha1(data), lfs)

    def _entry_for_blob(self, sha256: str) -> FileEntry:
        if not self.has_blob(sha256):
            raise HubError(400, f"LFS object {sha256} was not uploaded")
        path = self.blob_path(sha256)
        size = path.stat().st_size
        git = hashlib.sha1(b"blob %d\0" % size)
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                git.update(chunk)
        return FileEntry(sha256, size, git.hexdigest(), True)

    # -- repos ---------------------------------------------------------------------------------
    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        parts = repo_id.split("/")
        if repo_type not in REPO_TYPES or len(parts) != 2 or not all(map(_NAME.match, parts)):
            raise HubError(404, f"Repository {repo_type}s/{repo_id} not found", "RepoNotFound")
        return self.root / "repos" / f"{repo_type}s" / parts[0] / parts[1]

    def repo(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        """The repo's metadata (type, privacy, sdk, branches, tags); 404 ``RepoNotFound`` if absent."""
        path = self._repo_dir(repo_type, repo_id) / "repo.json"
        with self._lock:
            try:
                return json.loads(path.read_text())
            except FileNotFoundError:
                raise HubError(
                    404, f"Repository {repo_type}s/{repo_id} not found", "RepoNotFound"
                ) from None

    def create_repo(
        self, repo_type: str, repo_id: str, *, private: bool = False, sdk: str | None = None
    ) -> dict[str, Any]:
        """Create a repo whose ``main`` holds an initial commit with ``.gitattributes``.

        Raises ``HubError(409)`` if it exists.
        """
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        if not all(map(_NAME.match, repo_id.split("/"))) or repo_id.count("/") != 1:
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name'")
        repo_dir = self._repo_dir(repo_type, repo_id)
        with self._lock:
            if (repo_dir / "repo.json").exists():
                raise HubError(409, "You already created this repo")
            meta = {
                "type": repo_type,
                "id": repo_id,
                "private": bool(private),
                "sdk": sdk,
                "createdAt": now_iso(),
                "branches": {},
                "tags": {},
            }
            first = self._new_commit(
                repo_dir,
                repo_id,
                parents=(),
                files={".gitattributes": self._entry_for_bytes(_gitattributes(), lfs=False)},
                title="initial commit",
                message="",
            )
            meta["branches"]["main"] = first.id
            _write_json(repo_dir / "repo.json", meta)
            return meta

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        """Remove a repo's metadata and history (blobs stay: other repos may share them)."""
        import shutil  # only needed here

        with self._lock:
            self.repo(repo_type, repo_id)
            repo_dir = self._repo_dir(repo_type, repo_id)
            shutil.rmtree(repo_dir)
            self._commits = {p: c for p, c in self._commits.items() if repo_dir not in p.parents}

    # -- revisions -----------------------------------------------------------------------------
    def commit(self, repo_type: str, repo_id: str, commit_id: str) -> Commit:
        """A commit by its full id; 404 ``RevisionNotFound`` if the repo has no such commit."""
        path = self._repo_dir(repo_type, repo_id) / "commits" / f"{commit_id}.json"
        with self._lock:
            if path in self._commits:
                return self._commits[path]
            if not (_HEX40.match(commit_id) and path.is_file()):
                raise HubError(404, f"Invalid rev id: {commit_id}", "RevisionNotFound")
            commit = Commit.from_json(json.loads(path.read_text()))
            self._commits[path] = commit
            return commit

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> Commit:
        """The commit a branch, tag, ``refs/heads|tags/...`` or full commit id points to."""
        meta = self.repo(repo_type, repo_id)
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        if name in meta["branches"]:
            return self.commit(repo_type, repo_id, meta["branches"][name])
        if name in meta["tags"]:
            return self.commit(repo_type, repo_id, meta["tags"][name]["commit"])
        if _HEX40.match(revision):
            return self.commit(repo_type, repo_id, revision)
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, repo_type: str, repo_id: str, revision: str) -> list[Commit]:
        """Commits reachable from ``revision`` along first parents, newest first."""
        out = [self.resolve(repo_type, repo_id, revision)]
        while out[-1].parents:
            out.append(self.commit(repo_type, repo_id, out[-1].parents[0]))
        return out

    def last_change(self, repo_type: str, repo_id: str, commit: Commit, path: str) -> Commit:
        """The newest commit up to ``commit`` that changed the file or folder ``path``."""
        history = self.history(repo_type, repo_id, commit.id)

        def state(c: Commit) -> Any:
            return c.files.get(path) or c.under(path)

        for newer, older in zip(history, history[1:], strict=False):
            if state(newer) != state(older):
                return newer
        return history[-1]

    def _new_commit(
        self,
        repo_dir: Path,
        repo_id: str,
        *,
        parents: tuple[str, ...],
        files: dict[str, FileEntry],
        title: str,
        message: str,
    ) -> Commit:
        date = now_iso()
        body = json.dumps(
            [
                repo_id,
                parents,
                title,
                message,
                date,
                sorted((p, e.sha256) for p, e in files.items()),
            ]
        )
        commit = Commit(
            hashlib.sha1(body.encode()).hexdigest(), parents, title, message, date, dict(files)
        )
        path = repo_dir / "commits" / f"{commit.id}.json"
        _write_json(path, commit.to_json())
        self._commits[path] = commit
        return commit

    def apply_commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        operations: Iterable[Operation],
        *,
        title: str,
        message: str = "",
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply ``operations`` on top of the head of ``branch`` and move the branch.

        Raises ``HubError`` 404 (``RevisionNotFound``) if ``branch`` is not a branch, 412 if
        ``parent_commit`` is given and is no longer the head, 404 (``EntryNotFound``) when deleting
        a missing path, 400 when an LFS file was not uploaded first.
        """
        # Blobs of regular files are written before taking the lock: they are content-addressed.
        staged: list[tuple[Operation, FileEntry | None]] = []
        for op in operations:
            entry = None
            if op.kind == "add":
                entry = (
                    self._entry_for_blob(op.lfs_oid)
                    if op.lfs_oid is not None
                    else self._entry_for_bytes(op.content or b"", lfs=False)
                )
            staged.append((op, entry))
        with self._lock:
            meta = self.repo(repo_type, repo_id)
            if branch not in meta["branches"]:
                raise HubError(404, f"Branch {branch!r} not found", "RevisionNotFound")
            head = self.commit(repo_type, repo_id, meta["branches"][branch])
            if parent_commit is not None and parent_commit != head.id:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for op, entry in staged:
                if entry is not None:
                    files[op.path] = entry
                elif op.kind == "delete_file":
                    if files.pop(op.path, None) is None:
                        raise HubError(404, f"File not found: {op.path}", "EntryNotFound")
                else:
                    prefix = op.path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"Folder not found: {op.path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            repo_dir = self._repo_dir(repo_type, repo_id)
            commit = self._new_commit(
                repo_dir, repo_id, parents=(head.id,), files=files, title=title, message=message
            )
            meta["branches"][branch] = commit.id
            _write_json(repo_dir / "repo.json", meta)
            return commit

    # -- refs ----------------------------------------------------------------------------------
    def _update_refs(
        self, repo_type: str, repo_id: str, kind: str, name: str, value: Any | None
    ) -> None:
        """Set (``value``) or delete (``None``) one branch or tag."""
        with self._lock:
            meta = self.repo(repo_type, repo_id)
            refs = meta[kind]
            if value is None:
                if name not in refs:
                    code = "RevisionNotFound"
                    raise HubError(404, f"{kind[:-1].capitalize()} {name!r} not found", code)
                if kind == "branches" and name == "main":
                    raise HubError(403, "Cannot delete the main branch")
                del refs[name]
            else:
                if not name or name in meta["branches"] or name in meta["tags"]:
                    raise HubError(409, f"Reference {name!r} already exists")
                if _HEX40.match(name) or ".." in name or name.startswith(("/", "refs/")):
                    raise HubError(400, f"Invalid reference name {name!r}")
                refs[name] = value
            _write_json(self._repo_dir(repo_type, repo_id) / "repo.json", meta)

    def create_branch(
        self, repo_type: str, repo_id: str, branch: str, starting_point: str | None = None
    ) -> None:
        """Create ``branch`` at ``starting_point`` (default: the head of ``main``)."""
        commit = self.resolve(repo_type, repo_id, starting_point or "main")
        self._update_refs(repo_type, repo_id, "branches", branch, commit.id)

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        """Delete a branch other than ``main``."""
        self._update_refs(repo_type, repo_id, "branches", branch, None)

    def create_tag(
        self, repo_type: str, repo_id: str, revision: str, tag: str, message: str | None = None
    ) -> None:
        """Tag the commit ``revision`` resolves to."""
        commit = self.resolve(repo_type, repo_id, revision)
        self._update_refs(
            repo_type, repo_id, "tags", tag, {"commit": commit.id, "message": message}
        )

    def delete_tag(self, repo_type: str, repo_id: str, tag: str) -> None:
        """Delete a tag."""
        self._update_refs(repo_type, repo_id, "tags", tag, None)

    # -- reading files -------------------------------------------------------------------------
    def iter_blob(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of a blob, in chunks of 1 MiB."""
        with self.blob_path(sha256).open("rb") as f:
            f.seek(start)
            left = (end if end is not None else os.fstat(f.fileno()).st_size) - start
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk
