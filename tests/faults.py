"""The test suite's Hub: the product's local Hub plus fault injection for resilience tests.

:class:`FaultyHub` is a :class:`hfsoup.serve.hubserver.LocalHub` whose requests are answered by
:class:`FaultyHandler`: before routing, a request meets the hub's :class:`Fault` rules (first
match wins), which can drop, stall, corrupt or replace its answer::

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

The product server knows nothing of this: it only serves ``LocalHub.handler_class``.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hfsoup.serve.base import shutdown_socket
from hfsoup.serve.handler import Handler
from hfsoup.serve.hubserver import LocalHub


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


class _DropConnection(ConnectionError):
    """Raised to abandon a response mid-body on purpose (a ``drop_after_bytes`` fault); the
    handler treats it as a client gone away and closes the connection."""


class FaultyHandler(Handler):
    """The product handler, with the misbehaviours of the first :class:`Fault` that matches."""

    hub: FaultyHub  # type: ignore[assignment]

    def _handle(self, method: str) -> None:
        self._fault: Fault | None = None
        self._budget: int | None = None
        self._corrupt = False
        self._asked_span: tuple[int, int] | None = None
        try:
            super()._handle(method)
        finally:
            if self._budget is not None:
                # A drop fault hangs up after its bytes, whether or not the body was longer.
                self.close_connection = True
                shutdown_socket(self.connection)

    def _route(self, method: str, path: str) -> None:
        fault = self.hub.take_fault(method, path, self.headers.get("Range"))
        self._fault = fault
        if fault is None:
            super()._route(method, path)
            return
        if fault.shift_bytes:
            self._shift_range(fault.shift_bytes)
        if fault.stall_seconds:
            time.sleep(fault.stall_seconds)
        if fault.drop_after_bytes is not None:
            self._budget = fault.drop_after_bytes
        self._corrupt = fault.corrupt
        if fault.hang_up:
            self.close_connection = True
            shutdown_socket(self.connection)
        elif fault.body is not None:
            headers = {"Content-Type": fault.content_type}
            self._respond(fault.status or 200, headers, [fault.body], len(fault.body))
        elif fault.status is not None:
            extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            if fault.error_code:
                extra.update({"X-Error-Code": fault.error_code, "X-Error-Message": "Injected"})
            extra.update(fault.headers)
            self._send_json(fault.status, {"error": "Injected fault"}, extra)
        else:
            super()._route(method, path)

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

    def _respond(
        self, status: int, headers: dict[str, str], body: Iterable[bytes] = (), length: int = 0
    ) -> None:
        served = length
        headers, length = self._fault_headers(status, headers, length)
        if self._fault is not None and self._fault.headers:
            headers = {**headers, **self._fault.headers}
        if length > served:  # a shifted range that ran past the end of the file
            body = itertools.chain(body, [bytes(length - served)])
        super()._respond(status, headers, body, length)

    def _write(self, data: bytes) -> None:
        fault = self._fault
        if fault is None:
            super()._write(data)
            return
        if fault.trickle_seconds and len(data) > 1:
            for i in range(len(data)):
                self._write(data[i : i + 1])
            return
        if fault.trickle_seconds:
            time.sleep(fault.trickle_seconds)
        if self._corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
            self._corrupt = False
        if self._budget is not None and len(data) > self._budget:
            super()._write(data[: self._budget])
            raise _DropConnection
        super()._write(data)
        if fault.trickle_seconds:
            self.wfile.flush()
        if self._budget is not None:
            self._budget -= len(data)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        if self._fault is not None and self._fault.rewrite_json is not None:
            data = self._fault.rewrite_json(data)
        super()._send_json(status, data, headers)


class FaultyHub(LocalHub):
    """A :class:`LocalHub` whose requests first meet :attr:`faults`.

    Attributes:
        faults: :class:`Fault` rules applied, first match wins, before any request is routed.
    """

    handler_class = FaultyHandler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults: list[Fault] = []
        self._faults_lock = threading.Lock()

    def add_fault(self, **rule: Any) -> Fault:
        """Append a :class:`Fault` built from keyword arguments and return it."""
        fault = Fault(**rule)
        with self._faults_lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str, range_header: str | None) -> Fault | None:
        """The first rule matching the request, its uses and hits counted; ``None`` if none
        matches or the first match still lets requests through (``skip``)."""
        with self._faults_lock:
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
