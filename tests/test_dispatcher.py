"""The dispatcher: one thread runs every event; a batch is stored before it is
acknowledged; a storage failure is data; the log budget keeps a burst to a few lines."""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time

import pytest

from edgehook import dispatcher as dp
from edgehook.dispatcher import Actions, Bus, Dispatcher, Reply
from edgehook.errors import EdgehookError
from edgehook.events import Event, make_event
from edgehook.rules import OutputCall, Plan, WebhookCall


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


def test_every_event_runs_on_the_dispatcher_thread_in_order() -> None:
    """Sources only enqueue: whoever puts, the rules run on the one dispatcher thread."""
    engine = Recording()
    bus, d = make(engine)
    d.start()
    try:
        threads = [threading.Thread(target=bus.put, args=(make_event("x", f"s{i}"),))
                   for i in range(5)]
        for t in threads:
            t.start()
            t.join()
        assert sources_seen(engine, 5) == [f"s{i}" for i in range(5)]
        assert {name for _, name in engine.seen} == {"edgehook-dispatcher"}
    finally:
        d.stop()


class Hooks:
    """An engine whose every event asks for one webhook and one output."""

    def evaluate(self, event: Event, states: dict) -> Plan:
        return Plan(fired=["r"], calls=[
            WebhookCall("r", "t", "http://127.0.0.1:9/", {}, b"{}", "application/json"),
            OutputCall("r", "light", "on", None)])


def wired(store) -> tuple[Bus, Dispatcher, list[str]]:
    """A dispatcher whose side effects append to one log, in the order they happen."""
    log: list[str] = []
    bus = Bus()
    d = Dispatcher(bus, Hooks(), Actions(  # type: ignore[arg-type]
        store=lambda calls: (store(calls), log.append(f"store {len(calls)}")),
        set_output=lambda *a: log.append("output") or {"state": "on"},
        publish=lambda *a: None, states=lambda: {}))
    return bus, d, log


def wait_for(pred, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_an_event_is_acknowledged_only_after_its_batch_is_stored() -> None:
    bus, d, log = wired(lambda calls: None)
    for i in range(3):
        bus.put(make_event("mqtt.message", f"m{i}"), ack=lambda i=i: log.append(f"ack {i}"))
    d.start()  # all three queued: one batch, one store
    try:
        wait_for(lambda: log.count("output") == 3, "the batch")
        assert log[0] == "store 3" and log.index("ack 0") > 0
        assert sorted(x for x in log if x.startswith("ack")) == ["ack 0", "ack 1", "ack 2"]
    finally:
        d.stop()


@pytest.mark.parametrize("failure", [EdgehookError("disk full"),
                                     sqlite3.OperationalError("disk I/O error")])
def test_a_failed_store_still_switches_outputs_acks_nothing_and_retries(
        failure: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storage error (ours or a raw SQLite one) is data: the batch's outputs run, the
    failure is counted, the MQTT message is not acknowledged until its webhook is
    stored on a later try, and a hook is told at once (it answers 503)."""
    monkeypatch.setattr(dp, "STORE_RETRY", 0.05)
    failing = threading.Event()
    failing.set()

    def store(calls) -> None:
        if failing.is_set():
            raise failure

    bus, d, log = wired(store)
    acks: list[str] = []
    reply = Reply()
    bus.put(make_event("mqtt.message", "m"), ack=lambda: acks.append("m"))
    bus.put(make_event("hook.received", "h"), reply)
    d.start()
    try:
        assert reply.done.wait(5)
        assert reply.store_error and reply.results == [{"output": "light", "state": "on"}]
        wait_for(lambda: log.count("output") == 2, "both outputs")
        assert acks == [] and d.unstored == 1 and d.store_failures == 2
        failing.clear()  # the disk is back
        wait_for(lambda: acks == ["m"], "the held message's ack")
        assert d.unstored == 0 and "store 1" in log  # the hook's webhook was not kept
    finally:
        d.stop()


def test_a_press_whose_webhook_waits_in_memory_is_capped_loudly(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(dp, "UNSTORED_MAX", 2)
    bus, d, _ = wired(lambda calls: (_ for _ in ()).throw(EdgehookError("disk full")))
    for i in range(3):
        bus.put(make_event("input.pressed", f"p{i}"))
    d.start()
    try:
        wait_for(lambda: d.events_total == 3, "three presses")
        assert d.unstored == 2 and d.unstored_dropped == 1
        assert any("LOST" in r.getMessage() and "from p0" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.ERROR)
    finally:
        d.stop()
