"""The sender against a real HTTP receiver on 127.0.0.1 and a real SQLite outbox."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

import edgehook
from edgehook import delivery
from edgehook.config import Signing, WebhookConfig
from edgehook.delivery import Sender, classify, next_delay, parse_retry_after
from edgehook.outbox import NewDelivery, Outbox
from edgehook.signing import verify_standard
from edgehook.templates import Static
from receiver import Receiver, Reply

SECRET_NEW = "whsec_" + base64.b64encode(b"new-secret-32-bytes-long-padding").decode()
SECRET_OLD = "an old plain secret"


# --------------------------------------------------------------------------- helpers

def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def target(name: str, rx: Receiver, *, timeout: float = 2.0, signing: Signing | None = None,
           ) -> WebhookConfig:
    return WebhookConfig(name=name, url=Static(rx.url + "/hook"), timeout=timeout,
                         signing=signing)


def add(box: Outbox, name: str, rx: Receiver, n: int = 1, *, start: int = 0,
        max_attempts: int = 12, max_age: float = 900.0) -> list[int]:
    return box.add([NewDelivery(
        target=name, event_id=f"ev{i}", url=rx.url + f"/hook?seq={i}", method="POST",
        headers={"X-Seq": str(i)}, body=json.dumps({"seq": i}).encode(),
        content_type="application/json", max_attempts=max_attempts, max_age=max_age)
        for i in range(start, start + n)])


def status_of(box: Outbox, row_id: int) -> str:
    row = box.get(row_id)
    assert row is not None
    return row["status"]


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "BACKOFF_FIRST", (0.05, 0.1))
    monkeypatch.setattr(delivery, "BACKOFF_CAP", 0.5)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    o = Outbox(tmp_path / "outbox.db")
    yield o
    o.close()


@pytest.fixture
def rx() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def rx2() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


class Results(list[tuple[str, str, "int | None", float]]):
    def __call__(self, target: str, outcome: str, status: int | None, latency: float) -> None:
        self.append((target, outcome, status, latency))


@pytest.fixture
def make_sender(box: Outbox) -> Iterator[Callable[..., tuple[Sender, Results]]]:
    made: list[Sender] = []

    def make(*targets: WebhookConfig, start: bool = True) -> tuple[Sender, Results]:
        results = Results()
        s = Sender(box, {t.name: t for t in targets}, on_result=results)
        made.append(s)
        if start:
            s.start()
        return s, results

    yield make
    for s in made:
        s.stop(grace=0.5)


# --------------------------------------------------------------------------- pure policy

class FixedRng(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(("attempt", "retry_after", "low", "high"), [
    (1, None, 1.0, 5.0),       # first retry within 1-5 s
    (2, None, 2.0, 10.0),      # doubling
    (3, None, 4.0, 20.0),
    (7, None, 64.0, 300.0),    # the window's top is capped at 5 min
    (9, None, 256.0, 300.0),
    (10, None, 300.0, 300.0),  # ... and so is its bottom
    (60, None, 300.0, 300.0),  # no overflow for absurd attempt numbers
    (0, None, 1.0, 5.0),
    (3, 2.0, 2.0, 2.0),        # Retry-After replaces the computed wait
    (1, 1000.0, 300.0, 300.0), # ... capped the same way
    (1, -5.0, 0.0, 0.0),
])
def test_next_delay(monkeypatch: pytest.MonkeyPatch, attempt: int, retry_after: float | None,
                    low: float, high: float) -> None:
    monkeypatch.setattr(delivery, "BACKOFF_FIRST", (1.0, 5.0))
    monkeypatch.setattr(delivery, "BACKOFF_CAP", 300.0)
    assert next_delay(attempt, retry_after, FixedRng(0.0)) == pytest.approx(low)
    assert next_delay(attempt, retry_after, FixedRng(1.0)) == pytest.approx(high)
    spread = {next_delay(attempt, retry_after, random.Random(i)) for i in range(50)}
    assert all(low <= d <= high for d in spread)


def test_parse_retry_after() -> None:
    now = time.time()
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after(" 120 ", now) == 120.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after(None, now) is None


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "delivered"), (202, "delivered"), (204, "delivered"), (299, "delivered"),
    (408, "retry"), (429, "retry"), (500, "retry"), (503, "retry"), (599, "retry"),
    (400, "dead"), (401, "dead"), (404, "dead"), (410, "dead"), (422, "dead"), (301, "dead"),
])
def test_classify(status: int, outcome: str) -> None:
    assert classify(status) == outcome


# --------------------------------------------------------------------------- outcomes

def test_503_503_200_delivered_once_same_webhook_id(box, rx, make_sender) -> None:
    rx.script(503, 503, 200)
    (rid,) = add(box, "t", rx)
    _, results = make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "delivered", what="delivered")
    reqs = rx.requests
    assert len(reqs) == 3
    assert len({r.headers["webhook-id"] for r in reqs}) == 1
    row = box.get(rid)
    assert row["attempts"] == 3 and row["last_status"] == 200
    assert [h["status"] for h in row["history"]] == [503, 503, 200]
    assert [r[1] for r in results] == ["retry", "retry", "delivered"]
    assert box.counts() == {"pending": 0, "delivered": 1, "dead": 0}


def test_400_is_dead_after_one_attempt(box, rx, make_sender) -> None:
    rx.script(400)
    (rid,) = add(box, "t", rx)
    make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    row = box.get(rid)
    assert row["attempts"] == 1 and row["last_status"] == 400 and row["last_error"] == "HTTP 400"
    assert len(rx.requests) == 1


def test_410_marks_the_target_gone(box, rx, make_sender) -> None:
    rx.script(410)
    (rid,) = add(box, "t", rx)
    sender, _ = make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    assert sender.gone_targets() == {"t"}
    (rid2,) = add(box, "t", rx, start=1)
    sender.wake(["t"])
    wait_until(lambda: status_of(box, rid2) == "delivered", what="delivered")
    assert sender.gone_targets() == set()


def test_429_retry_after_is_honoured(box, rx, make_sender, monkeypatch) -> None:
    monkeypatch.setattr(delivery, "BACKOFF_CAP", 10.0)
    rx.script(Reply(429, {"Retry-After": "2"}), 200)
    (rid,) = add(box, "t", rx)
    make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "delivered", timeout=8, what="delivered")
    first, second = rx.requests
    assert second.at - first.at >= 2.0


def test_timeout_is_retried(box, rx, make_sender) -> None:
    rx.script(Reply(200, delay=1.5), 200)
    (rid,) = add(box, "t", rx)
    make_sender(target("t", rx, timeout=0.3))
    wait_until(lambda: status_of(box, rid) == "delivered", what="delivered")
    row = box.get(rid)
    assert row["attempts"] == 2
    assert row["history"][0]["error"] == "timeout" and row["history"][0]["status"] is None
    assert len({r.headers["webhook-id"] for r in rx.requests}) == 1


def test_refused_connections_then_everything_in_order(box, rx, make_sender) -> None:
    rx.stop()
    ids = add(box, "t", rx, 5)
    make_sender(target("t", rx))
    wait_until(lambda: box.get(ids[0])["attempts"] >= 3, what="three failed attempts")
    assert "refused" in box.get(ids[0])["last_error"].lower()
    assert all(box.get(i)["attempts"] == 0 for i in ids[1:])  # they wait behind the head
    rx.restart()
    wait_until(lambda: box.counts()["delivered"] == 5, what="all delivered")
    assert [r.headers["x-seq"] for r in rx.requests] == ["0", "1", "2", "3", "4"]


@pytest.mark.slow
def test_real_20_second_outage(box, rx, make_sender, monkeypatch) -> None:
    """The issue's case as stated: the receiver refuses connections for 20 s."""
    monkeypatch.setattr(delivery, "BACKOFF_FIRST", (0.2, 0.4))
    monkeypatch.setattr(delivery, "BACKOFF_CAP", 1.0)
    sender, _ = make_sender(target("t", rx))
    add(box, "t", rx, 3)
    sender.wake(["t"])
    rx.wait_for(3)
    rx.stop()
    outage_start = time.monotonic()
    for batch in range(4):  # events keep coming during the outage
        add(box, "t", rx, 5, start=3 + 5 * batch, max_attempts=100)
        sender.wake(["t"])
        time.sleep(5.0)  # the outage itself: real time passing, not a synchronisation
    assert box.counts()["pending"] == 20
    assert sender.heartbeat_age() < 2.0
    rx.restart()
    back = time.monotonic()
    assert back - outage_start >= 20.0
    wait_until(lambda: box.counts()["delivered"] == 23, what="all delivered")
    assert time.monotonic() - back < 2.5  # within one capped backoff (plus jitter)
    seqs = [int(r.headers["x-seq"]) for r in rx.requests]
    assert seqs == list(range(23))  # nothing lost, nothing duplicated, in order
    assert box.counts() == {"pending": 0, "delivered": 23, "dead": 0}


