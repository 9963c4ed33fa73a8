"""Request deadlines for the HTTP listener: one thread cuts off reads that run too long.

A per-read socket timeout cannot bound a whole request: a client trickling one byte a
second resets it for ever. So `http_server` arms each connection with the moment its
request must be in, and this module's thread, asleep until the earliest such moment,
shuts the socket's reading side when it passes: the blocked read returns at once and
the handler answers 408 (see `http_server`). Arming and disarming are a dict operation
under a lock.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time


class Deadlines:
    """Shuts the reading side of a connection whose request is not in by its deadline.

    A handler arms its connection while it reads and disarms it after; :meth:`disarm`
    says whether the deadline cut the read short. One thread, asleep until the
    earliest deadline; arming and disarming are a dict operation under a lock.

    A disarmed deadline stays in the heap until its time (removing it would cost a
    search), so under load the earliest entry is a stale one every fraction of a
    millisecond. Waking for each would take the GIL from the handlers thousands of
    times a second; the thread instead sleeps at least `GRAIN`, so a deadline may pass
    up to that much late (a quarter second on a 5 s `http.timeout`).
    """

    GRAIN = 0.25  # seconds: the least the thread sleeps while anything is armed

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, tuple[float, socket.socket]] = {}
        self._expired: set[int] = set()
        self._keys = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="edgehook-http-deadlines",
                                        daemon=True)
        self._thread.start()

    def key(self) -> int:
        """A key for one connection."""
        return next(self._keys)

    def arm(self, key: int, sock: socket.socket, deadline: float) -> None:
        """Watch `sock` until :meth:`disarm`; at `deadline` its reading side is shut."""
        with self._cond:
            self._armed[key] = (deadline, sock)
            first = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, key))
            if first:
                self._cond.notify()

    def passed(self, key: int) -> bool:
        """True when the deadline cut the read short (the connection stays watched)."""
        with self._cond:
            return key in self._expired

    def disarm(self, key: int) -> bool:
        """Stop watching; True when the deadline passed (the read was cut short)."""
        with self._cond:
            self._armed.pop(key, None)
            if key in self._expired:
                self._expired.discard(key)
                return True
            return False

    def stop(self) -> None:
        """End the thread (the listener is closing)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    deadline, key = heapq.heappop(self._heap)
                    armed = self._armed.get(key)
                    if armed is None or armed[0] != deadline:
                        continue  # disarmed, or armed again with another deadline
                    del self._armed[key]
                    self._expired.add(key)
                    try:
                        armed[1].shutdown(socket.SHUT_RD)
                    except OSError:
                        pass  # the peer is gone already: the read fails on its own
                wait = max(self._heap[0][0] - now, self.GRAIN) if self._heap else None
                self._cond.wait(wait)
