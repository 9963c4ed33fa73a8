"""The sender: outbox rows -> signed HTTP requests, with backoff, in order per target.

One thread per target. It keeps that target's deliveries in order (the head of the
queue goes first; a row that is backing off holds back the rows behind it, as
``Outbox.claim`` guarantees), and a black-holed or failing target only ever stalls
its own thread. A thread takes rows only once they are committed: the app stores a
batch, then calls :meth:`Sender.wake`; the thread claims the due head of its queue,
sends it, records each outcome, and asks the outbox when the head is due next.

Idle costs nothing: a thread sleeps on an ``Event`` until it is woken (new rows, a
retry from the API, a reload) or the head row is due, with no timeout otherwise.
Nothing else writes the queue behind its back: the CLI's retries and purges go
through the daemon's API while it runs. A sleeping thread counts as alive for
:meth:`Sender.heartbeat_age`: it is waiting for work, not stuck in it.

Rows follow the target's current config at each attempt (``retry.plan``: URL unless
it is a per-event template, headers, ``max_attempts``, ``max_age``); signing
secrets are applied at send time from that config and are never stored, logged or
echoed. Logs name the target and the webhook-id, never the URL (a Discord URL is a
credential). HTTP is ``transport.py``'s; what an answer means is ``retry.py``'s.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from . import __version__
from .config import Signing, WebhookConfig
from .errors import EdgehookError
from .events import rfc3339
from .retry import BACKOFF_CAP, Plan, Verdict, expired, judge, plan
from .signing import sign_github, standard_headers
from .transport import Result, Transport

_LOG = logging.getLogger(__name__)

BATCH = 50           # rows claimed at once
LEASE = 300.0        # a claim's lease; only a dead thread's rows ever wait it out
ERROR_PAUSE = 1.0    # after an outbox error (disk full), wait this long, doubling
USER_AGENT = f"edgehook/{__version__}"

Outcome = str  # 'delivered' | 'retry' | 'dead'
ResultCallback = Callable[[str, Outcome, "int | None", float], None]


class RowLike(Protocol):
    """What the sender reads from a claimed outbox row."""

    id: int
    webhook_id: str
    target: str
    url: str
    method: str
    headers: dict[str, str]
    body: bytes
    content_type: str
    attempts: int
    max_attempts: int
    created_at: float
    deadline: float


class OutboxLike(Protocol):
    """The part of the outbox the sender uses (typed here: edges never import each other)."""

    def claim(self, target: str, limit: int, now: float, lease: float) -> Sequence[RowLike]: ...
    def release(self, ids: Sequence[int]) -> None: ...
    def next_due(self, target: str) -> float | None: ...
    def mark_delivered(self, ids_with_status: Sequence[tuple[int, int]], now: float) -> None: ...
    def mark_retry(self, id: int, now: float, next_at: float, error: str,
                   status: int | None) -> None: ...
    def mark_dead(self, id: int, now: float, error: str, status: int | None, *,
                  attempted: bool = True) -> None: ...
    def mark_target_dead(self, target: str, now: float, error: str) -> int: ...
    def targets_with_pending(self) -> set[str]: ...


def sign_headers(signing: Signing | None, webhook_id: str, body: bytes,
                 now: float) -> dict[str, str]:
    """Signature headers for one attempt from the target's `Signing` (or none)."""
    if signing is None:
        return {}
    scheme, secrets = signing.scheme, signing.secrets
    if not secrets:
        return {}
    if scheme == "standard":
        return standard_headers(secrets, webhook_id, int(now), body)
    if scheme == "github":
        # GitHub's header has room for one signature: the first (newest) secret signs.
        return {"X-Hub-Signature-256": sign_github(secrets[0], body)}
    raise EdgehookError(f"unknown signing scheme {scheme!r}")