def test_black_holed_target_does_not_delay_another(box, rx, rx2, make_sender) -> None:
    rx.black_hole = True
    add(box, "slow", rx, 3)
    sender, _ = make_sender(target("slow", rx, timeout=3.0), target("fast", rx2))
    rx.wait_for(1)  # the slow target's request is now hanging
    for i in range(5):
        t0 = time.monotonic()
        (rid,) = add(box, "fast", rx2, start=i)
        sender.wake(["fast"])
        got = rx2.wait_for(i + 1, timeout=2)
        assert got[-1].at - t0 < 0.5
        assert status_of(box, rid) in ("pending", "delivered")
    assert box.get(1)["status"] == "pending"


def test_max_age_makes_it_dead(box, rx, make_sender) -> None:
    rx.default = Reply(503)
    (rid,) = add(box, "t", rx, max_age=0.6)
    make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    row = box.get(rid)
    assert "max_age" in row["last_error"]
    assert 1 <= row["attempts"] <= 12


def test_max_age_already_passed_is_dead_without_an_attempt(box, rx, make_sender) -> None:
    (rid,) = box.add([NewDelivery("t", "ev", rx.url, "POST", {}, b"{}", "application/json",
                                  5, 10.0)], now=time.time() - 60)
    make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    assert box.get(rid)["attempts"] == 0 and rx.requests == []


