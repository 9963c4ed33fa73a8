"""The HTTP edge: inbound hooks, REST API, health, metrics and the status page.

Why stdlib `http.server`: it is in every Python, its threads match the rest of
edgehook, and its two known weaknesses on a LAN are closed here rather than by a
dependency (measured on this machine: a trickling client kept a default
ThreadingHTTPServer connection open > 25 s, and there is no body limit):

- every request has a *total* deadline (`http.timeout`, default 5 s) from its first
  byte to its last, not a per-recv timeout a client can reset one byte at a time;
- the request line, header count and header bytes are capped (414 / 431) before
  http.client parses them, and a body over `http.max_body` is refused (413) from its
  Content-Length, unread;
- at most `http.max_connections` connections are served at once (a semaphore taken
  in `process_request`, before a thread exists); one more is answered 503 at once and
  closed, so a flood costs a refused connection, not a thread or memory.

A trickling client therefore holds one slot for at most `timeout` seconds and never
delays anyone else. Handlers never raise to the client: every error is JSON
`{"error", "detail"}` with the right 4xx; an unexpected bug is a logged 500.

Requests that have arrived are served one at a time in arrival order (`_Turnstile`):
with a thread per connection, threads otherwise take the GIL in no useful order,
and at 16 busy connections the p99 was twice the p50 (9-9.8 ms against 4.8 ms;
with the turnstile 6.1-6.6 ms at a higher rate, issue 6). A request that blocks
while it has the turn (a body that does not come, a slow reader of the answer, a
sync hook behind a long queue) makes the others wait at most `TURN_PATIENCE`;
then they go ahead without their turn, as before.

Status page auth (when `http.api_token` is set): `GET /` without credentials shows a
login form; `POST /login` with the token sets an HttpOnly, SameSite=Strict cookie
holding an expiry and an HMAC of it keyed by the token (stateless, valid 30 days,
void once the token changes; the token itself is never stored in the browser). The
cookie is accepted on `/`, `/api/*` and `/metrics` like the bearer token. State
changing requests from a browser must come from our own origin (an `Origin` header
naming another host is 403), and without an api_token the API answers only to a
loopback `Host` (a DNS-rebinding guard).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import math
import re
import secrets
import selectors
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from . import __version__
from .config import HookConfig, is_loopback, parse_duration
from .errors import CommandError
from .events import compact_json, make_event
from .hooks import (
    HookError,
    HookGuards,
    HookRequest,
    TokenBucket,
    check_auth,
    client_allowed,
    event_data,
    parse_body,
    parse_json,
    parse_query,
    safe_headers,
    token_matches,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Family, counter, daemon_families, render
from .status_page import event_summary, login_page, status_page

_LOG = logging.getLogger(__name__)

SYNC_WAIT = 5.0            # seconds a `respond: sync` hook waits for its actions
TURN_PATIENCE = 0.02       # seconds a request waits for its turn before going ahead
MAX_REQUEST_LINE = 8192    # bytes; longer is 414
MAX_HEADER_LINE = 8192     # bytes per header line; longer is 431
MAX_HEADERS = 64           # header lines; more is 431
MAX_HEAD_BYTES = 32768     # all header lines together; more is 431
MAX_DURATION = 7 * 86400.0  # the longest `for:` the API accepts
SESSION_COOKIE = "edgehook_session"
SESSION_TTL = 30 * 86400
LOG_THROTTLE = 10.0        # seconds between two log lines about refused requests of one kind
RECENT_DEAD = 5            # dead deliveries shown on the status page
_LOGIN_ERRORS = {"failed": "Wrong token.", "wait": "Too many attempts; wait a minute."}


class ApiBackend(Protocol):
    """What the HTTP edge needs from the daemon (app.py implements it)."""

    def state(self) -> dict[str, Any]: ...
    def health(self) -> tuple[bool, dict[str, Any]]: ...
    def set_output(self, name: str, state: str, duration: float | None) -> dict[str, Any]: ...
    def simulate(self, name: str, action: str) -> None: ...
    def outbox_list(self, status: str | None) -> list[dict[str, Any]]: ...
    def outbox_retry(self, item_id: int) -> bool: ...
    def outbox_retry_dead(self) -> int: ...
    def outbox_purge(self) -> int: ...
    def submit(self, event: Any, wait: float | None = None) -> Any: ...
    def recent_events(self) -> list[dict[str, Any]]: ...
    def metrics(self) -> dict[str, Any]: ...


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
    """One parsed request, handed to route handlers.

    `body` is read lazily through `reader` (so a hook can refuse an address before
    reading anything); tests may pass `body` directly and leave `reader` None.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # email.message.Message: case-insensitive get(), items()
    client: str
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    reader: Callable[[], bytes] | None = None
    raw_query: str = ""

    def load_body(self) -> bytes:
        """Read the body once (413/400/408 come from the reader)."""
        if self.reader is not None:
            reader, self.reader = self.reader, None
            self.body = reader()
        return self.body

    def json(self) -> Any:
        """The body parsed as strict JSON (400 when it is not)."""
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
    body: Any = None  # dict/list -> JSON, str -> text/html, bytes as-is
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


