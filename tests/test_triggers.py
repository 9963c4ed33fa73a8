"""Time triggers and MQTT silence, on an injected clock: nobody waits for 22:30."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from edgehook.config import Rule, Trigger
from edgehook.events import Event
from edgehook.triggers import AT_GRACE, SilenceWatch, TimeTriggers, next_daily
from fakeclock import FakeTimers

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
HOUR = 3600.0
DAY = 86400.0


def at(tz: ZoneInfo, *args: int, fold: int = 0) -> float:
    return datetime(*args, tzinfo=tz, fold=fold).timestamp()


def local(ts: float, tz: ZoneInfo = BERLIN) -> str:
    return datetime.fromtimestamp(ts, tz).isoformat()


# --------------------------------------------------------------------------- next_daily

@pytest.mark.parametrize("now, want", [
    ((2026, 6, 1, 22, 0), "2026-06-01T22:30:00+02:00"),    # before 22:30: today
    ((2026, 6, 1, 22, 30), "2026-06-02T22:30:00+02:00"),   # exactly now: strictly after
    ((2026, 6, 1, 22, 31), "2026-06-02T22:30:00+02:00"),   # after: tomorrow
    ((2026, 12, 31, 23, 0), "2027-01-01T22:30:00+01:00"),  # over the new year, winter time
])
def test_next_daily_before_and_after_now(now: tuple[int, ...], want: str) -> None:
    assert local(next_daily("22:30", at(BERLIN, *now), BERLIN)) == want


def test_spring_forward_day_is_23_hours_long() -> None:
    # Berlin, 2026-03-29: 02:00 CET -> 03:00 CEST
    first = next_daily("22:30", at(BERLIN, 2026, 3, 28, 23, 0), BERLIN)
    assert local(first) == "2026-03-29T22:30:00+02:00"
    assert first - at(BERLIN, 2026, 3, 28, 22, 30) == 23 * HOUR
    assert local(next_daily("01:30", at(BERLIN, 2026, 3, 29, 0, 0), BERLIN)) == \
        "2026-03-29T01:30:00+01:00"


def test_a_time_skipped_by_spring_forward_fires_at_the_jump() -> None:
    due = next_daily("02:30", at(BERLIN, 2026, 3, 29, 0, 0), BERLIN)
    assert local(due) == "2026-03-29T03:00:00+02:00"       # the first instant after 02:30
    assert due == at(BERLIN, 2026, 3, 29, 1, 59) + 60
    # and the day after it is back to 02:30
    assert local(next_daily("02:30", due, BERLIN)) == "2026-03-30T02:30:00+02:00"


def test_a_time_repeated_by_fall_back_fires_once() -> None:
    # Berlin, 2026-10-25: 03:00 CEST -> 02:00 CET, so 02:30 happens twice
    due = next_daily("02:30", at(BERLIN, 2026, 10, 25, 0, 0), BERLIN)
    assert local(due) == "2026-10-25T02:30:00+02:00"       # the first occurrence
    second = at(BERLIN, 2026, 10, 25, 2, 30, fold=1)
    assert second - due == HOUR
    nxt = next_daily("02:30", due, BERLIN)                  # asked right after firing
    assert local(nxt) == "2026-10-26T02:30:00+01:00"        # not the second occurrence
    assert next_daily("02:30", second - 1, BERLIN) == nxt   # nor just before it


def test_fall_back_day_is_25_hours_long() -> None:
    a = next_daily("22:30", at(BERLIN, 2026, 10, 24, 12, 0), BERLIN)
    b = next_daily("22:30", a, BERLIN)
    assert b - a == 25 * HOUR


def test_other_zone_dst_dates() -> None:
    # New York springs forward on 2026-03-08 at 02:00
    due = next_daily("02:15", at(NEW_YORK, 2026, 3, 8, 0, 0), NEW_YORK)
    assert local(due, NEW_YORK) == "2026-03-08T03:00:00-04:00"


@pytest.fixture
def tz_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's own zone (tz=None, as app.py uses it) set to Europe/Berlin."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_system_zone_when_no_tz_is_given(tz_env: None) -> None:
    assert local(next_daily("02:30", at(BERLIN, 2026, 3, 29, 0, 0))) == \
        "2026-03-29T03:00:00+02:00"
    assert local(next_daily("02:30", at(BERLIN, 2026, 10, 25, 0, 0))) == \
        "2026-10-25T02:30:00+02:00"
    assert local(next_daily("22:30", at(BERLIN, 2026, 6, 1, 22, 31))) == \
        "2026-06-02T22:30:00+02:00"


# --------------------------------------------------------------------------- TimeTriggers

class Rig:
    def __init__(self, *rules: Rule, start: float) -> None:
        self.timers = FakeTimers(epoch=start)
        self.fired: list[tuple[float, Event]] = []
        self.triggers = TimeTriggers(rules, self.timers, self._put, wall=self.timers.wall,
                                     tz=BERLIN)
        self.triggers.start()

    def _put(self, e: Event) -> None:
        self.fired.append((self.timers.wall(), e))

    def times(self) -> list[str]:
        return [local(t) for t, _ in self.fired]


def rule(name: str, **when: object) -> Rule:
    kind = "at" if "at" in when else "every"
    trig = Trigger(kind, name=str(when.get("at", "")), every=when.get("every"))  # type: ignore[arg-type]
    return Rule(name=name, when=trig, actions=())


def test_every_fires_repeatedly() -> None:
    r = Rig(rule("tick", every=300.0), start=at(BERLIN, 2026, 6, 1, 12, 0))
    r.timers.advance(299)
    assert r.fired == []
    r.timers.advance(1 + 2 * 300)
    assert len(r.fired) == 3
    e = r.fired[0][1]
    assert (e.type, e.source, e.data["rule_index"], e.data["every"]) == \
        ("timer.fired", "tick", 0, 300.0)


def test_at_fires_once_a_day_across_dst() -> None:
    r = Rig(rule("porch-off", at="22:30"), start=at(BERLIN, 2026, 3, 27, 12, 0))
    r.timers.advance(3 * DAY)
    assert r.times() == ["2026-03-27T22:30:00+01:00", "2026-03-28T22:30:00+01:00",
                         "2026-03-29T22:30:00+02:00"]
    e = r.fired[0][1]
    assert (e.type, e.source, e.data) == ("timer.fired", "porch-off",
                                          {"rule_index": 0, "at": "22:30"})


def test_at_does_not_fire_twice_when_the_clock_steps_back() -> None:
    r = Rig(rule("porch-off", at="22:30"), start=at(BERLIN, 2026, 6, 1, 22, 0))
    r.timers.advance(31 * 60)                 # 22:31, fired at 22:30
    assert len(r.fired) == 1
    r.timers.step_wall(-5 * 60)               # NTP steps the clock back to 22:26
    r.timers.advance(10 * 60)                 # the wall clock passes 22:30 again
    assert len(r.fired) == 1
    r.timers.advance(DAY)
    assert r.times() == ["2026-06-01T22:30:00+02:00", "2026-06-02T22:30:00+02:00"]


def test_at_follows_a_forward_step_and_skips_a_time_jumped_over(caplog) -> None:  # type: ignore[no-untyped-def]
    # A Pi without an RTC boots with yesterday's time, then NTP jumps it forward.
    r = Rig(rule("porch-off", at="22:30"), start=at(BERLIN, 2026, 6, 1, 21, 0))
    r.timers.advance(10)
    r.timers.step_wall(14 * HOUR)             # now 2026-06-02 ~11:00: 22:30 went by unseen
    with caplog.at_level(logging.WARNING, logger="edgehook.triggers"):
        r.timers.advance(HOUR)
    assert r.fired == []                      # not fired 12.5 h late
    assert any("skipped" in m for m in caplog.messages)
    r.timers.advance(DAY)
    assert r.times() == ["2026-06-02T22:30:00+02:00"]


def test_a_small_forward_step_still_fires(caplog) -> None:  # type: ignore[no-untyped-def]
    r = Rig(rule("porch-off", at="22:30"), start=at(BERLIN, 2026, 6, 1, 22, 29))
    r.timers.step_wall(AT_GRACE / 2)          # clock corrected forward by a few minutes
    r.timers.advance(61)
    assert len(r.fired) == 1


def test_stop_cancels_time_triggers() -> None:
    r = Rig(rule("tick", every=60.0), rule("porch-off", at="22:30"),
            start=at(BERLIN, 2026, 6, 1, 22, 0))
    r.triggers.stop()
    r.timers.advance(2 * DAY)
    assert r.fired == []


# --------------------------------------------------------------------------- SilenceWatch

def test_silence_fires_once_then_resumed() -> None:
    timers = FakeTimers()
    got: list[tuple[float, str, str]] = []
    w = SilenceWatch({"sensors/+/temp": 600.0}, timers,
                     lambda e: got.append((timers.now, e.type, e.source)))
    w.start()
    timers.advance(599)
    w.seen("sensors/+/temp", "sensors/attic/temp")     # a message resets the watchdog
    timers.advance(599)
    assert got == []
    timers.advance(2)
    assert got == [(1199.0, "mqtt.silent", "sensors/+/temp")]
    timers.advance(6000)
    assert len(got) == 1                               # once
    w.seen("sensors/+/temp", "sensors/attic/temp")
    w.seen("sensors/+/temp", "sensors/attic/temp")
    assert [g[1] for g in got] == ["mqtt.silent", "mqtt.resumed"]
    timers.advance(601)
    assert [g[1] for g in got] == ["mqtt.silent", "mqtt.resumed", "mqtt.silent"]
    w.seen("other/topic", "other/topic")               # not watched: ignored
    w.stop()
    timers.advance(10_000)
    assert len(got) == 3
    assert timers.pending() == 0