def test_max_attempts_makes_it_dead(box, rx, make_sender) -> None:
    rx.default = Reply(503)
    (rid,) = add(box, "t", rx, max_attempts=2)
    make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    row = box.get(rid)
    assert row["attempts"] == 2 and "max_attempts" in row["last_error"]
    assert len(rx.requests) == 2


def test_retry_of_a_dead_row_delivers_it_with_the_same_webhook_id(box, rx, make_sender) -> None:
    rx.script(400)
    (rid,) = add(box, "t", rx)
    sender, _ = make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    wait_until(lambda: sender._workers["t"].in_sync, what="in sync: it reads no more")
    assert box.retry(rid, time.time())  # an older row, pending behind the thread's back
    sender.wake(["t"])
    wait_until(lambda: status_of(box, rid) == "delivered", what="delivered")
    first, second = rx.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == box.get(rid)["webhook_id"]


# --------------------------------------------------------------------------- wire format

def test_headers_and_standard_signatures(box, rx, make_sender) -> None:
    signing = Signing("standard", (SECRET_NEW, SECRET_OLD))
    (rid,) = add(box, "t", rx)
    make_sender(target("t", rx, signing=signing))
    (req,) = rx.wait_for(1)
    h = req.headers
    assert req.method == "POST" and req.path == "/hook?seq=0"
    assert h["content-type"] == "application/json"
    assert h["user-agent"] == f"edgehook/{edgehook.__version__}"
    assert h["x-seq"] == "0"
    assert h["webhook-id"] == box.get(rid)["webhook_id"]
    assert abs(int(h["webhook-timestamp"]) - time.time()) < 5
    # Independent check: recompute each signature from the spec's recipe.
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + req.body
    keys = [base64.b64decode(SECRET_NEW[6:]), SECRET_OLD.encode()]
    expected = ["v1," + base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()).decode()
                for k in keys]
    assert h["webhook-signature"].split(" ") == expected
    assert verify_standard([SECRET_OLD], h["webhook-id"], h["webhook-timestamp"],
                           h["webhook-signature"], req.body, time.time())


def test_github_signature(box, rx, make_sender) -> None:
    add(box, "gh", rx)
    make_sender(target("gh", rx, signing=Signing("github", ("gh-secret",))))
    (req,) = rx.wait_for(1)
    expected = "sha256=" + hmac.new(b"gh-secret", req.body, hashlib.sha256).hexdigest()
    assert req.headers["x-hub-signature-256"] == expected
    assert "webhook-signature" not in req.headers


def test_signature_is_fresh_on_retry_and_secret_read_at_send_time(box, rx, make_sender) -> None:
    rx.script(503, 200)
    add(box, "t", rx)
    sender, _ = make_sender(target("t", rx, signing=Signing("standard", (SECRET_OLD,))))
    rx.wait_for(1)
    sender.reload({"t": target("t", rx, signing=Signing("standard", (SECRET_NEW,)))})
    first, second = rx.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert verify_standard([SECRET_NEW], second.headers["webhook-id"],
                           second.headers["webhook-timestamp"],
                           second.headers["webhook-signature"], second.body, time.time())