def request_headers(row: RowLike, p: Plan, cfg: WebhookConfig, now: float) -> dict[str, str]:
    """The headers of one attempt at `row` as planned, signed; EdgehookError on a bad secret."""
    headers = dict(p.headers)
    headers["Content-Type"] = row.content_type
    headers["User-Agent"] = USER_AGENT
    headers["webhook-id"] = row.webhook_id
    headers.update(sign_headers(cfg.signing, row.webhook_id, row.body, now))
    return headers


class _Worker:
    """The sender thread of one target and its HTTP transport."""

    def __init__(self, sender: Sender, name: str, config: WebhookConfig | None) -> None:
        self.sender = sender
        self.name = name
        self.config = config  # swapped whole on reload; None means "target removed"
        self.wakeup = threading.Event()
        self.beat = time.monotonic()
        self.sleeping = False  # waiting for work (alive by definition), see heartbeat_age
        self.transport = Transport(None if config is None else config.tls)
        self.unmarked: list[tuple[int, int]] = []  # delivered, not yet recorded
        self.unreleased: list[int] = []  # claimed, not attempted, lease not yet given back
        self.thread = threading.Thread(target=self._run, name=f"edgehook-send-{name}",
                                       daemon=True)

    def _run(self) -> None:
        stopping = self.sender._stopping
        pause = ERROR_PAUSE
        try:
            while not stopping.is_set():
                self.beat = time.monotonic()
                self.wakeup.clear()  # before reading: a later wake() is not lost
                cfg = self.config
                if cfg is None:
                    if self._reap():
                        return
                    continue
                try:
                    due = self._round()
                    pause = ERROR_PAUSE
                except Exception:
                    _LOG.exception("sender %s: outbox error; pausing %.0f s", self.name, pause)
                    stopping.wait(pause)
                    pause = min(pause * 2, BACKOFF_CAP)
                    continue
                if due is not None and due <= time.time():
                    continue
                self._sleep(due)
        except Exception:  # the loop's boundary: log, and let heartbeat_age show it
            _LOG.exception("sender %s died", self.name)
        finally:
            try:
                self._flush()
            except Exception:
                _LOG.exception("sender %s: could not record its last results", self.name)
            self.transport.close()

    def _sleep(self, due: float | None) -> None:
        """Wait for a wake-up, or until `due` (None: no timeout, an idle thread never
        wakes by itself)."""
        self.sleeping = True
        try:
            self.wakeup.wait(None if due is None else max(0.0, due - time.time()))
        finally:
            self.sleeping = False
            self.beat = time.monotonic()

    def _reap(self) -> bool:
        """The target left the config: its pending rows go dead. True when the thread ends."""
        with self.sender._lock:
            if self.config is not None:  # re-added meanwhile
                return False
            n = self.sender.outbox.mark_target_dead(self.name, time.time(),
                                                   "target removed from config")
            if n:
                _LOG.warning("target %s removed from config: %d pending deliveries dead",
                             self.name, n)
            if self.sender._workers.get(self.name) is self:
                del self.sender._workers[self.name]
            return True

    def _flush(self) -> None:
        """Record deliveries and give back leases; kept for the next try if the write fails."""
        if self.unmarked:
            self.sender.outbox.mark_delivered(self.unmarked, time.time())
            self.unmarked = []
        if self.unreleased:
            self.sender.outbox.release(self.unreleased)
            self.unreleased = []

    def _round(self) -> float | None:
        """Claim the due head of the queue and send it in order; returns when the head
        is due next (None: the queue is empty, 0.0: claim again at once)."""
        outbox = self.sender.outbox
        self._flush()  # what a failed write left comes first
        rows = outbox.claim(self.name, BATCH, time.time(), LEASE)
        done = 0
        try:
            for row in rows:
                cfg = self.config
                if self.sender._stopping.is_set() or cfg is None:
                    break
                sent = self._deliver(row, cfg)
                done += 1  # (not when recording it failed: its lease is given back)
                if not sent:
                    break  # the head is backing off: the rows behind it wait (order)
            else:
                if len(rows) == BATCH:
                    return 0.0  # there may be more
        finally:
            self.unreleased.extend(r.id for r in rows[done:])
            self._flush()
        return outbox.next_due(self.name)

    def _deliver(self, row: RowLike, cfg: WebhookConfig) -> bool:
        """Attempt one row under the target's current config; False when it is to be
        retried later (stop this round)."""
        sender = self.sender
        outbox = sender.outbox
        now = time.time()
        p = plan(row, cfg)
        why = expired(row, p, now)
        if why is not None:
            outbox.mark_dead(row.id, now, why, None, attempted=False)
            sender._result(self.name, "dead", None, 0.0)
            _LOG.warning("delivery %s to %s dead: %s", row.webhook_id, self.name, why)
            return True
        self.transport.configure(cfg.tls)
        start = time.monotonic()
        try:
            headers = request_headers(row, p, cfg, now)
        except EdgehookError as exc:  # a bad secret: retried, so fixing the config heals it
            result = Result(None, f"signing failed: {exc}")
        else:
            result = self.transport.send(row.method, p.url, headers, row.body, cfg.timeout)
        latency = time.monotonic() - start
        self.beat = time.monotonic()
        now = time.time()
        attempt = row.attempts + 1
        verdict = judge(result.status, result.error, result.final, result.retry_after,
                        attempt=attempt, p=p, now=now, rng=sender._rng)
        return self._record(row, p, result, verdict, attempt, latency, now)

    def _record(self, row: RowLike, p: Plan, result: Result, verdict: Verdict, attempt: int,
                latency: float, now: float) -> bool:
        """Write an attempt's verdict to the outbox, the health and the log."""
        sender, outbox, status = self.sender, self.sender.outbox, result.status
        if verdict.outcome == "delivered":
            assert status is not None
            self.unmarked.append((row.id, status))
            self._flush()
            sender._succeeded(self.name, now)
            sender._result(self.name, "delivered", status, latency)
            _LOG.debug("delivery %s to %s: HTTP %s", row.webhook_id, self.name, status)
            return True
        error = verdict.error or "failed"
        sender._failed(self.name, error, now)
        if verdict.outcome == "retry":
            assert verdict.next_at is not None
            outbox.mark_retry(row.id, now, verdict.next_at, error, status)
            sender._result(self.name, "retry", status, latency)
            _LOG.info("delivery %s to %s failed (%s), attempt %d/%d; next in %.1f s",
                      row.webhook_id, self.name, error, attempt, p.max_attempts,
                      verdict.next_at - now)
            return False
        if status == 410:
            with sender._lock:
                sender._gone.add(self.name)
            _LOG.warning("target %s is gone (HTTP 410): its deliveries fail until the config"
                         " changes", self.name)
        outbox.mark_dead(row.id, now, error, status)
        sender._result(self.name, "dead", status, latency)
        _LOG.warning("delivery %s to %s dead after %d attempt(s): %s", row.webhook_id,
                     self.name, attempt, error)
        return True


