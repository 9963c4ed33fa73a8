"""HTTP for the sender, on urllib3: one request in, one :class:`Result` out, never an exception.

Each sender thread owns one :class:`Transport` (so one target's connections are
never shared): a ``urllib3.PoolManager`` holding one keep-alive connection per
origin, and a ``ProxyManager`` per proxy when the environment names one. On top of
urllib3 this module adds only what a webhook sender needs and urllib3 leaves to
its caller:

- **One deadline per attempt** and a cap on what an answer may send: the pools of
  metered.py hold every socket read and write to what is left of the attempt
  (a server that trickles a byte now and then cannot hold it for ever).
- **A stale keep-alive connection is retried once,** on a fresh connection, when the
  server dropped it just as the request went out (urllib3 retries a POST only if
  told to retry every error, which would also send a request twice after a fresh
  connection died). A fresh connection that dies is a failed attempt.
- **Interim 1xx answers are skipped** (``http.client`` skips only 100 Continue and
  would take a 102 or 103 for the answer).
- **Proxies from the environment exactly as requests reads them** (``HTTPS_PROXY``,
  ``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``, through ``requests.utils``), and
  per-target TLS files: a private CA (which then replaces the system store, as
  ``requests``' ``verify=`` and curl's ``--cacert`` do) and a client certificate.
  Without them, the system store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured),
  loaded once per process and only when an https:// target is used.
- **Credentials in the URL** (``https://user:pass@host/``) become HTTP Basic auth
  (percent-decoded) and are stripped from the URL before urllib3 sees it, so no
  request line, log line or error text can carry them. A configured
  ``Authorization`` header wins over them.
- **Redirects are not followed** (a 3xx is an answer; ``retry.classify`` says what it
  means), and the answer's body is read only up to ``MAX_RESPONSE`` (a larger one
  is not read: the status counts and the connection is dropped).

Error texts name the cause (``ConnectionRefusedError: ...``, ``timeout``, ``bad
response: ...``), never the URL: a Discord webhook URL is a credential.
"""

from __future__ import annotations

import base64
import functools
import http.client
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import LocationParseError, ProxyError, ProxySchemeUnknown
from urllib3.util import Retry, Timeout, make_headers, parse_url

from .metered import CURRENT, POOLS, Budget, MeteredSSLSocket, ResponseTooLarge

NUMPOOLS = 4           # origins (and so keep-alive connections) kept open per target
MAX_RESPONSE = 1 << 20  # larger response bodies are not read; the connection is dropped
HEAD_ROOM = 1 << 17     # bytes of status lines, headers and chunk framing allowed on top
ERROR_MAX = 300         # characters of an error text kept

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")  # what http.client refuses too
_BAD_VALUE_CHARS = re.compile(r"[\x00\r\n]")
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)
# What urllib3 makes of ``retries=False, redirect=False`` on every request
# (Retry.from_int), made once: a Retry is never changed (increment() makes a new one)
_NO_RETRIES = Retry(False, redirect=False)


@dataclass(frozen=True, slots=True)
class Result:
    """One attempt's result: `status` None when no HTTP answer came (`error` says why);
    `final` marks a request that can never succeed as written (a bad URL or header)."""

    status: int | None
    error: str | None = None
    retry_after: str | None = None
    final: bool = False


class TlsFiles(Protocol):
    """A target's TLS files (``config.WebhookTls``); each may be None."""

    ca_file: str | None
    cert_file: str | None
    key_file: str | None




# --------------------------------------------------------------------------- TLS contexts

_DEFAULT_TLS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}
_DEFAULT_TLS_LOCK = threading.Lock()


def _env_cert_paths() -> tuple[str | None, str | None]:
    return os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")


def default_context() -> ssl.SSLContext:
    """The system CA store with verification on, made once per process (and per
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``): reading the store costs tens of ms and
    MBs on a Pi, which a config with only http:// targets never pays."""
    key = _env_cert_paths()
    with _DEFAULT_TLS_LOCK:
        ctx = _DEFAULT_TLS.get(key)
        if ctx is None:
            ctx = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
            ctx.sslsocket_class = MeteredSSLSocket
            _DEFAULT_TLS[key] = ctx
        return ctx


