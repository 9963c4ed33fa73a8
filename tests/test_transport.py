"""transport.Transport, the sender's HTTP client on urllib3, on its own.

Every server here is a real socket on loopback: a thread accepts on a listening
socket, reads the request bytes and writes scripted raw response bytes, so each
framing case (Content-Length, chunked, read-to-close, 1xx, Connection: close,
HTTP/1.0, limits, trickling) is exact. A proxy and TLS servers are real sockets
too. Every wait has a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import base64
import os
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgehook import transport
from edgehook.config import WebhookTls
from edgehook.transport import Result, Transport, parse_target

WAIT = 5.0      # the deadline of every wait on the server side (seconds)
TIMEOUT = 2.0   # the client's timeout unless a test says otherwise
QUICK = 1.0     # "answered at once": well under TIMEOUT, so a hang cannot pass for it
SECRET = "s3cr3t-T0KEN-value"

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CREATED = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
              "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own environment must not route loopback requests through a proxy."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- servers

class Peer:
    """The server side of one accepted connection."""

    def __init__(self, sock: socket.socket, server: RawServer) -> None:
        self.sock = sock
        self.server = server
        self.buf = b""

    def read_request(self) -> bytes:
        """One whole request (head + Content-Length body), recorded on the server."""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"EOF before a whole request head: {self.buf!r}")
            self.buf += chunk
        end = self.buf.index(b"\r\n\r\n") + 4
        length = 0
        for line in self.buf[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buf) < end + length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("EOF in the request body")
            self.buf += chunk
        raw, self.buf = self.buf[:end + length], self.buf[end + length:]
        self.server.requests.append(raw)
        return raw

    def send(self, *parts: bytes) -> None:
        """Write the parts as separate sends (the client must not care how bytes arrive)."""
        for part in parts:
            self.sock.sendall(part)

    def send_lenient(self, data: bytes) -> None:
        """Write what the client may stop reading: its close/reset is expected."""
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def wait_eof(self) -> bytes:
        """The bytes that arrive until the client closes (a reset counts as a close)."""
        data, self.buf = self.buf, b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk

    def hold(self) -> None:
        """Keep the connection open and silent until the test ends."""
        self.server.stopping.wait(WAIT)

    def close(self) -> None:
        self.sock.close()


Handler = Callable[[Peer], None]


class RawServer:
    """Accepts connections one at a time; connection n is served by handlers[n]."""

    def __init__(self, handlers: list[Handler], *, host: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(8)
        self.listener.settimeout(0.02)  # the accept loop's poll for `stopping`
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.handlers = list(handlers)
        self.tls = tls
        self.accepts = 0
        self.requests: list[bytes] = []
        self.errors: list[BaseException] = []
        self.tls_failures: list[BaseException] = []
        self.events: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.stopping = threading.Event()
        self._closed = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="raw-server")
        self.thread.start()

    def url(self, path: str = "/hook", scheme: str = "http") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepts += 1
            sock.settimeout(WAIT)
            handler = self.handlers.pop(0) if self.handlers else None
            try:
                if self.tls is not None:
                    try:
                        sock = self.tls.wrap_socket(sock, server_side=True)
                    except (ssl.SSLError, OSError) as exc:
                        self.tls_failures.append(exc)
                        continue
                if handler is None:
                    raise AssertionError(f"unexpected connection #{self.accepts}")
                handler(Peer(sock, self))
            except BaseException as exc:  # reported by the fixture at the end of the test
                self.errors.append(exc)
            finally:
                sock.close()

    def finish(self) -> None:
        """Stop serving; connections still in the backlog are counted in `accepts` too."""
        if self._closed:
            return
        self._closed = True
        self.stopping.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the server thread did not finish"
        self.listener.setblocking(False)
        try:
            while True:
                extra, _ = self.listener.accept()
                extra.close()
                self.accepts += 1
        except BlockingIOError:
            pass
        self.listener.close()


@pytest.fixture()
def serve() -> Iterator[Callable[..., RawServer]]:
    """Start raw servers; at the end each is stopped and any handler error fails the test."""
    servers: list[RawServer] = []

    def start(*handlers: Handler, host: str = "127.0.0.1",
              tls: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(list(handlers), host=host, tls=tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.finish()
    for server in servers:
        if server.errors:
            raise server.errors[0]



def client(tls: WebhookTls | None = None) -> Transport:
    return Transport(tls)


def answer(*parts: bytes) -> Handler:
    """A handler that reads one request and writes `parts`, then closes."""
    def handle(peer: Peer) -> None:
        peer.read_request()
        peer.send(*parts)
    return handle


def answer_each(*responses: bytes) -> Handler:
    """A handler that answers len(responses) requests on one connection."""
    def handle(peer: Peer) -> None:
        for response in responses:
            peer.read_request()
            peer.send(response)
    return handle


def answer_then_expect_eof(*parts: bytes) -> Handler:
    """Answer one request, then require that the client closes without sending more."""
    def handle(peer: Peer) -> None:
        peer.read_request()
        peer.send_lenient(b"".join(parts))
        rest = peer.wait_eof()
        assert rest == b"", f"the client reused a connection it should have dropped: {rest!r}"
        peer.server.events["eof"].set()
    return handle


def post(conn: Transport, url: str, body: bytes = b"{}", timeout: float = TIMEOUT,
         headers: dict[str, str] | None = None, method: str = "POST") -> Result:
    return conn.send(method, url, headers if headers is not None else {}, body, timeout)


def timed(fn: Callable[[], Result]) -> tuple[Result, float]:
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


def body_of(request: bytes) -> bytes:
    return request.split(b"\r\n\r\n", 1)[1]


def head_of(request: bytes) -> dict[bytes, bytes]:
    """The request's header fields, names lower-cased."""
    lines = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return {n.strip().lower(): v.strip() for n, _, v in (ln.partition(b":") for ln in lines)}


