"""The dispatcher's log budget: a steady stream of events stays at about one
journal line per event up to LOG_EVENTS_PER_S, then one summary line a second."""

from __future__ import annotations

import logging
import re
import time

import pytest

from edgehook import dispatcher as dp
from edgehook.dispatcher import Actions, Bus, Dispatcher
from edgehook.events import Event, make_event
from edgehook.rules import Plan


class NoRules:
    """An engine whose every event fires one rule and asks for nothing."""

    def evaluate(self, event: Event, states: dict) -> Plan:
        return Plan(fired=["r"])


def test_steady_load_logs_a_summary_once_a_second_not_per_batch(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dp, "LOG_EVENTS_PER_S", 5)
    monkeypatch.setattr(dp, "SUMMARY_AFTER", 0.3)
    caplog.set_level(logging.INFO, logger="edgehook.dispatcher")
    bus = Bus()
    d = Dispatcher(bus, NoRules(), Actions(  # type: ignore[arg-type]
        store=lambda calls: None, set_output=lambda *a: {}, publish=lambda *a: None,
        states=lambda: {}))
    d.start()
    try:
        n = 150  # 60 a second for 2.5 s: the bus empties after nearly every event
        t0 = time.monotonic()
        for i in range(n):
            bus.put(make_event("hook.received", "h", {"i": i}))
            time.sleep(max(0.0, t0 + (i + 1) / 60 - time.monotonic()))
        deadline = time.monotonic() + 5
        while d.events_total < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.events_total == n
        summaries: list[int] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the quiet after the burst brings the last one
            lines = [r.getMessage() for r in caplog.records]
            summaries = [int(m.group(1)) for m in
                         (re.match(r"(\d+) more event", line) for line in lines) if m]
            events = [line for line in lines if line.startswith("event ")]
            if len(events) + sum(summaries) == n:
                break
            time.sleep(0.05)
        assert len(events) + sum(summaries) == n  # every event is a line or counted
        seconds = time.monotonic() - t0
        assert len(summaries) <= seconds + 2, summaries  # one per second, not per batch
        assert len(events) <= 5 * (seconds + 2)
    finally:
        d.stop()
