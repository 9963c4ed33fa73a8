"""Pure checks for inbound hooks: who may call, whether they proved it, how often, what they sent.

No sockets here: `api` reads the request and asks these functions, in this order
(cheapest and least revealing first; an unauthenticated caller learns nothing but 401):

    404 unknown hook -> 405 method -> 403 allow_from -> 413 size (before the body is read)
    -> 401 auth (token, or HMAC + timestamp) -> duplicate webhook-id -> 429 rate
    -> 415 encoding or type -> 400 body

The rate limit counts only authenticated requests, so a stranger flooding a hook with
bad signatures cannot lock its real caller out. A Standard Webhooks `webhook-id` is
remembered only once its event is stored (a 429, 400 or 503 answer leaves the id free,
so the sender's retry of the same delivery still gets through), together with that
answer's status and event id. A validly signed request that repeats a remembered id is
rejected with 409 `duplicate` naming the first one's event, and no second event is made
(see `api.Api.hook`).
"""

from __future__ import annotations

import ipaddress
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs

from .config import HookAuth, HookConfig
from .signing import verify_github, verify_standard

REPLAY_TTL = 600.0        # seconds a Standard Webhooks id is remembered (> 2 x the tolerance)
REPLAY_MAX = 100_000      # ids remembered at most (bounded memory; rate limits keep it far below)
MAX_JSON_DEPTH = 32       # deeper JSON bodies are 400 (templates and deep copies recurse)
MAX_FORM_FIELDS = 200
MAX_EVENT_HEADERS = 40    # headers copied into an event, at most
MAX_HEADER_VALUE = 512    # characters of each copied header value

# Never copied into an event (and so never into a log, outbound webhook or the status page).
_SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-edgehook-token",
    "webhook-signature", "x-hub-signature", "x-hub-signature-256", "x-signature",
    "x-api-key", "x-auth-token", "x-csrf-token",
})
_SECRET_WORDS = ("token", "secret", "signature", "password", "auth", "cookie", "session",
                 "api-key", "apikey")

ALLOWED_TYPES = ("application/json", "application/*+json",
                 "application/x-www-form-urlencoded", "text/*")


class HookError(Exception):
    """A refused hook request: HTTP status, short error word, a detail safe to show."""

    def __init__(self, status: int, error: str, detail: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


# ---------------------------------------------------------------------- addresses
@lru_cache(maxsize=1024)
def parse_client(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The caller's address; an IPv4-mapped IPv6 address (::ffff:a.b.c.d) becomes IPv4."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_allowed(addr: str, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
                   ) -> bool:
    """True when `nets` is empty or the address is in one of them (IPv4-mapped aware)."""
    nets = tuple(nets)
    if not nets:
        return True
    return _client_allowed(addr, nets)


@lru_cache(maxsize=256)
def _client_allowed(addr: str, nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
                    ) -> bool:
    # Cached: parsing the address costs more than the rest of a hook's checks, and a
    # hook is called again and again from the same few clients.
    ip = parse_client(addr)
    if ip is None:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv4Address):  # also match a ::ffff:0:0/96 style rule
        candidates.append(ipaddress.IPv6Address("::ffff:" + str(ip)))
    return any(c in n for n in nets for c in candidates if c.version == n.version)


def forwarded_client(peer: str, forwarded: Sequence[str] | None,
                     trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
                     ) -> tuple[str, bool]:
    """Who a request is from, behind trusted proxies: (address, X-Forwarded-For malformed).

    Only a peer inside `trusted` is believed. Its `X-Forwarded-For` (all such headers,
    in order) is walked right to left, past the trusted proxies, and the first address
    that is not one of them is the client: whatever the client itself wrote further
    left is never reached. When every hop is trusted the leftmost is the client. An
    entry that is not an address makes the whole header untrustworthy: the peer is
    the client then, and the second value says so (for a log line).
    """
    if not trusted or not forwarded or not _client_allowed(peer, trusted):
        return peer, False
    client = None
    for entry in reversed([e for value in forwarded for e in value.split(",")]):
        ip = _forwarded_address(entry.strip())
        if ip is None:
            return peer, True
        client = ip
        if not _client_allowed(ip, trusted):
            break
    return client or peer, False