class Sender:
    """The sender threads, one per configured target."""

    def __init__(self, outbox: OutboxLike, targets: Mapping[str, WebhookConfig], *,
                 on_result: ResultCallback | None = None) -> None:
        """Prepare the senders of a config snapshot; no thread runs before :meth:`start`.

        :param on_result: called as ``on_result(target, outcome, status, latency_s)``
            after every attempt, from the sender thread (metrics): keep it cheap.
        """
        self.outbox = outbox
        self._targets = dict(targets)
        self._on_result = on_result
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._stopping = threading.Event()
        self._gone: set[str] = set()
        self._health: dict[str, dict[str, Any]] = {}
        self._rng = random.Random()
        self._started = False

    def _result(self, target: str, outcome: Outcome, status: int | None,
                latency: float) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(target, outcome, status, latency)
        except Exception:
            _LOG.exception("on_result callback failed for %s", target)

    def _succeeded(self, target: str, now: float) -> None:
        with self._lock:
            self._gone.discard(target)
            self._health.setdefault(target, {})["last_success"] = now

    def _failed(self, target: str, error: str, now: float) -> None:
        with self._lock:
            entry = self._health.setdefault(target, {})
            entry["last_error"], entry["last_error_at"] = error, now

    def start(self) -> None:
        """Start one thread per target; rows pending from before are sent once due."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._stopping.clear()
            for name, cfg in self._targets.items():
                self._spawn(name, cfg)
        self._reap_unconfigured()

    def _spawn(self, name: str, cfg: WebhookConfig | None) -> _Worker:
        worker = _Worker(self, name, cfg)
        self._workers[name] = worker
        worker.thread.start()
        return worker

    def _reap_unconfigured(self) -> None:
        with self._lock:
            configured = set(self._targets)
        for name in self.outbox.targets_with_pending() - configured:
            n = self.outbox.mark_target_dead(name, time.time(), "target removed from config")
            _LOG.warning("target %s is not in the config: %d pending deliveries dead", name, n)

    def wake(self, targets: Iterable[str] | None = None) -> None:
        """New rows were committed (or the queue changed) for these targets, or all: read it now."""
        with self._lock:
            workers = self._workers
            chosen = list(workers.values()) if targets is None else \
                [w for w in (workers.get(name) for name in targets) if w is not None]
        for worker in chosen:
            worker.wakeup.set()

    def reload(self, targets: Mapping[str, WebhookConfig]) -> None:
        """Swap in a new config snapshot: queued rows follow it from their next attempt;
        new targets get threads; removed targets' pending rows go dead."""
        with self._lock:
            self._targets = dict(targets)
            self._gone &= set(self._targets)
            self._health = {n: h for n, h in self._health.items() if n in self._targets}
            if not self._started:
                return
            for name, cfg in self._targets.items():
                worker = self._workers.get(name)
                if worker is not None and worker.thread.is_alive():
                    worker.config = cfg
                    worker.wakeup.set()
                else:
                    self._spawn(name, cfg)
            for name, worker in list(self._workers.items()):
                if name not in self._targets:
                    worker.config = None
                    worker.wakeup.set()

    def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; in-flight requests get `grace` seconds; the rest stays pending."""
        self._stopping.set()
        with self._lock:
            workers = list(self._workers.values())
            self._started = False
        for worker in workers:
            worker.wakeup.set()
        deadline = time.monotonic() + grace
        for worker in workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                _LOG.warning("sender %s still busy after %.1f s; leaving it", worker.name, grace)
        with self._lock:
            self._workers = {n: w for n, w in self._workers.items() if w.thread.is_alive()}

    def heartbeat_age(self) -> float:
        """Seconds since the least recently alive sender thread beat (0 with no threads).

        A thread asleep waiting for work counts as 0 (no timer has to wake it to prove
        it lives); a thread that died, or hangs in a request or a database call, keeps
        its last beat, so its age grows and the watchdog stops.
        """
        with self._lock:
            workers = list(self._workers.values())
        if not workers:
            return 0.0
        now = time.monotonic()
        return max(0.0 if w.sleeping and w.thread.is_alive() else now - w.beat
                   for w in workers)

    def gone_targets(self) -> set[str]:
        """Targets that answered 410 Gone to their latest delivery."""
        with self._lock:
            return set(self._gone)

    def target_health(self) -> dict[str, dict[str, str | None]]:
        """Per configured target, in memory since start: the last 2xx, the last failed
        attempt's error and when (RFC 3339 UTC; None when there was none)."""
        with self._lock:
            names, health = list(self._targets), {n: dict(h) for n, h in self._health.items()}
        out: dict[str, dict[str, str | None]] = {}
        for name in names:
            h = health.get(name, {})
            success, error_at = h.get("last_success"), h.get("last_error_at")
            out[name] = {"last_success": None if success is None else rfc3339(success),
                         "last_error": h.get("last_error"),
                         "last_error_at": None if error_at is None else rfc3339(error_at)}
        return out
