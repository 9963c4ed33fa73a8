"""The HTTP edge: REST API, health, hooks and status page on stdlib http.server.

Why stdlib: it is already in every Python, threads match the rest of edgehook, and
with a per-connection timeout and our own body limit it is safe on a LAN (see the
README's "HTTP server" note). Handlers never raise to the client: every error is
JSON `{"error", "detail"}` with the right 4xx, and an unexpected bug is a logged 500.
"""

from __future__ import annotations

import json
import logging
import re
import selectors
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .errors import CommandError

_LOG = logging.getLogger(__name__)


class ApiBackend(Protocol):
    """What the HTTP edge needs from the daemon (app.py implements it)."""

    def state(self) -> dict[str, Any]: ...
    def health(self) -> tuple[bool, dict[str, Any]]: ...
    def set_output(self, name: str, state: str, duration: float | None) -> dict[str, Any]: ...
    def simulate(self, name: str, action: str) -> None: ...
    def outbox_list(self, status: str | None) -> list[dict[str, Any]]: ...
    def outbox_retry(self, item_id: int) -> bool: ...


class HttpError(Exception):
    """An error answer: status, short error word, human detail."""

    def __init__(self, status: int, error: str, detail: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


@dataclass(slots=True)
class Request:
    """One parsed request, handed to route handlers."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # email.message.Message: case-insensitive get()
    client: str
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body parsed as JSON (400 when it is not)."""
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, "bad_request", f"malformed JSON: {exc}") from None


@dataclass(slots=True)
class Response:
    """A handler's answer."""

    status: int = 200
    body: Any = None  # dict/list -> JSON, str -> text/html, bytes as-is
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


class Router:
    """Method + path-regex dispatch; unknown paths 404, known paths with other methods 405."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        rx = re.compile("^" + pattern + "$")
        for existing, methods in self._routes:
            if existing.pattern == rx.pattern:
                methods[method] = handler
                return
        self._routes.append((rx, {method: handler}))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        for rx, methods in self._routes:
            m = rx.match(path)
            if m:
                if method not in methods:
                    allowed = ", ".join(sorted(methods))
                    raise HttpError(405, "method_not_allowed", f"use {allowed}",
                                    {"Allow": allowed})
                return methods[method], m.groupdict()
        raise HttpError(404, "not_found", f"no such path: {path}")


def json_response(body: Any, status: int = 200) -> Response:
    return Response(status, body)


class Api:
    """The routes of SPEC.md's HTTP API over an ApiBackend."""

    def __init__(self, backend: ApiBackend, *, api_token: str | None = None,
                 max_body: int = 65536) -> None:
        self.backend = backend
        self.api_token = api_token
        self.max_body = max_body
        self.router = Router()
        r = self.router
        r.add("GET", "/healthz", self.healthz)
        r.add("GET", "/api/v1/state", self.state)
        r.add("PUT", "/api/v1/outputs/(?P<name>[^/]+)", self.put_output)
        r.add("POST", "/api/v1/inputs/(?P<name>[^/]+)/simulate", self.simulate)
        r.add("GET", "/api/v1/outbox", self.outbox)
        r.add("POST", "/api/v1/outbox/(?P<item>[0-9]+)/retry", self.outbox_retry)

    # -------------------------------------------------------------- auth
    def check_api_token(self, req: Request) -> None:
        """Bearer api_token on /api/* when one is configured."""
        if not self.api_token:
            return
        import hmac

        got = req.headers.get("Authorization", "")
        token = got[7:].strip() if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_token.encode()):
            raise HttpError(401, "unauthorized", "missing or wrong bearer token",
                            {"WWW-Authenticate": 'Bearer realm="edgehook"'})

    # -------------------------------------------------------------- routes
    def healthz(self, req: Request) -> Response:
        ok, detail = self.backend.health()
        return Response(200 if ok else 503, {"status": "ok" if ok else "unhealthy", **detail})

    def state(self, req: Request) -> Response:
        self.check_api_token(req)
        return Response(200, self.backend.state())

    def put_output(self, req: Request) -> Response:
        self.check_api_token(req)
        body = req.json()
        if not isinstance(body, dict):
            raise HttpError(400, "bad_request", 'expected {"state": "on"|"off"|"toggle"}')
        state = str(body.get("state", "")).lower()
        if state not in ("on", "off", "toggle"):
            raise HttpError(400, "bad_request", 'state must be "on", "off" or "toggle"')
        duration = None
        if body.get("for") is not None:
            from .config import parse_duration

            try:
                duration = parse_duration(body["for"])
            except ValueError as exc:
                raise HttpError(400, "bad_request", f"for: {exc}") from None
        try:
            return Response(200, self.backend.set_output(req.params["name"], state, duration))
        except KeyError:
            raise HttpError(404, "not_found", f"no output named {req.params['name']!r}") \
                from None
        except CommandError as exc:
            raise HttpError(409, "refused", str(exc)) from None

    def simulate(self, req: Request) -> Response:
        self.check_api_token(req)
        body = req.json()
        action = str(body.get("action", "")) if isinstance(body, dict) else ""
        if action not in ("press", "release", "click", "hold"):
            raise HttpError(400, "bad_request", 'action must be press, release, click or hold')
        try:
            self.backend.simulate(req.params["name"], action)
        except KeyError:
            raise HttpError(404, "not_found", f"no input named {req.params['name']!r}") \
                from None
        except CommandError as exc:
            raise HttpError(409, "conflict", str(exc)) from None
        return Response(200, {"name": req.params["name"], "action": action})

    def outbox(self, req: Request) -> Response:
        self.check_api_token(req)
        status = (req.query.get("status") or [None])[0]
        if status not in (None, "pending", "dead", "delivered"):
            raise HttpError(400, "bad_request", "status must be pending, dead or delivered")
        return Response(200, {"items": self.backend.outbox_list(status)})

    def outbox_retry(self, req: Request) -> Response:
        self.check_api_token(req)
        if not self.backend.outbox_retry(int(req.params["item"])):
            raise HttpError(404, "not_found", "no dead delivery with that id")
        return Response(200, {"id": int(req.params["item"]), "status": "pending"})

    # -------------------------------------------------------------- entry
    def handle(self, req: Request) -> Response:
        """Route one request; HttpError becomes its JSON answer."""
        try:
            handler, params = self.router.resolve(req.method, req.path)
            req.params = params
            return handler(req)
        except HttpError as exc:
            return Response(exc.status, {"error": exc.error, "detail": exc.detail},
                            headers=exc.headers)


