"""The plumbing under the local Hub's routes: request bodies, responses, repo access.

:class:`RequestBase` is one HTTP/1.1 keep-alive connection. The routes (:mod:`hfsoup.serve.reads`,
:mod:`hfsoup.serve.writes`) build on it, and :class:`hfsoup.serve.handler.Handler` joins them.

Every answer goes out through :meth:`RequestBase._send_json` or :meth:`RequestBase._respond`,
and every body byte through :meth:`RequestBase._write`: a subclass that overrides those three
(and ``_route``, in the handler) sees every request and every reply. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol

from hfsoup.serve.hubauth import HubAuth
from hfsoup.serve.hubstore import HubStore
from hfsoup.serve.records import HubError

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
CHUNK = 1 << 20
# Request bodies we would rather drain than drop the keep-alive connection for.
_DRAIN_LIMIT = 16 * CHUNK


class ServedHub(Protocol):
    """What a request handler reads from the server it runs under (a ``LocalHub``)."""

    store: HubStore
    auth: HubAuth
    host: str
    port: int
    verbose: bool
    unhandled: list[str]
    errors: list[str]
    _lock: threading.Lock
    _connections: set[socket.socket]


def shutdown_socket(conn: socket.socket) -> None:
    """Shut both directions of ``conn`` down, ignoring a socket the peer already closed."""
    with contextlib.suppress(OSError):  # already closed by the peer
        conn.shutdown(socket.SHUT_RDWR)


class RequestBase(BaseHTTPRequestHandler):
    """One connection; ``self.server.hub`` is the server's :class:`ServedHub`."""

    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server_version = "hfsoup-hub"
    query: dict[str, list[str]]
    _body_done: bool
    _headers_sent: bool

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def hub(self) -> ServedHub:
        return self.server.hub  # type: ignore[attr-defined]  (set by LocalHub.start)

    @property
    def store(self) -> HubStore:
        return self.hub.store

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):  # the client went away
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        # Quiet by default; the request line never holds credentials, headers are never logged.
        if self.hub.verbose:
            super().log_message(format, *args)

    # -- request bodies ------------------------------------------------------------------------
    def _body_chunks(self) -> Iterator[bytes]:
        """The request body in chunks, plain or with chunked transfer encoding."""
        if self._body_done:
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline(1 << 16).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1 << 16) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                yield from self._read_exactly(size)
                self.rfile.readline(1 << 16)  # the CRLF closing the chunk
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))
        self._body_done = True

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size > 0:
            chunk = self.rfile.read(min(size, CHUNK))
            if not chunk:
                raise ConnectionError("request body cut short")
            size -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _json_body(self) -> dict[str, Any]:
        raw = self._body()
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HubError(400, "Request body must be a JSON object")
        return data

    def _settle_body(self, headers: dict[str, str]) -> None:
        # An unread body would be parsed as the next request: drain a small one, else hang up.
        if self._body_done:
            return
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = self.headers.get("Content-Length", "0")
        if not chunked and int(length) <= _DRAIN_LIMIT:
            for _ in self._body_chunks():
                pass
        else:
            self.close_connection = True
            headers["Connection"] = "close"

    # -- responses -----------------------------------------------------------------------------
    def _respond(
        self, status: int, headers: dict[str, str], body: Iterable[bytes] = (), length: int = 0
    ) -> None:
        """Send ``status``, ``headers`` (``Content-Length: length`` unless they set it) and, but
        for a HEAD request, ``body`` chunk by chunk through :meth:`_write`."""
        headers = {"Content-Length": str(length), **headers}
        self._settle_body(headers)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self._headers_sent = True
        if self.command == "HEAD":
            return
        for chunk in body:
            self._write(chunk)

    def _write(self, data: bytes) -> None:
        """Send ``data``, a piece of a response body."""
        self.wfile.write(data)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        """Answer ``status`` with ``data`` as JSON (and any extra ``headers``)."""
        body = json.dumps(data).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        self._respond(status, headers, [body], len(body))

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode()}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json(error.status, {"error": error.message}, headers)

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or f'{self.hub.host}:{self.hub.port}'}"

    def _flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    # -- repo access ---------------------------------------------------------------------------
    def _repo(
        self, args: dict[str, str | None], *, write: bool = False
    ) -> tuple[str, str, dict[str, Any]]:
        """(repo type, repo id, metadata) of the repo a URL names, checking access to it.

        ``write``: the request changes the repo, so it needs a valid token (checked before the
        repo is looked up: no token, no answer about what exists). Otherwise only private repos
        need one.
        """
        repo_type = TYPES[args["t"]] if args.get("t") else TYPES.get(f"{args.get('p')}", "model")
        repo_id = f"{args['ns']}/{args['name']}"
        credentials = self.headers.get("Authorization")
        if write:
            self.hub.auth.check_write(credentials)
        meta = self.store.repo(repo_type, repo_id)
        if meta["private"] and not write:
            self.hub.auth.check_private_read(credentials, f"{repo_type}s/{repo_id}")
        return repo_type, repo_id, meta

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self._base_url()}/{URL_PREFIX[repo_type]}{repo_id}"