# --------------------------------------------------------------------------- framing

def test_content_length_response_and_keep_alive_reuse(serve) -> None:
    srv = serve(answer_each(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world",
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 4\r\n\r\nbusy",
    ))
    c = client()
    r1, r2, r3 = (post(c, srv.url()) for _ in range(3))
    assert (r1.status, r1.error, r2.status, r2.error) == (200, None, 202, None)
    assert (r3.status, r3.retry_after, r3.error, r3.final) == (503, "7", None, False)
    srv.finish()
    assert srv.accepts == 1  # three requests, one TCP connection
    assert len(srv.requests) == 3


def test_content_length_body_split_across_writes(serve) -> None:
    srv = serve(lambda p: (p.read_request(), p.send(
        b"HTTP/1.1 200 OK\r", b"\nContent-Len", b"gth: 10\r\n\r", b"\n01234", b"56789"),
        p.read_request(), p.send(OK)))
    c = client()
    assert [post(c, srv.url()).status for _ in range(2)] == [200, 200]
    srv.finish()
    assert srv.accepts == 1


def test_chunked_response_with_extensions_and_trailers(serve) -> None:
    body26 = b"abcdefghijklmnopqrstuvwxyz"
    srv = serve(lambda p: (
        p.read_request(),
        p.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
               b"5;ext=1\r\nhello\r\n",
               b'1A ; name="quoted;value"\r\n' + body26[:10], body26[10:] + b"\r\n",
               b"0;last\r\nX-Trailer: a\r\nX-Checksum: 1234\r\n\r\n"),
        p.read_request(),
        p.send(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        p.read_request(),
        p.send(OK),
    ))
    c = client()
    statuses = [post(c, srv.url()).status for _ in range(3)]
    assert statuses == [200, 201, 200]
    srv.finish()
    assert srv.accepts == 1  # the trailers were consumed exactly: the connection stayed usable


def test_read_to_close_response_then_a_new_connection(serve) -> None:
    srv = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
                       b"the body runs until the server closes"),
                answer(OK))
    c = client()
    r1 = post(c, srv.url())
    assert (r1.status, r1.error) == (200, None)
    r2 = post(c, srv.url())
    assert (r2.status, r2.error) == (200, None)
    srv.finish()
    assert srv.accepts == 2
    assert len(srv.requests) == 2  # the second request went out once, on the new connection


def test_interim_1xx_responses_are_skipped(serve) -> None:
    srv = serve(lambda p: (
        p.read_request(),
        p.send(b"HTTP/1.1 100 Continue\r\n\r\n",
               b"HTTP/1.1 102 Processing\r\nX-Progress: 50\r\n\r\n"
               b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
               b"HTTP/1.1 204 No Content\r\n\r\n"),
        p.read_request(),
        p.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ))
    c = client()
    r1, r2 = post(c, srv.url()), post(c, srv.url())
    assert (r1.status, r1.error, r2.status, r2.error) == (204, None, 200, None)
    srv.finish()
    assert srv.accepts == 1


def test_head_and_204_responses_have_no_body(serve) -> None:
    """HEAD's Content-Length announces a body that is not sent: no wait for it."""
    srv = serve(answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
                            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
                            OK))
    c = client()
    r1, elapsed = timed(lambda: post(c, srv.url(), b"", method="HEAD"))
    assert (r1.status, r1.error) == (200, None)
    assert elapsed < QUICK
    assert post(c, srv.url()).status == 204
    assert post(c, srv.url()).status == 200
    srv.finish()
    assert srv.accepts == 1


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, Close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
], ids=["connection-close", "close-in-a-list", "http-1.0"])
def test_response_that_ends_the_connection_is_not_reused(serve, response: bytes) -> None:
    """The server keeps its end open: only the client's own close ends connection 1."""
    srv = serve(answer_then_expect_eof(response), answer(OK))
    c = client()
    r1 = post(c, srv.url())
    assert (r1.status, r1.error) == (200, None)
    assert srv.events["eof"].wait(WAIT)  # the client closed connection 1 itself
    r2 = post(c, srv.url())
    assert (r2.status, r2.error) == (200, None)
    srv.finish()
    assert srv.accepts == 2


def test_http_1_0_keep_alive_is_reused(serve) -> None:
    response = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    srv = serve(answer_each(response, response))
    c = client()
    assert [post(c, srv.url()).status for _ in range(2)] == [200, 200]
    srv.finish()
    assert srv.accepts == 1


