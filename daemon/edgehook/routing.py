"""What passes between the HTTP server and the handlers: requests, answers, routes.

Pure: no sockets. `http_server` turns what http.server parsed into a :class:`Request`
and writes the :class:`Response` a handler returns; `api` registers its handlers on a
:class:`Router`. Every refusal is an :class:`HttpError`, answered as JSON
`{"error", "detail"}` by :func:`error_response`, so no handler writes its own error shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .events import compact_json
from .hooks import HookError, parse_json


class HttpError(Exception):
    """An error answer: status, short error word, human detail, extra headers."""

    def __init__(self, status: int, error: str, detail: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


@dataclass(slots=True)
class Request:
    """One request as the handlers see it.

    `peer` is the socket's remote address; `client` is who the request is from (the
    peer, or behind a trusted proxy the address it forwarded), set by `Api.handle`.
    `body` is read lazily through `reader`, so a hook can refuse an address before
    anything is read; tests may pass `body` directly and leave `reader` None.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # email.message.Message: case-insensitive get(), get_all(), items()
    peer: str
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    reader: Callable[[], bytes] | None = None
    raw_query: str = ""
    client: str = ""

    def load_body(self) -> bytes:
        """Read the body once (the reader raises 413/400/408)."""
        if self.reader is not None:
            reader, self.reader = self.reader, None
            self.body = reader()
        return self.body

    def json(self) -> Any:
        """The body parsed as strict JSON (400 when it is not); no body is `{}`."""
        body = self.load_body()
        if not body:
            return {}
        try:
            return parse_json(body)
        except HookError as exc:
            raise HttpError(exc.status, exc.error, exc.detail) from None


@dataclass(slots=True)
class Response:
    """A handler's answer."""

    status: int = 200
    body: Any = None  # dict/list -> JSON, str -> text/html, bytes as they are
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> tuple[bytes, str]:
        """The body's bytes and their Content-Type."""
        body = self.body
        if isinstance(body, (dict, list)):
            return compact_json(body).encode(), self.content_type or "application/json"
        if isinstance(body, str):
            return body.encode(), self.content_type or "text/html; charset=utf-8"
        return body or b"", self.content_type or "application/octet-stream"


Handler = Callable[[Request], Response]


def error_response(exc: HttpError | HookError) -> Response:
    """The JSON error shape every refusal has."""
    return Response(exc.status, {"error": exc.error, "detail": exc.detail},
                    headers=dict(exc.headers))


class Router:
    """Method + path-regex dispatch; unknown paths 404, known paths with other methods 405.

    A route added with method "*" takes every method (the hook handler answers 405
    itself, after 404 for an unknown name). HEAD is served by the GET handler.
    """

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Route `method` on paths matching `pattern` (named groups become params)."""
        rx = re.compile("^" + pattern + "$")
        for existing, methods in self._routes:
            if existing.pattern == rx.pattern:
                methods[method] = handler
                return
        self._routes.append((rx, {method: handler}))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path params for a request, or HttpError 404/405."""
        for rx, methods in self._routes:
            m = rx.match(path)
            if m:
                handler = methods.get(method) or methods.get("*")
                if handler is None and method == "HEAD":
                    handler = methods.get("GET")
                if handler is None:
                    allowed = ", ".join(sorted(methods))
                    raise HttpError(405, "method_not_allowed", f"use {allowed}",
                                    {"Allow": allowed})
                return handler, m.groupdict()
        raise HttpError(404, "not_found", "no such path")


def request_kind(path: str) -> str:
    """A closed set of labels for metrics and logs: never the path itself."""
    if path.startswith("/hooks/"):
        return "hook"
    if path.startswith("/api/"):
        return "api"
    return {"/": "page", "/login": "page", "/logout": "page", "/healthz": "health",
            "/metrics": "metrics"}.get(path, "other")
