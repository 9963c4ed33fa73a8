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

COMPACT_MIN = 256  # rebuild the heap once this many cancelled jobs (and half of it) wait in it


class Handle:
    """A scheduled job; `cancel()` is safe from any thread, any number of times."""

    __slots__ = ("when", "fn", "cancelled", "_sched", "_queued")

    def __init__(self, when: float, fn: Callable[[], None], sched: Scheduler) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False
        self._sched = sched
        self._queued = True

    def cancel(self) -> None:
        """Drop the job if it has not started; a job already running is not interrupted."""
        self._sched._cancel(self)


class Scheduler:
    """Runs callables at monotonic times on a single daemon thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._cancelled = 0  # cancelled handles still sitting in the heap
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the timer thread."""
        self._thread = threading.Thread(target=self._run, name="edgehook-timers", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Handle:
        """Run `fn` after `delay` seconds."""
        return self.call_at(self.clock() + max(0.0, delay), fn)

    def call_at(self, when: float, fn: Callable[[], None]) -> Handle:
        """Run `fn` at monotonic time `when`."""
        handle = Handle(when, fn, self)
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), handle))
            if self._heap[0][2] is handle:
                self._cond.notify()
        return handle

    def pending(self) -> int:
        """Jobs waiting to run (cancelled ones not counted)."""
        with self._cond:
            return len(self._heap) - self._cancelled

    def _cancel(self, handle: Handle) -> None:
        with self._cond:
            if handle.cancelled:
                return
            handle.cancelled = True
            if not handle._queued:
                return
            self._cancelled += 1
            # An input re-armed on every edge (silence watchdog: hours ahead) would
            # otherwise leave one dead entry per edge in the heap until its deadline.
            if self._cancelled >= COMPACT_MIN and self._cancelled * 2 >= len(self._heap):
                self._heap = [e for e in self._heap if not e[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def stop(self) -> None:
        """Stop the thread; jobs not yet due never run."""
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
                        heapq.heappop(self._heap)[2]._queued = False
                        self._cancelled -= 1
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
                handle._queued = False
            try:
                handle.fn()
            except Exception:
                _LOG.exception("timer job %r failed", handle.fn)
