"""The local Hub's write routes: repos, preupload, commits, branches, tags, LFS uploads.

Each needs a token the server was given (checked by ``_repo(args, write=True)``), but the LFS
upload PUT, which is presigned (see :mod:`hfsoup.serve.hubauth`). Standard library only.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from hfsoup.serve.base import TYPES, URL_PREFIX, RequestBase
from hfsoup.serve.records import HubError, Operation, is_lfs_path


class WriteRoutes(RequestBase):
    """The routes that change the store."""

    # -- repos ---------------------------------------------------------------------------------
    def _do_create_repo(self, method: str, args: dict[str, str | None]) -> None:
        self.hub.auth.check_write(self.headers.get("Authorization"))
        body = self._json_body()
        repo_type = body.get("type") or "model"
        if not body.get("organization"):
            raise HubError(400, "This hub has no users: give the repo ID as 'namespace/name'")
        repo_id = f"{body['organization']}/{body.get('name')}"
        private = bool(body.get("private")) or body.get("visibility") in ("private", "protected")
        url = self._repo_url(repo_type, repo_id) if repo_type in URL_PREFIX else ""
        try:
            self.store.create_repo(repo_type, repo_id, private=private, sdk=body.get("sdk"))
        except HubError as e:
            if e.status != 409:
                raise
            self._send_json(409, {"error": e.message, "url": url})
            return
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _do_delete_repo(self, method: str, args: dict[str, str | None]) -> None:
        body = self._json_body()
        repo_type = body.get("type") or "model"
        prefix = {v: k for k, v in TYPES.items()}.get(repo_type, "models")
        names = {"t": prefix, "ns": body.get("organization"), "name": body.get("name")}
        if not names["ns"]:
            raise HubError(400, "Give the repo ID as 'namespace/name'")
        repo_type, repo_id, _ = self._repo(names, write=True)
        self.store.delete_repo(repo_type, repo_id)
        self._send_json(200, {})

    # -- writing -------------------------------------------------------------------------------
    def _do_preupload(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, _ = self._repo(args, write=True)
        body = self._json_body()
        head = self.store.resolve(repo_type, repo_id, args["rev"] or "main")
        files = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample") or "")
            lfs = is_lfs_path(f["path"], int(f.get("size") or 0), sample)
            existing = head.files.get(f["path"])
            # The client skips a file whose oid it computes alike: sha256 for LFS, git sha1 else.
            oid = None if existing is None else existing.sha256 if lfs else existing.git_sha1
            mode = "lfs" if lfs else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": files, "commitOid": head.id})

    def _do_commit(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, _ = self._repo(args, write=True)
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by this hub")
        header: dict[str, Any] = {}
        ops: list[Operation] = []
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                ops.append(Operation("add", value["path"], base64.b64decode(value["content"])))
            elif key == "lfsFile":
                ops.append(Operation("add", value["path"], lfs_oid=value["oid"]))
            elif key in ("deletedFile", "deletedFolder"):
                kind = "delete_file" if key == "deletedFile" else "delete_folder"
                ops.append(Operation(kind, value["path"]))
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = self.store.apply_commit(
            repo_type,
            repo_id,
            args["rev"] or "main",
            ops,
            title=header.get("summary") or "Upload files",
            message=header.get("description") or "",
            parent_commit=header.get("parentCommit"),
        )
        url = f"{self._repo_url(repo_type, repo_id)}/commit/{commit.id}"
        self._send_json(
            200, {"success": True, "commitOid": commit.id, "commitUrl": url, "pullRequestUrl": None}
        )

    def _do_branch(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, _ = self._repo(args, write=True)
        if method == "POST":
            start = self._json_body().get("startingPoint")
            self.store.create_branch(repo_type, repo_id, args["rev"] or "", start)
        else:
            self.store.delete_branch(repo_type, repo_id, args["rev"] or "")
        self._send_json(200, {})

    def _do_tag(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, _ = self._repo(args, write=True)
        if method == "POST":
            body = self._json_body()
            if not body.get("tag"):
                raise HubError(400, "Missing 'tag'")
            self.store.create_tag(
                repo_type, repo_id, args["rev"] or "", body["tag"], body.get("message")
            )
        else:
            self.store.delete_tag(repo_type, repo_id, args["rev"] or "")
        self._send_json(200, {})

    def _do_lfs_batch(self, method: str, args: dict[str, str | None]) -> None:
        repo_type, repo_id, _ = self._repo(args, write=True)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS upload operation is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid")), obj.get("size") or 0
            item: dict[str, Any] = {"oid": oid, "size": size}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                item["error"] = {"code": 422, "message": "oid must be a sha256"}
            elif not isinstance(size, int) or size < 0:
                item["error"] = {"code": 422, "message": "size must be a natural number"}
            elif not self.store.has_blob(oid):  # no actions: "already uploaded"
                # Presigned, as on the Hub: the client sends no token with the PUT.
                query = self.hub.auth.sign_upload(f"{repo_type}/{repo_id}", oid, size)
                href = f"{self._repo_url(repo_type, repo_id)}.git/info/lfs/objects/{oid}?{query}"
                item["actions"] = {"upload": {"href": href}}
            objects.append(item)
        self._send_json(
            200,
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _do_lfs_put(self, method: str, args: dict[str, str | None]) -> None:
        # The client sends no token here: only an authorised batch call hands out this URL,
        # signed for this repo, sha256 and size (see hubauth); the body must match both.
        repo_type = TYPES.get(f"{args.get('p')}", "model")
        repo = f"{repo_type}/{args['ns']}/{args['name']}"
        size = self.hub.auth.check_upload(repo, args["oid"] or "", self.query)
        declared = self.headers.get("Content-Length")
        if declared is not None and declared.strip() != str(size):
            raise HubError(400, f"Upload URL is signed for {size} bytes, not {declared}")
        self.store.put_blob(_at_most(self._body_chunks(), size), expected_sha256=args["oid"])
        self._send_json(200, {})


def _at_most(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``chunks``, refused with ``HubError(400)`` as soon as they pass ``size`` bytes."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > size:
            raise HubError(400, f"Upload URL is signed for {size} bytes; the body is longer")
        yield chunk
