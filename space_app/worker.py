"""Jobs run in a worker process: one job per process, spawned (never forked), cancellable.

Why a process: a soup can run for minutes; the web server must stay responsive, and Cancel
must really stop the work (a thread cannot be killed, a process can). Why ``spawn``: CUDA
cannot be initialised in a forked child, and a fresh interpreter leaks nothing between jobs.
Why a standby: importing torch and hfsoup takes seconds, so the next worker is spawned ahead
of time and waits for its one job; a click starts work at once.

Protocol, over one :func:`multiprocessing.Pipe` per worker (plain tuples):

- worker -> server: ``("ready", {"learned": bool, "methods": [...]})`` once imported (the
  registry's methods: name, summary, needs_task); then ``("line", text)``
  for every line hfsoup writes to stderr (log lines and tqdm updates); then exactly one of
  ``("result", dict)`` or ``("error", one_line_message)``.
- server -> worker: one :class:`JobRequest`.

The token travels only inside the pickled request, is passed only as ``token=`` to hfsoup,
and is masked in everything the worker sends back.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from logic import error_text, redact

Event = tuple[str, Any]


@dataclass(frozen=True)
class JobRequest:
    """One job for a worker.

    Attributes:
        action: ``"inspect"``, ``"soup"`` or ``"push"``.
        ingredients: repo IDs, optionally ``@revision`` (inspect, soup).
        method / task / dtype / accept / name / learned: as :func:`hfsoup.soup` takes them
            (soup); ``learned`` is passed only when given, as older releases lack it.
        output: the soup folder: written by ``soup``, uploaded by ``push``.
        repo_id / private: where to push.
        token: the user's Hub token, or ``None`` for the process's default credentials.
    """

    action: str
    ingredients: tuple[str, ...] = ()
    method: str = "uniform"
    task: dict[str, Any] | str | None = None
    dtype: str | None = None
    accept: str = ">="
    name: str | None = None
    learned: dict[str, Any] | None = None
    output: str | None = None
    repo_id: str | None = None
    private: bool = False
    token: str | None = field(default=None, repr=False)


class WorkerPool:
    """One job at a time, each in a fresh spawned process, with a standby spawned ahead.

    Args:
        prewarm: keep a standby worker (imported, waiting); ``False`` spawns on demand.
    """

    def __init__(self, *, prewarm: bool = True) -> None:
        self._ctx = mp.get_context("spawn")
        self._prewarm = prewarm
        self._lock = threading.Lock()
        self._standby: _Worker | None = None
        self._active: _Worker | None = None
        self._owner: str | None = None
        self._ready = threading.Event()
        self.capabilities: dict[str, Any] = {}

    def warm(self) -> None:
        """Spawn the standby worker if there is none."""
        with self._lock:
            if self._prewarm and self._standby is None:
                self._standby = _Worker(self._ctx)

    @property
    def busy(self) -> bool:
        """Whether a job is running."""
        return self._active is not None

    def owns(self, owner: str) -> bool:
        """Whether ``owner``'s job is the one running."""
        return self._active is not None and self._owner == owner

    def run(self, request: JobRequest, *, owner: str) -> Iterator[Event]:
        """Run ``request`` in a worker; yields its ``line`` events, then one of ``result``,
        ``error``, ``cancelled``, or only ``busy`` when another job holds the worker.
        Closing the iterator early kills the worker."""
        with self._lock:
            if self._active is not None:
                yield ("busy", None)
                return
            worker, self._standby = self._standby, None
            if worker is None or not worker.process.is_alive():
                worker = _Worker(self._ctx)
            self._active, self._owner = worker, owner
        if self._prewarm:
            self.warm()  # spawned now, so it is ready when this job ends
        try:
            worker.send(request)
            for kind, value in worker.events():
                if kind == "ready":
                    self._set_capabilities(value)
                    continue
                yield kind, value
        finally:
            worker.stop()
            with self._lock:
                self._active = self._owner = None

    def cancel(self, owner: str) -> bool:
        """Kill ``owner``'s running job; returns whether there was one."""
        with self._lock:
            worker = self._active if self._owner == owner else None
        if worker is None:
            return False
        worker.stop(cancelled=True)
        return True

    def wait_capabilities(self, timeout: float) -> dict[str, Any]:
        """What the installed hfsoup supports, as a worker found it (``{}`` if none answered)."""
        with self._lock:
            standby = self._standby
        if standby is not None and not self._ready.is_set():
            ready = standby.wait_ready(timeout)
            if ready is not None:
                self._set_capabilities(ready)
        return self.capabilities

    def _set_capabilities(self, value: dict[str, Any]) -> None:
        self.capabilities = value
        self._ready.set()

    def close(self) -> None:
        """Stop the standby and any running job."""
        with self._lock:
            workers = [w for w in (self._standby, self._active) if w is not None]
            self._standby = None
        for worker in workers:
            worker.stop(cancelled=True)