def test_each_origin_keeps_its_own_connection(serve) -> None:
    """A target whose URL is a template may reach several origins: each keeps its
    keep-alive connection (up to NUM_POOLS of them)."""
    a = serve(answer_each(OK, OK))
    b = serve(answer(CREATED))
    c = client()
    assert post(c, a.url("/one")).status == 200
    assert post(c, b.url("/two")).status == 201
    assert post(c, a.url("/three")).status == 200
    a.finish()
    b.finish()
    assert (a.accepts, b.accepts) == (1, 1)
    assert a.requests[1].startswith(b"POST /three HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % a.port)
    assert b.requests[0].startswith(b"POST /two HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % b.port)


def test_an_origin_whose_pool_was_closed_for_room_gets_a_new_one(serve) -> None:
    """More origins than NUMPOOLS: the least recently asked-for pool is closed (its
    connection too), and a later request to its origin opens a new one."""
    a = serve(answer_then_expect_eof(OK), answer(CREATED))
    others = [serve(answer(OK)) for _ in range(transport.NUMPOOLS)]
    c = client()
    assert post(c, a.url("/one")).status == 200
    for other in others:
        assert post(c, other.url()).status == 200
    assert a.events["eof"].wait(WAIT)  # the first pool was closed to make room
    assert post(c, a.url("/two")).status == 201
    a.finish()
    assert a.accepts == 2


# --------------------------------------------------------------------------- reconnects

def _answer_then_close(peer: Peer) -> None:
    peer.read_request()
    peer.send(OK)  # keep-alive: the client may reuse this connection...
    peer.close()   # ...but the server drops it while idle
    peer.server.events["closed"].set()


def _answer_then_drop_the_next(peer: Peer) -> None:
    """Answer, keep the connection open and silent, then close it when the next
    request arrives, without a word: a keep-alive timeout racing the request."""
    peer.read_request()
    peer.send(OK)
    peer.read_request()
    peer.close()


def test_idle_connection_closed_by_server_is_remade_transparently(serve) -> None:
    srv = serve(_answer_then_close, answer(CREATED))
    c = client()
    assert post(c, srv.url(), b"first").status == 200
    assert srv.events["closed"].wait(WAIT)
    r, elapsed = timed(lambda: post(c, srv.url(), b"second"))
    # One send, one result: the stale connection is not a failed attempt.
    assert (r.status, r.error, r.final) == (201, None, False)
    assert elapsed < QUICK
    srv.finish()
    assert srv.accepts == 2
    assert [body_of(req) for req in srv.requests] == [b"first", b"second"]


def test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(serve) -> None:
    """The server drops the reused connection as the request arrives (it looked
    alive when it was picked): the request goes again on a fresh connection, and the
    attempt is that one's answer, not a failure."""
    srv = serve(_answer_then_drop_the_next, answer(CREATED))
    c = client()
    assert post(c, srv.url(), b"first").status == 200
    r, elapsed = timed(lambda: post(c, srv.url(), b"second"))
    assert (r.status, r.error, r.final) == (201, None, False)
    assert elapsed < QUICK
    srv.finish()
    assert srv.accepts == 2
    assert [body_of(req) for req in srv.requests] == [b"first", b"second", b"second"]


def test_fresh_connection_closed_without_response_is_not_retried(serve) -> None:
    srv = serve(lambda p: p.read_request())  # then closes without a word
    r = post(client(), srv.url())
    assert r.status is None and not r.final
    assert r.error is not None and r.error.startswith("RemoteDisconnected")
    srv.finish()
    assert srv.accepts == 1  # a POST on a fresh connection is not sent twice


def test_stale_connection_is_retried_only_once(serve) -> None:
    srv = serve(_answer_then_drop_the_next, lambda p: p.read_request())
    c = client()
    assert post(c, srv.url()).status == 200
    r = post(c, srv.url())
    assert r.status is None and r.error is not None and r.error.startswith("RemoteDisconnected")
    srv.finish()
    assert srv.accepts == 2


def test_connection_refused_is_a_retryable_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        r, elapsed = timed(lambda: post(client(), f"http://user:{SECRET}@127.0.0.1:{port}/"))
    assert r.status is None and not r.final
    assert r.error is not None and r.error.startswith("ConnectionRefusedError")
    assert SECRET not in r.error
    assert elapsed < QUICK


# --------------------------------------------------------------------------- bad responses

def _answer_and_hold(*parts: bytes) -> Handler:
    """Answer, then keep the connection open: a reader that waits for more would hang."""
    def handle(peer: Peer) -> None:
        peer.read_request()
        peer.send_lenient(b"".join(parts))
        peer.wait_eof()  # returns when the client gives up on the connection
    return handle


@pytest.mark.parametrize(("response", "error"), [
    (b"SSH-2.0-OpenSSH_9.2p1\r\n\r\n", "bad response: BadStatusLine"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "bad response: BadStatusLine"),
    (b"HTTP/1.1 20x OK\r\n\r\n", "bad response: BadStatusLine"),
    (b"HTTP/2 200\r\n\r\n", "bad response: UnknownProtocol"),
    (b"ICY 200 OK\r\n\r\n", "bad response: BadStatusLine"),
    (b"\r\n\r\n", "bad response: BadStatusLine"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok", "bad response: InvalidHeader"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad response:"),
])
def test_garbage_response_is_an_error_not_a_hang(serve, response: bytes, error: str) -> None:
    srv = serve(_answer_and_hold(response))
    r, elapsed = timed(lambda: post(client(), srv.url()))
    assert r.status is None and not r.final
    assert r.error is not None and r.error.startswith(error), r.error
    assert elapsed < QUICK


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nthis line has no colon\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
], ids=["no-colon", "negative-length"])
def test_response_read_to_a_close_that_never_comes_ends_at_the_timeout(
        serve, response: bytes) -> None:
    """http.client reads these leniently (a body until the server closes): the
    attempt's deadline ends the wait, and it counts as failed."""
    srv = serve(_answer_and_hold(response))
    r, elapsed = timed(lambda: post(client(), srv.url(), timeout=0.4))
    assert (r.status, r.error, r.final) == (None, "timeout", False)
    assert elapsed < 0.4 + QUICK


