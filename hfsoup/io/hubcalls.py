"""One call to the Hub with hfsoup's retries: back-off, ``Retry-After`` and a capped total wait
(:func:`max_retry_wait`), network and protocol problems in one line each, and the hooks on
huggingface_hub's HTTP client that hand retryable answers and slow bodies back to hfsoup's loop.

:mod:`hfsoup.io.hub` makes hfsoup's own HTTP calls (it is the only module that does) and passes
each through :func:`call_hub` here; this module makes no request itself, it decides what a
failed one means and whether to try again.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from hfsoup.errors import (
    AccessDeniedError,
    HubConnectionError,
    HubResponseError,
    IngredientNotFoundError,
    RecipeError,
    scrub,
)

T = TypeVar("T")
log = logging.getLogger("hfsoup")

RETRIES = 5
BACKOFF_S = 0.5
# The longest one request may spend waiting in all (Retry-After waits and back-off together), so
# that a server asking for an hour fails the run at once instead of holding it.
MAX_RETRY_WAIT_VARIABLE = "HFSOUP_MAX_RETRY_WAIT"
DEFAULT_MAX_RETRY_WAIT_S = 60.0
# A range read slower than this over a whole HF_HUB_DOWNLOAD_TIMEOUT is abandoned and retried
# (from the last byte received), as a stalled one is: a server sending a byte a second would
# otherwise hold a run for hours without ever tripping the read timeout.
MIN_BYTES_PER_S = 1024
# Answers worth retrying: timeouts, rate limits, server errors.
_TRANSIENT = (408, 429)


class Retryable(Exception):
    def __init__(
        self, message: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


def max_retry_wait() -> float:
    """Seconds one request may spend waiting in all: ``HFSOUP_MAX_RETRY_WAIT``, default 60.

    Raises:
        RecipeError: the variable is not a number of seconds >= 0.
    """
    raw = os.environ.get(MAX_RETRY_WAIT_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_MAX_RETRY_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise RecipeError(
            f"{MAX_RETRY_WAIT_VARIABLE} must be a number of seconds >= 0, got {raw!r}"
        )
    return value


class Waits:
    """The waiting budget of one request: what servers ask for and back-off, together."""

    def __init__(self, what: str) -> None:
        self.what, self.limit = what, max_retry_wait()
        self.left = self.limit

    def wait(self, backoff: float, *, asked: float | None, status: int | None) -> bool:
        """Sleep before a retry: ``asked`` seconds when the server said, else ``backoff``.

        Returns:
            False when the back-off would overrun the budget (the caller gives up).

        Raises:
            HubConnectionError: the server asked for more than is left; saying what it asked.
        """
        if asked is not None and asked > self.left:
            raise HubConnectionError(
                f"{self.what}: the Hub answered {status} and asked to retry after {asked:g} s; "
                f"hfsoup waits at most {self.limit:g} s in all ({MAX_RETRY_WAIT_VARIABLE})"
            )
        seconds = asked if asked is not None else backoff
        if seconds > self.left:
            return False
        self.left -= seconds
        time.sleep(seconds)
        return True


def gave_up(retries: int) -> str:
    return f"gave up after {retries} {'retry' if retries == 1 else 'retries'}"


def hub_endpoint() -> str:
    """The Hub's address for messages, without any credentials written into it."""
    from huggingface_hub import constants

    return scrub(constants.ENDPOINT)


def is_network_error(exc: BaseException) -> bool:
    import httpx2

    return isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError)


def protocol_problem(exc: BaseException) -> str | None:
    """What is wrong when the server answered in a way no retry will mend (a redirect loop, a
    redirect to no HTTP address, a body that cannot be decoded); None for other errors."""
    import httpx2

    if isinstance(exc, httpx2.TooManyRedirects):
        return f"the Hub at {hub_endpoint()} redirected the request in a loop (too many redirects)"
    if isinstance(exc, httpx2.UnsupportedProtocol | httpx2.InvalidURL):
        return (
            f"the Hub at {hub_endpoint()} redirected the request to an address that is not http(s)"
        )
    if isinstance(exc, httpx2.DecodingError):
        return f"the Hub at {hub_endpoint()} sent a body that cannot be decoded ({exc})"[:300]
    return None