def test_keep_alive_connection_is_reused_and_remade(box, rx, make_sender) -> None:
    sender, results = make_sender(target("t", rx))
    add(box, "t", rx, 10)
    sender.wake()
    reqs = rx.wait_for(10)
    assert len({r.client_port for r in reqs}) == 1
    rx.stop()
    rx.restart()  # the server closed our idle keep-alive connection
    add(box, "t", rx, 1, start=10)
    sender.wake()
    rx.wait_for(11)
    wait_until(lambda: box.counts()["delivered"] == 11, what="delivered")
    assert [r[1] for r in results] == ["delivered"] * 11  # the reconnect cost no attempt


# --------------------------------------------------------------------------- lifecycle

def test_rows_pending_at_start_up_are_sent(tmp_path: Path, rx: Receiver) -> None:
    path = tmp_path / "o.db"
    first = Outbox(path)
    add(first, "t", rx, 3)
    first.claim("t", 3, time.time(), 3600)  # a previous daemon died holding the lease
    first.close()
    box = Outbox(path)
    sender = Sender(box, {"t": target("t", rx)})
    try:
        sender.start()
        wait_until(lambda: box.counts()["delivered"] == 3, what="delivered")
    finally:
        sender.stop(1)
        box.close()


def test_reload_adds_and_removes_targets(box, rx, rx2, make_sender) -> None:
    (orphan,) = add(box, "unknown", rx)
    sender, _ = make_sender(target("a", rx))
    wait_until(lambda: status_of(box, orphan) == "dead", what="orphan dead")
    assert box.get(orphan)["last_error"] == "target removed from config"
    assert box.get(orphan)["attempts"] == 0
    # A new target gets a thread.
    sender.reload({"a": target("a", rx), "b": target("b", rx2)})
    (rb,) = add(box, "b", rx2)
    sender.wake(["b"])
    wait_until(lambda: status_of(box, rb) == "delivered", what="b delivered")
    # A removed target's pending rows go dead.
    rx.default = Reply(503)
    ids = add(box, "a", rx, 3)
    sender.wake(["a"])
    rx.wait_for(1)
    sender.reload({"b": target("b", rx2)})
    wait_until(lambda: all(status_of(box, i) == "dead" for i in ids), what="a's rows dead")
    assert box.counts()["pending"] == 0
    wait_until(lambda: "a" not in sender._workers, what="a's thread gone")


def test_stop_leaves_the_rest_pending(box, rx, make_sender) -> None:
    rx.stop()
    ids = add(box, "t", rx, 4)
    sender, _ = make_sender(target("t", rx))
    wait_until(lambda: box.get(ids[0])["attempts"] >= 1, what="an attempt")
    sender.stop(grace=1)
    assert box.counts() == {"pending": 4, "delivered": 0, "dead": 0}
    # Nothing stays leased: a fresh sender can take them at once when due.
    rx.restart()
    again = Sender(box, {"t": target("t", rx)})
    again.start()
    try:
        wait_until(lambda: box.counts()["delivered"] == 4, what="delivered after restart")
    finally:
        again.stop(1)


class CountingOutbox:
    """Wraps an outbox and counts the calls the sender makes."""

    def __init__(self, inner: Outbox) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if callable(attr):
            def wrapped(*a: Any, **kw: Any) -> Any:
                self.calls.append(name)
                return attr(*a, **kw)
            return wrapped
        return attr


def test_idle_sender_touches_nothing_and_never_wakes(box, rx) -> None:
    counting = CountingOutbox(box)
    sender = Sender(counting, {"t": target("t", rx), "u": target("u", rx)})  # type: ignore[arg-type]
    sender.start()
    try:
        wait_until(lambda: counting.calls.count("next_due") >= 2, what="initial scan")
        workers = list(sender._workers.values())
        wait_until(lambda: all(w.sleeping for w in workers), what="both threads asleep")
        beats = [w.beat for w in workers]
        before = len(counting.calls)
        time.sleep(0.5)  # idle: no database access, and no timer wakes a thread
        assert len(counting.calls) == before
        assert [w.beat for w in workers] == beats
        assert all(w.sleeping for w in workers)
        assert sender.heartbeat_age() == 0.0  # asleep waiting for work counts as alive
        add(box, "t", rx)
        sender.wake(["t"])
        rx.wait_for(1)
    finally:
        sender.stop(1)


