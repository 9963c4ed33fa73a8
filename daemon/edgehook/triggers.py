"""Time-driven events: `every`, daily `at`, and MQTT silence (`expect_every`).

Pure timing maths (`next_daily`) plus small classes that arm timers on an injected
scheduler and only `put()` events, so they are tested with a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

from .config import Rule
from .events import Event, make_event
from .inputs import TimerHandle, Timers

AT_RECHECK = 3600.0  # sleep at most this long before re-computing a daily time (NTP, DST)


def next_daily(hhmm: str, now: float, tz: object | None = None) -> float:
    """Epoch seconds of the next local HH:MM strictly after `now` (DST-safe).

    A local time that does not exist on a spring-forward day fires at the first
    valid instant after it; one that happens twice on a fall-back day fires once.
    """
    hour, minute = (int(x) for x in hhmm.split(":"))
    here = datetime.fromtimestamp(now).astimezone(tz)  # type: ignore[arg-type]
    day = here.date()
    for add in range(0, 3):
        naive = datetime(day.year, day.month, day.day, hour, minute) + timedelta(days=add)
        cand = _local_epoch(naive, tz)
        if cand > now:
            return cand
    raise AssertionError("unreachable")  # pragma: no cover


def _local_epoch(naive: datetime, tz: object | None) -> float:
    if tz is None:
        # mktime with tm_isdst=-1 picks the right offset; a skipped time moves forward.
        return time.mktime((*naive.timetuple()[:8], -1))
    return naive.replace(tzinfo=tz, fold=0).timestamp()  # type: ignore[arg-type]


class TimeTriggers:
    """Arms `every` and `at` rules; each firing puts a `timer.fired` event."""

    def __init__(self, rules: tuple[Rule, ...], timers: Timers, put: Callable[[Event], None],
                 wall: Callable[[], float] = time.time, tz: object | None = None) -> None:
        self.rules = rules
        self.timers = timers
        self.put = put
        self.wall = wall
        self.tz = tz
        self._handles: dict[int, TimerHandle] = {}
        self._stopped = False

    def start(self) -> None:
        for i, rule in enumerate(self.rules):
            if rule.when.kind == "every":
                self._arm_every(i, rule)
            elif rule.when.kind == "at":
                self._arm_at(i, rule)

    def stop(self) -> None:
        self._stopped = True
        for h in self._handles.values():
            h.cancel()
        self._handles.clear()

    def _arm_every(self, i: int, rule: Rule) -> None:
        period = rule.when.every or 60.0

        def fire() -> None:
            if self._stopped:
                return
            self.put(make_event("timer.fired", rule.name, {"rule_index": i,
                                                            "every": period}))
            self._arm_every(i, rule)

        self._handles[i] = self.timers.call_later(period, fire)

    def _arm_at(self, i: int, rule: Rule, after: float | None = None) -> None:
        """Arm the next daily firing; `after` keeps one day from firing twice."""
        now = self.wall()
        due = next_daily(rule.when.name, max(now, after or now), self.tz)

        def fire() -> None:
            if self._stopped:
                return
            if self.wall() + 0.5 < due:  # woke early to re-check the wall clock
                self._arm_at(i, rule, after)
                return
            self.put(make_event("timer.fired", rule.name, {"rule_index": i,
                                                            "at": rule.when.name}))
            self._arm_at(i, rule, after=due + 1)

        self._handles[i] = self.timers.call_later(min(due - now, AT_RECHECK), fire)


class SilenceWatch:
    """`expect_every` for MQTT filters: `mqtt.silent` once, `mqtt.resumed` on return."""

    def __init__(self, periods: dict[str, float], timers: Timers,
                 put: Callable[[Event], None]) -> None:
        self.periods = periods
        self.timers = timers
        self.put = put
        self._handles: dict[str, TimerHandle] = {}
        self._silent: set[str] = set()

    def start(self) -> None:
        for flt in self.periods:
            self._arm(flt)

    def seen(self, flt: str, topic: str) -> None:
        """A message matching `flt` arrived."""
        if flt not in self.periods:
            return
        if flt in self._silent:
            self._silent.discard(flt)
            self.put(make_event("mqtt.resumed", flt, {"topic": topic}))
        self._arm(flt)

    def _arm(self, flt: str) -> None:
        old = self._handles.pop(flt, None)
        if old is not None:
            old.cancel()
        period = self.periods[flt]

        def fire() -> None:
            if flt in self._silent:
                return
            self._silent.add(flt)
            self.put(make_event("mqtt.silent", flt, {"seconds": period}))

        self._handles[flt] = self.timers.call_later(period, fire)

    def stop(self) -> None:
        for h in self._handles.values():
            h.cancel()
        self._handles.clear()
