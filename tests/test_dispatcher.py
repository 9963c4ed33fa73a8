"""The dispatcher's log budget: a steady stream of events stays at about one
journal line per event up to LOG_EVENTS_PER_S, then one summary line a second."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest

from edgehook import dispatcher as dp
from edgehook.dispatcher import Actions, Bus, Dispatcher, Reply
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


class Recording:
    """An engine that records which event it saw, on which thread, and can be held."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.held = threading.Event()

    def evaluate(self, event: Event, states: dict) -> Plan:
        if event.source == "slow":
            self.held.set()
            self.hold.wait(10)
        self.seen.append((event.source, threading.current_thread().name))
        return Plan(fired=["r"])


def make(engine: Recording) -> tuple[Bus, Dispatcher]:
    bus = Bus()
    return bus, Dispatcher(bus, engine, Actions(  # type: ignore[arg-type]
        store=lambda calls: None, set_output=lambda *a: {}, publish=lambda *a: None,
        states=lambda: {}))


def hung() -> tuple[Recording, Bus, Dispatcher]:
    """A started dispatcher busy with one event ("slow") until ``engine.hold`` is set."""
    engine = Recording()
    engine.hold.clear()
    bus, d = make(engine)
    d.start()
    bus.put(make_event("hook.received", "slow"))
    assert engine.held.wait(5)
    return engine, bus, d


def sources_seen(engine: Recording, n: int) -> list[str]:
    """The sources of the events run so far, once there are `n` (or after 5 s)."""
    deadline = time.monotonic() + 5
    while len(engine.seen) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return [s for s, _ in engine.seen]


def test_run_now_runs_on_the_callers_thread_when_nothing_is_queued() -> None:
    engine = Recording()
    bus, d = make(engine)
    d.start()
    try:
        reply = Reply()
        d.run_now(make_event("hook.received", "sync"), reply, 5.0)
        assert reply.done.is_set() and reply.fired == ["r"]
        assert engine.seen == [("sync", threading.current_thread().name)]
        assert d.events_total == 1 and d.recent[0]["source"] == "sync"
    finally:
        d.stop()


def test_run_now_runs_the_few_events_queued_ahead_first() -> None:
    engine = Recording()
    bus, d = make(engine)  # not started: only run_now takes events off the bus
    bus.put(make_event("hook.received", "queued-1"))
    bus.put(make_event("hook.received", "queued-2"))
    reply = Reply()
    d.run_now(make_event("hook.received", "sync"), reply, 5.0)
    assert reply.done.is_set()
    assert [s for s, _ in engine.seen] == ["queued-1", "queued-2", "sync"]  # order kept
    assert len(bus) == 0 and d.events_total == 3


def test_run_now_waits_behind_a_long_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dp, "HELP_MAX", 2)
    engine = Recording()
    bus, d = make(engine)
    for i in range(3):
        bus.put(make_event("hook.received", f"queued-{i}"))
    reply = Reply()
    caller = threading.Thread(target=d.run_now,
                              args=(make_event("hook.received", "sync"), reply, 5.0))
    caller.start()
    deadline = time.monotonic() + 5
    while len(bus) < 4 and time.monotonic() < deadline:  # queued behind the three
        time.sleep(0.01)
    assert len(bus) == 4 and not reply.done.is_set()
    d.start()
    try:
        caller.join(5)
        assert reply.done.is_set()
        assert [s for s, _ in engine.seen] == ["queued-0", "queued-1", "queued-2", "sync"]
        assert {t for _, t in engine.seen} == {"edgehook-dispatcher"}
    finally:
        d.stop()


def test_run_now_behind_a_hung_batch_queues_the_event_and_returns() -> None:
    engine, bus, d = hung()
    try:
        reply = Reply()
        t0 = time.monotonic()
        d.run_now(make_event("hook.received", "sync"), reply, 0.3)
        assert 0.25 < time.monotonic() - t0 < 3
        assert not reply.done.is_set() and len(bus) == 1  # queued, not lost
        assert d.stalled_for() > 0.25
        engine.hold.set()
        assert reply.done.wait(5)
        assert [s for s, _ in engine.seen] == ["slow", "sync"]
    finally:
        engine.hold.set()
        d.stop()


def test_offer_runs_on_the_callers_thread_after_a_quiet_spell() -> None:
    engine = Recording()
    bus, d = make(engine)
    d.start()
    try:
        d.offer(make_event("mqtt.message", "quiet"))
        # done when offer returns: nothing was queued for the dispatcher thread
        assert engine.seen == [("quiet", threading.current_thread().name)]
        assert d.events_total == 1 and len(bus) == 0
    finally:
        d.stop()


def test_offer_queues_in_a_burst_so_that_batches_stay_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dp, "QUIET_BEFORE_INLINE", 60.0)  # every offer counts as a burst
    engine = Recording()
    bus, d = make(engine)
    d._last_done = time.monotonic()
    for i in range(3):
        d.offer(make_event("mqtt.message", f"burst-{i}"))
    assert engine.seen == [] and len(bus) == 3  # queued, not run by the caller
    d.start()
    try:
        assert sources_seen(engine, 3) == ["burst-0", "burst-1", "burst-2"]
        assert {t for _, t in engine.seen} == {"edgehook-dispatcher"}
    finally:
        d.stop()


def test_offer_behind_a_queue_keeps_the_order() -> None:
    engine = Recording()
    bus, d = make(engine)  # not started: what is queued stays queued
    bus.put(make_event("hook.received", "queued"))
    d.offer(make_event("mqtt.message", "offered"))
    assert engine.seen == [] and len(bus) == 2
    d.start()
    try:
        assert sources_seen(engine, 2) == ["queued", "offered"]
    finally:
        d.stop()


def test_offer_never_waits_for_a_running_batch() -> None:
    engine, bus, d = hung()
    try:
        d._last_done = 0.0  # long quiet before the slow batch: only the lock is in the way
        t0 = time.monotonic()
        d.offer(make_event("mqtt.message", "offered"))
        assert time.monotonic() - t0 < 0.5 and len(bus) == 1  # queued at once
        engine.hold.set()
        assert sources_seen(engine, 2) == ["slow", "offered"]
        assert engine.seen[1][1] == "edgehook-dispatcher"
    finally:
        engine.hold.set()
        d.stop()