def network_problem(exc: BaseException, timeout: float) -> str:
    import httpx2

    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return f"no answer from the Hub at {hub_endpoint()} within {timeout:g}s"
    if isinstance(exc, httpx2.ConnectError | ConnectionRefusedError):
        return f"cannot reach the Hub at {hub_endpoint()}"
    return f"the connection to the Hub at {hub_endpoint()} broke ({type(exc).__name__})"


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait, None if it did not say (or said something
    unreadable): ``Retry-After`` (seconds or an HTTP date) first, else the Hub's ``RateLimit``
    header (``"api";r=0;t=55``: no requests left in this window, which resets in 55 s)."""
    if headers is None:
        return None
    value = (headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        when = None
    if when is not None and when.tzinfo is not None:  # RFC 9110 dates are GMT
        return float(max(0, math.ceil(when.timestamp() - time.time())))
    return _ratelimit_reset(headers)


def _ratelimit_reset(headers: Any) -> float | None:
    """Seconds until the rate-limit window resets, when the ``RateLimit`` header says that no
    request is left in it; None otherwise."""
    from huggingface_hub.utils import parse_ratelimit_headers

    try:
        info = parse_ratelimit_headers(headers)
    except (TypeError, ValueError):  # a header the parser cannot read says nothing
        return None
    if info is None or info.remaining > 0 or info.reset_in_seconds < 0:
        return None
    return float(info.reset_in_seconds)


def _is_transient(status: int | None) -> bool:
    return status is None or status in _TRANSIENT or status >= 500


def raise_for_status(response: Any, what: str) -> None:
    status = response.status_code
    if status < 400:
        return
    if _is_transient(status):
        raise Retryable(
            f"the Hub answered {status}", retry_after=_retry_after(response.headers), status=status
        )
    if status in (401, 403):
        raise AccessDeniedError(f"{what}: access denied ({status}); {_LOGIN_HINT}")
    raise IngredientNotFoundError(f"{what}: the Hub answered {status}")


_LOGIN_HINT = "set HF_TOKEN or run `hf auth login` with an account that can read it"


def call_hub(fn: Callable[[], T], *, what: str) -> T:
    """Run one huggingface_hub call, turning its errors into hfsoup's one-line errors.

    429/5xx answers are retried here, within :func:`max_retry_wait` seconds of waiting in all:
    huggingface_hub's own retries (``hf_hub_download``) would wait as long as a server asks,
    so while the call runs such an answer is raised out of it at once (:func:`_hook_session`).
    """
    from huggingface_hub import errors

    waits = Waits(what)
    for attempt in range(RETRIES + 1):
        _hook_session()  # each attempt: huggingface_hub replaces its client after a connect error
        _IN_CALL.active = True
        try:
            return fn()
        except Retryable as exc:
            problem, cause, asked, status = str(exc), exc, exc.retry_after, exc.status
        except errors.GatedRepoError as exc:
            raise AccessDeniedError(f"{what} is gated or private; {_LOGIN_HINT}") from exc
        except errors.RevisionNotFoundError as exc:
            raise IngredientNotFoundError(f"{what}: revision not found") from exc
        except errors.RepositoryNotFoundError as exc:
            raise IngredientNotFoundError(
                f"{what}: repository not found (or private: {_LOGIN_HINT})"
            ) from exc
        except errors.LocalEntryNotFoundError as exc:
            # A subclass of EntryNotFoundError: the file is not cached and the Hub could not be
            # reached. hf_hub_download has retried already; another loop would only wait longer.
            raise HubConnectionError(f"{what}: cannot reach the Hub at {hub_endpoint()}") from exc
        except errors.EntryNotFoundError as exc:
            raise IngredientNotFoundError(f"{what}: file not found") from exc
        except errors.HfHubHTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else None
            if status in (401, 403):
                raise AccessDeniedError(f"{what}: access denied; {_LOGIN_HINT}") from exc
            if not _is_transient(status):
                raise HubConnectionError(f"{what}: the Hub answered {status}") from exc
            asked = _retry_after(response.headers) if response is not None else None
            problem, cause = f"the Hub answered {status}", exc
        except Exception as exc:
            broken = protocol_problem(exc)
            if broken is not None:
                raise HubResponseError(f"{what}: {broken}") from exc
            if not is_network_error(exc):
                raise
            problem, cause, asked, status = (
                f"cannot reach the Hub at {hub_endpoint()}",
                exc,
                None,
                None,
            )
        finally:
            _IN_CALL.active = False
        if attempt == RETRIES or not waits.wait(BACKOFF_S * 2**attempt, asked=asked, status=status):
            raise HubConnectionError(f"{what}: {problem} ({gave_up(attempt)})") from cause
    raise AssertionError("unreachable")


# Set while :func:`call_hub` runs a huggingface_hub call on this thread.
_IN_CALL = threading.local()


def _leave_on_retryable(response: Any) -> None:
    """Response hook: inside :func:`call_hub`, a 408/429/5xx answer ends the library call.

    huggingface_hub retries such answers itself, sleeping whatever ``Retry-After`` says (an hour
    if asked); raised here, the answer reaches hfsoup's loop, which keeps to its budget.
    """
    if getattr(_IN_CALL, "active", False) and _is_transient(response.status_code):
        status = response.status_code
        raise Retryable(
            f"the Hub answered {status}", retry_after=_retry_after(response.headers), status=status
        )


def _bound_slow_bodies(response: Any) -> None:
    """Response hook: inside :func:`call_hub`, a body arriving slower than
    :data:`MIN_BYTES_PER_S` over a whole ``HF_HUB_DOWNLOAD_TIMEOUT`` ends the library call.

    huggingface_hub's downloads time out only when no byte comes at all, and resume (with fresh
    retries) whenever some did: a server trickling bytes would hold the run for hours. Raised
    here, the slow answer reaches hfsoup's loop, which retries within its bounds.
    """
    if getattr(_IN_CALL, "active", False):
        response.stream = _min_rate(response.stream)


def _min_rate_stream_class() -> type:
    import httpx2
    from huggingface_hub import constants

    class MinRateStream(httpx2.SyncByteStream):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __iter__(self) -> Any:
            timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
            start, got = time.monotonic(), 0
            for chunk in self.inner:
                got += len(chunk)
                yield chunk
                elapsed = time.monotonic() - start
                if elapsed >= timeout:
                    if got < MIN_BYTES_PER_S * elapsed:
                        raise Retryable(
                            f"the Hub sent only {got} bytes in {elapsed:.1f}s "
                            f"(slower than {MIN_BYTES_PER_S} bytes/s)"
                        )
                    start, got = time.monotonic(), 0

        def close(self) -> None:
            close = getattr(self.inner, "close", None)
            if close is not None:
                close()

    return MinRateStream


def _min_rate(inner: Any) -> Any:
    """``inner`` (an httpx2 byte stream) wrapped in the stream class, made on first use."""
    global _MIN_RATE_STREAM
    if _MIN_RATE_STREAM is None:
        _MIN_RATE_STREAM = _min_rate_stream_class()
    return _MIN_RATE_STREAM(inner)


_MIN_RATE_STREAM: type | None = None


def _hook_session() -> None:
    """Add :func:`_leave_on_retryable` and :func:`_bound_slow_bodies` to huggingface_hub's HTTP
    client (once per client; the hooks do nothing outside hfsoup's calls)."""
    from huggingface_hub import get_session

    hooks = get_session().event_hooks["response"]
    for hook in (_leave_on_retryable, _bound_slow_bodies):
        if hook not in hooks:
            hooks.append(hook)
