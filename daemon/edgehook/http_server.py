"""The HTTP listener: the standard library's ThreadingHTTPServer, with limits around it.

http.server reads and parses every request (`handle_one_request`, `parse_request`,
http.client's header parser); this module only overrides documented hooks (the
handler's `setup`, `finish`, `parse_request`, `handle_expect_100`, `send_error`,
`version_string`, `log_request`, `log_message` and `do_*`; the server's
`verify_request`, `process_request`, `finish_request`, `handle_error`) and hands
each request to the routes (`api.Api.handle`). The limits:

- **Time.** A request as a whole must arrive within `http.timeout` (default 5 s) from
  the moment the server waits for it: a client trickling one byte a second would
  otherwise reset a per-read timeout for ever. :class:`~edgehook.deadlines.Deadlines`
  shuts the socket's reading side when that time passes, so the blocked read returns.
  A request that was started (any byte of it arrived) is then answered 408 with a JSON
  error and closed; an idle connection (nothing asked) is closed without an answer.
  The socket's own timeout is only a backstop, `SOCKET_SLACK` times longer, so it never
  races the deadline (its expiry would end the connection without an answer).
- **Size.** The request line may be 8 KiB (else 414), the head 64 lines and 32 KiB
  (else 431). http.client reads a head under its own, larger caps (64 KiB a line,
  100 lines); ours are checked once it is parsed, so a hostile head costs at most
  those caps for at most `http.timeout`. A body over `http.max_body` is refused (413)
  from its Content-Length, unread, and `Expect: 100-continue` is not answered for it.
- **Chunked bodies are refused** (411 Length Required): every known caller of a hook
  (Home Assistant, GitHub, curl, phone shortcuts) sends Content-Length, and decoding
  chunks would be a second body reader to keep bounded. The connection is closed after
  any body left unread, so it cannot be taken for the next request.
- **Connections.** At most `http.max_connections` are served at once (a slot taken in
  `verify_request`, before a thread exists); one more is answered 503 at once and
  closed, so a flood costs a refused connection, not a thread or memory.
- **Methods** the API never uses get 501 (http.server finds no `do_` method).
- **Host.** More than one `Host` header is 400 (RFC 9112 3.2). An absolute-form target
  (`GET http://host/path`) names the host: it replaces the `Host` header before the
  routes see the request (RFC 9112 3.2.2), so the loopback-Host guard judges that host.
- **Expect.** `100-continue` is understood; any other expectation is 417.
- **Header syntax.** A line that is no header, or a folded line, is 400. http.client's
  parser also reports defects about a multipart *body* (it has none to look at); those
  are not header errors and pass (a hook then answers 415 for the body type).

Every error is JSON `{"error", "detail"}` with the right 4xx, http.server's own too
(`send_error`); nothing a client sends gets a 500. An unexpected bug is a logged 500.
"""

from __future__ import annotations

import email.errors
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .api import Api
from .deadlines import Deadlines
from .routing import HttpError, Request, Response, error_response, request_kind

_LOG = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8192    # bytes; longer is 414
MAX_HEADER_LINE = 8192     # bytes of one header (name, value); longer is 431
MAX_HEADERS = 64           # headers; more is 431
MAX_HEAD_BYTES = 32768     # all headers together; more is 431
SOCKET_SLACK = 2.0         # the socket timeout is this many times http.timeout (a backstop)
# the defects of http.client's parser that are about the head's syntax (the others are
# about a multipart body, which a parsed head never has)
_HEADER_DEFECTS = (email.errors.MissingHeaderBodySeparatorDefect,
                   email.errors.FirstHeaderLineIsContinuationDefect,
                   email.errors.MisplacedEnvelopeHeaderDefect, email.errors.HeaderDefect)
