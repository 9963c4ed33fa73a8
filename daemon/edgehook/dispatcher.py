"""The event bus and the one dispatcher thread: events in, rules evaluated, actions run.

Sources (pin callbacks, paho, HTTP hooks, timers) only translate and enqueue
(:meth:`Bus.put`); everything else happens on this one thread, in order, one batch
at a time:

1. every event of the batch is evaluated (pure rules);
2. the webhook actions of the whole batch go to the outbox in ONE transaction whose
   commit is fsynced (group commit: a burst costs one fsync per batch);
3. only then is each event acknowledged to its source (``ack``: an MQTT PUBACK; a
   hook's :class:`Reply` is set, so it answers 2xx): nothing is confirmed before
   it is on disk;
4. outputs and publishes run, whether or not the store succeeded (the light goes on
   when the disk is full).

When the store fails (full disk, I/O error), the batch's webhooks are kept in memory
and stored again every ``STORE_RETRY`` seconds; their events are acknowledged only
once that succeeds. An MQTT message therefore stays with the broker (which stops
sending past its in-flight window, so the memory held is bounded by it); a hook is
answered 503 at once (its caller retries) and its webhooks are not kept; a press has
no one to tell, so its webhooks are kept, up to ``UNSTORED_MAX`` events (past that
the oldest is dropped with an error line and counted: never silently).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CommandError, EdgehookError
from .events import Event
from .rules import OutputCall, Plan, PublishCall, RuleEngine, WebhookCall

_LOG = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
BATCH = 256
# seconds busy on one batch before the dispatcher counts as stuck (the environment
# variable exists for the watchdog test; nothing in config or on the network sets it)
STALL_AFTER = float(os.environ.get("EDGEHOOK_STALL_AFTER", "30"))
RECENT = 50
# Event lines logged per second; past that, events are counted and one line says how
# many went unlogged (a burst would otherwise be thousands of journal lines on the SD
# card and run into journald's own rate limit, which then drops warnings too).
# Errors are always logged.
LOG_EVENTS_PER_S = 20
SUMMARY_AFTER = 1.0  # seconds of quiet after a burst before its "N more" line
STORE_RETRY = 5.0    # seconds between attempts to store webhooks that failed to store
UNSTORED_MAX = 1_000  # events whose webhooks wait in memory for the disk to come back

Ack = Callable[[], None]


@dataclass(slots=True)
class Reply:
    """Filled by the dispatcher once an event's webhooks are durable and its actions ran.

    ``store_error`` is set when the event's webhooks could not be stored: its source
    must not be told that the event was taken (a hook answers 503).
    """

    done: threading.Event = field(default_factory=threading.Event)
    results: list[dict[str, Any]] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    store_error: str | None = None


@dataclass(slots=True)
class Item:
    """One queued event with whoever waits for it: a hook's reply, an MQTT ack."""

    event: Event
    reply: Reply | None = None
    ack: Ack | None = None


class Bus:
    """A bounded queue; when full the oldest event is dropped, counted and logged."""

    def __init__(self, maxsize: int = QUEUE_SIZE) -> None:
        self._q: deque[Item] = deque()
        self._cond = threading.Condition()
        self.maxsize = maxsize
        self.dropped = 0
        self.closed = False

    def put(self, event: Event, reply: Reply | None = None, ack: Ack | None = None) -> None:
        """Queue an event; never blocks the caller (a pin, paho or HTTP thread).

        A dropped event's ack is never called (an MQTT message stays with the broker)
        and its reply is set with the error.
        """
        with self._cond:
            if len(self._q) >= self.maxsize:
                old = self._q.popleft()
                self.dropped += 1
                _LOG.error("event queue full (%d): dropped oldest event %s %s from %s",
                           self.maxsize, old.event.id, old.event.type, old.event.source)
                if old.reply is not None:
                    old.reply.errors.append("dropped: event queue full")
                    old.reply.done.set()
            self._q.append(Item(event, reply, ack))
            self._cond.notify()

    def wait(self, timeout: float | None) -> bool:
        """Wait until an event is queued, the bus closes or `timeout` passes."""
        with self._cond:
            if not self._q and not self.closed:
                self._cond.wait(timeout)
            return bool(self._q)

    def take(self, limit: int) -> list[Item]:
        """Up to `limit` queued events, oldest first, without waiting."""
        with self._cond:
            n = min(limit, len(self._q))
            return [self._q.popleft() for _ in range(n)]

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._q)