@pytest.mark.parametrize(("response", "error"), [
    (b"HTTP/1.1 100 Continue\r\n\r\n", "RemoteDisconnected"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "bad response: IncompleteRead"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort",
     "bad response: IncompleteRead"),
])
def test_truncated_response_is_an_error(serve, response: bytes, error: str) -> None:
    srv = serve(answer(response))  # then the server closes
    r, elapsed = timed(lambda: post(client(), srv.url()))
    assert r.status is None and not r.final
    assert r.error is not None and r.error.startswith(error), r.error
    assert elapsed < QUICK


def test_a_head_cut_short_after_its_status_line_keeps_the_status(serve) -> None:
    """The status line arrived whole: the server said 200 (http.client reads the rest
    of the head up to the close), so the delivery counts."""
    srv = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Le"))
    r = post(client(), srv.url())
    assert (r.status, r.error) == (200, None)


def test_oversize_response_head_is_refused(serve) -> None:
    pad = b"X-Pad: " + b"a" * (3 * 65536) + b"\r\n"
    srv = serve(_answer_and_hold(b"HTTP/1.1 200 OK\r\n", pad, b"Content-Length: 0\r\n\r\n"))
    r, elapsed = timed(lambda: post(client(), srv.url()))
    assert r.status is None and r.error is not None
    assert r.error.startswith("bad response: LineTooLong"), r.error
    assert elapsed < QUICK


def test_oversize_chunk_size_line_is_refused(serve) -> None:
    line = b"5;" + b"x" * (3 * 65536) + b"\r\nhello\r\n0\r\n\r\n"
    srv = serve(_answer_and_hold(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", line))
    r, elapsed = timed(lambda: post(client(), srv.url()))
    assert r.status is None and r.error is not None
    assert r.error.startswith("bad response: LineTooLong"), r.error
    assert elapsed < QUICK


def test_oversize_trailer_line_is_refused(serve) -> None:
    trailer = b"X-Pad: " + b"t" * (3 * 65536)  # no CRLF: never ends
    srv = serve(_answer_and_hold(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                 b"0\r\n", trailer))
    r, elapsed = timed(lambda: post(client(), srv.url(), timeout=0.6))
    assert r.error is not None and r.error != "timeout"
    assert elapsed < 0.3


# --------------------------------------------------------------------------- MAX_RESPONSE

@pytest.fixture()
def small_max(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(transport, "MAX_RESPONSE", 1000)
    return 1000


def test_body_of_exactly_max_response_is_read_and_kept(serve, small_max: int) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % small_max + b"b" * small_max
    srv = serve(answer_each(big, OK))
    c = client()
    assert [post(c, srv.url()).status for _ in range(2)] == [200, 200]
    srv.finish()
    assert srv.accepts == 1


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"b" * 5000,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    + (b"2EE\r\n" + b"c" * 750 + b"\r\n") * 2 + b"0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n" + b"d" * 5000,  # read-to-close, and the server never closes
], ids=["content-length", "chunked", "read-to-close"])
def test_body_over_max_response_keeps_the_status_and_drops_the_connection(
        serve, small_max: int, response: bytes) -> None:
    srv = serve(answer_then_expect_eof(response), answer(OK))
    c = client()
    r1, elapsed = timed(lambda: post(c, srv.url()))
    assert (r1.status, r1.error) == (200, None)  # the status counts; the body is not read
    assert elapsed < QUICK  # not waiting for the rest of the body or a close
    assert srv.events["eof"].wait(WAIT)
    assert post(c, srv.url()).status == 200
    srv.finish()
    assert srv.accepts == 2


def test_negative_chunk_size_cannot_bypass_the_read_cap(serve, monkeypatch) -> None:
    """http.client reads a negative chunk size as "the rest": the attempt's byte budget
    (MAX_RESPONSE plus room for the head) still ends the read."""
    monkeypatch.setattr(transport, "MAX_RESPONSE", 1000)
    monkeypatch.setattr(transport, "HEAD_ROOM", 4096)
    srv = serve(lambda p: (
        p.read_request(),
        p.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"-FFFF\r\n"),
        p.send_lenient(b"e" * 200_000),
        p.wait_eof()))
    r, elapsed = timed(lambda: post(client(), srv.url()))
    # Either refused as malformed or dropped like any other body over MAX_RESPONSE.
    assert r.error is not None or r.status == 200
    assert elapsed < QUICK


# --------------------------------------------------------------------------- request bytes

def test_request_bytes_are_exact(serve) -> None:
    srv = serve(answer_each(OK, OK))
    c = client()
    body = b'{"event": "door", "open": true}'
    headers = {"Content-Type": "application/json", "User-Agent": "edgehook/test",
               "X-Signature": "v1,abc=", "X-Empty": ""}
    assert post(c, srv.url("/hooks/in?source=mqtt&x=%20y#fragment"), body,
                headers=headers).status == 200
    assert post(c, srv.url(""), b"", method="PUT", headers={"User-Agent": "u"}).status == 200
    srv.finish()
    host = b"Host: 127.0.0.1:" + str(srv.port).encode() + b"\r\n"
    assert srv.requests == [
        b"POST /hooks/in?source=mqtt&x=%20y HTTP/1.1\r\n" + host +
        b"Accept-Encoding: identity\r\n"
        b"Content-Length: 31\r\n"
        b"Content-Type: application/json\r\n"
        b"User-Agent: edgehook/test\r\n"
        b"X-Signature: v1,abc=\r\n"
        b"X-Empty: \r\n"
        b"\r\n" + body,
        b"PUT / HTTP/1.1\r\n" + host +
        b"Accept-Encoding: identity\r\n"
        b"Content-Length: 0\r\n"
        b"User-Agent: u\r\n"
        b"\r\n",
    ]


