"""The sender: outbox rows -> signed HTTP requests, with backoff, in order per target.

One thread per target. It keeps that target's deliveries in order (the head of the
queue goes first; a row that is backing off holds back the rows behind it), and a
black-holed or failing target only ever stalls its own thread. Each thread owns one
keep-alive connection and speaks HTTP/1.1 on it itself (``_Connection``): on this
hot path ``requests`` costs 0.5-0.7 ms CPU per POST, ``http.client`` with keep-alive
75 us and our own request writer and response reader 12 us (issue 6), and the
delivery rate of a Pi Zero is that CPU. Measured in the peer benchmark: with
``http.client`` a 5,000-message burst ran at 1.98x the bare loop and 1.30x
Node-RED, with this reader 2.6-2.9x and 1.8-2.1x (the targets are 2.0x and 1.5x).
No maintained library offers a cheaper blocking keep-alive client, so this one
is ours, kept to what a webhook POST needs and tested on its own
(tests/test_http_client.py).

Idle costs nothing: a thread sleeps on an ``Event`` until it is woken (new rows,
a retry, a reload) or the head row is due, with no timeout otherwise. Nothing else
writes the queue behind its back: the CLI's retries and purges go through the
daemon's API while it runs (and say so, pointing at a reload, when the API does not
answer). A sleeping thread counts as alive for :meth:`Sender.heartbeat_age`: it is
waiting for work, not stuck in it.

Rows carry the rendered URL, headers and body; signing secrets are applied at send
time from the target's current config and are never stored, logged or echoed. Logs
name the target and the webhook-id, never the URL (a Discord URL is a credential).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import os
import random
import re
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC
from typing import Protocol
from urllib.parse import urlsplit

from . import __version__
from .config import Signing, WebhookConfig
from .errors import EdgehookError
from .signing import sign_github, standard_headers

_LOG = logging.getLogger(__name__)

BACKOFF_FIRST = (1.0, 5.0)  # the first retry comes within this window (seconds)
BACKOFF_CAP = 300.0         # no wait between attempts is longer than this
BATCH = 50                  # rows claimed at once (and marked delivered in one commit)
LEASE = 300.0               # a claim's lease; only a dead thread's rows ever wait it out
INBOX_MAX = 256             # rows handed over in memory beyond this are read back instead
ERROR_PAUSE = 1.0           # after an outbox error (disk full), wait this long, doubling
MAX_RESPONSE = 1 << 20      # larger response bodies are not read; the connection is dropped
EARLY_MAX = 16384           # a request larger than this is never written early (_Early)
USER_AGENT = f"edgehook/{__version__}"
RETRY_STATUSES = frozenset({408, 429})
RETRY_AFTER_STATUSES = frozenset({429, 503})

Outcome = str  # 'delivered' | 'retry' | 'dead'
ResultCallback = Callable[[str, Outcome, "int | None", float], None]


class RowLike(Protocol):
    """What the sender reads from a claimed outbox row."""

    id: int
    webhook_id: str
    target: str
    url: str
    method: str
    headers: dict[str, str]
    body: bytes
    content_type: str
    attempts: int
    max_attempts: int
    deadline: float


class OutboxLike(Protocol):
    """The part of the outbox the sender uses (typed here: edges never import each other)."""

    def claim(self, target: str, limit: int, now: float, lease: float) -> Sequence[RowLike]: ...
    def release(self, ids: Sequence[int]) -> None: ...
    def next_due(self, target: str) -> float | None: ...
    def mark_delivered(self, ids_with_status: Sequence[tuple[int, int]], now: float) -> None: ...
    def mark_retry(self, id: int, now: float, next_at: float, error: str,
                   status: int | None) -> None: ...
    def mark_dead(self, id: int, now: float, error: str, status: int | None, *,
                  attempted: bool = True) -> None: ...
    def mark_target_dead(self, target: str, now: float, error: str) -> int: ...
    def targets_with_pending(self) -> set[str]: ...


# --------------------------------------------------------------------------- pure policy

def next_delay(attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 = the first attempt).

    Exponential backoff with jitter over the whole window: the first retry lands
    uniformly within ``BACKOFF_FIRST``, each later window doubles, and nothing
    exceeds ``BACKOFF_CAP``. A server's ``Retry-After`` replaces the computed wait
    (capped the same way), since the server knows better than our guess.
    """
    if retry_after is not None:
        return min(max(retry_after, 0.0), BACKOFF_CAP)
    factor = 2.0 ** min(max(attempt, 1) - 1, 32)
    high = min(BACKOFF_FIRST[1] * factor, BACKOFF_CAP)
    low = min(BACKOFF_FIRST[0] * factor, high)
    return low + (high - low) * rng.random()


def parse_retry_after(value: str | None, now: float) -> float | None:
    """A `Retry-After` header (delta seconds or an HTTP date) as seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def classify(status: int) -> Outcome:
    """What an HTTP status means for a delivery: delivered, retry, or dead (final)."""
    if 200 <= status < 300:
        return "delivered"
    if status in RETRY_STATUSES or status >= 500:
        return "retry"
    return "dead"


def sign_headers(signing: Signing | None, webhook_id: str, body: bytes,
                 now: float) -> dict[str, str]:
    """Signature headers for one attempt from the target's `Signing` (or none)."""
    if signing is None:
        return {}
    scheme, secrets = signing.scheme, signing.secrets
    if not secrets:
        return {}
    if scheme == "standard":
        return standard_headers(secrets, webhook_id, int(now), body)
    if scheme == "github":
        # GitHub's header has room for one signature: the first (newest) secret signs.
        return {"X-Hub-Signature-256": sign_github(secrets[0], body)}
    raise EdgehookError(f"unknown signing scheme {scheme!r}")