class _Worker:
    """The server's end of one worker process."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.cancelled = False
        self._pending: list[Event] = []
        self._lock = threading.Lock()

    def send(self, request: JobRequest) -> None:
        # If the worker died meanwhile, events() reports how it ended.
        with contextlib.suppress(OSError):
            self.conn.send(request)

    def wait_ready(self, timeout: float) -> dict[str, Any] | None:
        """Read up to the ``ready`` event (what is read is kept for :meth:`events`); its value,
        or ``None`` if the worker did not get ready in ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while wait([self.conn], max(0.0, deadline - time.monotonic())):
                try:
                    event = self.conn.recv()
                except (EOFError, OSError):
                    return None
                self._pending.append(event)
                if event[0] == "ready":
                    return event[1]
        return None

    def events(self) -> Iterator[Event]:
        while True:
            with self._lock:
                event = self._pending.pop(0) if self._pending else None
            if event is None:
                event = self._next()
            yield event
            if event[0] in ("result", "error", "cancelled"):
                return

    def _next(self) -> Event:
        while True:
            wait([self.conn, self.process.sentinel])
            with self._lock:
                if self._pending:
                    return self._pending.pop(0)
                if self.conn.poll():  # a message beats the exit: the result precedes the end
                    try:
                        return self.conn.recv()
                    except (EOFError, OSError):  # closed, or reset by a killed worker
                        break
                if not self.process.is_alive():
                    break
        self.process.join(timeout=5)
        if self.cancelled:
            return ("cancelled", None)
        return (
            "error",
            f"the worker process stopped unexpectedly (exit code {self.process.exitcode})",
        )

    def stop(self, *, cancelled: bool = False) -> None:
        """Kill the process if it still runs (a finished one has exited by itself)."""
        self.cancelled = self.cancelled or cancelled
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=3)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=3)


# ---------------------------------------------------------------- in the worker process


class _LineSink(io.TextIOBase):
    """``sys.stderr`` / ``sys.stdout`` of the worker: each line (``\\n`` or tqdm's ``\\r``)
    goes to the server as a ``line`` event, secrets masked."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._buffer = ""
        self._lock = threading.Lock()
        self.secrets: list[str | None] = []

    @property
    def encoding(self) -> str:
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            *lines, self._buffer = self._buffer.replace("\r", "\n").split("\n")
            for line in lines:
                if line.strip():
                    self._conn.send(("line", redact(line, self.secrets)))
        return len(text)

    def log(self, message: str) -> None:
        self.write(f"hfsoup: {message}\n")


def worker_main(conn: Connection) -> None:
    """The worker process: import hfsoup, say ready, run one job, send its outcome, exit."""
    sink = _LineSink(conn)
    sys.stdout = sys.stderr = sink
    log_to(sink)
    workdir = tempfile.mkdtemp(prefix="hfsoup-worker-")
    # Relative names never resolve to a local folder: the working directory is empty.
    os.chdir(workdir)
    request: JobRequest | None = None
    try:
        from huggingface_hub.utils import enable_progress_bars

        import hfsoup.api  # noqa: F401  (the slow import, done before the job arrives)

        enable_progress_bars()  # they become the page's progress, not terminal output
        from capabilities import registered_methods, supports_learned

        learned = supports_learned()
        conn.send(("ready", {"learned": learned, "methods": registered_methods(learned)}))
        request = conn.recv()
        sink.secrets.append(request.token)
        conn.send(("result", _ACTIONS[request.action](request, sink.log)))
    except EOFError:  # the server went away before giving a job
        pass
    except Exception as exc:
        secrets = [request.token if request else None]
        if not _is_user_error(exc):  # a bug: its traceback is for the server log, not the page
            print(redact(traceback.format_exc(), secrets), file=sys.__stderr__)
        conn.send(("error", error_text(exc, secrets=secrets)))
    finally:
        os.chdir(tempfile.gettempdir())
        shutil.rmtree(workdir, ignore_errors=True)
        conn.close()


class _LogLines(logging.Handler):
    """hfsoup's log records (progress steps and notices) as ``hfsoup: ...`` lines of the job."""

    def __init__(self, sink: _LineSink) -> None:
        super().__init__(level=logging.INFO)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a log line must never fail the job
            self._sink.log(" ".join(record.getMessage().split()))


