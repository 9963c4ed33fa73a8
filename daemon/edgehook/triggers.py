"""Time-driven events: `every`, daily `at`, and MQTT silence (`expect_every`).

Pure timing maths (`next_daily`) plus small classes that arm timers on an injected
scheduler and only `put()` events, so they are tested with a fake clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo

from .config import Rule
from .events import Event, make_event
from .inputs import TimerHandle, Timers

_LOG = logging.getLogger(__name__)

AT_RECHECK = 60.0   # sleep at most this long before re-reading the wall clock (NTP, DST)
AT_GRACE = 300.0    # a daily time missed by more than this (clock jumped) is skipped


def _wall(ts: float, tz: tzinfo | None) -> datetime:
    """Local wall time (naive) of epoch `ts` in `tz` (None: the system's zone)."""
    return datetime.fromtimestamp(ts, tz).replace(tzinfo=None)


def _epoch(naive: datetime, tz: tzinfo | None, fold: int) -> float:
    local = naive.replace(fold=fold)
    return (local if tz is None else local.replace(tzinfo=tz)).timestamp()


def _first_reaching(naive: datetime, tz: tzinfo | None) -> float:
    """The first instant at which the local clock shows `naive` or later.

    Usually the instant of `naive` itself; on a fall-back day its first occurrence;
    on a spring-forward day, for a time inside the gap, the moment of the jump.
    """
    early, late = _epoch(naive, tz, 0), _epoch(naive, tz, 1)
    if early <= late:  # a normal time (equal) or a repeated one (fold=0 comes first)
        return early
    # In a gap, fold=1 lands before the jump and fold=0 after it: bisect to the jump.
    lo, hi = int(late), int(early) + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _wall(mid, tz) >= naive:
            hi = mid
        else:
            lo = mid
    return float(hi)


def next_daily(hhmm: str, now: float, tz: tzinfo | None = None) -> float:
    """Epoch seconds of the next local HH:MM strictly after `now` (DST-safe).

    A local time that does not exist on a spring-forward day fires at the first
    valid instant after it (the jump itself); one that happens twice on a fall-back
    day fires once, at its first occurrence.
    """
    hour, minute = (int(x) for x in hhmm.split(":"))
    day = _wall(now, tz).date()
    for add in range(0, 3):
        d = day + timedelta(days=add)
        cand = _first_reaching(datetime(d.year, d.month, d.day, hour, minute), tz)
        if cand > now:
            return cand
    raise AssertionError("unreachable")  # pragma: no cover


class TimeTriggers:
    """Arms `every` and `at` rules; each firing puts a `timer.fired` event."""

    def __init__(self, rules: tuple[Rule, ...], timers: Timers, put: Callable[[Event], None],
                 wall: Callable[[], float] = time.time, tz: tzinfo | None = None) -> None:
        self.rules = rules
        self.timers = timers
        self.put = put
        self.wall = wall
        self.tz = tz
        self._lock = threading.Lock()
        self._handles: dict[int, TimerHandle] = {}
        self._stopped = False

    def start(self) -> None:
        """Arm every `every` and `at` rule."""
        with self._lock:
            for i, rule in enumerate(self.rules):
                if rule.when.kind == "every":
                    self._arm_every(i, rule)
                elif rule.when.kind == "at":
                    self._arm_at(i, rule)

    def stop(self) -> None:
        """Cancel every timer; nothing fires afterwards."""
        with self._lock:
            self._stopped = True
            for h in self._handles.values():
                h.cancel()
            self._handles.clear()

    def _arm_every(self, i: int, rule: Rule) -> None:
        period = rule.when.every or 60.0

        def fire() -> None:
            with self._lock:
                if self._stopped:
                    return
                self.put(make_event("timer.fired", rule.name, {"rule_index": i,
                                                                "every": period}))
                self._arm_every(i, rule)

        self._handles[i] = self.timers.call_later(period, fire)

    def _arm_at(self, i: int, rule: Rule, after: float | None = None) -> None:
        """Arm the next daily firing; `after` keeps one day from firing twice.

        The timer sleeps at most AT_RECHECK on the monotonic clock, then looks at the
        wall clock again, so an NTP step or a DST change moves the firing with it.
        """
        now = self.wall()
        due = next_daily(rule.when.name, max(now, after or now), self.tz)

        def fire() -> None:
            with self._lock:
                if self._stopped:
                    return
                wall = self.wall()
                if wall + 0.5 < due:  # woke early to re-check the wall clock
                    self._arm_at(i, rule, after)
                    return
                if wall - due > AT_GRACE:  # the clock jumped past it (boot-time NTP)
                    _LOG.warning("rule %s: at %s skipped: the clock jumped %.0f s past it",
                                 rule.name, rule.when.name, wall - due)
                else:
                    self.put(make_event("timer.fired", rule.name, {"rule_index": i,
                                                                    "at": rule.when.name}))
                self._arm_at(i, rule, after=due + 1)

        self._handles[i] = self.timers.call_later(max(0.0, min(due - now, AT_RECHECK)), fire)


class SilenceWatch:
    """`expect_every` for MQTT filters: `mqtt.silent` once, `mqtt.resumed` on return."""

    def __init__(self, periods: dict[str, float], timers: Timers,
                 put: Callable[[Event], None]) -> None:
        self.periods = periods
        self.timers = timers
        self.put = put
        self._lock = threading.Lock()
        self._handles: dict[str, tuple[object, TimerHandle | None]] = {}
        self._silent: set[str] = set()
        self._stopped = False

    def start(self) -> None:
        """Arm one watchdog per MQTT filter."""
        with self._lock:
            for flt in self.periods:
                self._arm(flt)

    def seen(self, flt: str, topic: str) -> None:
        """A message matching `flt` arrived (from the dispatcher thread)."""
        if flt not in self.periods:
            return
        with self._lock:
            if self._stopped:
                return
            if flt in self._silent:
                self._silent.discard(flt)
                self.put(make_event("mqtt.resumed", flt, {"topic": topic}))
            self._arm(flt)

    def _arm(self, flt: str) -> None:
        old = self._handles.pop(flt, None)
        if old is not None and old[1] is not None:
            old[1].cancel()
        period = self.periods[flt]
        token = object()

        def fire() -> None:
            with self._lock:
                if self._stopped or self._handles.get(flt, (None,))[0] is not token:
                    return  # re-armed by a message after the timer thread took this job
                del self._handles[flt]
                if flt not in self._silent:
                    self._silent.add(flt)
                    self.put(make_event("mqtt.silent", flt, {"seconds": period}))

        self._handles[flt] = (token, None)
        self._handles[flt] = (token, self.timers.call_later(period, fire))

    def stop(self) -> None:
        """Cancel every watchdog."""
        with self._lock:
            self._stopped = True
            for _, h in self._handles.values():
                if h is not None:
                    h.cancel()
            self._handles.clear()