def offer(box: Outbox, sender: Sender, name: str, rx: Receiver, n: int = 1, *,
          start: int = 0) -> list[int]:
    """Store rows and hand them over as the daemon does (commit, then offer)."""
    rows = box.add_rows([NewDelivery(
        target=name, event_id=f"ev{i}", url=rx.url + f"/hook?seq={i}", method="POST",
        headers={"X-Seq": str(i)}, body=json.dumps({"seq": i}).encode(),
        content_type="application/json", max_attempts=12, max_age=900.0)
        for i in range(start, start + n)])
    sender.offer(rows)
    return [r.id for r in rows]


def seqs(rx: Receiver) -> list[int]:
    return [int(r.headers["x-seq"]) for r in rx.requests]


def test_offered_rows_are_sent_without_reading_them_back(box, rx) -> None:
    counting = CountingOutbox(box)
    sender = Sender(counting, {"t": target("t", rx)})  # type: ignore[arg-type]
    sender.start()
    try:
        wait_until(lambda: "next_due" in counting.calls, what="initial scan: queue empty")
        wait_until(lambda: sender._workers["t"].sleeping, what="asleep, in sync")
        counting.calls.clear()
        for i in range(5):
            offer(box, sender, "t", rx, start=i)
            rx.wait_for(i + 1)
        wait_until(lambda: box.counts()["delivered"] == 5, what="all marked delivered")
        assert seqs(rx) == [0, 1, 2, 3, 4]
        # one commit per delivery ("delivered"), no claim, no lease, no re-read
        assert set(counting.calls) == {"mark_delivered"}
        assert all(box.get(i)["attempts"] == 1 for i in range(1, 6))
    finally:
        sender.stop(1)


def test_a_failed_offered_row_falls_back_to_the_database_in_order(box, rx) -> None:
    rx.script(503, 200)
    sender = Sender(box, {"t": target("t", rx)})
    sender.start()
    try:
        wait_until(lambda: sender._workers["t"].in_sync, what="in sync")
        ids = offer(box, sender, "t", rx, 1)
        rx.wait_for(1)
        ids += offer(box, sender, "t", rx, 4, start=1)  # behind the row backing off
        wait_until(lambda: box.counts()["delivered"] == 5, what="all delivered")
        assert seqs(rx) == [0, 0, 1, 2, 3, 4]  # one retry, nothing overtakes it
        assert [box.get(i)["attempts"] for i in ids] == [2, 1, 1, 1, 1]
        wait_until(lambda: sender._workers["t"].in_sync, what="back in sync")
        offer(box, sender, "t", rx, 1, start=5)
        rx.wait_for(7)
        assert seqs(rx)[-1] == 5
    finally:
        sender.stop(1)


def test_a_thread_backing_off_keeps_no_rows_in_memory(box, rx, monkeypatch) -> None:
    monkeypatch.setattr(delivery, "BACKOFF_FIRST", (0.5, 0.5))
    rx.script(503)
    sender = Sender(box, {"t": target("t", rx)})
    sender.start()
    try:
        worker = sender._workers["t"]
        wait_until(lambda: worker.in_sync, what="in sync")
        offer(box, sender, "t", rx, 1)
        rx.wait_for(1)
        wait_until(lambda: not worker.in_sync, what="out of sync: backing off")
        for i in range(1, 30, 5):
            offer(box, sender, "t", rx, 5, start=i)
            assert len(worker.inbox) == 0  # in the database only
        wait_until(lambda: box.counts()["delivered"] == 31, what="all delivered")
        assert seqs(rx) == [0, *range(31)]
    finally:
        sender.stop(1)


def test_an_overfull_inbox_is_read_back_from_the_database(box, rx, monkeypatch) -> None:
    monkeypatch.setattr(delivery, "INBOX_MAX", 5)
    sender = Sender(box, {"t": target("t", rx)})
    sender.start()
    try:
        wait_until(lambda: sender._workers["t"].in_sync, what="in sync")
        rx.script(Reply(200, delay=0.3))  # the first send holds the thread
        offer(box, sender, "t", rx, 1)
        rx.wait_for(1)
        for i in range(1, 40, 3):
            offer(box, sender, "t", rx, 3, start=i)
        assert len(sender._workers["t"].inbox) <= 5
        wait_until(lambda: box.counts()["delivered"] == 40, what="all delivered")
        assert seqs(rx) == list(range(40))
    finally:
        sender.stop(1)


