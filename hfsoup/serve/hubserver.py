"""A small Hub-protocol HTTP server: the real ``huggingface_hub``, ``transformers``, ``datasets``
and ``evaluate`` clients run against it unmodified (see HUB_PROTOCOL.md for the endpoints).

Standard library only, because tests import it before they point ``HF_ENDPOINT`` at it.
Storage lives in :mod:`hfsoup.serve.hubstore` and persists, so a served folder can be reopened.

Writes and private reads need a token the server was given (see :mod:`hfsoup.serve.hubauth`); with
none given, it makes one (:attr:`LocalHub.token`).

Example:
    >>> with LocalHub("/tmp/hub") as hub:       # doctest: +SKIP
    ...     os.environ["HF_ENDPOINT"] = hub.url  # before importing huggingface_hub
    ...     os.environ["HF_TOKEN"] = hub.token   # a random token: writes need it

Faults for resilience tests are rules in :attr:`LocalHub.faults`, applied before routing::

    hub.add_fault(path=r"/resolve/", status=500, times=2)             # two 500s, then normal
    hub.add_fault(path=r"model\\.safetensors$", drop_after_bytes=1024)  # cut the body short
    hub.add_fault(path=r"model\\.safetensors$", stall_seconds=30)       # hang before answering
    hub.add_fault(path=r"config\\.json$", corrupt=True)                 # bytes fail their sha256
    hub.add_fault(path=r"/resolve/", status=429, retry_after=3600)      # "come back in an hour"
    hub.add_fault(path=r"/resolve/", status=503, retry_after="Wed, 21 Oct 2037 07:28:00 GMT")
    hub.add_fault(path=r"model\\.safetensors$", content_range="bytes 0-9/10")  # a wrong range
    hub.add_fault(path=r"model\\.safetensors$", content_range="")     # no Content-Range at all
    hub.add_fault(path=r"model\\.safetensors$", shift_bytes=8)  # the bytes 8 further on, under
                                                                 # the Content-Range asked for
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hfsoup.errors import HubServeError
from hfsoup.serve.hubauth import INVALID_CREDENTIALS, HubAuth, exposure_warning, generate_token
from hfsoup.serve.hubstore import Commit, FileEntry, HubError, HubStore, Operation, is_lfs_path

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_CHUNK = 1 << 20
# Request bodies we would rather drain than drop the keep-alive connection for.
_DRAIN_LIMIT = 16 * _CHUNK
_log = logging.getLogger("hfsoup")


@dataclass
class Fault:
    """A misbehaviour shown to requests whose method and path match, ``times`` times.

    Attributes:
        method: HTTP method to match, or ``"*"``.
        path: regular expression searched in the request path (without the query).
        times: how many matching requests it applies to; ``None`` for all of them.
        skip: let this many matching requests through untouched first (e.g. a file's header
            probe), then misbehave.
        status: answer this status (with a JSON error body) instead of serving the request.
        retry_after: sent in ``Retry-After`` with ``status``: seconds, or an HTTP date.
        error_code: sent in ``X-Error-Code`` with ``status`` (``"GatedRepo"``, ``"RepoNotFound"``).
        drop_after_bytes: serve normally but close the connection after this many body bytes.
        stall_seconds: wait this long before answering (a server or network that hangs).
        corrupt: serve the body with its first byte flipped: same length, wrong sha256.
        content_range: on a 206, send this ``Content-Range`` instead of the true one (``""``:
            send none); the body is unchanged.
        shift_bytes: on a range request, serve the bytes ``shift_bytes`` further into the file
            (zeros past its end) under the ``Content-Range`` of the range asked: plausible
            headers, wrong bytes.
        rewrite_json: serve normally, but pass each JSON reply's data through this function
            first (a model_info whose ``sha`` or siblings lie, a list instead of an object).
        body: answer ``status`` (200 if not given) with these raw bytes instead of serving the
            request (HTML, truncated JSON, ...), as ``content_type``.
        content_type: the ``Content-Type`` sent with ``body``.
        headers: extra headers sent with the reply, a ``status`` one or a served one (a
            ``RateLimit: "api";r=0;t=55``, a ``Location``, a huge header, ...).
        hang_up: close the connection without answering (a server that dies before headers).
        trickle_seconds: send the body one byte at a time, waiting this long before each.
        hits: how many requests it has been applied to so far.
        ranges: the ``Range`` header (or ``None``) of each request it was applied to; a rule
            with no misbehaviour only records what it sees.
    """

    method: str = "*"
    path: str = ".*"
    times: int | None = 1
    skip: int = 0
    status: int | None = None
    retry_after: int | str | None = None
    error_code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop_after_bytes: int | None = None
    stall_seconds: float | None = None
    corrupt: bool = False
    content_range: str | None = None
    shift_bytes: int = 0
    rewrite_json: Callable[[Any], Any] | None = None
    body: bytes | None = None
    content_type: str = "application/json"
    hang_up: bool = False
    trickle_seconds: float | None = None
    hits: int = 0
    ranges: list[str | None] = field(default_factory=list)

    def matches(self, method: str, path: str) -> bool:
        """Whether the rule applies to this request and still has uses left."""
        return (
            (self.times is None or self.times > 0)
            and self.method in ("*", method)
            and re.search(self.path, path) is not None
        )


class _DropConnection(Exception):
    """Raised to abandon a response mid-body on purpose (a ``drop_after_bytes`` fault)."""


class LocalHub:
    """A Hub-protocol server over a data folder, served from a daemon thread.

    Args:
        data_dir: folder holding blobs, repos and commits; created if missing, reused if not.
        host: interface to bind; anything but a loopback address logs a warning at
            :meth:`start` (no TLS: tokens would travel in clear text).
        port: port to bind; ``0`` picks a free one (read :attr:`url` after :meth:`start`).
        tokens: the tokens that may write and read private repos (``Authorization: Bearer``).
            ``None``: one random token is made, read it from :attr:`token`. An empty list: a
            read-only server of public repos.
        anonymous_writes: accept writes without a token. For test suites that upload with a
            plain ``HfApi``; reads of private repos still need one of ``tokens``.

    Raises:
        HubServeError: a token is malformed (empty, spaces, control or non-ASCII characters).

    Attributes:
        faults: :class:`Fault` rules applied, first match wins, before any request is routed.
        unhandled: ``"METHOD path"`` of requests no route matched (a hint of what a client wants).
        errors: tracebacks of requests that crashed the server (answered with 500).
    """

    def __init__(
        self,
        data_dir: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: Iterable[str] | None = None,
        anonymous_writes: bool = False,
    ) -> None:
        self.auth = HubAuth(
            [generate_token()] if tokens is None else tokens, anonymous_writes=anonymous_writes
        )
        self.store = HubStore(data_dir)
        self.host = host
        self.port = port
        self.faults: list[Fault] = []
        self.unhandled: list[str] = []
        self.errors: list[str] = []
        self.verbose = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        """The endpoint to give clients, e.g. ``http://127.0.0.1:8080``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def token(self) -> str | None:
        """The first token the server accepts (the generated one when none was given)."""
        return self.auth.tokens[0] if self.auth.tokens else None

    def start(self) -> LocalHub:
        """Bind and serve in a daemon thread; returns ``self``.

        Raises:
            HubServeError: the address cannot be bound (in use, not this machine's, no right).
        """
        warning = exposure_warning(self.host)
        if warning:
            _log.warning("hfsoup hub: %s", warning)
        try:
            server = (_Server6 if ":" in self.host else _Server)((self.host, self.port), _Handler)
        except OSError as exc:
            raise HubServeError(
                f"cannot serve on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        server.hub = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open keep-alive connections; the data folder is kept."""
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            for conn in list(self._connections):
                _shutdown(conn)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_fault(self, **rule: Any) -> Fault:
        """Append a :class:`Fault` built from keyword arguments and return it."""
        fault = Fault(**rule)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take_fault(self, method: str, path: str, range_header: str | None) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.skip > 0:
                        fault.skip -= 1
                        return None
                    if fault.times is not None:
                        fault.times -= 1
                    fault.hits += 1
                    fault.ranges.append(range_header)
                    return fault
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not keep the process alive
    request_queue_size = 128  # clients open several connections at once (thread pools)
    hub: LocalHub

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (a reset while a keep-alive connection idles, a timed-out
        # read) is ordinary; printing a traceback for it would only interleave with the output
        # of whatever runs beside the server.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer
        conn.shutdown(socket.SHUT_RDWR)


def _segment(value: str | None) -> str | None:
    return unquote(value) if value is not None else None


_NS = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_API = r"/api/(?P<t>models|datasets|spaces)/" + _NS
_GIT = r"/(?:(?P<p>datasets|spaces)/)?" + _NS
# (methods, path pattern on the still-quoted path, handler method name)
_ROUTES: list[tuple[tuple[str, ...], re.Pattern[str], str]] = [
    (methods, re.compile(pattern), name)
    for methods, pattern, name in [
        (("POST",), r"/api/repos/create", "create_repo"),
        (("DELETE",), r"/api/repos/delete", "delete_repo"),
        (("POST",), r"/api/validate-yaml", "validate_yaml"),
        (("GET",), r"/api/whoami-v2", "whoami"),
        (("GET",), r"/api/agent-harnesses", "agent_harnesses"),
        (("GET",), _API + r"(?:/revision/(?P<rev>[^/]+))?", "info"),
        (("GET",), _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        (("POST",), _API + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
        (("GET",), _API + r"/refs", "refs"),
        (("GET",), _API + r"/commits/(?P<rev>[^/]+)", "commits"),
        (("POST",), _API + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        (("POST",), _API + r"/commit/(?P<rev>[^/]+)", "commit"),
        (("POST", "DELETE"), _API + r"/branch/(?P<rev>[^/]+)", "branch"),
        (("POST", "DELETE"), _API + r"/tag/(?P<rev>[^/]+)", "tag"),
        (("GET",), _API + r"/safetensors-metadata/(?P<path>.+)", "safetensors_metadata"),
        (("POST",), _GIT + r"\.git/info/lfs/objects/batch", "lfs_batch"),
        (("PUT",), _GIT + r"\.git/info/lfs/objects/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        (("GET", "HEAD"), _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        # Canonical one-segment IDs ("gpt2") do not exist here: say so the way the Hub does.
        (("GET", "HEAD"), r"/(?:(?:datasets|spaces)/)?[^/]+/resolve/.*", "no_such_repo"),
        (
            ("GET", "POST"),
            r"/api/(?:models|datasets|spaces)/[^/]+"
            r"(?:/(?:revision|tree|paths-info|refs|commits|preupload|commit)(?:/.*)?)?",
            "no_such_repo",
        ),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    """One connection; ``self.server.hub`` is the :class:`LocalHub`."""

    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    server_version = "hfsoup-hub"

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]  (set on _Server)

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

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self._body_done = False
        self._budget: int | None = None
        self._headers_sent = False
        self._corrupt = False
        self._fault: Fault | None = None
        self._asked_span: tuple[int, int] | None = None
        try:
            fault = self.hub._take_fault(method, url.path, self.headers.get("Range"))
            self._fault = fault
            if fault is not None and fault.shift_bytes:
                self._shift_range(fault.shift_bytes)
            if fault is not None and fault.stall_seconds:
                time.sleep(fault.stall_seconds)
            if fault is not None and fault.drop_after_bytes is not None:
                self._budget = fault.drop_after_bytes
            if fault is not None:
                self._corrupt = fault.corrupt
            if fault is not None and fault.hang_up:
                self.close_connection = True
                _shutdown(self.connection)
            elif fault is not None and fault.body is not None:
                headers = {"Content-Type": fault.content_type}
                self._respond(fault.status or 200, headers, [fault.body], len(fault.body))
            elif fault is not None and fault.status is not None:
                extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
                if fault.error_code:
                    extra.update({"X-Error-Code": fault.error_code, "X-Error-Message": "Injected"})
                extra.update(fault.headers)
                self._send_json(fault.status, {"error": "Injected fault"}, extra)
            else:
                self._route(method, url.path)
        except HubError as e:
            if self._headers_sent:
                self.close_connection = True
            else:
                self._send_error(e)
        except _DropConnection:
            pass
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            self.hub.errors.append(traceback.format_exc())
            self.close_connection = True
            if not self._headers_sent:
                self._send_json(500, {"error": "Internal error of the test hub"})
        if self._budget is not None:
            # A drop fault hangs up after its bytes, whether or not the body was longer.
            self.close_connection = True
            _shutdown(self.connection)

    def _route(self, method: str, path: str) -> None:
        for methods, pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match and method in methods:
                args = {k: _segment(v) for k, v in match.groupdict().items()}
                getattr(self, f"_do_{name}")(method, args)
                return
        self.hub.unhandled.append(f"{method} {path}")
        raise HubError(404, f"Not found: {method} {path}")

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
            chunk = self.rfile.read(min(size, _CHUNK))
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

    def _shift_range(self, shift: int) -> None:
        """A ``shift_bytes`` fault: ask the store for the range ``shift`` bytes further on; the
        answer is dressed as the range asked by :meth:`_fault_headers`."""
        span = re.fullmatch(r"\s*bytes\s*=\s*(\d+)\s*-\s*(\d+)\s*", self.headers.get("Range") or "")
        if span is None:
            return
        first, last = int(span[1]), int(span[2])
        self._asked_span = (first, last)
        del self.headers["Range"]
        self.headers["Range"] = f"bytes={first + shift}-{last + shift}"

    def _fault_headers(
        self, status: int, headers: dict[str, str], length: int
    ) -> tuple[dict[str, str], int]:
        """The headers (and body length) a ``content_range`` or ``shift_bytes`` fault sends."""
        fault = self._fault
        if fault is None or status != 206:
            return headers, length
        if fault.shift_bytes and self._asked_span is not None:
            first, last = self._asked_span
            total = headers.get("Content-Range", "/*").rpartition("/")[2]
            headers = {**headers, "Content-Range": f"bytes {first}-{last}/{total}"}
            length = last + 1 - first  # padded with zeros where the shifted range runs out
        if fault.content_range is not None:
            headers = {k: v for k, v in headers.items() if k != "Content-Range"}
            if fault.content_range:
                headers["Content-Range"] = fault.content_range
        return headers, length

    # -- responses -----------------------------------------------------------------------------
    def _respond(
        self, status: int, headers: dict[str, str], body: Iterable[bytes] = (), length: int = 0
    ) -> None:
        served = length
        headers, length = self._fault_headers(status, headers, length)
        if self._fault is not None and self._fault.headers:
            headers = {**headers, **self._fault.headers}
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
        if length > served:  # a shifted range that ran past the end of the file
            self._write(bytes(length - served))

    def _write(self, data: bytes) -> None:
        if self._fault is not None and self._fault.trickle_seconds and len(data) > 1:
            for i in range(len(data)):
                self._write(data[i : i + 1])
            return
        if self._fault is not None and self._fault.trickle_seconds:
            time.sleep(self._fault.trickle_seconds)
        if self._corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
            self._corrupt = False
        if self._budget is not None and len(data) > self._budget:
            self.wfile.write(data[: self._budget])
            raise _DropConnection
        self.wfile.write(data)
        if self._fault is not None and self._fault.trickle_seconds:
            self.wfile.flush()
        if self._budget is not None:
            self._budget -= len(data)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        if self._fault is not None and self._fault.rewrite_json is not None:
            data = self._fault.rewrite_json(data)
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
        repo_type = _TYPES[args["t"]] if args.get("t") else _TYPES.get(f"{args.get('p')}", "model")
        repo_id = f"{args['ns']}/{args['name']}"
        credentials = self.headers.get("Authorization")
        if write:
            self.hub.auth.check_write(credentials)
        meta = self.store.repo(repo_type, repo_id)
        if meta["private"] and not write:
            self.hub.auth.check_private_read(credentials, f"{repo_type}s/{repo_id}")
        return repo_type, repo_id, meta

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self._base_url()}/{_URL_PREFIX[repo_type]}{repo_id}"

    def _do_no_such_repo(self, method: str, args: dict[str, str | None]) -> None:
        raise HubError(404, "Repository not found (IDs here are 'namespace/name')", "RepoNotFound")

    # -- repos ---------------------------------------------------------------------------------
    def _do_create_repo(self, method: str, args: dict[str, str | None]) -> None:
        self.hub.auth.check_write(self.headers.get("Authorization"))
        body = self._json_body()
        repo_type = body.get("type") or "model"
        if not body.get("organization"):
            raise HubError(400, "This hub has no users: give the repo ID as 'namespace/name'")
        repo_id = f"{body['organization']}/{body.get('name')}"
        private = bool(body.get("private")) or body.get("visibility") in ("private", "protected")
        url = self._repo_url(repo_type, repo_id) if repo_type in _URL_PREFIX else ""
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
        prefix = {v: k for k, v in _TYPES.items()}.get(repo_type, "models")
        names = {"t": prefix, "ns": body.get("organization"), "name": body.get("name")}
        if not names["ns"]:
            raise HubError(400, "Give the repo ID as 'namespace/name'")
        repo_type, repo_id, _ = self._repo(names, write=True)
        self.store.delete_repo(repo_type, repo_id)
        self._send_json(200, {})

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
        repo_type = _TYPES.get(f"{args.get('p')}", "model")
        repo = f"{repo_type}/{args['ns']}/{args['name']}"
        size = self.hub.auth.check_upload(repo, args["oid"] or "", self.query)
        declared = self.headers.get("Content-Length")
        if declared is not None and declared.strip() != str(size):
            raise HubError(400, f"Upload URL is signed for {size} bytes, not {declared}")
        self.store.put_blob(_at_most(self._body_chunks(), size), expected_sha256=args["oid"])
        self._send_json(200, {})

    # -- files ---------------------------------------------------------------------------------
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


def _at_most(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``chunks``, refused with ``HubError(400)`` as soon as they pass ``size`` bytes."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > size:
            raise HubError(400, f"Upload URL is signed for {size} bytes; the body is longer")
        yield chunk


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


def serve(
    data_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    tokens: Iterable[str] | None = None,
) -> None:
    """Serve ``data_dir`` until interrupted (Ctrl-C); blocking.

    ``tokens``: as for :class:`LocalHub`; with ``None`` the generated token is printed once on
    stderr, the only place it is ever shown.

    Raises:
        HubServeError: a token is malformed, or the address cannot be bound.

    Example:
        >>> serve("./hub-data", port=8080, tokens=["hf_local_team"])  # doctest: +SKIP
        # then: HF_ENDPOINT=http://127.0.0.1:8080 HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_local_team ...
    """
    hub = LocalHub(data_dir, host=host, port=port, tokens=tokens).start()
    if tokens is None:
        print(
            "hfsoup hub: no token was given, so writes and private reads need this one, made "
            f"for this run and shown only now: export HF_TOKEN={hub.token}",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"Serving {Path(data_dir).resolve()} at {hub.url} "
        f"(clients: HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1)",
        flush=True,
    )
    try:
        while hub._thread is not None and hub._thread.is_alive():
            hub._thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m hfsoup.serve.hubserver --data DIR [options]``: the same as ``hfsoup hub serve``."""
    from hfsoup.cli import main as cli_main

    raise SystemExit(cli_main(["hub", "serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
