"""urllib3 connections held to one attempt's deadline and size budget.

urllib3's timeouts bound each socket operation, so a server that trickles a byte
now and then could hold an attempt for ever. The connections here make their
sockets as :class:`_Metered` ones, which set the socket timeout to what is left of
the attempt before every read and write and count the bytes read. transport.py
sets :data:`CURRENT` ``.budget`` around each attempt and uses :data:`POOLS`.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

MAX_INTERIM = 10        # 1xx answers skipped before the real one; more is a broken server

class Budget:
    """The current attempt of this thread: its deadline, the bytes it may still read,
    and whether it had to open a connection (then a dropped one is no stale one)."""

    __slots__ = ("deadline", "left", "opened")

    def __init__(self, deadline: float, limit: int) -> None:
        self.deadline = deadline
        self.left = limit
        self.opened = False


CURRENT = threading.local()  # .budget: the Budget of the thread's attempt, or None


class ResponseTooLarge(OSError):
    """The answer is larger than the attempt's byte budget."""


def _remaining() -> tuple[Budget | None, float]:
    budget: Budget | None = getattr(CURRENT, "budget", None)
    if budget is None:
        return None, 0.0
    left = budget.deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return budget, left


class _Metered:
    """Socket methods that hold every read and write to the attempt's deadline and
    count the bytes read (mixed into the plain and the TLS socket classes)."""

    def _arm(self) -> Budget | None:
        """Hold the next socket call to what is left of the attempt's deadline."""
        budget, left = _remaining()
        if budget is not None:
            self.settimeout(left)  # type: ignore[attr-defined]
        return budget

    @staticmethod
    def _count(budget: Budget | None, n: int) -> None:
        """Charge `n` bytes read to the attempt's budget."""
        if budget is not None:
            budget.left -= n
            if budget.left < 0:
                raise ResponseTooLarge("response too large")

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        budget = self._arm()
        n: int = super().recv_into(*args, **kwargs)  # type: ignore[misc]
        self._count(budget, n)
        return n

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        budget = self._arm()
        data: bytes = super().recv(*args, **kwargs)  # type: ignore[misc]
        self._count(budget, len(data))
        return data

    def send(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().send(*args, **kwargs)  # type: ignore[misc,no-any-return]

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self._arm()
        super().sendall(*args, **kwargs)  # type: ignore[misc]


class _Socket(_Metered, socket.socket):
    """A plain TCP socket of ours."""


class MeteredSSLSocket(_Metered, ssl.SSLSocket):
    """A TLS socket of ours (``SSLContext.sslsocket_class``)."""


def _adopt(sock: socket.socket) -> socket.socket:
    """The same connected socket as one of ours (the descriptor moves over)."""
    timeout = sock.gettimeout()
    ours = _Socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    ours.settimeout(timeout)
    return ours


class _Response(http.client.HTTPResponse):
    """``http.client``'s response, skipping every interim 1xx answer but 101."""

    def _read_status(self) -> tuple[str, int, str]:
        for _ in range(MAX_INTERIM + 1):
            version, status, reason = super()._read_status()
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim answer's headers: unused
        raise http.client.HTTPException(f"more than {MAX_INTERIM} interim (1xx) responses")


class _Tracked:
    """A connection that tells the attempt in progress when it opens a new socket."""

    response_class = _Response

    def _new_conn(self) -> socket.socket:
        budget = getattr(CURRENT, "budget", None)
        if budget is not None:
            budget.opened = True
        return _adopt(super()._new_conn())  # type: ignore[misc]


class _Conn(_Tracked, HTTPConnection):
    pass


class _TLSConn(_Tracked, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Conn


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConn


POOLS = {"http": _Pool, "https": _TLSPool}