class _Handler(BaseHTTPRequestHandler):
    server_version = f"edgehook/{__version__}"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else keep-alive answers wait ~40 ms for delayed ACKs
    timeout = 5.0                   # a client that trickles bytes is cut off
    api: Api

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        _LOG.debug("http %s " + format, self.client_address[0], *args)

    def _serve(self) -> None:
        split = urlsplit(self.path)
        req = Request(method=self.command, path=split.path,
                      query=parse_qs(split.query, keep_blank_values=True),
                      headers=self.headers, client=self.client_address[0])
        try:
            req.body = self._read_body()
            resp = self.api.handle(req)
        except HttpError as exc:
            resp = Response(exc.status, {"error": exc.error, "detail": exc.detail},
                            headers=exc.headers)
            self.close_connection = True
        except Exception:
            _LOG.exception("http %s %s failed", self.command, split.path)
            resp = Response(500, {"error": "internal", "detail": "see the daemon's log"})
        self._send(resp)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HttpError(411, "length_required", "send Content-Length, not chunked")
        raw = self.headers.get("Content-Length")
        if not raw:
            return b""
        try:
            length = int(raw)
        except ValueError:
            raise HttpError(400, "bad_request", "bad Content-Length") from None
        if length < 0:
            raise HttpError(400, "bad_request", "bad Content-Length")
        if length > self.api.max_body:
            raise HttpError(413, "too_large", f"body over {self.api.max_body} bytes")
        return self.rfile.read(length)

    def _send(self, resp: Response) -> None:
        body = resp.body
        if isinstance(body, (dict, list)):
            data = json.dumps(body, separators=(",", ":")).encode()
            ctype = resp.content_type or "application/json"
        elif isinstance(body, str):
            data = body.encode()
            ctype = resp.content_type or "text/html; charset=utf-8"
        else:
            data = body or b""
            ctype = resp.content_type or "application/octet-stream"
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for k, v in resp.headers.items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own errors (bad request line, 414...) as JSON too."""
        self.close_connection = True
        try:
            self._send(Response(code, {"error": HTTPStatus(code).phrase.lower().replace(" ", "_"),
                                       "detail": message or ""}))
        except Exception:  # the socket may be gone already
            pass


class HttpServer:
    """A threaded HTTP server bound to config's listen address, in its own thread."""

    def __init__(self, host: str, port: int, api: Api, timeout: float = 5.0) -> None:
        handler = type("EdgehookHandler", (_Handler,), {"api": api, "timeout": timeout})
        server_cls = ThreadingHTTPServer
        if ":" in host:
            server_cls = type("V6Server", (ThreadingHTTPServer,),
                              {"address_family": socket.AF_INET6})
        self.httpd = server_cls((host, port), handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, name="edgehook-http", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        """Accept loop that sleeps until a connection or stop() (serve_forever polls)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.httpd, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    self.httpd._handle_request_noblock()

    def set_api(self, api: Api) -> None:
        """Swap the routes' backend snapshot (reload) as one reference."""
        self.httpd.RequestHandlerClass.api = api

    def stop(self) -> None:
        """Stop accepting; requests in flight finish on their own threads."""
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(timeout=2)
            self._wake_r.close()
            self._wake_w.close()
        self.httpd.server_close()