def _forwarded_address(entry: str) -> str | None:
    """`192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1` or `[2001:db8::1]:4711` -> the address."""
    host, port = entry, None
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or rest[:1] not in ("", ":"):
            return None
        if rest:
            port = rest[1:]
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    if port is not None and not (port.isascii() and port.isdigit()):
        return None
    ip = parse_client(host) if host else None
    return str(ip) if ip is not None else None


# ---------------------------------------------------------------------- replay cache
@dataclass(frozen=True, slots=True)
class FirstAnswer:
    """How the first request with a webhook-id was answered (None: still being handled)."""

    status: int | None
    event_id: str | None


class ReplayCache:
    """Standard Webhooks ids accepted in the last `ttl` seconds; thread-safe, bounded.

    Each id keeps the status and event id it was answered with (:meth:`settle`), so a
    repeat of it can be answered the same way.
    """

    def __init__(self, ttl: float = REPLAY_TTL, max_size: int = REPLAY_MAX) -> None:
        self.ttl = ttl
        self.max_size = max_size
        # id -> (expiry, first answer), in insertion order
        self._seen: OrderedDict[str, tuple[float, FirstAnswer]] = OrderedDict()
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        while self._seen:
            oldest, (expiry, _) = next(iter(self._seen.items()))
            if expiry > now:
                break
            del self._seen[oldest]

    def seen(self, msg_id: str, now: float) -> bool:
        """True when the id was accepted within the ttl (a replay)."""
        return self.first(msg_id, now) is not None

    def first(self, msg_id: str, now: float) -> FirstAnswer | None:
        """How the id was first answered, when it was accepted within the ttl; else None."""
        with self._lock:
            self._prune(now)
            entry = self._seen.get(msg_id)
            return entry[1] if entry is not None else None

    def settle(self, msg_id: str, status: int, event_id: str) -> None:
        """Record the answer given to the request that added the id."""
        with self._lock:
            entry = self._seen.get(msg_id)
            if entry is not None:
                self._seen[msg_id] = (entry[0], FirstAnswer(status, event_id))

    def forget(self, msg_id: str) -> None:
        """Drop an id whose request was not taken after all (its retry must get through)."""
        with self._lock:
            self._seen.pop(msg_id, None)

    def add(self, msg_id: str, now: float) -> bool:
        """Remember an accepted id; False when it was already there (a concurrent replay).

        When full, the oldest id is forgotten early: with the rate limits in front of it
        that takes more accepted requests within `ttl` than any hook allows by default.
        """
        with self._lock:
            self._prune(now)
            if msg_id in self._seen:
                return False
            if len(self._seen) >= self.max_size:
                self._seen.popitem(last=False)
            self._seen[msg_id] = (now + self.ttl, FirstAnswer(None, None))
            return True

    def __len__(self) -> int:
        return len(self._seen)


# ---------------------------------------------------------------------- rate limit
class TokenBucket:
    """`capacity` requests at once, refilled at capacity/per per second; thread-safe."""

    def __init__(self, capacity: int, per: float, now: float | None = None) -> None:
        self.capacity = float(max(1, capacity))
        self.rate = self.capacity / per
        self.tokens = self.capacity
        self.stamp = time.monotonic() if now is None else now
        self._lock = threading.Lock()

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        with self._lock:
            if now > self.stamp:
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return 0.0
            return (1.0 - self.tokens) / self.rate


