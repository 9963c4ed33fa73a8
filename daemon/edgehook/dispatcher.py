"""The event bus and the one dispatcher thread: events in, rules evaluated, actions run.

Sources (pins, MQTT, HTTP, timers) hand events over (``put()``, or for pins and MQTT
:meth:`Dispatcher.offer`, see below); everything else happens here, in order, one
batch at a time. Webhook actions of a whole batch of events go to the
outbox in one transaction (group commit) before any of those events counts as handled.

One exception to "on the dispatcher thread": a synchronous hook, whose HTTP thread
waits for the result anyway, runs its event itself, together with the few events
queued ahead of it (:meth:`Dispatcher.run_now`), holding the same one-batch-at-a-time
lock. That saves two thread hand-offs per request: at 16 concurrent connections
the p99 went from 11-12.6 ms to 8.2-9.4 ms on a quiet machine (issue 6).

The same holds for a press or an MQTT message that finds the dispatcher idle for
a while (:meth:`Dispatcher.offer`): the pin's or paho's thread runs it itself, with
a non-blocking try for the lock, so it never waits for a batch. That saves the
wake-up of this thread (MQTT -> POST p99 1.66 -> 1.53 ms, p50 0.78 -> 0.69 ms;
press -> arrival p99 1.40-1.70x -> 1.25-1.36x a warm http.client POST, with the
early write's yield, see delivery.py), and paho acknowledges such a QoS 1 message
only after its webhook is committed: a crash before the commit leaves it with the
broker, which sends it again. In a burst, events queue as before and are stored
in batches (one hand-off, one commit per batch).
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
# many went unlogged (a 5,000-message burst would otherwise be 5,000 journal lines on
# the SD card, cost a tenth of the burst's CPU, and run into journald's own rate limit,
# which then drops lines: warnings included). Errors are always logged.
LOG_EVENTS_PER_S = 20
SUMMARY_AFTER = 1.0  # seconds of quiet after a burst before its "N more" line
HELP_MAX = 16  # a sync hook runs the events queued ahead of it itself, up to this many
# seconds without a batch before offer() runs an event on its caller's thread; in a
# burst, events arrive faster than that and go through the bus, in batches
QUIET_BEFORE_INLINE = 0.002


@dataclass(slots=True)
class Reply:
    """Filled by the dispatcher once an event's actions ran (for sync hooks)."""

    done: threading.Event = field(default_factory=threading.Event)
    results: list[dict[str, Any]] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Bus:
    """A bounded queue; when full the oldest event is dropped, counted and logged."""

    def __init__(self, maxsize: int = QUEUE_SIZE) -> None:
        self._q: deque[tuple[Event, Reply | None]] = deque()
        self._cond = threading.Condition()
        self.maxsize = maxsize
        self.dropped = 0
        self.closed = False

    def put(self, event: Event, reply: Reply | None = None) -> None:
        """Queue an event; never blocks the caller (a pin or paho thread)."""
        with self._cond:
            if len(self._q) >= self.maxsize:
                old, old_reply = self._q.popleft()
                self.dropped += 1
                _LOG.error("event queue full (%d): dropped oldest event %s %s from %s",
                           self.maxsize, old.id, old.type, old.source)
                if old_reply is not None:
                    old_reply.errors.append("dropped: event queue full")
                    old_reply.done.set()
            self._q.append((event, reply))
            self._cond.notify()

    def wait(self, timeout: float | None) -> bool:
        """Wait until an event is queued, the bus closes, `timeout` passes or someone
        calls :meth:`nudge`; True when an event is queued."""
        with self._cond:
            if not self._q and not self.closed:
                self._cond.wait(timeout)
            return bool(self._q)

    def take(self, limit: int) -> list[tuple[Event, Reply | None]]:
        """Up to `limit` queued events, oldest first, without waiting."""
        with self._cond:
            n = min(limit, len(self._q))
            return [self._q.popleft() for _ in range(n)]

    def nudge(self) -> None:
        """Wake a :meth:`wait` so that its caller looks at its own state again."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._q)


@dataclass(slots=True)
class Actions:
    """The side effects the dispatcher may cause, injected by app.py."""

    store: Callable[[Sequence[tuple[Event, WebhookCall]]], None]   # outbox, one transaction
    set_output: Callable[[str, str, float | None, str], dict[str, Any]]
    publish: Callable[[str, bytes, int, bool], None]
    states: Callable[[], dict[str, Any]]
    observe: Callable[[Event, Plan], None] = lambda e, p: None     # mirrors, metrics


class Dispatcher:
    """Runs rules for every event on one thread; `engine` is swapped whole on reload."""

    def __init__(self, bus: Bus, engine: RuleEngine, actions: Actions) -> None:
        self.bus = bus
        self.engine = engine
        self.actions = actions
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.last_event: Event | None = None
        self.events_total = 0
        self.store_failures = 0
        self._busy_since: float | None = None
        self._thread: threading.Thread | None = None
        self._hang = os.environ.get("EDGEHOOK_TEST_HANG_EVENT")  # test-only fault, see README
        self._log_second = 0       # the second (monotonic) the event-line budget is for
        self._log_budget = LOG_EVENTS_PER_S
        self._log_unlogged = 0     # events past the budget since the last summary
        self._last_done = 0.0      # when the last batch finished (monotonic)
        # Held while a batch runs, by the dispatcher thread or by run_now's caller;
        # the dispatcher takes events off the bus only while holding it, so an event
        # run_now sees no queue ahead of has none.
        self._turn = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgehook-dispatcher",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then stop."""
        self.bus.close()
        if self._thread:
            self._thread.join(timeout)

    def stalled_for(self) -> float:
        """Seconds the current batch has been running (0 while idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def healthy(self) -> bool:
        """False when the thread died or one batch has run longer than STALL_AFTER."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self.stalled_for() < STALL_AFTER

    def _run(self) -> None:
        while True:
            # With events left unlogged, wait at most SUMMARY_AFTER: a quiet second ends
            # the burst and gets its one summary line (under steady load the line comes
            # once a second, from _log_allowed). Otherwise: sleep until an event comes.
            timeout = None
            if self._log_unlogged:
                timeout = self._last_done + SUMMARY_AFTER - time.monotonic()
                if timeout <= 0:
                    with self._turn:
                        if self._log_unlogged:
                            self._log_summary()
                    continue
            if not self.bus.wait(timeout):
                if self.bus.closed:
                    return
                continue
            with self._turn:
                batch = self.bus.take(BATCH)
                if batch:
                    self._process_guarded(batch)

    def run_now(self, event: Event, reply: Reply, wait: float) -> None:
        """Run `event` on the calling thread, after the few events queued ahead of it
        (up to ``HELP_MAX``, in order, in the same batch); behind a longer queue it
        waits its turn on the dispatcher thread. Either way `reply` is done once its
        actions ran, or not yet after `wait` seconds (the event stays queued)."""
        deadline = time.monotonic() + wait
        if not self._turn.acquire(timeout=wait):  # a batch hangs: queue it behind
            self.bus.put(event, reply)
            return
        try:
            inline = len(self.bus) <= HELP_MAX and not self.bus.closed
            if inline:
                self._process_guarded([*self.bus.take(HELP_MAX), (event, reply)])
        finally:
            self._turn.release()
        if not inline:
            self.bus.put(event, reply)  # behind what is queued: order kept
            reply.done.wait(max(0.0, deadline - time.monotonic()))
        elif self._log_unlogged:
            self.bus.nudge()  # the dispatcher thread times this burst's summary line

    def offer(self, event: Event) -> None:
        """Run `event` on the calling thread when the dispatcher has been idle for
        ``QUIET_BEFORE_INLINE`` and nothing is queued; otherwise queue it. Never waits."""
        if (not len(self.bus) and time.monotonic() - self._last_done >= QUIET_BEFORE_INLINE
                and self._turn.acquire(blocking=False)):
            try:
                if not len(self.bus) and not self.bus.closed:
                    self._process_guarded([(event, None)])
                    if self._log_unlogged:
                        self.bus.nudge()  # the dispatcher thread times the summary line
                    return
            finally:
                self._turn.release()
        self.bus.put(event)

    def _process_guarded(self, batch: Sequence[tuple[Event, Reply | None]]) -> None:
        """:meth:`process` with the stall clock running; the caller holds ``_turn``."""
        self._busy_since = time.monotonic()
        try:
            self.process(batch)
        except Exception:
            _LOG.exception("dispatcher: batch of %d events failed", len(batch))
            for _, reply in batch:
                if reply is not None and not reply.done.is_set():
                    reply.errors.append("internal error (logged)")
                    reply.done.set()
        finally:
            self._busy_since = None
            self._last_done = time.monotonic()

    def process(self, batch: Sequence[tuple[Event, Reply | None]]) -> None:
        """Evaluate a batch, store its webhooks in one transaction, then run the rest."""
        engine = self.engine
        plans: list[Plan] = []
        stored: list[tuple[Event, WebhookCall]] = []
        for event, _ in batch:
            if self._hang and event.type == self._hang:
                _LOG.warning("EDGEHOOK_TEST_HANG_EVENT: dispatcher hangs on %s", event.id)
                threading.Event().wait()
            plan = engine.evaluate(event, self.actions.states)
            plans.append(plan)
            stored.extend((event, c) for c in plan.calls if isinstance(c, WebhookCall))
        store_error = None
        if stored:
            try:
                self.actions.store(stored)
            except EdgehookError as exc:
                store_error = str(exc)
                self.store_failures += len(stored)
        for (event, reply), plan in zip(batch, plans, strict=True):
            self._run_plan(event, plan, reply, store_error)

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
        # One budget decision per event covers its action lines too (LOG_EVENTS_PER_S)
        log = _LOG.isEnabledFor(logging.INFO) and self._log_allowed()
        if log:
            # Queued webhooks go on the event's own line: one log record per event.
            queued = "" if store_error else ", ".join(
                c.target for c in plan.calls if isinstance(c, WebhookCall))
            _LOG.info("event %s %s from %s%s%s", event.id, event.type, event.source,
                      f": rules {', '.join(plan.fired)}" if plan.fired else "",
                      f": webhook {queued} queued" if queued else "")
        results: list[dict[str, Any]] = []
        errors = list(plan.errors)
        for err in plan.errors:
            _LOG.error("event %s: %s (action skipped)", event.id, err)
        for call in plan.calls:
            try:
                if isinstance(call, WebhookCall):
                    if store_error:
                        msg = f"webhook {call.target} NOT stored: {store_error}"
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
                msg = f"rule {call.rule}: {type(call).__name__}: {exc}"
                _LOG.error("event %s: %s", event.id, msg)
                errors.append(msg)
            except Exception as exc:  # an action must never stop the next one
                msg = f"rule {call.rule}: {type(exc).__name__}: {exc}"
                _LOG.exception("event %s: %s", event.id, msg)
                errors.append(msg)
        self.recent.appendleft({"id": event.id, "type": event.type, "source": event.source,
                                "time": event.time, "rules": plan.fired, "results": results,
                                "errors": errors})
        try:
            self.actions.observe(event, plan)
        except Exception:
            _LOG.exception("event %s: observer failed", event.id)
        if reply is not None:
            reply.results = results
            reply.fired = plan.fired
            reply.errors = errors
            reply.done.set()
