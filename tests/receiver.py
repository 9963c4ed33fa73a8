"""A real HTTP/1.1 keep-alive webhook receiver on 127.0.0.1 for the delivery tests.

Scripted replies (status, headers, delay), a black-hole mode (accepts the
connection and the request, never answers), and stop/restart on the same port so a
test can make the sender meet refused connections and then a receiver that is back.
Every request is recorded with its headers, body and arrival time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: bytes = b"ok"


@dataclass(frozen=True)
class Request:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() at arrival
    wall: float  # time.time() at arrival
    client_port: int  # the sender's side of the connection (same port = keep-alive reused)


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    receiver: Receiver


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.receiver._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.receiver._track(self.connection, add=False)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _handle(self) -> None:
        rec = self.server.receiver
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                      body, time.monotonic(), time.time(), self.client_address[1])
        reply = rec._record(req)
        if reply is None:  # black hole: hold the connection, never answer
            rec._released.wait()
            self.close_connection = True
            return
        if reply.delay and rec._released.wait(reply.delay):
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    do_POST = do_PUT = do_PATCH = do_GET = _handle


class Receiver:
    """A threaded webhook receiver on 127.0.0.1 (port 0 picks a free port once)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.requests: list[Request] = []
        self.black_hole = False
        self.default = Reply(200)
        self.on_request: Callable[[Request], None] | None = None
        self._script: list[Reply] = []
        self._cond = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._released = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> Receiver:
        """Listen (again) on the same port."""
        self._released = threading.Event()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.receiver = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection: new connections are refused."""
        server = self._server
        if server is None:
            return
        self._server = None
        self._released.set()
        server.shutdown()
        server.server_close()
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def restart(self) -> None:
        """Start again on the same port after `stop`."""
        self.start()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- behaviour
    def script(self, *replies: Reply | int) -> None:
        """Answer the next requests with these replies (ints are statuses), then `default`."""
        with self._cond:
            self._script = [r if isinstance(r, Reply) else Reply(r) for r in replies]

    def _record(self, req: Request) -> Reply | None:
        with self._cond:
            self.requests.append(req)
            reply = None if self.black_hole else (
                self._script.pop(0) if self._script else self.default)
            self._cond.notify_all()
        if self.on_request is not None:
            self.on_request(req)
        return reply

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Request]:
        """Block until at least `n` requests arrived; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {n} requests, got {len(self.requests)}")
                self._cond.wait(left)
            return list(self.requests)