class HookGuards:
    """The state kept across requests and reloads: one replay cache, a bucket per hook."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.replay = ReplayCache()
        self.clock = clock
        self._buckets: dict[str, tuple[tuple[int, float], TokenBucket]] = {}
        self._lock = threading.Lock()

    def bucket(self, hook: HookConfig) -> TokenBucket:
        """The hook's bucket; a new one when its rate_limit changed (reload)."""
        key = (hook.rate_requests, hook.rate_per)
        with self._lock:
            have = self._buckets.get(hook.name)
            if have is None or have[0] != key:
                have = (key, TokenBucket(hook.rate_requests, hook.rate_per, self.clock()))
                self._buckets[hook.name] = have
            return have[1]

    def rate_check(self, hook: HookConfig) -> None:
        """Raise 429 with Retry-After when the hook's bucket is empty."""
        wait = self.bucket(hook).take(self.clock())
        if wait > 0:
            secs = max(1, math.ceil(wait))
            raise HookError(429, "rate_limited",
                            f"hook {hook.name}: more than {hook.rate_requests} requests per "
                            f"{hook.rate_per:g} s; retry in {secs} s", {"Retry-After": str(secs)})


# ---------------------------------------------------------------------- authentication
def _header_bytes(value: str) -> bytes:
    """A header value's bytes as sent (http.client decodes them as Latin-1)."""
    return value.encode("latin-1", "replace")


def bearer_token(headers: Mapping[str, str] | Any) -> str:
    """The token of `Authorization: Bearer <t>`, else of `X-Edgehook-Token`, else ''."""
    auth = headers.get("Authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return (headers.get("X-Edgehook-Token") or "").strip()


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of a token from a header with the configured one."""
    import hmac

    return hmac.compare_digest(_header_bytes(given), expected.encode("utf-8"))


_UNAUTHORIZED = "missing or invalid credentials"


def check_auth(auth: HookAuth, headers: Mapping[str, str] | Any, body: bytes, now: float
               ) -> str | None:
    """Raise 401 unless the request proves itself; return its Standard Webhooks id (else
    None), which the caller checks against the replay cache and remembers once accepted.

    The detail is the same for every failure: which part of a signature was wrong
    (timestamp, id, MAC) is logged by nobody and told to no one.
    """
    if auth.kind == "none":
        return None
    if auth.kind == "token":
        if auth.token and token_matches(bearer_token(headers), auth.token):
            return None
        raise HookError(401, "unauthorized", _UNAUTHORIZED,
                        {"WWW-Authenticate": 'Bearer realm="edgehook"'})
    signing = auth.signing
    if auth.kind == "hmac" and signing is not None:
        if signing.scheme == "github":
            ok = _safe(verify_github, signing.secrets, headers.get("X-Hub-Signature-256"), body)
            if ok:
                return None
        else:
            msg_id = headers.get("webhook-id")
            ok = _safe(verify_standard, signing.secrets, msg_id,
                       headers.get("webhook-timestamp"), headers.get("webhook-signature"),
                       body, time.time() if now is None else now)
            if ok and msg_id:
                return msg_id
    raise HookError(401, "unauthorized", _UNAUTHORIZED)


def _safe(fn: Callable[..., bool], *args: Any) -> bool:
    """A verifier that meets strange input (non-ASCII digits, surrogates) says False."""
    try:
        return bool(fn(*args))
    except (ValueError, TypeError, UnicodeError, OverflowError):
        return False


# ---------------------------------------------------------------------- bodies
def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """`text/plain; charset=latin-1` -> ("text/plain", {"charset": "latin-1"})."""
    if not content_type:
        return "", {}
    main, *rest = content_type.split(";")
    params = {}
    for p in rest:
        k, _, v = p.partition("=")
        if k.strip():
            params[k.strip().lower()] = v.strip().strip('"')
    return main.strip().lower(), params


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return False
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return True


def parse_json(body: bytes) -> Any:
    """Strict JSON (no NaN/Infinity, bounded depth); HookError 400 when malformed."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise HookError(400, "bad_request", "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HookError(400, "bad_request", f"malformed JSON: {_short(exc)}") from None
    if (body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH
            and not _depth_ok(value, MAX_JSON_DEPTH)):  # fewer brackets cannot nest deeper
        raise HookError(400, "bad_request", f"malformed JSON: nested deeper than "
                                            f"{MAX_JSON_DEPTH}")
    return value


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


def _flatten(fields: dict[str, list[str]]) -> dict[str, Any]:
    """{"a": ["1"], "b": ["1", "2"]} -> {"a": "1", "b": ["1", "2"]}."""
    return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}


