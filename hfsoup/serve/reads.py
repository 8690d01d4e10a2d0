"""The local Hub's read routes: repo info, trees, refs, commits, shard headers, file downloads.

Each ``_do_NAME(method, args)`` answers one route of :data:`hfsoup.serve.handler.ROUTES`
(``args``: the named groups of its path pattern, unquoted). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any
from urllib.parse import parse_qs

from hfsoup.serve.base import RequestBase
from hfsoup.serve.hubauth import INVALID_CREDENTIALS
from hfsoup.serve.records import Commit, FileEntry, HubError


class ReadRoutes(RequestBase):
    """The routes that read: none changes the store."""

    def _do_no_such_repo(self, method: str, args: dict[str, str | None]) -> None:
        raise HubError(404, "Repository not found (IDs here are 'namespace/name')", "RepoNotFound")

    def _do_validate_yaml(self, method: str, args: dict[str, str | None]) -> None:
        self._body()
        self._send_json(200, {"errors": [], "warnings": []})

    def _do_whoami(self, method: str, args: dict[str, str | None]) -> None:
        if not self.hub.auth.accepts(self.headers.get("Authorization")):
            raise HubError(401, INVALID_CREDENTIALS)
        user = {"type": "user", "name": "hfsoup-user", "fullname": "hfsoup user", "orgs": []}
        token = {"displayName": "local", "role": "write"}  # every token may write here
        self._send_json(200, {**user, "auth": {"type": "access_token", "accessToken": token}})

    def _do_agent_harnesses(self, method: str, args: dict[str, str | None]) -> None:
        # huggingface_hub fetches this registry once a day to tag its user agent: none here.
        self._send_json(200, {"standardEnvVars": [], "harnesses": {}})

    def _do_info(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, meta = self._repo(args)
        commit = self.store.resolve(repo_type, repo_id, args["rev"] or "main")
        blobs = self._flag("blobs")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    sibling["lfs"] = {**_lfs_info(entry), "sha256": entry.sha256}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if repo_type == "space":
            info["sdk"] = meta.get("sdk")
            info["runtime"] = {"stage": "RUNNING", "hardware": {"current": None, "requested": None}}
        self._send_json(200, info)

    # -- reading trees -------------------------------------------------------------------------
    def _entry_json(self, path: str, commit: Commit, last: Commit | None) -> dict[str, Any]:
        entry = commit.files.get(path)
        if entry is None:
            out: dict[str, Any] = {"type": "directory", "oid": commit.tree_oid(path), "size": 0}
        else:
            out = {"type": "file", "oid": entry.oid, "size": entry.size}
            if entry.lfs:
                out["lfs"] = {**_lfs_info(entry), "oid": entry.sha256}
        out["path"] = path
        if last is not None:  # asked with expand=true
            out["lastCommit"] = {"id": last.id, "title": last.title, "date": last.date}
        return out

    def _entries_json(
        self, repo_type: str, repo_id: str, commit: Commit, paths: list[str], expand: bool
    ) -> list[dict[str, Any]]:
        return [
            self._entry_json(
                p, commit, self.store.last_change(repo_type, repo_id, commit, p) if expand else None
            )
            for p in paths
        ]

    def _do_tree(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, _ = self._repo(args)
        commit = self.store.resolve(repo_type, repo_id, args["rev"] or "main")
        base = (args["path"] or "").strip("/")
        prefix = base + "/" if base else ""
        if base and base not in commit.folders:
            raise HubError(404, f"{base} does not exist on {commit.id}", "EntryNotFound")
        recursive = self._flag("recursive")
        paths = [
            p
            for p in sorted(set(commit.files) | commit.folders)
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])
        ]
        entries = self._entries_json(repo_type, repo_id, commit, paths, self._flag("expand"))
        self._send_json(200, entries)

    def _do_paths_info(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, _ = self._repo(args)
        raw = self._body()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(raw or b"{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(raw.decode())
            paths = form.get("paths", [])
            expand = form.get("expand", [""])[-1].lower() in ("1", "true")
        commit = self.store.resolve(repo_type, repo_id, args["rev"] or "main")
        wanted = [p.strip("/") for p in paths]
        found = [p for p in wanted if p in commit.files or p in commit.folders]
        self._send_json(200, self._entries_json(repo_type, repo_id, commit, found, expand))

    def _do_refs(self, method: str, args: dict[str, str | None]) -> None:
        _, _, meta = self._repo(args)

        def ref(kind: str, name: str, target: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": target}

        data: dict[str, Any] = {
            "branches": [ref("heads", n, c) for n, c in sorted(meta["branches"].items())],
            "tags": [ref("tags", n, t["commit"]) for n, t in sorted(meta["tags"].items())],
            "converts": [],
        }
        if self._flag("include_prs"):
            data["pullRequests"] = []
        self._send_json(200, data)

    def _do_commits(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, _ = self._repo(args)
        out = []
        for c in self.store.history(repo_type, repo_id, args["rev"] or "main"):
            item: dict[str, Any] = {
                "id": c.id,
                "title": c.title,
                "message": c.message,
                "date": c.date,
                "authors": [{"user": "hfsoup-user"}],
            }
            if "formatted" in self.query.get("expand[]", []):
                item["formatted"] = {"title": c.title, "message": c.message}
            out.append(item)
        self._send_json(200, out)

    def _do_safetensors_metadata(self, method: str, args: dict[str, str | None]) -> None:
        # The Hub's one-request alternative to reading every shard header (main only).
        repo_type, repo_id, _ = self._repo(args)
        commit = self.store.resolve(repo_type, repo_id, "main")
        index_entry = commit.files.get(args["path"] or "")
        if index_entry is None:
            raise HubError(404, f"{args['path']} not found", "EntryNotFound")
        index = json.loads(b"".join(self.store.iter_blob(index_entry.sha256)))
        shards = sorted(set(index.get("weight_map", {}).values()))
        folder = (args["path"] or "").rpartition("/")[0]
        headers = {}
        for shard in shards:
            entry = commit.files.get(f"{folder}/{shard}" if folder else shard)
            if entry is None:
                raise HubError(404, f"Shard {shard} not found", "EntryNotFound")
            (n,) = struct.unpack("<Q", b"".join(self.store.iter_blob(entry.sha256, 0, 8)))
            headers[shard] = json.loads(b"".join(self.store.iter_blob(entry.sha256, 8, 8 + n)))
        index.pop("weight_map", None)
        self._send_json(200, {"index": index, "headers": headers})

    def _do_resolve(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, _ = self._repo(args)
        commit = self.store.resolve(repo_type, repo_id, args["rev"] or "main")
        path = args["path"] or ""
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        span = _parse_range(self.headers.get("Range"), entry.size)
        if span is None:
            body = self.store.iter_blob(entry.sha256) if method == "GET" else ()
            self._respond(200, headers, body, entry.size)
        elif span == "unsatisfiable":
            headers["Content-Range"] = f"bytes */{entry.size}"
            self._respond(416, headers)
        else:
            start, end = span
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
            body = self.store.iter_blob(entry.sha256, start, end + 1) if method == "GET" else ()
            self._respond(206, headers, body, end + 1 - start)


def _lfs_info(entry: FileEntry) -> dict[str, Any]:
    return {"size": entry.size, "pointerSize": len(entry.lfs_pointer)}


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """``(start, end)`` inclusive for one ``bytes=`` range, ``"unsatisfiable"``, or ``None``
    (no header, or a form we ignore as RFC 9110 allows, such as several ranges)."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else "unsatisfiable"
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(int(last), size - 1) if last else size - 1