def test_non_ascii_path_is_percent_encoded(serve) -> None:
    """As requests does: the UTF-8 bytes, percent-encoded."""
    srv = serve(answer(OK))
    assert post(client(), srv.url("/h\u00f6ok?q=\u00e9")).status == 200
    srv.finish()
    assert srv.requests[0].startswith(b"POST /h%C3%B6ok?q=%C3%A9 HTTP/1.1\r\n")


@pytest.fixture()
def ipv6_loopback() -> str:
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6 support")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback (::1) here: {exc}")
    return "::1"


def test_ipv6_literal_host_header_is_bracketed(serve, ipv6_loopback: str) -> None:
    srv = serve(answer(OK), host=ipv6_loopback)
    r = post(client(), srv.url("/v6"), b"x")
    assert (r.status, r.error) == (200, None)
    srv.finish()
    assert srv.requests[0].startswith(b"POST /v6 HTTP/1.1\r\nHost: [::1]:%d\r\n" % srv.port)


@pytest.mark.parametrize(("url", "clean", "origin", "auth"), [
    ("http://example.com/a", "http://example.com/a", ("http", "example.com", 80), None),
    ("https://example.com:443/a", "https://example.com:443/a",
     ("https", "example.com", 443), None),
    ("https://example.com:80/a#frag", "https://example.com:80/a",
     ("https", "example.com", 80), None),
    ("HTTP://User:pw@Example.COM:8080/a?b=c", "http://Example.COM:8080/a?b=c",
     ("http", "example.com", 8080), "User:pw"),
    ("https://us%3Aer:p%40ss%2Fw%C3%B6rd@h.example/x", "https://h.example/x",
     ("https", "h.example", 443), "us:er:p@ss/w\u00f6rd"),
    ("https://token@h.example/x", "https://h.example/x", ("https", "h.example", 443), "token:"),
    ("https://:only-a-password@h.example/", "https://h.example/",
     ("https", "h.example", 443), ":only-a-password"),
    ("http://[::1]/a", "http://[::1]/a", ("http", "::1", 80), None),
    ("https://u:p@[2001:db8::1]:8443/a", "https://[2001:db8::1]:8443/a",
     ("https", "2001:db8::1", 8443), "u:p"),
])
def test_parse_target_strips_and_decodes_credentials(url: str, clean: str,
                                                     origin: tuple[str, str, int],
                                                     auth: str | None) -> None:
    t = parse_target(url)
    assert (t.url, (t.scheme, t.host, t.port)) == (clean, origin)
    if auth is None:
        assert t.authorization is None
    else:
        assert t.authorization == "Basic " + base64.b64encode(auth.encode()).decode()


def test_url_credentials_are_sent_as_basic_auth_and_never_in_the_request_line(serve) -> None:
    srv = serve(answer_each(OK, OK))
    c = client()
    url = f"http://hook%20user:{SECRET}%40x@127.0.0.1:{srv.port}/in"
    assert post(c, url).status == 200
    assert post(c, url, headers={"Authorization": "Bearer configured"}).status == 200
    srv.finish()
    first, second = srv.requests
    assert first.startswith(b"POST /in HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % srv.port)
    expected = base64.b64encode(f"hook user:{SECRET}@x".encode())
    assert head_of(first)[b"authorization"] == b"Basic " + expected
    assert head_of(second)[b"authorization"] == b"Bearer configured"  # the config's wins
    assert SECRET.encode() not in first.split(b"\r\n")[0]


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("method", "path", "headers"), [
    ("POST", "/hook", {"Authorization": f"Bearer {SECRET}\r\nX-Injected: 1"}),
    ("POST", "/hook", {"Authorization": f"Bearer {SECRET}\nX-Injected: 1"}),
    ("POST", "/hook", {"Authorization": f"Bearer {SECRET}\rX-Injected: 1"}),
    ("POST", "/hook", {"Authorization": f"Bearer {SECRET}\x00"}),
    ("POST", "/hook", {"Authorization": f"Bearer {SECRET}\u20ac"}),  # not Latin-1
    ("POST", "/hook", {f"X-{SECRET}: x": "v"}),
    ("POST", "/hook", {f"X {SECRET}": "v"}),
    ("POST", f"/hook?token={SECRET} x", {}),
    ("POST", f"/hook?token={SECRET}\r\nX-Injected: 1", {}),
    ("POST", f"/hook?token={SECRET}\x7f", {}),
    ("PO ST", f"/hook?token={SECRET}", {}),
    ("POST\r\nX-Injected: 1", f"/hook?token={SECRET}", {}),
    ("", f"/hook?token={SECRET}", {}),
])
def test_unsendable_request_is_refused_before_anything_is_sent(
        serve, method: str, path: str, headers: dict[str, str]) -> None:
    srv = serve()  # no handler: any connection is an error
    r = client().send(method, srv.url(path), headers, b"{}", TIMEOUT)
    assert r.status is None and r.final
    assert r.error is not None and SECRET not in r.error
    srv.finish()
    assert srv.accepts == 0