@dataclass(slots=True)
class Actions:
    """The side effects the dispatcher may cause, injected by app.py."""

    # outbox: one fsynced transaction; raises EdgehookError when nothing was stored
    store: Callable[[Sequence[tuple[Event, WebhookCall]]], None]
    set_output: Callable[[str, str, float | None, str], dict[str, Any]]
    publish: Callable[[str, bytes, int, bool], None]
    states: Callable[[], dict[str, Any]]
    observe: Callable[[Event, Plan], None] = lambda e, p: None     # mirrors, metrics


@dataclass(slots=True)
class _Unstored:
    """An event whose webhooks wait in memory to be stored; acked once they are."""

    event: Event
    calls: list[WebhookCall]
    ack: Ack | None


class Dispatcher:
    """Runs rules for every event on one thread; `engine` is swapped whole on reload."""

    def __init__(self, bus: Bus, engine: RuleEngine, actions: Actions) -> None:
        self.bus = bus
        self.engine = engine
        self.actions = actions
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.last_event: Event | None = None
        self.events_total = 0
        self.store_failures = 0      # webhooks that failed to store at least once
        self.unstored_dropped = 0    # events whose webhooks were given up (memory cap)
        self.last_store_error: str | None = None
        self.last_store_failure = 0.0  # monotonic time of the last failed store (0: never)
        self._unstored: deque[_Unstored] = deque()
        self._next_store_retry = 0.0
        self._busy_since: float | None = None
        self._thread: threading.Thread | None = None
        self._hang = os.environ.get("EDGEHOOK_TEST_HANG_EVENT")  # test fault (docs/design.md)
        self._log_second = 0       # the second (monotonic) the event-line budget is for
        self._log_budget = LOG_EVENTS_PER_S
        self._log_unlogged = 0     # events past the budget since the last summary
        self._last_done = 0.0      # when the last batch finished (monotonic)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgehook-dispatcher",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then stop (unstored webhooks get one last try)."""
        self.bus.close()
        if self._thread:
            self._thread.join(timeout)

    @property
    def unstored(self) -> int:
        """Events whose webhooks are waiting in memory for the outbox to take them."""
        return len(self._unstored)

    def stalled_for(self) -> float:
        """Seconds the current batch has been running (0 while idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def alive(self) -> bool:
        """True while the dispatcher thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stuck_for(self) -> float:
        """Seconds the current batch has run, once that is STALL_AFTER or more; else 0."""
        busy = self.stalled_for()
        return busy if busy >= STALL_AFTER else 0.0

    def healthy(self) -> bool:
        """False when the thread died or one batch has run longer than STALL_AFTER."""
        return self.alive() and not self.stuck_for()

    def _timeout(self) -> float | None:
        """How long the loop may sleep: until a retry of unstored webhooks is due, or
        the end of a burst's quiet second (for its one summary line); else forever."""
        now = time.monotonic()
        times = []
        if self._unstored:
            times.append(self._next_store_retry - now)
        if self._log_unlogged:
            times.append(self._last_done + SUMMARY_AFTER - now)
        return max(0.0, min(times)) if times else None

    def _run(self) -> None:
        while True:
            queued = self.bus.wait(self._timeout())
            if queued:
                self._process_guarded(self.bus.take(BATCH))
            now = time.monotonic()
            if self._unstored and now >= self._next_store_retry:
                self._retry_unstored()
            if self._log_unlogged and not queued and now >= self._last_done + SUMMARY_AFTER:
                self._log_summary()
            if self.bus.closed and not len(self.bus):
                if self._unstored:
                    self._retry_unstored()  # one last try before the process ends
                return

    def _process_guarded(self, batch: Sequence[Item]) -> None:
        """:meth:`process` with the stall clock running; a bug fails one batch only."""
        self._busy_since = time.monotonic()
        try:
            self.process(batch)
        except Exception:
            _LOG.exception("dispatcher: batch of %d events failed", len(batch))
            for item in batch:
                if item.reply is not None and not item.reply.done.is_set():
                    item.reply.errors.append("internal error (logged)")
                    item.reply.store_error = item.reply.store_error or "internal error"
                    item.reply.done.set()
        finally:
            self._busy_since = None
            self._last_done = time.monotonic()

    def process(self, batch: Sequence[Item]) -> None:
        """Evaluate a batch, store its webhooks in one fsynced transaction, acknowledge
        the events that are now durable, then run outputs and publishes."""
        engine = self.engine
        plans: list[Plan] = []
        stored: list[tuple[Event, WebhookCall]] = []
        for item in batch:
            event = item.event
            if self._hang and event.type == self._hang:
                _LOG.warning("EDGEHOOK_TEST_HANG_EVENT: dispatcher hangs on %s", event.id)
                threading.Event().wait()
            plan = engine.evaluate(event, self.actions.states)
            plans.append(plan)
            stored.extend((event, c) for c in plan.calls if isinstance(c, WebhookCall))
        store_error = self._store(stored) if stored else None
        for item, plan in zip(batch, plans, strict=True):
            webhooks = [c for c in plan.calls if isinstance(c, WebhookCall)]
            if store_error and webhooks and item.reply is None:
                self._keep(item.event, webhooks, item.ack)  # acked once stored
            elif item.ack is not None and not (store_error and webhooks):
                self._ack(item.event, item.ack)
            self._run_plan(item.event, plan, item.reply,
                           store_error if webhooks else None)

    def _store(self, calls: Sequence[tuple[Event, WebhookCall]]) -> str | None:
        """Store webhooks in one transaction; the error in words, or None when durable."""
        try:
            self.actions.store(calls)
        except EdgehookError as exc:
            error = str(exc)
        except Exception as exc:  # a bug or an unexpected storage error: still data
            _LOG.exception("outbox: storing %d webhook(s) failed", len(calls))
            error = f"{type(exc).__name__}: {exc}"
        else:
            return None
        self.store_failures += len(calls)
        self.last_store_error = error
        self.last_store_failure = time.monotonic()
        return error

    def _keep(self, event: Event, calls: list[WebhookCall], ack: Ack | None) -> None:
        """Hold an event's webhooks in memory until the outbox takes them."""
        if not self._unstored:
            self._next_store_retry = time.monotonic() + STORE_RETRY
        self._unstored.append(_Unstored(event, calls, ack))
        while len(self._unstored) > UNSTORED_MAX:
            lost = self._unstored.popleft()
            self.unstored_dropped += 1
            _LOG.error("event %s %s from %s: %d webhook(s) LOST: the outbox has refused "
                       "them for too long and %d more events wait in memory",
                       lost.event.id, lost.event.type, lost.event.source, len(lost.calls),
                       UNSTORED_MAX)

    def _retry_unstored(self) -> None:
        """Try again to store the webhooks held in memory, all in one transaction."""
        held = list(self._unstored)
        error = self._store([(u.event, c) for u in held for c in u.calls])
        if error is not None:
            self._next_store_retry = time.monotonic() + STORE_RETRY
            _LOG.warning("outbox still refuses %d event(s)' webhooks: %s; retrying in %g s",
                         len(held), error, STORE_RETRY)
            return
        for _ in held:
            self._unstored.popleft()
        _LOG.info("outbox took the webhooks of %d held event(s)", len(held))
        for u in held:
            if u.ack is not None:
                self._ack(u.event, u.ack)

    @staticmethod
    def _ack(event: Event, ack: Ack) -> None:
        try:
            ack()
        except Exception as exc:  # the link may be gone: the broker then resends
            _LOG.warning("event %s: acknowledging it failed: %s", event.id, exc)

    def _log_allowed(self) -> bool:
        """True while this second's budget of event lines lasts (see LOG_EVENTS_PER_S)."""
        second = int(time.monotonic())
        if second != self._log_second:
            if self._log_unlogged:
                self._log_summary()
            self._log_second = second
            self._log_budget = LOG_EVENTS_PER_S
        if self._log_budget > 0:
            self._log_budget -= 1
            return True
        self._log_unlogged += 1
        return False

    def _log_summary(self) -> None:
        _LOG.info("%d more event(s) handled without a line each (over %d/s); "
                  "/api/v1/events and /metrics have them", self._log_unlogged,
                  LOG_EVENTS_PER_S)
        self._log_unlogged = 0

    def _run_plan(self, event: Event, plan: Plan, reply: Reply | None,
                  store_error: str | None) -> None:
        self.events_total += 1
        self.last_event = event
        skipped = [{"rule": r, "reason": why} for r, why in plan.skipped]
        # One budget decision per event covers its action lines too (LOG_EVENTS_PER_S)
        log = _LOG.isEnabledFor(logging.INFO) and self._log_allowed()
        if log:
            queued = "" if store_error else ", ".join(
                c.target for c in plan.calls if isinstance(c, WebhookCall))
            why_not = "; ".join(f"rule {s['rule']} skipped ({s['reason']})" for s in skipped)
            _LOG.info("event %s %s from %s%s%s%s", event.id, event.type, event.source,
                      f": rules {', '.join(plan.fired)}" if plan.fired else "",
                      f": webhook {queued} stored" if queued else "",
                      f": {why_not}" if why_not else "")
        results: list[dict[str, Any]] = []
        errors = list(plan.errors)
        for err in plan.errors:
            _LOG.error("event %s: %s (action skipped)", event.id, err)
        for call in plan.calls:
            try:
                if isinstance(call, WebhookCall):
                    if store_error:
                        kept = "" if reply is not None else " (kept in memory, retried)"
                        msg = f"webhook {call.target} NOT stored: {store_error}{kept}"
                        _LOG.error("event %s: rule %s: %s", event.id, call.rule, msg)
                        errors.append(msg)
                        continue
                    results.append({"webhook": call.target, "queued": True})
                elif isinstance(call, OutputCall):
                    state = self.actions.set_output(call.output, call.state, call.duration,
                                                    f"rule {call.rule}, event {event.id}")
                    if log:
                        _LOG.info("event %s: rule %s: output %s %s%s", event.id, call.rule,
                                  call.output, call.state,
                                  f" for {call.duration:g} s" if call.duration else "")
                    results.append({"output": call.output, **state})
                elif isinstance(call, PublishCall):
                    self.actions.publish(call.topic, call.payload, call.qos, call.retain)
                    if log:
                        _LOG.info("event %s: rule %s: publish %s", event.id, call.rule,
                                  call.topic)
                    results.append({"publish": call.topic})
            except (CommandError, KeyError) as exc:
                msg = f"rule {call.rule}: {call.describe()}: {str(exc).strip(chr(39))}"
                _LOG.error("event %s: %s", event.id, msg)
                errors.append(msg)
            except Exception as exc:  # an action must never stop the next one
                msg = f"rule {call.rule}: {call.describe()} failed: {exc}"
                _LOG.exception("event %s: %s", event.id, msg)
                errors.append(msg)
        self.recent.appendleft({"id": event.id, "type": event.type, "source": event.source,
                                "time": event.time, "rules": plan.fired, "results": results,
                                "errors": errors, "skipped": skipped})
        try:
            self.actions.observe(event, plan)
        except Exception:
            _LOG.exception("event %s: observer failed", event.id)
        if reply is not None:
            reply.results = results
            reply.fired = plan.fired
            reply.errors = errors
            reply.skipped = skipped
            reply.store_error = store_error
            reply.done.set()