# the detail of http.server's own refusals that come without a message
_DEFAULT_DETAIL = {414: f"request line over {MAX_REQUEST_LINE} bytes"}
# serve_forever sleeps in select() with no timeout: an idle daemon never wakes for
# it; stop() wakes it with a connection to itself (see HttpServer.stop)
POLL_INTERVAL = None
_BUSY_BODY = b'{"error":"busy","detail":"too many connections; retry shortly"}'
_date = (0, "")  # (second, its Date header), shared by every handler thread
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
         + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class _Handler(BaseHTTPRequestHandler):
    """One connection: http.server parses, :meth:`_serve` answers through the Api."""

    server_version = f"edgehook/{__version__}"
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # errors get a status line even for garbage
    disable_nagle_algorithm = True        # status line and body are two writes
    server: _Server

    # ---------------------------------------------------------------- connection
    def setup(self) -> None:
        self.timeout = self.server.request_timeout * SOCKET_SLACK  # the deadline ends reads
        self._key = self.server.deadlines.key()
        self._client = self.client_address[0]
        super().setup()
        self._await_request()

    def finish(self) -> None:
        self.server.deadlines.disarm(self._key)
        super().finish()

    def _await_request(self) -> None:
        """Arm the next request's deadline: all of it must be in within http.timeout."""
        self._kind = "other"
        self._deadline = time.monotonic() + self.server.request_timeout
        self.server.deadlines.arm(self._key, self.connection, self._deadline)

    def parse_request(self) -> bool:
        """http.server's parsing, then our limits on the head; False once answered."""
        deadlines = self.server.deadlines
        self.command, self.requestline = "", ""  # for an answer before http.server's parse
        self.request_version = self.default_request_version
        if deadlines.passed(self._key):
            return self._timed_out()  # the request line was cut short
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.send_error(414, f"request line over {MAX_REQUEST_LINE} bytes")
            return False
        try:
            ok = super().parse_request()
        except TimeoutError:  # the backstop: the deadline thread was later still
            return self._timed_out()
        if deadlines.passed(self._key):
            return self._timed_out() if ok else False
        if not ok:
            return False
        if len(self.requestline.split()) != 3:
            self.send_error(400, "HTTP/0.9 requests are not served")
            return False
        if any(isinstance(d, _HEADER_DEFECTS) for d in self.headers.defects) or \
                any("\n" in v for v in self.headers.values()):
            # http.client keeps going after a line that is no header (and the headers
            # after it silently become "body"), and joins folded lines: both are 400
            self.send_error(400, "malformed header line")
            return False
        sizes = [len(k) + len(v) + 4 for k, v in self.headers.items()]
        if len(sizes) > MAX_HEADERS or sum(sizes) > MAX_HEAD_BYTES or \
                any(n > MAX_HEADER_LINE for n in sizes):
            self.send_error(431, f"at most {MAX_HEADERS} header lines, {MAX_HEADER_LINE} "
                                 f"bytes each, {MAX_HEAD_BYTES} bytes in all")
            return False
        if not self._host_ok() or not self._expect_ok():
            return False
        deadlines.disarm(self._key)  # the head is in; a body is read under its own arming
        return True

    def _host_ok(self) -> bool:
        """One Host at most; an absolute-form target's host replaces it. False once answered."""
        if len(self.headers.get_all("Host", [])) > 1:
            self.send_error(400, "more than one Host header")
            return False
        if self.path.startswith("/") or "://" not in self.path.partition("?")[0]:
            return True
        try:  # absolute-form: http://host:port/path?query
            target = urlsplit(self.path)
        except ValueError:
            target = None
        host = target.netloc.rpartition("@")[2] if target else ""
        if not host:
            self.send_error(400, "absolute-form target without a host")
            return False
        del self.headers["Host"]
        self.headers["Host"] = host
        self.path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        return True

    def _expect_ok(self) -> bool:
        """Only `Expect: 100-continue` is understood (else 417). False once answered."""
        values = [v.strip().lower() for h in self.headers.get_all("Expect", [])
                  for v in h.split(",") if v.strip()]
        if all(v == "100-continue" for v in values):
            return True
        self.send_error(417, "only Expect: 100-continue is understood")
        return False

    def _timed_out(self) -> bool:
        self.server.deadlines.disarm(self._key)
        self.server.api.stats.bump("timeouts")
        self.send_error(408, "request not received in time")
        return False

    def handle_expect_100(self) -> bool:
        """Say 100 Continue only for a body that will be read (not too large, not chunked)."""
        if not self._expect_ok():
            return False  # another expectation beside 100-continue: 417, nothing read
        length = self.headers.get("Content-Length", "").strip()
        if "Transfer-Encoding" in self.headers or not length.isdigit() or \
                int(length) > self.server.api.max_body:
            return True  # _serve answers without reading; the client sends nothing
        return super().handle_expect_100()

    # ---------------------------------------------------------------- requests
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET  # noqa: N815

    def _serve(self) -> None:
        """Build the Request, let the Api answer it, write the Response."""
        path, _, query = self.path.partition("#")[0].partition("?")  # origin-form now
        self._kind = request_kind(path)
        api = self.server.api
        req = Request(method=self.command, path=path, query={}, headers=self.headers,
                      peer=self.client_address[0], raw_query=query)
        self._body_pending = False
        self._client = req.peer
        try:
            if query:
                req.query = parse_qs(query, keep_blank_values=True, max_num_fields=200)
            req.reader = self._body_reader(api.max_body)
            resp = api.handle(req)
        except HttpError as exc:  # a Content-Length we cannot trust: where is the next request?
            resp = error_response(exc)
            self.close_connection = True
        except ValueError:  # parse_qs: too many fields
            resp = Response(400, {"error": "bad_request", "detail": "query too long"})
        except Exception:
            _LOG.exception("http %s %s failed", self.command, self._kind)
            resp = Response(500, {"error": "internal", "detail": "see the daemon's log"})
        if self._body_pending:
            self.close_connection = True  # an unread body would be taken for the next request
        self._client = req.client or req.peer
        api.stats.count(self._kind, resp.status, req.params.get("hook"))
        self._send(resp)

    def _body_reader(self, max_body: int) -> Callable[[], bytes]:
        """A callable that reads the body once, within the request's deadline."""
        raw = self.headers.get("Content-Length")
        if len({v.strip() for v in self.headers.get_all("Content-Length", [])}) > 1:
            raise HttpError(400, "bad_request", "conflicting Content-Length headers")
        if "Transfer-Encoding" in self.headers:
            self._body_pending = True

            def refuse() -> bytes:
                raise HttpError(411, "length_required", "send Content-Length, not chunked")
            return refuse
        if raw is None:
            return lambda: b""
        raw = raw.strip()
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
            raise HttpError(400, "bad_request", "bad Content-Length")
        length = int(raw)
        self._body_pending = length > 0

        def read() -> bytes:
            if length > max_body:
                raise HttpError(413, "too_large", f"body over {max_body} bytes")
            if not length:
                return b""
            deadlines = self.server.deadlines
            deadlines.arm(self._key, self.connection, self._deadline)
            try:
                data = self.rfile.read(length)
            except TimeoutError:
                data = None
            if deadlines.disarm(self._key) or data is None:
                self.server.api.stats.bump("timeouts")
                raise HttpError(408, "request_timeout", "request body not received in time")
            if len(data) < length:
                raise HttpError(400, "bad_request", "body shorter than Content-Length")
            self._body_pending = False
            return data
        return read

    def _send(self, resp: Response) -> None:
        data, ctype = resp.payload()
        self.send_response(resp.status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in resp.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)
        if not self.close_connection:
            self._await_request()

    # ---------------------------------------------------------------- http.server's hooks
    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, 431, 501...) as JSON too."""
        self.close_connection = True
        try:
            error = HTTPStatus(code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            error = "error"
        self.server.api.stats.count(self._kind, code)
        _LOG.debug("http %s refused: %d %s", self.client_address[0], code, message)
        detail = message or explain or _DEFAULT_DETAIL.get(code)
        if not detail:
            try:
                detail = HTTPStatus(code).description
            except ValueError:
                detail = error
        self._send(Response(code, {"error": error, "detail": detail}))

    def version_string(self) -> str:
        """The Server header: edgehook/<version>, nothing about Python."""
        return self.server_version

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The Date header, formatted once a second: http.server formats it for every
        answer through email.utils, a few percent of a sync hook's CPU."""
        global _date
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        if _date[0] != second:
            _date = (second, super().date_time_string(second))
        return _date[1]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One debug line per answer: the kind of request, never its path or query."""
        _LOG.debug("http %s %s %s %s", self._client, self.command, self._kind, code)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        _LOG.debug("http %s " + format, self.client_address[0], *args)


class _Server(ThreadingHTTPServer):
    """Thread per connection, at most `max_connections` of them; the rest get a quick 503."""

    daemon_threads = True
    block_on_close = False  # stop() does not wait for idle keep-alive connections
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], api: Api, timeout: float,
                 max_connections: int) -> None:
        self.api = api
        self.request_timeout = timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.deadlines = Deadlines()
        try:
            super().__init__(addr, _Handler)
        except BaseException:
            self.deadlines.stop()
            raise

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # dual stack: IPv4 callers arrive as ::ffff:a.b.c.d (hooks.py maps them back)
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection slot, or answer 503 and refuse the connection."""
        if self.slots.acquire(blocking=False):
            return True
        self._busy(request)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread could be started: answer like a full server
            self.slots.release()
            self._busy(request)
            self.shutdown_request(request)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            super().finish_request(request, client_address)
        finally:
            self.slots.release()

    def _busy(self, request: Any) -> None:
        self.api.stats.bump("rejected_connections")
        try:
            request.setblocking(False)
            try:
                request.recv(65536)  # whatever already arrived, so close() sends FIN not RST
            except OSError:
                pass
            request.send(_BUSY)
        except OSError:
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed: a client that went away is no news; a bug is."""
        if isinstance(sys.exc_info()[1], OSError):
            _LOG.debug("http: connection from %s ended: %s", client_address[0],
                       sys.exc_info()[1])
            return
        _LOG.exception("http: connection from %s failed", client_address[0])

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.stop()


class HttpServer:
    """The HTTP listener bound to config's address, serving in its own thread."""

    def __init__(self, host: str, port: int, api: Api, timeout: float = 5.0,
                 max_connections: int | None = None) -> None:
        server_cls = _Server
        if ":" in host:
            server_cls = type("V6Server", (_Server,), {"address_family": socket.AF_INET6})
        self.httpd = server_cls((host, port), api, timeout,
                                max_connections or api.max_connections)
        self.address = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def api(self) -> Api:
        """The routes serving requests now."""
        return self.httpd.api

    def start(self) -> None:
        """Accept connections in a thread of its own."""
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        args=(POLL_INTERVAL,), name="edgehook-http",
                                        daemon=True)
        self._thread.start()

    def set_api(self, api: Api) -> None:
        """Swap the routes' config snapshot (reload) as one reference; keep guards/stats."""
        api.adopt(self.httpd.api)
        self.httpd.api = api

    def stop(self) -> None:
        """Stop accepting; requests in flight finish on their own threads."""
        if self._thread is not None:
            stopper = threading.Thread(target=self.httpd.shutdown, daemon=True)
            stopper.start()
            deadline = time.monotonic() + 2
            while stopper.is_alive() and time.monotonic() < deadline:
                self._wake()  # the loop sees the shutdown request once select() returns
                stopper.join(0.05)
            self._thread.join(timeout=2)
        self.httpd.server_close()

    def _wake(self) -> None:
        """Connect to our own listener, so that serve_forever's select() returns."""
        host, port = self.httpd.server_address[:2]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        try:
            socket.create_connection((host, port), timeout=0.5).close()
        except OSError:
            pass  # nothing to wake: the loop has ended already
