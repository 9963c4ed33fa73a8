"""One timer thread for every delayed job (reverts, max_on, filters, gestures, silence).

A thread per `threading.Timer` would cost a stack each; this keeps one heap and one
thread that sleeps until the next deadline, and does not wake at all when idle.
Jobs must be quick: they translate and enqueue, like every other callback.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

_LOG = logging.getLogger(__name__)


class Handle:
    """A scheduled job; `cancel()` is safe from any thread, any number of times."""

    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Runs callables at monotonic times on a single daemon thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgehook-timers", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Handle:
        """Run `fn` after `delay` seconds."""
        return self.call_at(self.clock() + max(0.0, delay), fn)

    def call_at(self, when: float, fn: Callable[[], None]) -> Handle:
        """Run `fn` at monotonic time `when`."""
        handle = Handle(when, fn)
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), handle))
            if self._heap[0][2] is handle:
                self._cond.notify()
        return handle

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - self.clock()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                if self._stopped:
                    return
                _, _, handle = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            try:
                handle.fn()
            except Exception:
                _LOG.exception("timer job %r failed", handle.fn)