def _request_headers(row: RowLike, cfg: WebhookConfig, now: float) -> dict[str, str]:
    """The headers of one attempt at `row`, signed; EdgehookError on a bad secret."""
    headers = dict(row.headers)
    headers["Content-Type"] = row.content_type
    headers["User-Agent"] = USER_AGENT
    headers["webhook-id"] = row.webhook_id
    headers.update(sign_headers(cfg.signing, row.webhook_id, row.body, now))
    return headers


# --------------------------------------------------------------------------- transport

class _Attempt:
    """The result of one HTTP attempt; `final` marks a request that can never succeed."""

    __slots__ = ("status", "error", "retry_after", "final")

    def __init__(self, status: int | None, error: str | None,
                 retry_after: str | None = None, final: bool = False) -> None:
        self.status = status
        self.error = error
        self.retry_after = retry_after
        self.final = final


class _ProtocolError(Exception):
    """The server's answer is not HTTP/1.x as we can read it."""


class RemoteDisconnected(ConnectionError):
    """The server closed the connection before a response started."""


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")  # what http.client refuses too
_BAD_VALUE_CHARS = re.compile(r"[\x00\r\n]")
_HEAD_MAX = 65536           # response status line + headers larger than this are refused
_READ = 65536


class _Connection:
    """One keep-alive HTTP/1.1 connection of one sender thread, re-made when the origin changes.

    A small hand-written HTTP/1.1 client over a (TLS) socket rather than
    ``http.client``: one ``sendall`` per request and a response reader that only
    splits the status line and headers. Measured with the same keep-alive POST to the
    peer benchmark's receiver: 12 us of CPU per request against 75 us for
    ``http.client`` (whose header parsing goes through the email package), which is
    a quarter of the CPU of a whole MQTT -> webhook delivery. It speaks exactly what
    a webhook POST needs: Content-Length request bodies; responses with
    Content-Length, chunked or read-to-close bodies, 1xx interim responses skipped,
    ``Connection: close`` and HTTP/1.0 honoured.
    """

    def __init__(self, tls: Callable[[], ssl.SSLContext]) -> None:
        self._tls = tls  # made on the first https:// connection (see Sender.tls_context)
        self._sock: socket.socket | None = None
        self._origin: tuple[str, str, int] | None = None
        self._heads: dict[tuple[str, str], tuple[tuple[str, str, int], bytes]] = {}

    def _head(self, method: str, url: str) -> tuple[tuple[str, str, int], bytes, bytes]:
        """The origin, the request line and the Host header line of (method, url), cached."""
        key = (method, url)
        hit = self._heads.get(key)
        if hit is None:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("the webhook URL is not http(s)://host/...")
            default = 443 if scheme == "https" else 80
            try:
                port = default if parts.port is None else parts.port
            except ValueError:
                raise _InvalidURL() from None
            if port == 0:
                raise _InvalidURL()
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.hostname
            if _BAD_URL_CHARS.search(path) or _BAD_URL_CHARS.search(host) or \
                    not _TOKEN.fullmatch(method):
                raise _InvalidURL()
            try:
                ipaddress.ip_address(host)
                host_header = host.encode("ascii")
            except ValueError:  # a name: IDNA also refuses empty or over-long labels
                try:
                    host_header = host.encode("idna")
                except UnicodeError:
                    raise _InvalidURL() from None
            if b":" in host_header:
                host_header = b"[" + host_header + b"]"  # an IPv6 literal
            if port != default:
                host_header += b":%d" % port
            try:
                line = f"{method} {path} HTTP/1.1\r\n".encode("ascii")
            except UnicodeEncodeError:
                raise _InvalidURL() from None
            hit = ((scheme, host, port), line, b"Host: " + host_header + b"\r\n")
            if len(self._heads) >= 64:
                self._heads.clear()
            self._heads[key] = hit
        return hit

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _open(self, origin: tuple[str, str, int], timeout: float) -> socket.socket:
        scheme, host, port = origin
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = self._tls().wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self._sock, self._origin = sock, origin
        return sock

    def prepare(self, method: str, url: str, headers: dict[str, str],
                body: bytes) -> tuple[tuple[str, str, int], bytes] | _Attempt:
        """(origin, the request's bytes), or the final attempt when it cannot be sent."""
        try:
            origin, line, host = self._head(method, url)
            return origin, line + _encode_headers(headers, len(body), host) + body
        except _InvalidURL:  # http.client's text quotes the URL, which may hold a token
            return _Attempt(None, "invalid URL (control characters or a bad port)",
                            final=True)
        except ValueError as exc:  # a header value with a newline, a non-Latin-1 value...
            if "not http(s)" in str(exc):
                return _Attempt(None, str(exc), final=True)
            return _Attempt(None, f"invalid request ({type(exc).__name__}): a header or"
                            " the URL cannot be sent as HTTP", final=True)

    def write_early(self, origin: tuple[str, str, int], request: bytes) -> int | None:
        """Start `request` on the open keep-alive connection without ever blocking
        (called by the storing thread, see :class:`_Early`): the bytes the socket
        took (0 when it is broken), or None when there is no idle open connection
        to `origin` to write on. :meth:`finish` then writes the rest and reads the
        response."""
        sock = self._sock
        if sock is None or self._origin != origin or len(request) > EARLY_MAX:
            return None
        try:
            # readable while idle: the server closed it (a keep-alive timeout) or
            # wrote unasked; either way the thread makes a fresh connection itself
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if poller.poll(0):
                return None
            sock.settimeout(0.0)
            sent = sock.send(request)
            # The receiver this wakes may be queued on this CPU, behind the INSERT and
            # COMMIT the storing thread goes on to; yielding lets it run first (a
            # local receiver's write -> arrival p50 0.31 -> 0.15 ms when the pin or
            # paho thread stores, issue 6). Nothing else runnable: a plain syscall.
            os.sched_yield()
            return sent
        except OSError:  # a full buffer or a dead connection: finish() deals with it
            return 0

    def send(self, method: str, url: str, headers: dict[str, str], body: bytes,
             timeout: float) -> _Attempt:
        """One request; a keep-alive connection the server closed is re-made once."""
        prepared = self.prepare(method, url, headers, body)
        if isinstance(prepared, _Attempt):
            return prepared
        origin, request = prepared
        return self._exchange(method, origin, request, 0, time.monotonic(), timeout)

    def finish(self, early: _Early, method: str, timeout: float) -> _Attempt:
        """:meth:`send` for a request :meth:`write_early` began: the rest of it, then
        the response (the timeout counts from its first byte)."""
        return self._exchange(method, early.origin, early.request, early.sent, early.start,
                              timeout)

    def _exchange(self, method: str, origin: tuple[str, str, int], request: bytes,
                  sent: int, start: float, timeout: float) -> _Attempt:
        """Write `request` (its first `sent` bytes are out already on the open
        connection) and read the response."""
        deadline = start + timeout  # for the whole attempt, not per read
        for fresh in (False, True):
            sock = self._sock
            reused = sock is not None and self._origin == origin and not fresh
            try:
                if not reused:
                    self.close()
                    sock = self._open(origin, timeout)
                else:
                    assert sock is not None
                    sock.settimeout(timeout)
                sock.sendall(memoryview(request)[sent:] if reused else request)
                status, retry_after, keep = _read_response(_Reader(sock, deadline), method)
                if not keep:
                    self.close()
                return _Attempt(status, None, retry_after)
            except (RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    ConnectionAbortedError) as exc:
                self.close()
                if reused:
                    continue  # the server dropped an idle keep-alive connection: retry once
                return _Attempt(None, _describe(exc))
            except _ProtocolError as exc:
                self.close()
                return _Attempt(None, f"bad response: {exc}")
            except OSError as exc:  # timeouts, refusals; TLS errors are OSErrors too
                self.close()
                return _Attempt(None, _describe(exc))
            except ValueError:  # a host name the resolver cannot encode
                self.close()
                return _Attempt(None, "invalid URL (the host name cannot be resolved as "
                                "written)", final=True)
        return _Attempt(None, "connection closed by the server")  # pragma: no cover