def parse_query(query: str) -> dict[str, Any]:
    """A query string as a flat dict (400 on too many fields)."""
    if not query:
        return {}
    try:
        return _flatten(parse_qs(query, keep_blank_values=True,
                                 max_num_fields=MAX_FORM_FIELDS))
    except ValueError:
        raise HookError(400, "bad_request", f"more than {MAX_FORM_FIELDS} query fields") \
            from None


def check_encoding(headers: Any) -> None:
    """Raise 415 (with `Accept-Encoding: identity`) for a Content-Encoding other than
    identity: a gzipped body must not be read as if it were plain."""
    codings = [c.strip().lower() for value in headers.get_all("Content-Encoding", [])
               for c in value.split(",") if c.strip()]
    bad = [c for c in codings if c != "identity"]
    if bad:
        raise HookError(415, "unsupported_media_type",
                        f"Content-Encoding {bad[0][:40]} is not accepted; send the body "
                        "uncompressed", {"Accept-Encoding": "identity"})


def parse_body(content_type: str | None, body: bytes) -> Any:
    """The event's `body`: parsed JSON, form fields (dict) or text; 415 for other types.

    An empty body is `{}` whatever its Content-Type, JSON included, so `event.body.x`
    in a template is simply undefined: no body is no data, not malformed JSON. Home
    Assistant's rest_command with `content_type: application/json` and no `payload`
    sends exactly that, and the porch-light guide relies on it ("no body toggles").
    """
    if not body:
        return {}
    mtype, params = media_type(content_type)
    charset = params.get("charset", "utf-8")
    if mtype == "application/json" or (mtype.startswith("application/")
                                       and mtype.endswith("+json")):
        return parse_json(body)
    if mtype == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HookError(400, "bad_request", "form body is not UTF-8") from None
        try:
            return _flatten(parse_qs(text, keep_blank_values=True,
                                     max_num_fields=MAX_FORM_FIELDS))
        except ValueError:
            raise HookError(400, "bad_request",
                            f"more than {MAX_FORM_FIELDS} form fields") from None
    if mtype.startswith("text/"):
        try:
            return body.decode(charset, "replace")
        except LookupError:
            return body.decode("utf-8", "replace")
    hint = " (with curl: -d or --data-urlencode, not -F)" if mtype.startswith("multipart/") \
        else ""
    raise HookError(415, "unsupported_media_type",
                    "send Content-Type application/json, application/x-www-form-urlencoded "
                    "or text/plain" + (f", not {mtype[:80]}" if mtype else "") + hint)


@lru_cache(maxsize=512)
def _secret_header(key: str) -> bool:
    return key in _SECRET_HEADERS or any(w in key for w in _SECRET_WORDS)


def safe_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The headers a rule may see: lower-case names, no credentials or signatures."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if _secret_header(key):
            continue
        if key in out or len(out) >= MAX_EVENT_HEADERS:
            continue
        out[key] = value[:MAX_HEADER_VALUE]
    return out


@dataclass(frozen=True, slots=True)
class HookRequest:
    """What a hook handler saw, as handed to `event_data`."""

    client: str
    content_type: str | None
    query: dict[str, Any]
    headers: dict[str, str]
    body: Any


def event_data(req: HookRequest) -> dict[str, Any]:
    """The `data` of a hook.received event (SPEC: body, query, headers, content_type, remote)."""
    ip = parse_client(req.client)
    return {"body": req.body, "query": req.query, "headers": req.headers,
            "content_type": media_type(req.content_type)[0] or None,
            "remote": str(ip) if ip is not None else req.client}
