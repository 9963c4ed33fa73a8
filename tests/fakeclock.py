"""A deterministic stand-in for edgehook's Scheduler: jobs run only inside advance()."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    """`call_later` on a clock that moves only when the test says so.

    `clock()` is the monotonic time and `wall()` the epoch time (`epoch` + clock), so
    the same object can be injected as a Gpio's clock/wall or a TimeTriggers' wall.
    """

    def __init__(self, epoch: float = 1_800_000_000.0) -> None:
        self.now = 0.0
        self.epoch = epoch
        self._heap: list[tuple[float, int, FakeHandle, Callable[[], None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.epoch + self.now

    def call_later(self, delay: float, fn: Callable[[], None]) -> FakeHandle:
        h = FakeHandle()
        heapq.heappush(self._heap, (self.now + max(0.0, delay), next(self._seq), h, fn))
        return h

    def advance(self, dt: float) -> None:
        """Move the clock by `dt`, running every job that falls due on the way."""
        end = self.now + dt
        while self._heap and self._heap[0][0] <= end:
            when, _, h, fn = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if not h.cancelled:
                fn()
        self.now = end

    def step_wall(self, dt: float) -> None:
        """Step the wall clock (NTP) without moving the monotonic one."""
        self.epoch += dt

    def pending(self) -> int:
        return sum(1 for e in self._heap if not e[2].cancelled)