class _InvalidURL(ValueError):
    """The URL or method cannot be put on a request line."""


def _encode_headers(headers: dict[str, str], length: int, host: bytes) -> bytes:
    """Host + Content-Length + header lines + the blank line; ValueError on what HTTP
    can't carry. A configured Host replaces ours; Content-Length is always ours."""
    out = [b"", b"Content-Length: %d\r\n" % length]
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _BAD_VALUE_CHARS.search(value):
            raise ValueError("a header name or value HTTP cannot carry")
        key = name.lower()
        if key == "content-length":
            continue
        line = f"{name}: {value}\r\n".encode("latin-1")
        if key == "host":
            host = line
            continue
        out.append(line)
    out[0] = host
    out.append(b"\r\n")
    return b"".join(out)


class _Reader:
    """recv() against one deadline for the whole response (a server that trickles
    bytes, or sends 1xx after 1xx, cannot stretch an attempt past its timeout)."""

    __slots__ = ("sock", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def recv(self, n: int) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)
        return self.sock.recv(n)


MAX_INTERIM = 10  # 1xx responses skipped before the real one; more is a broken server
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


def _read_response(sock: _Reader, method: str) -> tuple[int, str | None, bool]:
    """Read one response: (status, Retry-After, keep the connection?).

    The body is read and thrown away (up to ``MAX_RESPONSE``; a larger one is left
    unread and the connection is dropped).
    """
    buf = b""
    started = False
    for _ in range(MAX_INTERIM + 1):  # 1xx interim responses come before the real one
        while True:
            end = buf.find(b"\r\n\r\n")
            if end > _HEAD_MAX or (end < 0 and len(buf) > _HEAD_MAX):
                raise _ProtocolError("response headers too large")
            if end >= 0:
                break
            chunk = sock.recv(_READ)
            if not chunk:
                if started or buf:
                    raise _ProtocolError("connection closed in the middle of a response")
                raise RemoteDisconnected("the server closed the connection without a response")
            buf += chunk
        started = True
        lines = buf[:end].split(b"\r\n")
        buf = buf[end + 4:]
        status_line = lines[0].split(None, 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or \
                len(status_line[1]) != 3 or not status_line[1].isdigit():
            raise _ProtocolError(f"bad status line {lines[0][:40]!r}")
        status = int(status_line[1])
        if 100 <= status < 200 and status != 101:
            continue
        fields: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                if line[:1] in (b" ", b"\t"):
                    continue  # obsolete line folding: a continuation we do not need
                raise _ProtocolError("bad header line")
            key = name.strip().lower()
            value = value.strip()
            fields[key] = fields[key] + b", " + value if key in fields else value
        break
    else:
        raise _ProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")
    conn = fields.get(b"connection", b"").lower()
    keep = b"close" not in conn and (status_line[0] != b"HTTP/1.0" or b"keep-alive" in conn)
    retry_after = fields.get(b"retry-after")
    retry = retry_after.decode("latin-1") if retry_after is not None else None
    if method == "HEAD" or status in (204, 304) or status < 200:
        return status, retry, keep and not buf
    if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        return status, retry, keep and _read_chunked(sock, buf)
    length = fields.get(b"content-length")
    if length is not None:
        if not length.isdigit():
            raise _ProtocolError("bad Content-Length")
        n = int(length)
        if n > MAX_RESPONSE:
            return status, retry, False
        while len(buf) < n:
            chunk = sock.recv(min(_READ, n - len(buf)))
            if not chunk:
                raise _ProtocolError("connection closed in the middle of the body")
            buf += chunk
        return status, retry, keep and len(buf) == n
    # no length: the body runs until the server closes
    total = len(buf)
    while total <= MAX_RESPONSE:
        chunk = sock.recv(_READ)
        if not chunk:
            break
        total += len(chunk)
    return status, retry, False


def _read_line(sock: _Reader, buf: bytes, too_long: str,
               eof_ok: bool = False) -> tuple[bytes | None, bytes]:
    """One CRLF-terminated line of a chunked body and what follows it.

    The line is None when the server closed the connection first and `eof_ok`.
    """
    while b"\r\n" not in buf:
        if len(buf) > _HEAD_MAX:
            raise _ProtocolError(too_long)
        chunk = sock.recv(_READ)
        if not chunk:
            if eof_ok:
                return None, buf
            raise _ProtocolError("connection closed in the middle of the body")
        buf += chunk
    line, _, rest = buf.partition(b"\r\n")
    return line, rest


def _read_chunked(sock: _Reader, buf: bytes) -> bool:
    """Consume a chunked body; False when the connection cannot be reused."""
    total = 0
    while True:
        line, buf = _read_line(sock, buf, "bad chunk size line")
        assert line is not None
        digits = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(digits):
            raise _ProtocolError("bad chunk size line")
        size = int(digits, 16)
        if size == 0:
            # trailers, then the blank line
            trailers = 0
            while True:
                trailer, buf = _read_line(sock, buf, "trailers too large", eof_ok=True)
                if trailer is None:
                    return False
                trailers += len(trailer) + 2
                if trailers > _HEAD_MAX:
                    raise _ProtocolError("trailers too large")
                if not trailer:
                    return not buf
        total += size
        if total > MAX_RESPONSE:
            return False  # not worth reading: drop the connection
        while len(buf) < size + 2:
            chunk = sock.recv(_READ)
            if not chunk:
                raise _ProtocolError("connection closed in the middle of the body")
            buf += chunk
        buf = buf[size + 2:]


def _by_target(rows: Sequence[RowLike]) -> dict[str, list[RowLike]]:
    by_target: dict[str, list[RowLike]] = {}
    for row in rows:
        by_target.setdefault(row.target, []).append(row)
    return by_target


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


# --------------------------------------------------------------------------- threads

class _Commit:
    """The fate of a transaction whose rows were handed over before it stored them:
    once `done`, `rows` maps each row's webhook-id to the stored row (with its id),
    or is None when nothing was stored. `sleepers`: threads to wake once it is done.

    Done-ness is a bare lock held until then rather than a ``threading.Event`` (a
    Condition around a lock, built in Python): one is made for every batch the
    dispatcher stores, on the way to the request."""

    __slots__ = ("_pending", "rows", "sleepers")

    def __init__(self) -> None:
        self._pending = threading.Lock()
        self._pending.acquire()
        self.rows: dict[str, RowLike] | None = None
        self.sleepers: list[_Worker] = []

    def finish(self) -> None:
        """The transaction settled (`rows` is set first); called once."""
        self._pending.release()

    def done(self) -> bool:
        return not self._pending.locked()

    def wait(self) -> None:
        """Until :meth:`finish` was called."""
        with self._pending:
            pass


class _Early:
    """A request the storing thread wrote itself on an idle thread's connection.

    When a thread in sync is asleep with nothing queued, the thread storing a new
    row (the dispatcher, or a pin's or paho's thread running its own event)
    prepares that row's request and writes it at once, before the INSERT, instead
    of waking the sender thread to do it: that wake-up
    (a thread on another CPU) was 0.02 ms at p50 and 0.28 ms at p99 of the press
    -> arrival path, its largest step left (issue 6). The write never blocks: a
    socket send with no timeout, only for a request under ``EARLY_MAX``, only on
    an open keep-alive connection with nothing to read (one the server closed
    is left to the thread, which connects afresh), whose buffers are empty.
    The sender thread is woken once the row is stored (before that it could only
    wait for the answer, on a CPU the receiver needs); it writes what the socket
    did not take (`sent` is how many bytes went out) and reads the response,
    retrying on a fresh connection as for any keep-alive connection the server
    dropped. The thread reads that answer before anything else, so the request
    keeps its place in the target's order.
    """

    __slots__ = ("origin", "request", "sent", "start", "config")

    def __init__(self, origin: tuple[str, str, int], request: bytes, sent: int,
                 start: float, config: WebhookConfig) -> None:
        self.origin = origin
        self.request = request
        self.sent = sent
        self.start = start
        self.config = config


class Handover:
    """Rows handed to the sender threads before they are stored (issue 6).

    ``Outbox.add_rows`` calls :meth:`offer` with the new rows before its INSERT (no
    ids yet) and :meth:`settle` after its COMMIT or rollback, both under the lock its
    reads take. A thread in sync starts sending at once, so the request is on the
    wire while the row is written instead of after it (that write was 0.07-0.17 ms
    at p50 and 0.4 ms at p99 in the latency path); it records the outcome only once
    the row is stored, under the row's id. Rows a thread could not take early are
    offered once stored, as committed rows (a thread that read the database before
    would have missed them). If the transaction fails, nothing was stored: an
    attempt that already went out is not recorded, and the error goes up to the
    caller.

    Durability is unchanged: a row is safe once committed, and a crash before the
    commit loses the event in either order (only now its webhook may have arrived
    anyway).
    """

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.commit = _Commit()
        self.late: list[RowLike] = []

    def offer(self, rows: Sequence[RowLike]) -> None:
        workers = self.sender._workers
        for name, batch in _by_target(rows).items():
            worker = workers.get(name)
            if worker is not None and not worker.take(batch, self.commit):
                self.late.extend(batch)

    def settle(self, rows: Sequence[RowLike] | None) -> None:
        """The stored rows, in the order offered (None: the transaction failed)."""
        commit = self.commit
        if rows is not None:
            commit.rows = {row.webhook_id: row for row in rows}
            self.sender.offer([commit.rows[row.webhook_id] for row in self.late])
        commit.finish()
        for worker in commit.sleepers:
            worker.wakeup.set()


class _Worker:
    """The sender thread of one target.

    Two modes. *Database mode* reads the queue from the outbox (claim the due head,
    send it, sleep until the next row is due): at start, after a failed attempt, and
    whenever another part of the daemon changed the queue behind its back (a retry
    from the API, a reload; :meth:`Sender.wake`). When a database round finds the
    target's queue empty the thread is *in sync*: every row stored from then on is
    handed to it in memory (:class:`Handover`, or :meth:`Sender.offer` once
    committed), and it sends those in order without reading them back (no claim,
    no lease: one daemon per state directory, and a crash clears leases anyway).
    That saves two of the four transactions a delivery cost and a thread's worth of
    latency (issue 6).
    Any failed attempt, or an inbox past ``INBOX_MAX`` rows, drops it back to
    database mode; committed row ids only grow, so ``high`` (the last committed id
    taken) tells a row already sent from one seen again.

    Rows can even arrive before they are stored (:meth:`Sender.handover`), without
    ids yet: the thread sends them while the transaction is written and waits for it
    only to record the outcome, under the id the row got. Such a row cannot have been
    read from the database before its transaction settled (the outbox settles it
    under the lock its reads take), and after that it counts as an ordinary row.
    Throwing the inbox away stays safe for the same reason: the thread's next
    database read waits for that transaction, so it finds those rows.
    """

    def __init__(self, sender: Sender, name: str, config: WebhookConfig | None) -> None:
        self.sender = sender
        self.name = name
        self.config = config  # swapped whole on reload; None means "target removed"
        self.wakeup = threading.Event()
        self.beat = time.monotonic()
        self.sleeping = False  # waiting for work (alive by definition), see heartbeat_age
        self.conn = _Connection(sender.tls_context)
        self.unmarked: list[tuple[int, int]] = []  # delivered, not yet recorded
        self.unreleased: list[int] = []  # claimed, not attempted, lease not yet given back
        # rows handed over in memory, each with its commit (None: committed already)
        # and, for the head row only, the request written for it already (_Early)
        self.inbox: deque[tuple[RowLike, _Commit | None, _Early | None]] = deque()
        # `idle`: asleep in sync with an empty inbox, so the storing thread may write
        # the next request itself (_Early); both read and set it under `gate`
        self.gate = threading.Lock()
        self.idle = False
        self.in_sync = False  # the inbox is the whole queue (see the class docstring)
        self.dirty = True  # set by other threads: the queue changed; read the database
        self.high = 0  # the highest committed row id this thread has taken
        self.thread = threading.Thread(target=self._run, name=f"edgehook-send-{name}",
                                       daemon=True)

    def offer(self, rows: Sequence[RowLike]) -> None:
        """Committed new rows of this target (called by the storing thread).

        Kept only while the thread is in sync and the inbox has room; otherwise they
        are read back from the database (``dirty``), so a target that is down or
        slow never holds row bodies in memory beyond ``INBOX_MAX`` rows.
        """
        if not self.take(rows, None):
            self.dirty = True  # they are in the database; read them from there
            self.wakeup.set()

    def take(self, rows: Sequence[RowLike], commit: _Commit | None) -> bool:
        """Rows about to be stored (no ids yet; `commit` tells when they are), or
        stored already (None): taken only by a thread in sync with room in its
        inbox; False means "read them from the database once stored". The first of
        rows about to be stored may have its request written at once (_Early)."""
        if not self.in_sync or len(self.inbox) + len(rows) > INBOX_MAX:
            return False
        early = commit is not None and self._start(rows[0], commit)
        if not early:
            self.inbox.append((rows[0], commit, None))
        self.inbox.extend((row, commit, None) for row in rows[1:])
        if early:
            # woken once the rows are stored: its answer is on the way by then, and a
            # thread woken now would only wait for it on a CPU the receiver needs
            commit.sleepers.append(self)
        else:
            self.wakeup.set()
        return True

    def _start(self, row: RowLike, commit: _Commit) -> bool:
        """Write `row`'s request now, on the storing thread, if this thread sleeps
        idle on an open connection to its origin (:class:`_Early`); True when it is
        queued as the inbox's head with its request on the wire."""
        with self.gate:
            cfg = self.config
            if not self.idle or self.inbox or cfg is None:
                return False
            self.idle = False  # one early request per sleep: the thread reads its answer
            try:
                headers = _request_headers(row, cfg, time.time())
            except EdgehookError:
                return False  # the thread makes this attempt, and logs why it failed
            prepared = self.conn.prepare(row.method, row.url, headers, row.body)
            if isinstance(prepared, _Attempt):
                return False
            start = time.monotonic()
            sent = self.conn.write_early(*prepared)
            if sent is None:
                return False
            self.inbox.append((row, commit, _Early(*prepared, sent, start, cfg)))
            return True

    # The loop ------------------------------------------------------------

    def _run(self) -> None:
        pause = ERROR_PAUSE
        due: float | None = 0.0  # when the head of the queue is due (database mode)
        try:
            while not self.sender._stopping.is_set():
                self.beat = time.monotonic()
                self.wakeup.clear()
                if self.dirty:  # read after clearing: a later change sets wakeup again
                    self.dirty = False
                    self.in_sync = False
                    due = 0.0
                try:
                    self._finish_early()  # a request on the wire comes first, whatever changed
                    cfg = self.config
                    if cfg is None:
                        if self._reap():
                            return
                        continue
                    if self.in_sync:
                        self._send_inbox(cfg)
                        due = None if self.in_sync else self.sender.outbox.next_due(self.name)
                    elif due is not None and due <= time.time():
                        self.inbox.clear()  # committed before the claim below reads
                        self._flush()
                        due = self._round()
                        self.in_sync = due is None
                    pause = ERROR_PAUSE
                except Exception:
                    _LOG.exception("sender %s: outbox error; pausing %.0f s", self.name, pause)
                    self.sender._stopping.wait(pause)
                    pause = min(pause * 2, BACKOFF_CAP)
                    self.dirty = True
                    continue
                if self.dirty or (self.in_sync and self.inbox) or \
                        (not self.in_sync and due is not None and due <= time.time()):
                    continue
                self._sleep(None if self.in_sync else due)
        except Exception:  # the loop's boundary: log, and let heartbeat_age show it
            _LOG.exception("sender %s died", self.name)
        finally:
            try:
                self._finish_early()  # stopping: it is in flight, so it gets its answer
                self._flush()
            except Exception:
                _LOG.exception("sender %s: could not finish its last request", self.name)
            self.conn.close()

    def _sleep(self, due: float | None) -> None:
        """Wait for a wake-up, or until `due` (None: no timeout, an idle thread never
        wakes by itself)."""
        self.sleeping = True
        with self.gate:
            self.idle = due is None and self.in_sync and not self.inbox and not self.dirty
        try:
            self.wakeup.wait(None if due is None else max(0.0, due - time.time()))
        finally:
            with self.gate:  # waits for a request being written early to be queued
                self.idle = False
            self.sleeping = False
            self.beat = time.monotonic()

    def _finish_early(self) -> None:
        """Send the rest of a request written early (:class:`_Early`) and read its
        answer, before anything else touches the connection or the inbox."""
        if not self.inbox or self.inbox[0][2] is None:
            return
        row, commit, early = self.inbox.popleft()
        assert early is not None
        if not self._deliver(row, early.config, commit, early):
            self.in_sync = False
            self.inbox.clear()  # all in the database, behind the row backing off
            self.dirty = True  # back to database mode: sleep until that row is due

    def _send_inbox(self, cfg: WebhookConfig) -> None:
        """In sync: send the handed-over rows in order; a failed one ends the sync."""
        inbox = self.inbox
        while inbox and not self.dirty and not self.sender._stopping.is_set():
            row, commit, _ = inbox.popleft()  # (only the head can be early: done)
            if commit is not None and commit.done():
                if commit.rows is None:
                    continue  # its transaction rolled back: the row never existed
                row, commit = commit.rows[row.webhook_id], None  # stored: an ordinary row
            if commit is None:
                if row.id <= self.high:
                    continue  # already taken from the database
                self.high = row.id
            # else: not stored yet, so no database read can have taken it
            sent = self._deliver(row, cfg, commit)
            if not sent:
                self.in_sync = False
                inbox.clear()  # all in the database, behind the row backing off
                break
        self._flush()

    def _reap(self) -> bool:
        """The target left the config: its pending rows go dead. True when the thread ends."""
        with self.sender._lock:
            if self.config is not None:  # re-added meanwhile
                return False
            n = self.sender.outbox.mark_target_dead(self.name, time.time(),
                                                   "target removed from config")
            if n:
                _LOG.warning("target %s removed from config: %d pending deliveries dead",
                             self.name, n)
            if self.sender._workers.get(self.name) is self:
                del self.sender._workers[self.name]
            return True

    def _flush(self) -> None:
        """Record deliveries and give back leases; kept for the next try if the write fails."""
        if self.unmarked:
            self.sender.outbox.mark_delivered(self.unmarked, time.time())
            self.unmarked = []
        if self.unreleased:
            self.sender.outbox.release(self.unreleased)
            self.unreleased = []

    def _round(self) -> float | None:
        """Claim the due head of the queue and send it in order; returns when the head
        is due next (None: the queue is empty, 0.0: claim again at once)."""
        outbox = self.sender.outbox
        rows = outbox.claim(self.name, BATCH, time.time(), LEASE)
        done = 0
        try:
            for row in rows:
                if self.sender._stopping.is_set():
                    break
                cfg = self.config
                if cfg is None:
                    break
                done += 1
                self.high = max(self.high, row.id)
                if not self._deliver(row, cfg):
                    break  # the head is backing off: the rows behind it wait (order)
            else:
                if len(rows) == BATCH:
                    return 0.0  # there may be more
        finally:
            self.unreleased.extend(r.id for r in rows[done:])
            self._flush()
        return outbox.next_due(self.name)

    def _stored(self, row: RowLike, commit: _Commit | None) -> RowLike | None:
        """Before recording anything about `row`: the stored row, waiting for its
        transaction if it was handed over early; None when that rolled back (nothing
        to record)."""
        if commit is None:
            return row
        commit.wait()
        if commit.rows is None:
            _LOG.warning("delivery %s to %s: its outbox write failed (the event's log line "
                         "says why); an attempt that already went out is not recorded",
                         row.webhook_id, self.name)
            return None
        stored = commit.rows[row.webhook_id]
        self.high = max(self.high, stored.id)
        return stored

    def _deliver(self, row: RowLike, cfg: WebhookConfig,
                 commit: _Commit | None = None, early: _Early | None = None) -> bool:
        """Attempt one row (or finish the attempt that `early` began); False when it
        is to be retried later (stop this round)."""
        sender = self.sender
        outbox = sender.outbox
        now = time.time()
        if early is None and (now > row.deadline or row.attempts >= row.max_attempts):
            stored = self._stored(row, commit)
            if stored is None:
                return True
            row = stored
            why = ("max_age exceeded before the attempt" if now > row.deadline
                   else f"max_attempts ({row.max_attempts}) reached")
            self._flush()
            outbox.mark_dead(row.id, now, why, None, attempted=False)
            sender._result(self.name, "dead", None, 0.0)
            _LOG.warning("delivery %s to %s dead: %s", row.webhook_id, self.name, why)
            return True
        if early is not None:
            start = early.start
            result = self.conn.finish(early, row.method, cfg.timeout)
        else:
            start = time.monotonic()
            try:
                headers = _request_headers(row, cfg, now)
            except EdgehookError as exc:  # a bad secret: retried, so fixing the config heals it
                result = _Attempt(None, f"signing failed: {exc}")
            else:
                result = self.conn.send(row.method, row.url, headers, row.body, cfg.timeout)
        latency = time.monotonic() - start
        stored = self._stored(row, commit)
        if stored is None:
            return True
        row = stored
        self.beat = time.monotonic()
        now = time.time()
        status = result.status
        outcome = classify(status) if status is not None else (
            "dead" if result.final else "retry")
        attempt = row.attempts + 1
        if outcome == "delivered":
            self.unmarked.append((row.id, status))  # type: ignore[arg-type]
            if len(self.unmarked) >= BATCH:
                self._flush()
            if self.name in sender._gone:
                sender._gone.discard(self.name)
            sender._result(self.name, "delivered", status, latency)
            _LOG.debug("delivery %s to %s: HTTP %s", row.webhook_id, self.name, status)
            return True
        self._flush()
        error = result.error or f"HTTP {status}"
        if outcome == "retry":
            retry_after = None
            if status in RETRY_AFTER_STATUSES:
                retry_after = parse_retry_after(result.retry_after, now)
            next_at = now + next_delay(attempt, retry_after, sender._rng)
            if attempt >= row.max_attempts:
                outcome, error = "dead", f"max_attempts ({row.max_attempts}) reached: {error}"
            elif next_at > row.deadline:
                outcome, error = "dead", f"max_age exceeded: {error}"
            else:
                outbox.mark_retry(row.id, now, next_at, error, status)
                sender._result(self.name, "retry", status, latency)
                _LOG.info("delivery %s to %s failed (%s), attempt %d/%d; next in %.1f s",
                          row.webhook_id, self.name, error, attempt, row.max_attempts,
                          next_at - now)
                return False
        if status == 410:
            sender._gone.add(self.name)
            _LOG.warning("target %s is gone (HTTP 410): its deliveries fail until the config"
                         " changes", self.name)
        outbox.mark_dead(row.id, now, error, status)
        sender._result(self.name, "dead", status, latency)
        _LOG.warning("delivery %s to %s dead after %d attempt(s): %s", row.webhook_id,
                     self.name, attempt, error)
        return True


class Sender:
    """The sender threads, one per configured target."""

    def __init__(self, outbox: OutboxLike, targets: Mapping[str, WebhookConfig], *,
                 on_result: ResultCallback | None = None) -> None:
        """Prepare the senders of a config snapshot; no thread runs before :meth:`start`.

        :param on_result: called as ``on_result(target, outcome, status, latency_s)``
            after every attempt, from the sender thread (metrics): keep it cheap.
        """
        self.outbox = outbox
        self._targets = dict(targets)
        self._on_result = on_result
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._stopping = threading.Event()
        self._gone: set[str] = set()
        self._rng = random.Random()
        self._tls: ssl.SSLContext | None = None
        self._started = False

    def tls_context(self) -> ssl.SSLContext:
        """The system CA store with verification on, loaded on first use: reading the CA
        bundle costs 24 ms and 2 MB here, which a config with only http:// targets
        should not pay at start-up."""
        with self._lock:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            return self._tls

    def _result(self, target: str, outcome: Outcome, status: int | None,
                latency: float) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(target, outcome, status, latency)
        except Exception:
            _LOG.exception("on_result callback failed for %s", target)

    def start(self) -> None:
        """Start one thread per target; rows pending from before are sent once due."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._stopping.clear()
            for name, cfg in self._targets.items():
                self._spawn(name, cfg)
        self._reap_unconfigured()

    def _spawn(self, name: str, cfg: WebhookConfig | None) -> _Worker:
        worker = _Worker(self, name, cfg)
        self._workers[name] = worker
        worker.thread.start()
        return worker

    def _reap_unconfigured(self) -> None:
        with self._lock:
            configured = set(self._targets)
        for name in self.outbox.targets_with_pending() - configured:
            n = self.outbox.mark_target_dead(name, time.time(), "target removed from config")
            _LOG.warning("target %s is not in the config: %d pending deliveries dead", name, n)

    def wake(self, targets: Iterable[str] | None = None) -> None:
        """The queue changed in the database (for these targets, or all): read it now."""
        workers = self._workers
        chosen = list(workers.values()) if targets is None else \
            [w for w in (workers.get(name) for name in targets) if w is not None]
        for worker in chosen:
            worker.dirty = True
            worker.wakeup.set()

    def offer(self, rows: Sequence[RowLike]) -> None:
        """Rows just committed to the outbox: hand them to their targets' threads."""
        workers = self._workers
        for name, batch in _by_target(rows).items():
            worker = workers.get(name)
            if worker is not None:
                worker.offer(batch)

    def handover(self) -> Handover:
        """A hand-over for one batch of rows about to be stored (issue 6); pass it to
        ``Outbox.add_rows(handover=...)``. See :class:`Handover`."""
        return Handover(self)

    def reload(self, targets: Mapping[str, WebhookConfig]) -> None:
        """Swap in a new config snapshot: new threads for new targets; removed targets'
        pending rows go dead."""
        with self._lock:
            self._targets = dict(targets)
            if not self._started:
                return
            for name, cfg in self._targets.items():
                worker = self._workers.get(name)
                if worker is not None and worker.thread.is_alive():
                    worker.config = cfg
                    worker.dirty = True
                    worker.wakeup.set()
                else:
                    self._spawn(name, cfg)
            for name, worker in list(self._workers.items()):
                if name not in self._targets:
                    worker.config = None
                    worker.wakeup.set()
            self._gone &= set(self._targets)

    def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; in-flight requests get `grace` seconds; the rest stays pending."""
        self._stopping.set()
        with self._lock:
            workers = list(self._workers.values())
            self._started = False
        for worker in workers:
            worker.wakeup.set()
        deadline = time.monotonic() + grace
        for worker in workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                _LOG.warning("sender %s still busy after %.1f s; leaving it", worker.name, grace)
        with self._lock:
            self._workers = {n: w for n, w in self._workers.items() if w.thread.is_alive()}

    def heartbeat_age(self) -> float:
        """Seconds since the least recently alive sender thread beat (0 with no threads).

        A thread asleep waiting for work counts as 0 (no timer has to wake it to prove
        it lives); a thread that died, or hangs in a request or a database call, keeps
        its last beat, so its age grows and the watchdog stops.
        """
        workers = list(self._workers.values())
        if not workers:
            return 0.0
        now = time.monotonic()
        return max(0.0 if w.sleeping and w.thread.is_alive() else now - w.beat
                   for w in workers)

    def gone_targets(self) -> set[str]:
        """Targets that answered 410 Gone to their latest delivery."""
        return set(self._gone)
