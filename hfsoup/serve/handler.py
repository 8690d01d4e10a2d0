"""The local Hub's request handler: the route table, and one place that answers every failure.

:class:`Handler` joins the read and write routes (:mod:`hfsoup.serve.reads`,
:mod:`hfsoup.serve.writes`) over the plumbing of :mod:`hfsoup.serve.base`. A server may serve a
subclass of it instead (``LocalHub.handler_class``): ``_route`` sees each request before it is
routed, and the answer goes out through ``_send_json`` / ``_respond`` / ``_write``.
Standard library only.
"""

from __future__ import annotations

import re
import traceback
from urllib.parse import parse_qs, unquote, urlsplit

from hfsoup.serve.reads import ReadRoutes
from hfsoup.serve.records import HubError
from hfsoup.serve.writes import WriteRoutes


def _segment(value: str | None) -> str | None:
    return unquote(value) if value is not None else None


_NS = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_API = r"/api/(?P<t>models|datasets|spaces)/" + _NS
_GIT = r"/(?:(?P<p>datasets|spaces)/)?" + _NS
# (methods, path pattern on the still-quoted path, handler method name)
ROUTES: list[tuple[tuple[str, ...], re.Pattern[str], str]] = [
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


class Handler(ReadRoutes, WriteRoutes):
    """One connection of the local Hub; ``self.server.hub`` is the ``LocalHub``."""

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
        self._headers_sent = False
        try:
            self._route(method, url.path)
        except HubError as e:
            if self._headers_sent:
                self.close_connection = True
            else:
                self._send_error(e)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            self.hub.errors.append(traceback.format_exc())
            self.close_connection = True
            if not self._headers_sent:
                self._send_json(500, {"error": "Internal error of the test hub"})

    def _route(self, method: str, path: str) -> None:
        """Answer the request with the first route matching ``method`` and ``path`` (still
        quoted, without the query); a 404 ``HubError`` when none does."""
        for methods, pattern, name in ROUTES:
            match = pattern.fullmatch(path)
            if match and method in methods:
                args = {k: _segment(v) for k, v in match.groupdict().items()}
                getattr(self, f"_do_{name}")(method, args)
                return
        self.hub.unhandled.append(f"{method} {path}")
        raise HubError(404, f"Not found: {method} {path}")