@pytest.mark.parametrize(("headers", "why"), [
    ({"A": "x", "B": "caf\u00e9"}, None),  # Latin-1 is fine
    ({"A": "x\ty"}, None),
    ({"A": "\u20ac", "B": "x\ny"}, "a header value is not Latin-1"),  # the first one's reason
    ({"A": "x\ny", "B": "\u20ac"}, "a header name or value HTTP cannot carry"),
    ({"A": "\u20ac", "B C": "x"}, "a header value is not Latin-1"),
    ({"B C": "x", "A": "\u20ac"}, "a header name or value HTTP cannot carry"),
])
def test_header_check_names_the_first_unusable_header(headers: dict[str, str],
                                                      why: str | None) -> None:
    for _ in range(2):  # the second time with the names remembered
        found = transport._check_request("POST", headers)
        assert found == (None if why is None else f"invalid request: {why}")


@pytest.mark.parametrize("url", [
    f"ftp://127.0.0.1/hook?token={SECRET}",
    f"http:///hook?token={SECRET}",
    f"127.0.0.1/hook?token={SECRET}",
    f"http://127.0.0.1:99999/hook?token={SECRET}",
    f"http://127.0.0.1:{SECRET}/hook",
    f"http://[::1/hook?token={SECRET}",
    f"http://exa mple.com/hook?token={SECRET}",
    f"http://u:{SECRET}@127.0.0.1:0/hook",
])
def test_invalid_url_is_refused_without_echoing_it(url: str) -> None:
    r = client().send("POST", url, {}, b"{}", TIMEOUT)
    assert r.status is None and r.final
    assert r.error is not None and SECRET not in r.error and "127.0.0.1" not in r.error


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example"])
def test_host_that_cannot_be_encoded_is_refused(host: str) -> None:
    r = client().send("POST", f"http://{host}/hook?token={SECRET}", {}, b"{}", TIMEOUT)
    assert r.status is None and r.final
    assert r.error is not None and SECRET not in r.error


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding"])
def test_caller_host_or_framing_header_is_not_duplicated(serve, name: str) -> None:
    srv = serve(answer(OK))
    value = {"Host": "virtual.example", "content-length": "2"}.get(name, "chunked")
    r = post(client(), srv.url(), b"{}", headers={name: value})
    srv.finish()
    assert r.status == 200
    head = srv.requests[0].split(b"\r\n\r\n")[0].lower()
    if name == "Transfer-Encoding":  # framing is ours: Content-Length, never chunked
        assert b"transfer-encoding" not in head and b"\r\ncontent-length: 2" in head
    else:
        assert head.count(b"\r\n" + name.lower().encode() + b":") == 1
    if name == "Host":
        assert b"\r\nhost: virtual.example" in head


# --------------------------------------------------------------------------- timeouts

def test_server_that_never_answers_times_out(serve) -> None:
    srv = serve(lambda p: (p.read_request(), p.hold()))
    r, elapsed = timed(lambda: post(client(), srv.url(), timeout=0.5))
    assert (r.status, r.error, r.final) == (None, "timeout", False)
    assert 0.45 <= elapsed < 0.5 + 0.5


def test_server_that_stalls_mid_head_times_out(serve) -> None:
    srv = serve(lambda p: (p.read_request(), p.send(b"HTTP/1.1 200 OK\r\nContent-"), p.hold()))
    r, elapsed = timed(lambda: post(client(), srv.url(), timeout=0.5))
    assert (r.status, r.error) == (None, "timeout")
    assert elapsed < 0.5 + 0.5


def _trickle(data: bytes, every: float = 0.05) -> Handler:
    """Read the request, then send `data` a byte at a time, `every` seconds apart."""
    def handle(peer: Peer) -> None:
        peer.read_request()
        for i in range(len(data)):
            if peer.server.stopping.wait(every):  # pacing, not synchronisation
                return
            try:
                peer.sock.sendall(data[i:i + 1])
            except OSError:
                return  # the client gave up: that is the point
    return handle