def log_to(sink: _LineSink) -> logging.Handler:
    """Send the ``hfsoup`` logger's INFO and above to the page, as the CLI prints them."""
    logger = logging.getLogger("hfsoup")
    handler = _LogLines(sink)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def _is_user_error(exc: BaseException) -> bool:
    from hfsoup.errors import HfsoupError

    return isinstance(exc, HfsoupError)


def _inspect(request: JobRequest, log: Callable[[str], None]) -> dict[str, Any]:
    import hfsoup

    log(f"resolving {len(request.ingredients)} ingredients")
    return hfsoup.inspect(list(request.ingredients), token=request.token).to_dict()


def _soup(request: JobRequest, log: Callable[[str], None]) -> dict[str, Any]:
    import hfsoup
    from hfsoup.report.summary import TRAJECTORY_PNG

    log(f"resolving {len(request.ingredients)} ingredients")
    from capabilities import needs_task

    scored = needs_task(request.method)
    result = hfsoup.soup(
        list(request.ingredients), output=request.output, method=request.method,
        task=request.task if scored else None, dtype=request.dtype, accept=request.accept,
        name=request.name, token=request.token, progress=True,
        **({"learned": request.learned} if request.learned else {}),
    )  # fmt: skip
    results = result.results
    if not scored and request.task is not None:
        results = {**results, **_score_uniform(request, result.output, log)}
    # The greedy trajectory first, then any other figure the card shows (learned soups' α).
    figures = sorted(result.output.glob("*.png"), key=lambda p: (p.name != TRAJECTORY_PNG, p.name))
    log("done")
    return {
        "output": str(result.output),
        "results": results,
        "card": (result.output / "README.md").read_text(encoding="utf-8"),
        "plot": str(figures[0]) if figures else None,
    }


def _score_uniform(request: JobRequest, soup: Path, log: Callable[[str], None]) -> dict:
    """Scores for a uniform soup: each ingredient and the ensembles, then the soup itself.

    hfsoup scores only the methods that need scores to choose (greedy, learned); the page
    shows the same comparison for a uniform soup too.
    """
    import hfsoup

    log("scoring the ingredients and their ensembles")
    report = hfsoup.evaluate(list(request.ingredients), task=request.task, token=request.token)
    log("scoring the uniform soup")
    (own,) = hfsoup.evaluate([str(soup)], task=request.task)["ingredients"]
    table = report["table"]
    rows = [
        {"repo": row["repo"], "revision": row["revision"], "sha": row["sha"],
         "weight": 1 / len(report["ingredients"]), "scores": row["scores"]}
        for row in report["ingredients"]
    ]  # fmt: skip
    return {
        "ingredients": rows,
        "table": {
            "best_individual": table["best_individual"],
            "uniform_soup": own["scores"],
            "ensemble": table["ensemble"],
            "greedy_ensemble": table["greedy_ensemble"],
        },
        "selection": report["selection"],
    }


def _push(request: JobRequest, log: Callable[[str], None]) -> dict[str, Any]:
    import hfsoup

    log(f"pushing to {request.repo_id}")
    url = hfsoup.push(request.output, request.repo_id, private=request.private, token=request.token)
    return {"url": url, "repo_id": request.repo_id}


_ACTIONS: dict[str, Callable[[JobRequest, Callable[[str], None]], dict[str, Any]]] = {
    "inspect": _inspect,
    "soup": _soup,
    "push": _push,
}
