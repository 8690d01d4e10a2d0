"""A small Hub-protocol HTTP server: the real ``huggingface_hub``, ``transformers``, ``datasets``
and ``evaluate`` clients run against it unmodified (see HUB_PROTOCOL.md for the endpoints).

Standard library only, because tests import it before they point ``HF_ENDPOINT`` at it.
Storage lives in :mod:`hfsoup.serve.hubstore` and persists, so a served folder can be reopened;
the routes live in :mod:`hfsoup.serve.handler`.

Writes and private reads need a token the server was given (see :mod:`hfsoup.serve.hubauth`); with
none given, it makes one (:attr:`LocalHub.token`).

Example:
    >>> with LocalHub("/tmp/hub") as hub:       # doctest: +SKIP
    ...     os.environ["HF_ENDPOINT"] = hub.url  # before importing huggingface_hub
    ...     os.environ["HF_TOKEN"] = hub.token   # a random token: writes need it

Command line: ``python -m hfsoup.serve.hubserver --data DIR`` (the options of ``hfsoup hub
serve``), for a server in a process of its own without the rest of hfsoup.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hfsoup.errors import HfsoupError, HubServeError, scrub
from hfsoup.serve.base import shutdown_socket
from hfsoup.serve.handler import Handler
from hfsoup.serve.hubauth import HubAuth, exposure_warning, generate_token, tokens_from_options
from hfsoup.serve.hubstore import HubStore

_log = logging.getLogger("hfsoup")


class LocalHub:
    """A Hub-protocol server over a data folder, served from a daemon thread.

    :attr:`handler_class` answers the requests: a subclass may set a subclass of
    :class:`~hfsoup.serve.handler.Handler` there (the test suite's fault-injecting Hub does).

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
        unhandled: ``"METHOD path"`` of requests no route matched (a hint of what a client wants).
        errors: tracebacks of requests that crashed the server (answered with 500).
    """

    handler_class: type[Handler] = Handler

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
            server = (_Server6 if ":" in self.host else _Server)(
                (self.host, self.port), self.handler_class
            )
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
                shutdown_socket(conn)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


def serve(
    data_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    tokens: Iterable[str] | None = None,
) -> None:
    """Serve ``data_dir`` until interrupted (Ctrl-C); blocking. The body of ``hfsoup hub serve``
    and of :func:`main`, so it prints what the command shows: the address on stdout once bound.

    ``tokens``: as for :class:`LocalHub`; with ``None`` the generated token is printed once on
    stderr, the only place it is ever shown (never logged: a log handler may keep it in a file).

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hfsoup.serve.hubserver",
        description="Serve a folder as a Hub (the same as `hfsoup hub serve`).",
    )
    add_serve_options(parser)
    return parser


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``hfsoup hub serve`` and ``python -m hfsoup.serve.hubserver`` (one list)."""
    parser.add_argument("--data", required=True, metavar="DIR")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; any other prints a warning: "
                             "there is no TLS, tokens would travel in clear text)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN",
                        help="accept this token for writes and private reads (repeatable; "
                             "other users of this machine can see it in the process list)")  # fmt: skip
    parser.add_argument("--tokens-file", action="append", default=[], metavar="FILE",
                        help="accept the tokens of FILE, one a line, # comments (repeatable). "
                             "With neither option, one token is made and printed once")  # fmt: skip


class _StderrNotices(logging.Handler):
    """The ``hfsoup`` logger's warnings as one scrubbed line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a notice must never become an error of its own
            print(f"hfsoup: {scrub(' '.join(record.getMessage().split()))}", file=sys.stderr)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # stop serving as on Ctrl-C: open connections closed, exit 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hfsoup.serve.hubserver --data DIR [options]``: the same as ``hfsoup hub serve``,
    without importing the rest of hfsoup. A user error is one ``hfsoup: error:`` line, exit 2;
    SIGTERM stops the server like Ctrl-C."""
    args = _parser().parse_args(argv)
    notices = _StderrNotices(level=logging.WARNING)
    _log.addHandler(notices)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        tokens = tokens_from_options(args.token, args.tokens_file)
        serve(args.data, host=args.host, port=args.port, tokens=tokens)
    except HfsoupError as exc:
        print(f"hfsoup: error: {scrub(' '.join(str(exc).split()))}", file=sys.stderr)
        return 2
    finally:
        _log.removeHandler(notices)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