class Headers:
    """Request headers: case-insensitive `get`, `items` in arrival order (the subset of
    email.message.Message that edgehook uses, without its ~200 us parser)."""

    __slots__ = ("_items", "_first")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._first: dict[str, str] = {}
        for k, v in items:
            self._first.setdefault(k.lower(), v)

    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name.lower(), default)

    def __getitem__(self, name: str) -> str | None:
        return self._first.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def get_all(self, name: str, failobj: Any = None) -> list[str] | Any:
        low = name.lower()
        found = [v for k, v in self._items if k.lower() == low]
        return found or failobj

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def keys(self) -> list[str]:
        return [k for k, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __str__(self) -> str:
        return "".join(f"{k}: {v}\n" for k, v in self._items)


class Router:
    """Method + path-regex dispatch; unknown paths 404, known paths with other methods 405.

    A route added with method "*" takes every method (the hook handler answers 405 itself,
    after 404 for an unknown name). HEAD is served by the GET handler.
    """

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
                handler = methods.get(method) or methods.get("*")
                if handler is None and method == "HEAD":
                    handler = methods.get("GET")
                if handler is None:
                    allowed = ", ".join(sorted(methods))
                    raise HttpError(405, "method_not_allowed", f"use {allowed}",
                                    {"Allow": allowed})
                return handler, m.groupdict()
        raise HttpError(404, "not_found", "no such path")


def error_response(exc: HttpError | HookError) -> Response:
    """The JSON error shape every refusal has."""
    return Response(exc.status, {"error": exc.error, "detail": exc.detail},
                    headers=dict(exc.headers))


class HttpStats:
    """Requests by handler kind and status, refused connections; shared across reloads."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.hooks: Counter[tuple[str, str]] = Counter()
        self.rejected_connections = 0
        self.timeouts = 0
        self._lock = threading.Lock()

    def bump(self, what: str) -> None:
        """Count one refused connection ("rejected_connections") or timeout ("timeouts")."""
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def count(self, kind: str, status: int, hook: str | None = None) -> None:
        with self._lock:
            self.requests[(kind, str(status))] += 1
            if hook is not None:
                self.hooks[(hook, str(status))] += 1

    def families(self) -> list[Family]:
        """The HTTP side of /metrics."""
        with self._lock:
            reqs, hooks = dict(self.requests), dict(self.hooks)
            rejected, timeouts = self.rejected_connections, self.timeouts
        return [
            counter("edgehook_http_requests_total", "HTTP requests answered, by handler and "
                    "status code", reqs, ("handler", "code")),
            counter("edgehook_hook_requests_total", "requests to configured hooks, by hook "
                    "and status code", hooks, ("hook", "code")),
            counter("edgehook_http_connections_rejected_total", "connections refused with 503 "
                    "because http.max_connections were busy", rejected),
            counter("edgehook_http_request_timeouts_total", "requests cut off by http.timeout",
                    timeouts),
        ]


def request_kind(path: str) -> str:
    """A closed set of labels for metrics: never the path itself."""
    if path.startswith("/hooks/"):
        return "hook"
    if path.startswith("/api/"):
        return "api"
    return {"/": "page", "/login": "page", "/logout": "page", "/healthz": "health",
            "/metrics": "metrics"}.get(path, "other")


class _Throttle:
    """At most one log line per key per LOG_THROTTLE seconds, counting the rest."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(key, (-math.inf, 0))
            if now - last < LOG_THROTTLE:
                self._last[key] = (last, skipped + 1)
                return
            self._last[key] = (now, 0)
            if len(self._last) > 1000:
                self._last.clear()
        if skipped:
            msg += " (%d more like it not logged)"
            args = (*args, skipped)
        _LOG.warning(msg, *args)


class Api:
    """The routes of SPEC.md's HTTP API, hooks and status page over an ApiBackend."""

    def __init__(self, backend: ApiBackend, *, api_token: str | None = None,
                 max_body: int = 65536, hooks: dict[str, HookConfig] | None = None,
                 guards: HookGuards | None = None, stats: HttpStats | None = None,
                 max_connections: int = 32) -> None:
        self.backend = backend
        self.max_connections = max_connections
        self.api_token = api_token or None
        self.max_body = max_body
        self.hooks = dict(hooks or {})
        self.guards = guards or HookGuards()
        self.stats = stats or HttpStats()
        self.login_bucket = TokenBucket(10, 60.0)
        self._throttle = _Throttle()
        self.router = Router()
        r = self.router
        r.add("GET", "/", self.page)
        r.add("POST", "/login", self.login)
        r.add("POST", "/logout", self.logout)
        r.add("GET", "/healthz", self.healthz)
        r.add("GET", "/metrics", self.metrics)
        r.add("*", "/hooks/(?P<name>[^/]{1,200})", self.hook)
        r.add("GET", "/api/v1/state", self.state)
        r.add("GET", "/api/v1/events", self.events)
        r.add("PUT", "/api/v1/outputs/(?P<name>[^/]+)", self.put_output)
        r.add("POST", "/api/v1/inputs/(?P<name>[^/]+)/simulate", self.simulate)
        r.add("GET", "/api/v1/outbox", self.outbox)
        r.add("POST", "/api/v1/outbox/(?P<item>[0-9]{1,15})/retry", self.outbox_retry)
        r.add("POST", "/api/v1/outbox/retry", self.outbox_retry_dead)
        r.add("DELETE", "/api/v1/outbox", self.outbox_purge)

    def adopt(self, old: Api) -> None:
        """Keep the replay cache, rate buckets and stats of the Api this one replaces."""
        self.guards = old.guards
        self.stats = old.stats
        self.login_bucket = old.login_bucket

    # -------------------------------------------------------------- auth
    def _session_value(self, expiry: int) -> str:
        assert self.api_token is not None
        mac = hmac.new(self.api_token.encode(), f"edgehook-session:{expiry}".encode(),
                       hashlib.sha256).hexdigest()
        return f"{expiry}.{mac}"

    def _session_ok(self, req: Request) -> bool:
        raw = req.headers.get("Cookie")
        if not raw or not self.api_token:
            return False
        try:
            jar = SimpleCookie()
            jar.load(raw)
        except (CookieError, ValueError, TypeError):
            return False
        morsel = jar.get(SESSION_COOKIE)
        if morsel is None:
            return False
        expiry_text, _, _ = morsel.value.partition(".")
        if not expiry_text.isascii() or not expiry_text.isdigit() or len(expiry_text) > 12:
            return False
        expiry = int(expiry_text)
        if expiry < time.time():
            return False
        return token_matches(morsel.value, self._session_value(expiry))

    def authorized(self, req: Request) -> bool:
        """True with no api_token, or with the bearer token, or with a session cookie."""
        if not self.api_token:
            return True
        got = req.headers.get("Authorization") or ""
        if got[:7].lower() == "bearer " and token_matches(got[7:].strip(), self.api_token):
            return True
        return self._session_ok(req)

    def check_api_token(self, req: Request) -> None:
        """Bearer api_token (or the status page's cookie) when one is configured."""
        self._check_origin(req)
        if not self.authorized(req):
            raise HttpError(401, "unauthorized", "missing or wrong bearer token",
                            {"WWW-Authenticate": 'Bearer realm="edgehook"'})

    def _check_origin(self, req: Request) -> None:
        """Browser guards: same-origin for state changes; a loopback Host without a token."""
        host = req.headers.get("Host")
        if not self.api_token and host is not None and not _local_host(host):
            raise HttpError(403, "forbidden", "without http.api_token the API answers only "
                                              "to a loopback Host")
        if req.method not in ("GET", "HEAD"):
            origin = req.headers.get("Origin")
            if origin is not None:
                try:
                    netloc = urlsplit(origin).netloc
                except ValueError:
                    netloc = ""
                if not netloc or netloc.lower() != (host or "").lower():
                    raise HttpError(403, "forbidden", "cross-origin request refused")

    # -------------------------------------------------------------- hooks
    def hook(self, req: Request) -> Response:
        """POST/PUT /hooks/<name>: checks in the order of hooks.py, then one event."""
        name = unquote(req.params["name"])
        hook = self.hooks.get(name)
        if hook is None:
            raise HttpError(404, "not_found", "no such hook")
        req.params["hook"] = name
        if req.method not in ("POST", "PUT"):
            raise HttpError(405, "method_not_allowed", "use POST or PUT",
                            {"Allow": "POST, PUT"})
        try:
            if not client_allowed(req.client, hook.allow_from):
                raise HookError(403, "forbidden", "this address may not call this hook")
            body = req.load_body()
            now = time.time()
            msg_id = check_auth(hook.auth, req.headers, body, now, self.guards.replay)
            self.guards.rate_check(hook)
            ctype = req.headers.get("Content-Type")
            parsed = parse_body(ctype, body)
            query = parse_query(req.raw_query)
            if msg_id is not None and not self.guards.replay.add(msg_id, now):
                raise HookError(401, "unauthorized", "missing or invalid credentials")
        except HookError as exc:
            self._throttle.log(f"{name}:{exc.status}", "hook %s: %d %s from %s", name,
                               exc.status, exc.error, req.client)
            return error_response(exc)
        data = event_data(HookRequest(client=req.client, content_type=ctype, query=query,
                                      headers=safe_headers(req.headers.items()), body=parsed))
        event = make_event("hook.received", name, data)
        if hook.respond != "sync":
            self.backend.submit(event)
            _LOG.info("hook %s: event %s queued (from %s)", name, event.id, req.client)
            return Response(202, {"event_id": event.id})
        reply = self.backend.submit(event, wait=SYNC_WAIT)
        if reply is None or not reply.done.is_set():
            _LOG.warning("hook %s: event %s still running after %g s", name, event.id,
                         SYNC_WAIT)
            return Response(202, {"event_id": event.id, "status": "queued",
                                  "detail": f"actions still running after {SYNC_WAIT:g} s"})
        if any(e.startswith("dropped:") for e in reply.errors):
            return Response(503, {"error": "overloaded", "detail": "event queue full",
                                  "event_id": event.id}, headers={"Retry-After": "1"})
        body_out = {"event_id": event.id, "rules": list(reply.fired),
                    "results": list(reply.results), "errors": list(reply.errors)}
        if reply.errors and not reply.results:
            return Response(409, {"error": "action_failed", "detail": "; ".join(reply.errors),
                                  **body_out})
        return Response(200, body_out)

    # -------------------------------------------------------------- health, metrics
    def healthz(self, req: Request) -> Response:
        ok, detail = self.backend.health()
        status = detail.pop("status", None) or ("ok" if ok else "unhealthy")
        return Response(200 if ok else 503, {"status": status, **detail})

    def metrics(self, req: Request) -> Response:
        self.check_api_token(req)
        families = daemon_families(self.backend.metrics())
        families.extend(self.stats.families())
        return Response(200, render(families), content_type=METRICS_CONTENT_TYPE)

    # -------------------------------------------------------------- API
    def state(self, req: Request) -> Response:
        self.check_api_token(req)
        return Response(200, self.backend.state())

    def events(self, req: Request) -> Response:
        """GET /api/v1/events?limit=N: the last events and what each rule did."""
        self.check_api_token(req)
        raw = (req.query.get("limit") or ["50"])[0]
        limit = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 5 else 50
        items = self.backend.recent_events()[:max(0, limit)]
        return Response(200, {"items": [{**e, "summary": event_summary(e)} for e in items]})

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
            try:
                duration = parse_duration(body["for"])
            except (ValueError, TypeError, OverflowError) as exc:
                raise HttpError(400, "bad_request", f"for: {exc}") from None
            if not math.isfinite(duration) or duration > MAX_DURATION:
                raise HttpError(400, "bad_request", f"for: at most {MAX_DURATION:g} s")
        name = req.params["name"]
        try:
            return Response(200, self.backend.set_output(name, state, duration or None))
        except KeyError:
            raise HttpError(404, "not_found", "no such output") from None
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
            raise HttpError(404, "not_found", "no such input") from None
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
        item = int(req.params["item"])
        if not self.backend.outbox_retry(item):
            raise HttpError(404, "not_found", "no dead delivery with that id")
        return Response(200, {"id": item, "status": "pending"})

    def outbox_retry_dead(self, req: Request) -> Response:
        """Every dead delivery again (``edgehook outbox retry --all-dead``)."""
        self.check_api_token(req)
        return Response(200, {"retried": self.backend.outbox_retry_dead()})

    def outbox_purge(self, req: Request) -> Response:
        """Delete the dead deliveries (``edgehook outbox purge``); only dead ones."""
        self.check_api_token(req)
        status = (req.query.get("status") or [None])[0]
        if status != "dead":
            raise HttpError(400, "bad_request", "only ?status=dead can be purged")
        return Response(200, {"purged": self.backend.outbox_purge()})

    # -------------------------------------------------------------- status page
    def page(self, req: Request) -> Response:
        """GET /: the status page, or the login form when a token is set and not given."""
        self._check_origin(req)
        if not self.authorized(req):
            why = (req.query.get("login") or [""])[0]
            return _html(200, login_page(_LOGIN_ERRORS.get(why)))
        state = self.backend.state()
        events = [{**e, "summary": event_summary(e)} for e in self.backend.recent_events()[:50]]
        dead = self.backend.outbox_list("dead")[:RECENT_DEAD]
        nonce = secrets.token_urlsafe(16)
        logout = self.api_token is not None and req.headers.get("Authorization") is None
        return _html(200, status_page(state, events, dead, nonce, logout), nonce)

    def login(self, req: Request) -> Response:
        """POST /login (form: token): sets the session cookie and goes back to /.

        Post/redirect/get: a wrong token or too many attempts also redirect, to
        `/?login=failed|wait`, whose form says so (so every 4xx stays JSON).
        """
        self._check_origin(req)
        if not self.api_token:
            return Response(303, b"", headers={"Location": "/"})
        wait = self.login_bucket.take(time.monotonic())
        if wait > 0:
            return Response(303, b"", headers={"Location": "/?login=wait"})
        body = req.load_body()
        try:
            fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        except ValueError:
            fields = {}
        given = (fields.get("token") or [""])[0]
        if not token_matches(given, self.api_token):
            _LOG.warning("status page: wrong token from %s", req.client)
            return Response(303, b"", headers={"Location": "/?login=failed"})
        expiry = int(time.time()) + SESSION_TTL
        cookie = (f"{SESSION_COOKIE}={self._session_value(expiry)}; Path=/; HttpOnly; "
                  f"SameSite=Strict; Max-Age={SESSION_TTL}")
        _LOG.info("status page: signed in from %s", req.client)
        return Response(303, b"", headers={"Location": "/", "Set-Cookie": cookie})

    def logout(self, req: Request) -> Response:
        """POST /logout: forget the session cookie."""
        self._check_origin(req)
        return Response(303, b"", headers={
            "Location": "/",
            "Set-Cookie": f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"})

    # -------------------------------------------------------------- entry
    def handle(self, req: Request) -> Response:
        """Route one request; HttpError becomes its JSON answer."""
        try:
            handler, params = self.router.resolve(req.method, req.path)
            req.params = params
            return handler(req)
        except (HttpError, HookError) as exc:
            return error_response(exc)


def _local_host(host: str) -> bool:
    """True when a Host header names a loopback address or localhost."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


# ------------------------------------------------------------------ HTML responses
def _html(status: int, text: str, nonce: str | None = None) -> Response:
    src = f"'nonce-{nonce}'" if nonce else "'none'"
    csp = (f"default-src 'none'; script-src {src}; style-src 'nonce-{nonce or 'login'}'; "
           "connect-src 'self'; img-src data:; form-action 'self'; base-uri 'none'; "
           "frame-ancestors 'none'")
    # Referrer-Policy same-origin, not no-referrer: with no-referrer Chromium sends
    # `Origin: null` on the login form's POST, which the origin check must refuse.
    return Response(status, text, "text/html; charset=utf-8", headers={
        "Content-Security-Policy": csp, "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"})



# ------------------------------------------------------------------ the server
_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        from email.utils import formatdate

        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class _DeadlineReader(io.RawIOBase):
    """Socket reads that share one deadline per request (a trickle cannot extend it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received within http.timeout")
        self.sock.settimeout(left)
        return self.sock.recv_into(buf)


class _SocketWriter(io.RawIOBase):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sock.sendall(b)
        return len(b)


class _Handler(BaseHTTPRequestHandler):
    server_version = f"edgehook/{__version__}"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # errors get a status line even for garbage
    timeout = 5.0                   # whole request, first byte to last (see module doc)
    api: Api
    server: _Server

    def setup(self) -> None:
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 16384)
        self.wfile = _SocketWriter(self.connection)
        self.close_connection = True

    def finish(self) -> None:
        try:
            self.rfile.close()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        _LOG.debug("http %s " + format, self.client_address[0], *args)

    def handle_one_request(self) -> None:
        """One request under one deadline, with our limits on the request head."""
        self._reader.deadline = time.monotonic() + self.timeout
        self.command = None  # type: ignore[assignment]
        self.request_version = "HTTP/1.1"
        self.requestline = ""
        self._kind = "other"
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not line:
                self.close_connection = True
                return
            if len(line) > MAX_REQUEST_LINE:
                self.send_error(414, "request line too long")
                return
            self.raw_requestline = line
            head = self._read_head()
            if head is None or not self._parse(line, head):
                return
            turnstile = self.server.turnstile
            had_turn = turnstile.enter()
            try:
                self._serve()
            finally:
                if had_turn:
                    turnstile.leave()
        except TimeoutError:
            self.close_connection = True
            self.api.stats.bump("timeouts")
            if self.command is not None or self.requestline:
                self._try_send(Response(408, {"error": "request_timeout",
                                              "detail": "request not received in time"}))
        except (ConnectionError, OSError):
            self.close_connection = True

    def _read_head(self) -> list[bytes] | None:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if not line:
                self.close_connection = True
                return None
            if line in (b"\r\n", b"\n"):
                return lines
            total += len(line)
            lines.append(line)
            if len(line) > MAX_HEADER_LINE or len(lines) > MAX_HEADERS or \
                    total > MAX_HEAD_BYTES:
                self.send_error(431, f"at most {MAX_HEADERS} header lines, "
                                     f"{MAX_HEAD_BYTES} bytes")
                return None

    def _parse(self, raw_line: bytes, head: list[bytes]) -> bool:
        """Request line and headers (what http.server's parse_request does, minus the
        email parser); False once an error was sent."""
        line = raw_line.decode("latin-1").rstrip("\r\n")
        self.requestline = line
        words = line.split()
        if len(words) != 3:
            self.send_error(400, f"bad request line {line[:100]!r}")
            return False
        command, path, version = words
        try:
            if not version.startswith("HTTP/"):
                raise ValueError(version)
            major, minor = (int(x) for x in version[5:].split(".", 1))
            if major < 0 or minor < 0 or len(version) > 12:
                raise ValueError(version)
        except ValueError:
            self.send_error(400, f"bad request version {version[:20]!r}")
            return False
        if major >= 2:
            self.send_error(505, f"invalid HTTP version ({version[:20]})")
            return False
        self.command, self.path, self.request_version = command, path, version
        items: list[tuple[str, str]] = []
        for raw in head:
            text = raw.decode("latin-1").rstrip("\r\n")
            name, sep, value = text.partition(":")
            if not sep or not name or name[0] in " \t" or name != name.rstrip():
                self.send_error(400, "malformed header line")
                return False
            items.append((name, value.strip(" \t")))
        self.headers = Headers(items)  # type: ignore[assignment]
        conn = (self.headers.get("Connection") or "").lower()
        self.close_connection = (major, minor) < (1, 1)
        if "close" in conn:
            self.close_connection = True
        elif "keep-alive" in conn:
            self.close_connection = False
        expect = (self.headers.get("Expect") or "").lower()
        if expect == "100-continue" and (major, minor) >= (1, 1):
            return self.handle_expect_100()
        return True

    def handle_expect_100(self) -> bool:
        """Answer `Expect: 100-continue` only when the body will be accepted by size."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.api.max_body:
            return True  # _serve answers 413 without reading; the client sends nothing
        return super().handle_expect_100()

    def _serve(self) -> None:
        target = self.path
        if "://" in target.partition("?")[0]:  # absolute-form: http://host/path
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path, _, query = target.partition("#")[0].partition("?")
        self._kind = request_kind(path)
        api = self.api
        req = Request(method=self.command, path=path, query={}, headers=self.headers,
                      client=self.client_address[0], raw_query=query)
        self._body_pending = False
        try:
            if query:
                req.query = parse_qs(query, keep_blank_values=True, max_num_fields=200)
            req.reader = self._body_reader()
            resp = api.handle(req)
        except HttpError as exc:
            resp = error_response(exc)
            self.close_connection = True
        except TimeoutError:
            resp = Response(408, {"error": "request_timeout",
                                  "detail": "request body not received in time"})
            api.stats.bump("timeouts")
            self.close_connection = True
        except ValueError:  # parse_qs: too many fields
            resp = Response(400, {"error": "bad_request", "detail": "query too long"})
        except Exception:
            _LOG.exception("http %s %s failed", self.command, self._kind)
            resp = Response(500, {"error": "internal", "detail": "see the daemon's log"})
        if self._body_pending:
            self.close_connection = True  # an unread body would be taken for the next request
        hook = req.params.get("hook")
        api.stats.count(self._kind, resp.status, hook)
        self._send(resp)

    def _body_reader(self) -> Callable[[], bytes]:
        te = self.headers.get("Transfer-Encoding")
        raw = self.headers.get("Content-Length")
        if te is not None:
            self._body_pending = True

            def chunked() -> bytes:
                raise HttpError(411, "length_required", "send Content-Length, not chunked")
            return chunked
        if raw is None:
            return lambda: b""
        raw = raw.strip()
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
            raise HttpError(400, "bad_request", "bad Content-Length")
        length = int(raw)
        self._body_pending = length > 0
        max_body = self.api.max_body

        def read() -> bytes:
            if length > max_body:
                raise HttpError(413, "too_large", f"body over {max_body} bytes")
            data = self.rfile.read(length) if length else b""
            if len(data) < length:
                raise HttpError(400, "bad_request", "body shorter than Content-Length")
            self._body_pending = False
            return data
        return read

    def _send(self, resp: Response) -> None:
        """Status line, headers and body in one write (one segment for small answers)."""
        body = resp.body
        if isinstance(body, (dict, list)):
            data = compact_json(body).encode()
            ctype = resp.content_type or "application/json"
        elif isinstance(body, str):
            data = body.encode()
            ctype = resp.content_type or "text/html; charset=utf-8"
        else:
            data = body or b""
            ctype = resp.content_type or "application/octet-stream"
        try:
            phrase = HTTPStatus(resp.status).phrase
        except ValueError:
            phrase = ""
        head = [f"HTTP/1.1 {resp.status} {phrase}", f"Server: {self.server_version}",
                f"Date: {_http_date()}", f"Content-Type: {ctype}",
                f"Content-Length: {len(data)}", "Cache-Control: no-store"]
        head.extend(f"{k}: {v}" for k, v in resp.headers.items())
        if self.close_connection:
            head.append("Connection: close")
        out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace")
        if self.command != "HEAD":
            out += data
        self.connection.settimeout(self.timeout)
        self.wfile.write(out)
        if resp.status != 100:
            _LOG.debug("http %s %s %s %d", self.client_address[0], self.command,
                       self._kind, resp.status)

    def _try_send(self, resp: Response) -> None:
        try:
            self._send(resp)
        except OSError:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own errors (bad request line, 431, 501...) as JSON too."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase.lower().replace(" ", "_")
        except ValueError:
            phrase = "error"
        self.api.stats.count(self._kind, code)
        self._try_send(Response(code, {"error": phrase, "detail": message or ""}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)


class _Turnstile:
    """First come, first served, with patience (see the module docstring).

    :meth:`enter` returns True once it is the caller's turn (the caller then calls
    :meth:`leave`), or False after `patience` seconds in the queue: the caller goes
    ahead without a turn, so one stuck turn delays the others by at most that.
    The turn is handed straight to the next in line, so nobody overtakes a waiter.
    """

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self._lock = threading.Lock()
        self._queue: deque[threading.Lock] = deque()  # one locked lock per waiter
        self._taken = False

    def enter(self) -> bool:
        with self._lock:
            if not self._taken:
                self._taken = True
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self._queue.append(waiter)
        if waiter.acquire(timeout=self.patience):
            return True  # handed over by leave()
        with self._lock:
            if waiter in self._queue:
                self._queue.remove(waiter)
                return False
        return True  # handed over between the timeout and the check

    def leave(self) -> None:
        with self._lock:
            if self._queue:
                self._queue.popleft().release()  # the turn passes on, never freed between
            else:
                self._taken = False


class _Server(ThreadingHTTPServer):
    """Thread per connection, at most `max_connections` of them; the rest get a quick 503."""

    daemon_threads = True
    request_queue_size = 128
    api: Api

    def __init__(self, addr: tuple[str, int], handler: type[_Handler],
                 max_connections: int) -> None:
        self.slots = threading.BoundedSemaphore(max_connections)
        self.turnstile = _Turnstile(TURN_PATIENCE)
        super().__init__(addr, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # dual stack: IPv4 callers arrive as ::ffff:a.b.c.d (hooks.py maps them back)
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self._busy(request)
            return
        try:
            threading.Thread(target=self._run, args=(request, client_address),
                             name="edgehook-http-conn", daemon=True).start()
        except RuntimeError:  # cannot start a thread: answer like a full server
            self.slots.release()
            self._busy(request)

    def _run(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def _busy(self, request: Any) -> None:
        self.api.stats.bump("rejected_connections")
        try:
            request.setblocking(False)
            try:
                request.recv(65536)  # whatever already arrived, so close() sends FIN not RST
            except OSError:
                pass
            body = b'{"error":"busy","detail":"too many connections; retry shortly"}'
            request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                         b"\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        _LOG.exception("http: connection from %s failed", client_address[0])


class HttpServer:
    """The HTTP listener bound to config's address, accepting in its own thread."""

    def __init__(self, host: str, port: int, api: Api, timeout: float = 5.0,
                 max_connections: int | None = None) -> None:
        max_connections = max_connections or api.max_connections
        handler = type("EdgehookHandler", (_Handler,), {"api": api, "timeout": timeout})
        server_cls = _Server
        if ":" in host:
            server_cls = type("V6Server", (_Server,), {"address_family": socket.AF_INET6})
        self.httpd = server_cls((host, port), handler, max_connections)
        self.httpd.api = api
        self.address = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def api(self) -> Api:
        return self.httpd.RequestHandlerClass.api  # type: ignore[attr-defined]

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
                    try:
                        self.httpd._handle_request_noblock()
                    except Exception:  # never let the accept loop die
                        _LOG.exception("http: accept failed")

    def set_api(self, api: Api) -> None:
        """Swap the routes' config snapshot (reload) as one reference; keep guards/stats."""
        api.adopt(self.api)
        self.httpd.RequestHandlerClass.api = api  # type: ignore[attr-defined]
        self.httpd.api = api

    def stop(self) -> None:
        """Stop accepting; requests in flight finish on their own threads."""
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(timeout=2)
            self._wake_r.close()
            self._wake_w.close()
        self.httpd.server_close()
