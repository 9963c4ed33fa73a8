"""The routes of the HTTP API: hooks, REST API, health, metrics and the status page.

No sockets here: `http_server` hands each parsed request to :meth:`Api.handle` and
writes the :class:`~edgehook.routing.Response` it gets back. One `Api` holds one
config snapshot; a reload builds a new one and swaps it in whole, keeping the replay
cache, the rate-limit buckets and the counters of the old one (:meth:`Api.adopt`).

Who a request is from: the socket's peer, unless the peer is in `http.trusted_proxies`;
then the address its `X-Forwarded-For` names (hooks.forwarded_client). That address is
what `allow_from` judges and what the logs and a hook's `event.data.remote` show.
Without trusted proxies the header is ignored, so nobody can claim another address.

A hook is acknowledged only once it is durable: whatever `respond:` says, the answer
waits (at most `SYNC_WAIT`) until the event's webhooks are committed to the outbox.
202 means stored; 503 means not taken, retry (busy: not stored in time; storage
unavailable: the outbox could not store it; overloaded: the event queue was full).

A Standard Webhooks `webhook-id` already taken is rejected (SPEC): a validly signed
repeat gets 409 `duplicate`, naming the event the first one made, and nothing is
stored or run again. Not 401: the credentials are fine, and a sender that lost the
first 2xx can tell from the answer that its delivery did arrive. While the first is
still being handled, the repeat gets 503 busy (retry); when the first was not taken
(503), its id is forgotten, so the repeat is handled as new.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from typing import Any, Protocol
from urllib.parse import unquote

from .config import HookConfig, parse_duration
from .errors import CommandError
from .events import make_event
from .hooks import (
    FirstAnswer,
    HookError,
    HookGuards,
    HookRequest,
    check_auth,
    check_encoding,
    client_allowed,
    event_data,
    forwarded_client,
    parse_body,
    parse_query,
    safe_headers,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import HttpStats, daemon_families, render
from .routing import HttpError, Request, Response, Router, error_response
from .status_page import event_summary, login_page, status_page
from .webauth import LOGIN_ERRORS, WebAuth

_LOG = logging.getLogger(__name__)

SYNC_WAIT = 5.0             # seconds a hook waits for its event to be stored (and run)
BUSY_RETRY_AFTER = 5        # Retry-After of a hook not stored within SYNC_WAIT
STORAGE_RETRY_AFTER = 30    # Retry-After when the outbox cannot store
MAX_DURATION = 7 * 86400.0  # the longest `for:` the API accepts
LOG_THROTTLE = 10.0         # seconds between two log lines about refused requests of one kind
RECENT_DEAD = 5             # dead deliveries shown on the status page

Networks = tuple[Any, ...]  # ipaddress networks, as config.HttpConfig.trusted_proxies


class ApiBackend(Protocol):
    """What the HTTP side needs from the daemon (app.py implements it)."""

    def state(self) -> dict[str, Any]: ...
    def health(self) -> tuple[bool, dict[str, Any]]: ...
    def set_output(self, name: str, state: str, duration: float | None) -> dict[str, Any]: ...
    def simulate(self, name: str, action: str) -> None: ...
    def outbox_list(self, status: str | None) -> list[dict[str, Any]]: ...
    def outbox_retry(self, item_id: int) -> str | bool: ...
    def outbox_retry_dead(self) -> int: ...
    def outbox_purge(self) -> int: ...
    def outbox_drop(self, item_id: int) -> bool: ...
    def outbox_drop_target(self, name: str) -> int: ...
    def submit(self, event: Any, wait: float) -> Any: ...
    def recent_events(self) -> list[dict[str, Any]]: ...
    def metrics(self) -> dict[str, Any]: ...


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
                 max_connections: int = 32, trusted_proxies: Networks = ()) -> None:
        self.backend = backend
        self.max_connections = max_connections
        self.max_body = max_body
        self.hooks = dict(hooks or {})
        self.trusted_proxies = tuple(trusted_proxies)
        self.guards = guards or HookGuards()
        self.stats = stats or HttpStats()
        self.auth = WebAuth(api_token)
        self._throttle = _Throttle()
        self._warned_forwarded = threading.Event()
        self.router = r = Router()
        r.add("GET", "/", self.page)
        r.add("POST", "/login", self.auth.login)
        r.add("POST", "/logout", self.auth.logout)
        r.add("GET", "/healthz", self.healthz)
        r.add("GET", "/metrics", self.metrics)
        r.add("*", "/hooks/(?P<name>[^/]{1,200})", self.hook)
        r.add("GET", "/api/v1/state", self.state)
        r.add("GET", "/api/v1/events", self.events)
        r.add("PUT", "/api/v1/outputs/(?P<name>[^/]+)", self.put_output)
        r.add("POST", "/api/v1/inputs/(?P<name>[^/]+)/simulate", self.simulate)
        r.add("GET", "/api/v1/outbox", self.outbox)
        r.add("DELETE", "/api/v1/outbox", self.outbox_delete)
        r.add("POST", "/api/v1/outbox/retry", self.outbox_retry_dead)
        r.add("DELETE", "/api/v1/outbox/(?P<item>[0-9]{1,15})", self.outbox_drop)
        r.add("POST", "/api/v1/outbox/(?P<item>[0-9]{1,15})/retry", self.outbox_retry)

    @property
    def api_token(self) -> str | None:
        """The configured api_token (None: the API is open to loopback Hosts)."""
        return self.auth.api_token

    def adopt(self, old: Api) -> None:
        """Keep the replay cache, rate buckets and stats of the Api this one replaces."""
        self.guards = old.guards
        self.stats = old.stats
        self.auth.login_bucket = old.auth.login_bucket
        if old._warned_forwarded.is_set():
            self._warned_forwarded.set()

    # -------------------------------------------------------------- entry
    def handle(self, req: Request) -> Response:
        """Route one request; HttpError (or HookError) becomes its JSON answer."""
        req.client = self.client_of(req)
        try:
            handler, params = self.router.resolve(req.method, req.path)
            req.params = params
            return handler(req)
        except (HttpError, HookError) as exc:
            return error_response(exc)

    def client_of(self, req: Request) -> str:
        """The request's client: the peer, or the address a trusted proxy forwarded."""
        if not self.trusted_proxies:
            return req.peer
        client, malformed = forwarded_client(
            req.peer, req.headers.get_all("X-Forwarded-For"), self.trusted_proxies)
        if malformed and not self._warned_forwarded.is_set():
            self._warned_forwarded.set()
            _LOG.warning("http: malformed X-Forwarded-For from trusted proxy %s; using the "
                         "proxy's address (logged once)", req.peer)
        return client

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
            msg_id = check_auth(hook.auth, req.headers, body, now)
            first = self.guards.replay.first(msg_id, now) if msg_id is not None else None
            if first is not None:
                return self._duplicate(name, first)
            self.guards.rate_check(hook)
            check_encoding(req.headers)
            ctype = req.headers.get("Content-Type")
            parsed = parse_body(ctype, body)
            query = parse_query(req.raw_query)
            if msg_id is not None and not self.guards.replay.add(msg_id, now):
                return self._duplicate(name, self.guards.replay.first(msg_id, now))
        except HookError as exc:
            self._throttle.log(f"{name}:{exc.status}", "hook %s: %d %s from %s", name,
                               exc.status, exc.error, req.client)
            return error_response(exc)
        data = event_data(HookRequest(client=req.client, content_type=ctype, query=query,
                                      headers=safe_headers(req.headers.items()), body=parsed))
        event = make_event("hook.received", name, data)
        resp = None
        try:
            resp = self._run_hook(hook, name, event, req.client)
        finally:
            if msg_id is not None:
                if resp is not None and resp.status < 500:
                    self.guards.replay.settle(msg_id, resp.status, event.id)
                else:  # not taken: the sender's retry must be handled as new
                    self.guards.replay.forget(msg_id)
        return resp

    def _duplicate(self, name: str, first: FirstAnswer | None) -> Response:
        """The answer to a repeated webhook-id: 409, naming the first one's event."""
        if first is None or first.status is None:
            return _unavailable("busy", "the first request with this webhook-id is still "
                                "being handled; retry", None, 1)
        _LOG.info("hook %s: duplicate webhook-id of event %s: not stored again", name,
                  first.event_id)
        return Response(409, {"error": "duplicate", "event_id": first.event_id,
                              "detail": f"this webhook-id was already received (event "
                                        f"{first.event_id}, answered {first.status}); "
                                        "not stored again"})

    def _run_hook(self, hook: HookConfig, name: str, event: Any, client: str) -> Response:
        """Submit the hook's event and answer as `respond:` says, once it is durable."""
        reply = self.backend.submit(event, wait=SYNC_WAIT)
        refused = self._not_taken(name, event.id, reply)
        if refused is not None:
            return refused
        if hook.respond != "sync":
            _LOG.info("hook %s: event %s stored (from %s)", name, event.id, client)
            return Response(202, {"event_id": event.id})
        body_out = {"event_id": event.id, "rules": list(reply.fired),
                    "results": list(reply.results), "errors": list(reply.errors)}
        if reply.errors and not reply.results:
            return Response(409, {"error": "action_failed", "detail": "; ".join(reply.errors),
                                  **body_out})
        return Response(200, body_out)

    def _not_taken(self, name: str, event_id: str, reply: Any) -> Response | None:
        """The 503 for an event that is not durable (see the module docstring), else None."""
        if reply is None or not reply.done.is_set():
            self._throttle.log(f"{name}:busy", "hook %s: event %s not stored within %g s: "
                               "503", name, event_id, SYNC_WAIT)
            return _unavailable("busy", f"event not stored within {SYNC_WAIT:g} s; retry",
                                event_id, BUSY_RETRY_AFTER)
        if any(e.startswith("dropped:") for e in reply.errors):
            return _unavailable("overloaded", "event queue full", event_id, 1)
        store_error = reply.store_error
        if store_error:
            self._throttle.log(f"{name}:storage", "hook %s: event %s not stored (%s): 503",
                               name, event_id, store_error)
            return _unavailable("storage_unavailable", f"the event's webhooks could not be "
                                f"stored: {store_error}", event_id, STORAGE_RETRY_AFTER)
        return None

    # -------------------------------------------------------------- health, metrics
    def healthz(self, req: Request) -> Response:
        """GET /healthz: 200 or 503, with what the backend found."""
        ok, detail = self.backend.health()
        status = detail.pop("status", None) or ("ok" if ok else "unhealthy")
        return Response(200 if ok else 503, {"status": status, **detail})

    def metrics(self, req: Request) -> Response:
        """GET /metrics: the daemon's and the HTTP server's families."""
        self.auth.require(req)
        families = daemon_families(self.backend.metrics())
        families.extend(self.stats.families())
        return Response(200, render(families), content_type=METRICS_CONTENT_TYPE)

    # -------------------------------------------------------------- API
    def state(self, req: Request) -> Response:
        """GET /api/v1/state."""
        self.auth.require(req)
        return Response(200, self.backend.state())

    def events(self, req: Request) -> Response:
        """GET /api/v1/events?limit=N: the last events and what each rule did."""
        self.auth.require(req)
        raw = (req.query.get("limit") or ["50"])[0]
        limit = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 5 else 50
        items = self.backend.recent_events()[:max(0, limit)]
        return Response(200, {"items": [{**e, "summary": event_summary(e)} for e in items]})

    def put_output(self, req: Request) -> Response:
        """PUT /api/v1/outputs/<name> {"state", "for"}."""
        self.auth.require(req)
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
        try:
            return Response(200, self.backend.set_output(req.params["name"], state,
                                                         duration or None))
        except KeyError:
            raise HttpError(404, "not_found", "no such output") from None
        except CommandError as exc:
            raise HttpError(409, "refused", str(exc)) from None

    def simulate(self, req: Request) -> Response:
        """POST /api/v1/inputs/<name>/simulate {"action"}: 409 unless the pins are mock."""
        self.auth.require(req)
        body = req.json()
        action = str(body.get("action", "")) if isinstance(body, dict) else ""
        if action not in ("press", "release", "click", "hold"):
            raise HttpError(400, "bad_request", "action must be press, release, click or hold")
        try:
            self.backend.simulate(req.params["name"], action)
        except KeyError:
            raise HttpError(404, "not_found", "no such input") from None
        except CommandError as exc:
            raise HttpError(409, "conflict", str(exc)) from None
        return Response(200, {"name": req.params["name"], "action": action})

    def outbox(self, req: Request) -> Response:
        """GET /api/v1/outbox?status=...: the rows as the backend lists them."""
        self.auth.require(req)
        status = (req.query.get("status") or [None])[0]
        if status not in (None, "pending", "dead", "delivered"):
            raise HttpError(400, "bad_request", "status must be pending, dead or delivered")
        return Response(200, {"items": self.backend.outbox_list(status)})

    def outbox_retry(self, req: Request) -> Response:
        """POST /api/v1/outbox/<id>/retry: the row is pending again, same webhook-id;
        `was` says whether it was dead (queued again) or pending (made due now)."""
        self.auth.require(req)
        item = int(req.params["item"])
        outcome = self.backend.outbox_retry(item)
        if outcome is True or outcome in ("queued", "due"):
            return Response(200, {"id": item, "status": "pending",
                                  "was": "pending" if outcome == "due" else "dead"})
        if outcome == "delivered":
            raise HttpError(409, "already_delivered", f"delivery {item} was delivered already")
        if outcome == "no_target":
            target = self._target_of(item)
            raise HttpError(409, "target_gone", f"target {target} is not in the config; fix "
                                                "the config or drop the row")
        raise HttpError(404, "not_found", "no delivery with that id")

    def _target_of(self, item: int) -> str:
        """The target a row names, for an error message (its id when not listed)."""
        for status in ("dead", "pending"):
            for row in self.backend.outbox_list(status):
                if row.get("id") == item and row.get("target"):
                    return str(row["target"])
        return f"of delivery {item}"

    def outbox_retry_dead(self, req: Request) -> Response:
        """POST /api/v1/outbox/retry: every dead delivery again."""
        self.auth.require(req)
        return Response(200, {"retried": self.backend.outbox_retry_dead()})

    def outbox_drop(self, req: Request) -> Response:
        """DELETE /api/v1/outbox/<id>: delete one row, whatever its status."""
        self.auth.require(req)
        item = int(req.params["item"])
        if not self.backend.outbox_drop(item):
            raise HttpError(404, "not_found", "no delivery with that id")
        return Response(200, {"dropped": 1, "id": item})

    def outbox_delete(self, req: Request) -> Response:
        """DELETE /api/v1/outbox?target=NAME (that target's rows) or ?status=dead (purge)."""
        self.auth.require(req)
        target = (req.query.get("target") or [""])[0]
        status = (req.query.get("status") or [None])[0]
        if target and status is None:
            return Response(200, {"dropped": self.backend.outbox_drop_target(target),
                                  "target": target})
        if status == "dead" and not target:
            return Response(200, {"purged": self.backend.outbox_purge()})
        raise HttpError(400, "bad_request", "give ?target=NAME (drop that target's rows) or "
                                            "?status=dead (purge dead rows)")

    # -------------------------------------------------------------- status page
    def page(self, req: Request) -> Response:
        """GET /: the status page, or the login form when a token is set and not given."""
        self.auth.check_origin(req)
        if not self.auth.authorized(req):
            why = (req.query.get("login") or [""])[0]
            return _html(login_page(LOGIN_ERRORS.get(why)))
        state = self.backend.state()
        events = [{**e, "summary": event_summary(e)} for e in self.backend.recent_events()[:50]]
        dead = self.backend.outbox_list("dead")[:RECENT_DEAD]
        pending = self.backend.outbox_list("pending")[:RECENT_DEAD]
        nonce = secrets.token_urlsafe(16)
        logout = self.api_token is not None and req.headers.get("Authorization") is None
        return _html(status_page(state, events, dead, nonce, logout, pending), nonce)


def _unavailable(error: str, detail: str, event_id: str | None, retry_after: int
                 ) -> Response:
    body = {"error": error, "detail": detail}
    if event_id is not None:
        body["event_id"] = event_id
    return Response(503, body, headers={"Retry-After": str(retry_after)})


def _html(text: str, nonce: str | None = None) -> Response:
    src = f"'nonce-{nonce}'" if nonce else "'none'"
    csp = (f"default-src 'none'; script-src {src}; style-src 'nonce-{nonce or 'login'}'; "
           "connect-src 'self'; img-src data:; form-action 'self'; base-uri 'none'; "
           "frame-ancestors 'none'")
    # Referrer-Policy same-origin, not no-referrer: with no-referrer Chromium sends
    # `Origin: null` on the login form's POST, which the origin check must refuse.
    return Response(200, text, "text/html; charset=utf-8", headers={
        "Content-Security-Policy": csp, "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"})