@pytest.mark.parametrize("where", ["head", "body"])
def test_a_trickling_server_cannot_stretch_an_attempt_past_its_timeout(
        serve, where: str) -> None:
    """Every read gets bytes well within any per-read timeout, yet the attempt ends
    at its deadline: the timeout is for the whole attempt."""
    if where == "head":
        srv = serve(_trickle(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n"))
    else:
        srv = serve(lambda p: (p.read_request(),
                               p.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
                               _trickle(b"b" * 100)(_Replayed(p))))
    r, elapsed = timed(lambda: post(client(), srv.url(), timeout=0.5))
    assert (r.status, r.error, r.final) == (None, "timeout", False)
    assert 0.45 <= elapsed < 0.5 + 0.4


class _Replayed(Peer):
    """A peer whose request was read already (for a handler that reads it again)."""

    def __init__(self, peer: Peer) -> None:
        super().__init__(peer.sock, peer.server)

    def read_request(self) -> bytes:
        return b""


def test_timed_out_connection_is_not_reused(serve) -> None:
    def late(peer: Peer) -> None:
        peer.read_request()
        peer.server.events["timed out"].wait(WAIT)
        peer.send_lenient(OK)  # the answer to request 1 arrives after the client gave up
        peer.wait_eof()
    srv = serve(late, answer(CREATED))
    c = client()
    assert post(c, srv.url(), timeout=0.3).error == "timeout"
    srv.events["timed out"].set()
    r = post(c, srv.url())
    assert (r.status, r.error) == (201, None)  # not request 1's late 200
    srv.finish()
    assert srv.accepts == 2


def test_endless_interim_responses_end_within_the_timeout(serve) -> None:
    def trickle(peer: Peer) -> None:
        peer.read_request()
        until = time.monotonic() + 1.0
        while time.monotonic() < until and not peer.server.stopping.wait(0.05):  # pacing
            peer.send_lenient(b"HTTP/1.1 102 Processing\r\n\r\n")
        peer.wait_eof()
    srv = serve(trickle)
    r, elapsed = timed(lambda: post(client(), srv.url(), timeout=0.25))
    assert r.status is None
    assert elapsed < 0.25 + 0.4


def test_too_many_interim_responses_are_a_bad_response(serve) -> None:
    srv = serve(_answer_and_hold(b"HTTP/1.1 102 Processing\r\n\r\n" * 20 + OK))
    r = post(client(), srv.url())
    assert r.status is None and r.error is not None
    assert "interim" in r.error and r.error.startswith("bad response")


def test_redirects_are_answers_not_followed(serve) -> None:
    srv = serve(answer_each(b"HTTP/1.1 301 Moved\r\nLocation: /elsewhere\r\n"
                            b"Content-Length: 0\r\n\r\n",
                            b"HTTP/1.1 307 Temporary\r\nLocation: http://127.0.0.1:9/\r\n"
                            b"Content-Length: 0\r\n\r\n"))
    c = client()
    assert [post(c, srv.url()).status for _ in range(2)] == [301, 307]
    srv.finish()
    assert len(srv.requests) == 2 and srv.accepts == 1


# --------------------------------------------------------------------------- proxies

class Proxy:
    """A tiny forward proxy on 127.0.0.1: records each request head; answers plain
    http:// requests itself (200, "via proxy"), and tunnels CONNECT to the target."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.02)
        self.port = self.listener.getsockname()[1]
        self.heads: list[bytes] = []
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="proxy")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(WAIT)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            self.heads.append(head)
            line = head.split(b"\r\n")[0]
            if line.startswith(b"CONNECT "):
                host, _, port = line.split()[1].rpartition(b":")
                upstream = socket.create_connection((host.decode(), int(port)), timeout=WAIT)
                sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self._pipe(sock, upstream, rest)
                return
            length = int(head_of(buf).get(b"content-length", b"0"))
            while len(rest) < length:
                rest += sock.recv(65536)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\n"
                         b"via proxy")
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            sock.close()

    def _pipe(self, a: socket.socket, b: socket.socket, pending: bytes) -> None:
        if pending:
            b.sendall(pending)
        with b:
            while not self.stopping.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(WAIT)
        self.listener.close()
        if self.errors:
            raise self.errors[0]


@pytest.fixture()
def proxy() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.stop()


def test_http_proxy_from_the_environment_gets_the_absolute_url(serve, proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://pxuser:px%40pass@127.0.0.1:{proxy.port}")
    srv = serve()  # never reached: the proxy answers
    r = post(client(), f"http://u:{SECRET}@127.0.0.1:{srv.port}/hook?a=1")
    assert (r.status, r.error) == (200, None)
    (head,) = proxy.heads
    assert head.split(b"\r\n")[0] == b"POST http://127.0.0.1:%d/hook?a=1 HTTP/1.1" % srv.port
    fields = head_of(head + b"\r\n\r\n")
    assert fields[b"proxy-authorization"] == b"Basic " + base64.b64encode(b"pxuser:px@pass")
    assert fields[b"authorization"] == b"Basic " + base64.b64encode(f"u:{SECRET}".encode())
    assert SECRET.encode() not in head.split(b"\r\n")[0]
    srv.finish()
    assert srv.accepts == 0


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "127.0.0.0/8", "localhost, 127.0.0.1", "*"])
def test_no_proxy_goes_direct(serve, proxy, monkeypatch, no_proxy: str) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    srv = serve(answer(OK))
    assert post(client(), srv.url()).status == 200
    srv.finish()
    assert proxy.heads == [] and srv.accepts == 1


def test_proxy_decision_matches_requests(monkeypatch) -> None:
    """Same environment, same answer as requests for each URL (its own code decides)."""
    import requests

    monkeypatch.setenv("HTTPS_PROXY", "proxy.example:3128")
    monkeypatch.setenv("http_proxy", "http://plain.example:8080")
    monkeypatch.setenv("NO_PROXY", "internal.example,10.0.0.0/8")
    s = requests.Session()
    t = Transport()
    for url in ("https://hooks.example/x", "http://hooks.example/x",
                "https://api.internal.example/x", "http://10.1.2.3:8123/x"):
        settings = s.merge_environment_settings(url, {}, None, None, None)
        want = requests.utils.select_proxy(url, settings["proxies"])
        want = requests.utils.prepend_scheme_if_needed(want, "http") if want else None
        assert t._proxy_for(parse_target(url)) == want, url


def test_a_proxy_that_refuses_is_a_retryable_proxy_error(monkeypatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{s.getsockname()[1]}")
        r = post(client(), "http://hooks.example/x")
    assert r.status is None and not r.final
    assert r.error is not None and r.error.startswith("proxy: ConnectionRefusedError"), r.error


# --------------------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the openssl binary is required in CI (to make a test certificate)")
        pytest.skip("the openssl binary is not installed: no test certificate for TLS")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.fixture()
def tls_server_ctx(tls_cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_cert)
    return ctx


def trusting(cert: Path) -> WebhookTls:
    return WebhookTls(ca_file=str(cert))


def test_tls_post_with_a_trusted_ca_file(serve, tls_cert, tls_server_ctx) -> None:
    srv = serve(answer_each(OK, CREATED), tls=tls_server_ctx)
    c = client(trusting(tls_cert[0]))
    r1 = post(c, srv.url("/secure", scheme="https"), b"one")
    r2 = post(c, srv.url("/secure", scheme="https"), b"two")
    assert (r1.status, r1.error, r2.status, r2.error) == (200, None, 201, None)
    srv.finish()
    assert srv.accepts == 1
    assert srv.requests[0].startswith(b"POST /secure HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                      % srv.port)
    assert body_of(srv.requests[0]) == b"one"


def test_tls_sni_names_the_host(serve, tls_cert) -> None:
    seen: list[str | None] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_cert)
    ctx.sni_callback = lambda sock, name, _ctx: seen.append(name)  # type: ignore[assignment]
    srv = serve(answer(OK), tls=ctx)
    r = post(client(trusting(tls_cert[0])), f"https://localhost:{srv.port}/")
    assert (r.status, r.error) == (200, None)
    assert seen == ["localhost"]


def test_ssl_cert_file_is_honoured_without_tls_files(serve, tls_cert, tls_server_ctx,
                                                     monkeypatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_cert[0]))
    srv = serve(answer(OK), tls=tls_server_ctx)
    r = post(client(), srv.url(scheme="https"))
    assert (r.status, r.error) == (200, None)


def test_tls_idle_connection_closed_by_server_is_remade(serve, tls_cert,
                                                        tls_server_ctx) -> None:
    srv = serve(_answer_then_close, answer(OK), tls=tls_server_ctx)
    c = client(trusting(tls_cert[0]))
    assert post(c, srv.url(scheme="https")).status == 200
    assert srv.events["closed"].wait(WAIT)
    r = post(c, srv.url(scheme="https"))
    assert (r.status, r.error) == (200, None)
    srv.finish()
    assert srv.accepts == 2


def test_tls_stale_keep_alive_connection_is_retried(serve, tls_cert, tls_server_ctx) -> None:
    srv = serve(_answer_then_drop_the_next, answer(CREATED), tls=tls_server_ctx)
    c = client(trusting(tls_cert[0]))
    assert post(c, srv.url(scheme="https"), b"first").status == 200
    r = post(c, srv.url(scheme="https"), b"second")
    assert (r.status, r.error) == (201, None)
    srv.finish()
    assert srv.accepts == 2


def test_tls_trickling_server_times_out(serve, tls_cert, tls_server_ctx) -> None:
    srv = serve(_trickle(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n"),
                tls=tls_server_ctx)
    r, elapsed = timed(lambda: post(client(trusting(tls_cert[0])), srv.url(scheme="https"),
                                    timeout=0.5))
    assert (r.status, r.error) == (None, "timeout")
    assert elapsed < 0.5 + 0.4


def test_tls_default_context_rejects_a_self_signed_certificate(serve, tls_server_ctx) -> None:
    srv = serve(answer(OK), tls=tls_server_ctx)
    r, elapsed = timed(lambda: post(client(), srv.url(scheme="https")))
    assert r.status is None and not r.final
    assert r.error is not None and r.error.startswith("SSLCertVerificationError")
    assert "CERTIFICATE_VERIFY_FAILED" in r.error
    assert elapsed < QUICK
    srv.finish()
    assert srv.accepts == 1
    assert len(srv.tls_failures) == 1 and srv.requests == []


def test_tls_hostname_must_match_the_certificate(serve, tls_cert, tls_server_ctx) -> None:
    """Trusting the certificate is not enough: 127.0.0.2 is not a name in it."""
    try:
        srv = serve(host="127.0.0.2", tls=tls_server_ctx)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.2 here: {exc}")
    r = post(client(trusting(tls_cert[0])), srv.url(scheme="https"))
    assert r.status is None and not r.final
    assert r.error is not None and r.error.startswith("SSLCertVerificationError")
    assert "127.0.0.2" in r.error  # the mismatch, not an unknown issuer
    srv.finish()
    assert srv.accepts == 1 and len(srv.tls_failures) == 1


def test_tls_client_certificate_for_mutual_tls(serve, tls_cert) -> None:
    cert, key = tls_cert
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(cert))  # the same self-signed cert is the client's
    srv = serve(answer(OK), lambda p: None, tls=ctx)
    r = post(client(WebhookTls(ca_file=str(cert), cert_file=str(cert), key_file=str(key))),
             srv.url(scheme="https"))
    assert (r.status, r.error) == (200, None)
    without = post(client(trusting(cert)), srv.url(scheme="https"))
    assert without.status is None and without.error is not None and not without.final
    srv.finish()


def test_unreadable_tls_files_are_a_retryable_error(tmp_path: Path) -> None:
    r = post(client(WebhookTls(ca_file=str(tmp_path / "missing.pem"))),
             "https://127.0.0.1:9/")
    assert r.status is None and not r.final
    assert r.error is not None and r.error.startswith("TLS files: FileNotFoundError")


def test_https_through_a_proxy_tunnel_with_a_ca_file(serve, proxy, tls_cert, tls_server_ctx,
                                                     monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    srv = serve(answer_each(OK, CREATED), tls=tls_server_ctx)
    c = client(trusting(tls_cert[0]))
    r1 = post(c, srv.url("/tunnelled", scheme="https"), b"one")
    r2 = post(c, srv.url("/tunnelled", scheme="https"), b"two")
    assert (r1.status, r1.error, r2.status, r2.error) == (200, None, 201, None)
    assert len(proxy.heads) == 1  # one tunnel, kept alive
    assert proxy.heads[0].startswith(b"CONNECT 127.0.0.1:%d HTTP/1." % srv.port)
    srv.finish()
    assert [body_of(r) for r in srv.requests] == [b"one", b"two"]