def tls_context(tls: TlsFiles | None) -> ssl.SSLContext:
    """The context for a target's TLS files; OSError or ssl.SSLError when they won't load."""
    if tls is None or not (tls.ca_file or tls.cert_file):
        return default_context()
    if tls.ca_file:
        ctx = ssl.create_default_context(cafile=tls.ca_file)  # only this CA is trusted
    else:
        ctx = ssl.create_default_context()
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    ctx.sslsocket_class = MeteredSSLSocket
    return ctx


# --------------------------------------------------------------------------- URLs

@dataclass(frozen=True, slots=True)
class Target:
    """A webhook URL taken apart: the URL to request (no credentials) and the
    ``Authorization`` value its credentials make, if it had any."""

    url: str
    scheme: str
    host: str
    port: int
    authorization: str | None
    pool_host: str    # the host and request line as urllib3 makes them from `url`,
    request_uri: str  # so a direct request skips its per-request URL parsing


@functools.lru_cache(maxsize=64)  # a target sends to one URL, or a few (templates)
def parse_target(url: str) -> Target:
    """Split credentials off an http(s) URL; ValueError (quoting nothing) when unusable."""
    if _BAD_URL_CHARS.search(url):
        raise ValueError("invalid URL (control characters or spaces)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("invalid URL (a bad port or host)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the webhook URL is not http(s)://host/...")
    if port == 0:
        raise ValueError("invalid URL (a bad port or host)")
    userinfo, at, hostport = parts.netloc.rpartition("@")
    auth = None
    if at:
        user, _, password = userinfo.partition(":")
        pair = f"{unquote(user)}:{unquote(password)}".encode()
        auth = "Basic " + base64.b64encode(pair).decode("ascii")
    clean = parts._replace(netloc=hostport, fragment="").geturl()
    try:
        u = parse_url(clean)
    except LocationParseError:
        raise ValueError("invalid URL (the host name cannot be resolved as written)") from None
    return Target(clean, scheme, parts.hostname, port or (443 if scheme == "https" else 80),
                  auth, u.host or parts.hostname, u.request_uri)


@functools.lru_cache(maxsize=256)  # the same few names on every request (the config's)
def _is_token(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


def _check_request(method: str, headers: Mapping[str, str]) -> str | None:
    """Why the method or a header cannot go on the wire (quoting no value), or None.

    The values are checked at once, joined by a tab (which a value may hold); only
    when that finds something does :func:`_first_bad` go header by header for the
    reason (or find a Latin-1 value that is fine after all).
    """
    if not _is_token(method):
        return "invalid request: the method is not an HTTP token"
    values = "\t".join(headers.values())
    if (not all(_is_token(name) for name in headers) or _BAD_VALUE_CHARS.search(values)
            or not values.isascii()):
        return _first_bad(headers)
    return None


def _first_bad(headers: Mapping[str, str]) -> str | None:
    """The reason the first unusable header cannot go on the wire, or None."""
    for name, value in headers.items():
        if not _is_token(name) or _BAD_VALUE_CHARS.search(value):
            return "invalid request: a header name or value HTTP cannot carry"
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return "invalid request: a header value is not Latin-1"
    return None


# --------------------------------------------------------------------------- errors

def _root(exc: BaseException) -> BaseException:
    """The cause inside urllib3's wrappers (ProtocolError, SSLError, NewConnectionError...)."""
    for _ in range(8):
        if not isinstance(exc, Urllib3Error):
            return exc
        inner = next((a for a in exc.args if isinstance(a, BaseException)), None)
        inner = inner or getattr(exc, "original_error", None) or exc.__cause__ or exc.__context__
        if inner is None:
            return exc
        exc = inner
    return exc


def describe(exc: BaseException) -> str:
    """A short error text for last_error and the log (the cause, never the URL)."""
    root = _root(exc)
    if isinstance(root, TimeoutError | urllib3.exceptions.TimeoutError):
        return "timeout"  # (urllib3's NewConnectionError is one too, but has a cause)
    if isinstance(root, ResponseTooLarge):
        return "bad response: response too large"
    if isinstance(root, http.client.HTTPException | urllib3.exceptions.InvalidHeader |
                  urllib3.exceptions.ProtocolError) and not isinstance(root, _STALE):
        text = str(root) or type(root).__name__
        return f"bad response: {type(root).__name__}: {text}"[:ERROR_MAX]
    text = str(root) or type(root).__name__
    prefix = "proxy: " if isinstance(exc, ProxyError) else ""
    return f"{prefix}{type(root).__name__}: {text}"[:ERROR_MAX]


# --------------------------------------------------------------------------- the transport

def _environ_proxy(url: str) -> str | None:
    """The proxy for `url` as requests picks it from the environment, or None.

    requests (and its 4 MB) is imported only when some ``*_proxy`` variable is set:
    on Linux the environment is the only place requests looks, so without one the
    answer is "direct" either way.
    """
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return None
    from requests.utils import get_environ_proxies, prepend_scheme_if_needed, select_proxy

    proxy = select_proxy(url, get_environ_proxies(url))
    return prepend_scheme_if_needed(proxy, "http") if proxy else None


def _quiet_urllib3(record: logging.LogRecord) -> bool:
    """Drop urllib3's warning about a malformed response head: it quotes the request
    URL (a credential), and the attempt's own result says what went wrong."""
    return not str(record.msg).startswith("Failed to parse headers")


logging.getLogger("urllib3.connection").addFilter(_quiet_urllib3)


class Transport:
    """The HTTP client of one sender thread (one target): keep-alive pools, proxies, TLS."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self._tls = tls
        self._context: ssl.SSLContext | None = None
        self._managers: dict[str | None, urllib3.PoolManager] = {}  # by proxy URL
        self._routes: dict[tuple[str, str, int], str | None] = {}  # origin -> proxy
        # origin -> the direct manager's pool key for it, and the pool's settings
        # (see _direct_pool; cleared when the manager's settings change)
        self._pool_keys: dict[tuple[str, str, int], tuple[Any, dict[str, Any]]] = {}

    def configure(self, tls: TlsFiles | None) -> None:
        """Use these TLS files from now on (connections made with others are closed)."""
        if tls != self._tls:
            self.close()
            self._tls = tls

    def close(self) -> None:
        """Close every connection; the next request opens new ones."""
        for manager in self._managers.values():
            manager.clear()
        self._managers.clear()
        self._routes.clear()
        self._pool_keys.clear()
        self._context = None

    def _proxy_for(self, target: Target) -> str | None:
        """The proxy URL for this origin per the environment (requests' rules), cached:
        the environment of a running daemon does not change."""
        key = (target.scheme, target.host, target.port)
        if key not in self._routes:
            self._routes[key] = _environ_proxy(target.url)
        return self._routes[key]

    def _manager(self, proxy: str | None, https: bool) -> urllib3.PoolManager:
        manager = self._managers.get(proxy)
        if manager is None:
            kw: dict[str, Any] = {"num_pools": NUMPOOLS, "maxsize": 1, "block": False,
                                  "retries": False}
            if proxy is None:
                manager = urllib3.PoolManager(**kw)
            else:
                parts = urlsplit(proxy)
                userinfo, at, hostport = parts.netloc.rpartition("@")
                headers = None
                if at:
                    user, _, password = userinfo.partition(":")
                    headers = make_headers(
                        proxy_basic_auth=f"{unquote(user)}:{unquote(password)}")
                manager = urllib3.ProxyManager(parts._replace(netloc=hostport).geturl(),
                                               proxy_headers=headers, **kw)
            manager.pool_classes_by_scheme = POOLS  # type: ignore[assignment]
            self._managers[proxy] = manager
        if https and "ssl_context" not in manager.connection_pool_kw:
            if self._context is None:
                self._context = tls_context(self._tls)
            manager.connection_pool_kw["ssl_context"] = self._context
            self._pool_keys.clear()  # a pool key includes the manager's settings
        return manager

    def _direct_pool(self, manager: urllib3.PoolManager, target: Target) -> HTTPConnectionPool:
        """What ``manager.connection_from_host`` answers for the target's origin.

        That builds the pool's settings and normalises them into a pool key on every
        call, for a key that changes only with the manager's settings. The key is
        made here once per origin, as connection_from_host makes it, and the manager
        is asked by key: it still keeps its ``NUMPOOLS`` most recently used pools and
        makes a pool when it has none for the key.
        """
        origin = (target.scheme, target.pool_host, target.port)
        known = self._pool_keys.get(origin)
        if known is None:
            context = dict(manager.connection_pool_kw, scheme=target.scheme,
                           port=target.port, host=target.pool_host)
            known = (manager.key_fn_by_scheme[target.scheme](context), context)
            if len(self._pool_keys) >= 64:  # (a URL template could name many hosts)
                self._pool_keys.clear()
            self._pool_keys[origin] = known
        key, context = known
        return manager.connection_from_pool_key(key, dict(context))  # (a new pool takes
        # its settings from the dict and empties it)

    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes,
             timeout: float) -> Result:
        """One request; `timeout` bounds all of it (connect, TLS, write, the whole answer)."""
        try:
            target = parse_target(url)
        except ValueError as exc:
            return Result(None, str(exc), final=True)
        why = _check_request(method, headers)
        if why is not None:
            return Result(None, why, final=True)
        out = {k: v for k, v in headers.items()
               if k.lower() not in ("content-length", "transfer-encoding")}
        if target.authorization and not any(k.lower() == "authorization" for k in out):
            out["Authorization"] = target.authorization
        try:
            proxy = self._proxy_for(target)
            manager = self._manager(proxy, target.scheme == "https")
        except (OSError, ssl.SSLError, ValueError, ProxySchemeUnknown) as exc:
            where = "proxy" if isinstance(exc, ProxySchemeUnknown | ValueError) else "TLS files"
            return Result(None, f"{where}: {type(exc).__name__}: {exc}"[:ERROR_MAX])
        budget = Budget(time.monotonic() + timeout, MAX_RESPONSE + HEAD_ROOM)
        CURRENT.budget = budget
        try:
            for _ in range(2):
                budget.opened = False
                try:
                    return self._exchange(manager, proxy, method, target, out, body, budget)
                except _StaleConnection:
                    continue  # the server dropped an idle keep-alive connection: once more
            return Result(None, "connection closed by the server")  # pragma: no cover
        finally:
            CURRENT.budget = None

    def _exchange(self, manager: urllib3.PoolManager, proxy: str | None, method: str,
                  target: Target, headers: dict[str, str], body: bytes,
                  budget: Budget) -> Result:
        left = max(budget.deadline - time.monotonic(), 0.001)
        kw: dict[str, Any] = {"body": body, "headers": headers, "redirect": False,
                              "retries": _NO_RETRIES, "preload_content": False,
                              "decode_content": False, "timeout": Timeout(connect=left,
                                                                          read=left)}
        try:
            if proxy is None:  # straight to the origin's pool: what PoolManager.urlopen
                # does after parsing the URL again, which parse_target did once
                pool = self._direct_pool(manager, target)
                resp = pool.urlopen(method, target.request_uri, assert_same_host=False, **kw)
            else:
                resp = manager.urlopen(method, target.url, **kw)
        except LocationParseError:
            return Result(None, "invalid URL (the host name cannot be resolved as written)",
                          final=True)
        except (Urllib3Error, OSError, http.client.HTTPException) as exc:
            if isinstance(_root(exc), _STALE) and not budget.opened:
                raise _StaleConnection() from exc
            return Result(None, describe(exc))
        status, retry_after = resp.status, resp.headers.get("Retry-After")
        keep = False
        try:
            length = resp.headers.get("Content-Length", "").strip()
            if not (length.isdigit() and int(length) > MAX_RESPONSE
                    and method != "HEAD" and status not in (204, 304)):
                keep = _read_body(resp)
        except (Urllib3Error, OSError, http.client.HTTPException) as exc:
            if not isinstance(_root(exc), ResponseTooLarge):
                return Result(None, describe(exc))
        finally:
            if not keep:
                resp.close()  # and its connection: what is left of the body stays unread
            resp.release_conn()
        return Result(status, None, retry_after)


def _read_body(resp: urllib3.BaseHTTPResponse) -> bool:
    """Read the body to its end and throw it away: True when it was all read (the
    connection can be reused), False when it is larger than ``MAX_RESPONSE``. Reads
    until urllib3 says the body is done, so a body cut short is an error; a body of
    a known length is done once that many bytes came (no read just to hear so)."""
    total = 0
    while True:
        chunk = resp.read(MAX_RESPONSE + 1 - total, decode_content=False)
        if not chunk:
            return True
        total += len(chunk)
        if total > MAX_RESPONSE:
            return False
        if resp.length_remaining == 0:
            return True


class _StaleConnection(Exception):
    """A reused keep-alive connection died under the request: make it again."""
