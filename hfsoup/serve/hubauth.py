"""Who may do what on the local Hub: tokens for writes and private reads, signed upload URLs.

The model is one trusted team behind one server, so a token is all-or-nothing: any token the
server was given may write to every repo and read every private one; without a valid token a
client reads public repos only. Standard library only (the test Hub imports it early).

- Writes (create or delete a repo, preupload, LFS batch, commits, branches, tags) need
  ``Authorization: Bearer <token>`` with a token the server was given, else 401.
- Reads of a private repo need such a token too, else 401 ``RepoNotFound``: what the Hub answers,
  so the real client raises its usual ``RepositoryNotFoundError``.
- The LFS upload URLs handed out by an authorised batch call are presigned, as on the Hub (the
  client sends no token to them): an HMAC with a per-server secret binds each to one repo, one
  sha256, one size and an expiry, so a URL cannot be guessed, reused for other bytes, or forged.

Example:
    >>> auth = HubAuth(["hf_local_team"])
    >>> auth.accepts("Bearer hf_local_team"), auth.accepts("Bearer hf_other"), auth.accepts(None)
    (True, False, False)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from hfsoup.errors import HubServeError
from hfsoup.serve.records import HubError

# What huggingface_hub recognises as a bad token (it then raises HfHubHTTPError, not
# RepositoryNotFoundError, so a refused write reads as an access problem).
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
UPLOAD_URL_LIFETIME_S = 3600
_TOKEN_PREFIX = "hf_local_"


def generate_token() -> str:
    """A fresh random token (192 bits), e.g. ``hf_local_3q2-...``."""
    return _TOKEN_PREFIX + secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine: ``localhost``, 127.0.0.0/8 or ``::1``."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str) -> str | None:
    """The warning to show when serving on ``host`` exposes the server beyond this machine."""
    if is_loopback(host):
        return None
    return (
        f"warning: serving on {host!r}, not a loopback address: other machines can reach this "
        "Hub, and it has no TLS, so tokens and files travel in clear text; bind 127.0.0.1 (the "
        "default) or put a TLS proxy in front"
    )


def check_token(token: str, source: str = "a token") -> str:
    """``token`` without surrounding whitespace, if it can travel in an HTTP header.

    Raises:
        HubServeError: it is empty, or holds spaces, control or non-ASCII characters. The
            message never quotes the token.
    """
    token = token.strip()
    if not token:
        raise HubServeError(f"{source} is empty")
    if not all(33 <= ord(c) < 127 for c in token):
        raise HubServeError(f"{source} holds spaces, control or non-ASCII characters")
    return token


def read_tokens_file(path: str | Path) -> list[str]:
    """The tokens of a file holding one per line; blank lines and ``#`` comments are skipped.

    Raises:
        HubServeError: the file cannot be read, is not UTF-8 text, holds a malformed token, or
            holds no token at all (a server nobody can write to is rarely what was meant).

    Example:
        >>> read_tokens_file("team-tokens.txt")  # doctest: +SKIP
        ['hf_local_alice...', 'hf_local_bob...']
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise HubServeError(f"cannot read the tokens file {str(path)!r}: {reason}") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(check_token(line, f"line {number} of the tokens file {str(path)!r}"))
    if not tokens:
        raise HubServeError(f"the tokens file {str(path)!r} holds no token")
    return tokens


def tokens_from_options(tokens: Iterable[str], files: Iterable[str | Path]) -> list[str] | None:
    """The tokens of ``--token`` values and ``--tokens-file`` files; ``None`` when neither was
    given (the server then makes one).

    Raises:
        HubServeError: a value is malformed, or a file cannot be read (see :func:`read_tokens_file`).
    """
    tokens, files = list(tokens), list(files)
    found = [check_token(t, "a --token value") for t in tokens]
    found += [t for f in files for t in read_tokens_file(f)]
    return found if tokens or files else None


class HubAuth:
    """The tokens a server accepts, and the secret its upload URLs are signed with.

    Args:
        tokens: the tokens that may write and read private repos; none: a read-only server
            (public repos only), unless ``anonymous_writes``.
        anonymous_writes: let writes through without a token (test suites only: private reads
            are still checked against ``tokens``).

    Raises:
        HubServeError: a token is malformed (see :func:`check_token`).
    """

    def __init__(self, tokens: Iterable[str] = (), *, anonymous_writes: bool = False) -> None:
        self.tokens = tuple(dict.fromkeys(check_token(t) for t in tokens))
        self.anonymous_writes = anonymous_writes
        self._secret = secrets.token_bytes(32)  # per server: its URLs die with it

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries one of the tokens."""
        scheme, _, credential = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return False
        given = credential.strip().encode()
        # Compare against every token, so the time taken does not say which one nearly matched.
        return sum(hmac.compare_digest(given, t.encode()) for t in self.tokens) > 0

    def check_write(self, authorization: str | None) -> None:
        """Raise ``HubError(401)`` unless the request may write."""
        if self.anonymous_writes or self.accepts(authorization):
            return
        raise HubError(401, INVALID_CREDENTIALS)

    def check_private_read(self, authorization: str | None, what: str) -> None:
        """Raise ``HubError(401, RepoNotFound)`` unless the request may read a private repo."""
        if not self.accepts(authorization):
            raise HubError(401, f"Repository not found or private: {what}", "RepoNotFound")

    def _signature(self, repo: str, oid: str, size: int, expires: int) -> str:
        message = f"{repo}\n{oid}\n{size}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign_upload(self, repo: str, oid: str, size: int) -> str:
        """The query string that presigns the upload of blob ``oid`` of ``size`` bytes to ``repo``."""
        expires = int(time.time()) + UPLOAD_URL_LIFETIME_S
        signature = self._signature(repo, oid, size, expires)
        return f"size={size}&expires={expires}&signature={signature}"

    def check_upload(self, repo: str, oid: str, query: Mapping[str, list[str]]) -> int:
        """The size a presigned upload URL allows; ``HubError(403)`` if it is not one of ours.

        Args:
            repo: ``"{type}/{namespace}/{name}"`` of the URL.
            oid: the sha256 the URL names.
            query: the URL's parsed query (``urllib.parse.parse_qs``).
        """
        try:
            size = int(query["size"][-1])
            expires = int(query["expires"][-1])
            signature = query["signature"][-1]
        except (KeyError, IndexError, ValueError):
            raise HubError(403, "Upload URL is not signed: ask the LFS batch endpoint") from None
        expected = self._signature(repo, oid, size, expires)
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise HubError(403, "Upload URL signature does not match")
        if expires < time.time():
            raise HubError(403, "Upload URL has expired")
        return size