def new_rows(name: str, rx: Receiver, n: int, start: int) -> list[NewDelivery]:
    return [NewDelivery(
        target=name, event_id=f"ev{i}", url=rx.url + f"/hook?seq={i}", method="POST",
        headers={"X-Seq": str(i)}, body=json.dumps({"seq": i}).encode(),
        content_type="application/json", max_attempts=12, max_age=900.0)
        for i in range(start, start + n)]


class Pausing:
    """The sender's hand-over, with `inside` run right after the early offer (under
    the outbox's lock, before the INSERT)."""

    def __init__(self, inner: delivery.Handover, inside: Callable[[], None] | None) -> None:
        self.inner = inner
        self.inside = inside

    def offer(self, rows: Any) -> None:
        self.inner.offer(rows)
        if self.inside is not None:
            self.inside()

    def settle(self, rows: Any) -> None:
        self.inner.settle(rows)


def hand_over(box: Outbox, sender: Sender, name: str, rx: Receiver, n: int = 1, *,
              start: int = 0, inside: Callable[[], None] | None = None) -> list[int]:
    """Store rows as the daemon does: handed to the sender before they are stored."""
    rows = box.add_rows(new_rows(name, rx, n, start),
                        handover=Pausing(sender.handover(), inside))
    return [r.id for r in rows]


def running_in(thread: threading.Thread, function: str) -> bool:
    """True when `function` is on `thread`'s stack right now."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_unsendable_requests_are_final_and_quote_no_secret(box, rx, make_sender) -> None:
    bad_header, bad_url, bad_scheme = box.add([
        NewDelivery("t", "ev1", rx.url + "/h", "POST", {"Authorization": "Bearer tok\r\nX: y"},
                    b"{}", "application/json", 5, 60),
        NewDelivery("t", "ev2", rx.url + "/h?token=s3cr3t value", "POST", {}, b"{}",
                    "application/json", 5, 60),
        NewDelivery("t", "ev3", "ftp://127.0.0.1/x", "POST", {}, b"{}", "application/json",
                    5, 60),
    ])
    (good,) = add(box, "t", rx)
    make_sender(target("t", rx))
    wait_until(lambda: status_of(box, good) == "delivered", what="the good row delivered")
    for rid in (bad_header, bad_url, bad_scheme):
        row = box.get(rid)
        assert row["status"] == "dead" and row["attempts"] == 1
        assert "tok" not in row["last_error"] and "s3cr3t" not in row["last_error"]
    assert len(rx.requests) == 1


def test_a_bad_secret_is_retried_not_fatal(box, rx, make_sender) -> None:
    (rid,) = add(box, "t", rx)
    sender, _ = make_sender(target("t", rx, signing=Signing("standard", ("whsec_%%%",))))
    wait_until(lambda: box.get(rid)["attempts"] >= 2, what="two attempts")
    assert box.get(rid)["last_error"].startswith("signing failed")
    assert "%%%" not in box.get(rid)["last_error"]
    sender.reload({"t": target("t", rx, signing=Signing("standard", (SECRET_OLD,)))})
    wait_until(lambda: status_of(box, rid) == "delivered", what="delivered after the fix")


class FlakyOutbox(CountingOutbox):
    """An outbox whose first mark_delivered fails, as on a full disk."""

    def __init__(self, inner: Outbox) -> None:
        super().__init__(inner)
        self.failed = False

    def mark_delivered(self, ids_with_status: Any, now: float) -> None:
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        self.inner.mark_delivered(ids_with_status, now)


def test_a_failed_write_is_retried_without_resending(box, rx, monkeypatch) -> None:
    monkeypatch.setattr(delivery, "ERROR_PAUSE", 0.05)
    flaky = FlakyOutbox(box)
    add(box, "t", rx, 3)
    sender = Sender(flaky, {"t": target("t", rx)})  # type: ignore[arg-type]
    sender.start()
    try:
        wait_until(lambda: box.counts()["delivered"] == 3, what="delivered")
        assert flaky.failed
        assert [r.headers["x-seq"] for r in rx.requests] == ["0", "1", "2"]  # no resend
    finally:
        sender.stop(1)
