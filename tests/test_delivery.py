"""The sender, black-box: a real SQLite outbox, a real HTTP receiver on 127.0.0.1.

Rows are stored and then the sender is woken, as the daemon does after each commit.
The pure policy (retry.py) is tested by tables, and over time with tests/fakeclock.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

import edgehook
from edgehook import delivery, retry
from edgehook.config import Signing, WebhookConfig
from edgehook.delivery import Sender
from edgehook.outbox import NewDelivery, Outbox
from edgehook.retry import Plan, classify, expired, judge, next_delay, parse_retry_after, plan
from edgehook.signing import verify_standard
from edgehook.templates import Static, compile_template
from fakeclock import FakeTimers
from receiver import Receiver, Reply

SECRET_NEW = "whsec_" + base64.b64encode(b"new-secret-32-bytes-long-padding").decode()
SECRET_OLD = "an old plain secret"
PASSWORD = "pa55:w@rd-T0KEN"


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


SEQ_HEADER = {"X-Seq": compile_template("{{ event.data.seq }}")}  # a per-event header


def target(name: str, rx: Receiver | str, *, timeout: float = 2.0,
           signing: Signing | None = None, headers: dict[str, Any] | None = None,
           max_attempts: int = 12, max_age: float = 900.0) -> WebhookConfig:
    """A target whose URL is a per-event template (each row keeps the URL rendered for
    it) unless `rx` is a URL string (a constant), with the per-event X-Seq header."""
    url = compile_template("{{ base }}/hook?seq={{ seq }}") if isinstance(rx, Receiver) \
        else Static(rx)
    return WebhookConfig(name=name, url=url, timeout=timeout, signing=signing,
                         headers=SEQ_HEADER if headers is None else headers,
                         max_attempts=max_attempts, max_age=max_age)


def add(box: Outbox, name: str, rx: Receiver, n: int = 1, *, start: int = 0,
        max_attempts: int = 12, max_age: float = 900.0, url: str | None = None,
        headers: dict[str, str] | None = None, now: float | None = None) -> list[int]:
    """Store rows as the app renders them (URL and the per-event header filled in)."""
    return box.add([NewDelivery(
        target=name, event_id=f"ev{i}", url=url or rx.url + f"/hook?seq={i}", method="POST",
        headers={"X-Seq": str(i), **(headers or {})}, body=json.dumps({"seq": i}).encode(),
        content_type="application/json", max_attempts=max_attempts, max_age=max_age)
        for i in range(start, start + n)], now=now)


def status_of(box: Outbox, row_id: int) -> str:
    row = box.get(row_id)
    assert row is not None
    return row["status"]


def seqs(rx: Receiver) -> list[int]:
    return [int(r.headers["x-seq"]) for r in rx.requests]


def refused_url() -> str:
    """An http:// URL on loopback where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "BACKOFF_FIRST", (0.05, 0.1))
    monkeypatch.setattr(retry, "BACKOFF_CAP", 0.5)


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

    def make(*targets: WebhookConfig, start: bool = True, outbox: Any = None,
             ) -> tuple[Sender, Results]:
        results = Results()
        s = Sender(outbox or box, {t.name: t for t in targets}, on_result=results)
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
    monkeypatch.setattr(retry, "BACKOFF_FIRST", (1.0, 5.0))
    monkeypatch.setattr(retry, "BACKOFF_CAP", 300.0)
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
    (302, "dead"), (307, "dead"), (102, "dead"),
])
def test_classify(status: int, outcome: str) -> None:
    assert classify(status) == outcome


@dataclass
class StoredRow:
    """A row as the outbox stores it (the fields retry.plan reads)."""

    url: str = "https://old.example/hook"
    headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    created_at: float = 1000.0
    deadline: float = 1900.0  # created_at + the max_age it was stored with (900)


@dataclass
class StoredRowWithAge(StoredRow):
    max_age: float = 900.0


def cfg(url: str = "https://new.example/hook", headers: dict[str, str] | None = None,
        max_attempts: int = 12, max_age: float = 900.0) -> WebhookConfig:
    return WebhookConfig(name="t", url=compile_template(url), max_attempts=max_attempts,
                         max_age=max_age,
                         headers={k: compile_template(v) for k, v in (headers or {}).items()})


TOKEN_URL = "https://hooks.example/{{ event.data.room }}"


@pytest.mark.parametrize(("row", "config", "expected"), [
    # a constant URL: the config's as it is now (a fixed URL reaches queued rows)
    (StoredRow(), cfg(), Plan("https://new.example/hook", {}, 12, 1900.0)),
    # a per-event URL: the one rendered for the row's event
    (StoredRow(url="https://hooks.example/kitchen"), cfg(TOKEN_URL),
     Plan("https://hooks.example/kitchen", {}, 12, 1900.0)),
    # headers: constants now, templates as rendered, gone ones dropped, new templates
    # left out (no event to render them with); names matched case-insensitively
    (StoredRow(headers={"X-Key": "old", "x-room": "kitchen", "X-Gone": "g"}),
     cfg(headers={"X-Key": "new", "X-Room": "{{ event.data.room }}",
                  "X-New": "{{ event.id }}", "X-Added": "a"}),
     Plan("https://new.example/hook", {"X-Key": "new", "X-Room": "kitchen", "X-Added": "a"},
          12, 1900.0)),
    # retry policy: max_attempts now; a longer max_age reaches queued rows
    (StoredRow(), cfg(max_attempts=3, max_age=3600.0),
     Plan("https://new.example/hook", {}, 3, 4600.0)),
    # a shorter max_age: a row that cannot tell its window keeps its stored deadline
    (StoredRow(), cfg(max_age=60.0), Plan("https://new.example/hook", {}, 12, 1900.0)),
    # ... and one that can (its stored max_age) gets the current one from its start
    (StoredRowWithAge(), cfg(max_age=60.0), Plan("https://new.example/hook", {}, 12, 1060.0)),
    # re-armed by `edgehook outbox retry` at 5000: the new window is kept
    (StoredRow(deadline=5900.0), cfg(), Plan("https://new.example/hook", {}, 12, 5900.0)),
    (StoredRowWithAge(deadline=5900.0), cfg(max_age=60.0),
     Plan("https://new.example/hook", {}, 12, 5060.0)),
], ids=["constant-url", "template-url", "headers", "longer-policy", "shorter-max-age",
        "shorter-max-age-known", "re-armed", "re-armed-known"])
def test_plan_follows_the_current_config(row: StoredRow, config: WebhookConfig,
                                         expected: Plan) -> None:
    assert plan(row, config) == expected


@pytest.mark.parametrize(("attempts", "now", "why"), [
    (0, 1000.0, None),
    (2, 1899.0, None),
    (0, 1900.5, "max_age exceeded before the attempt"),
    (3, 1000.0, "max_attempts (3) reached"),  # lowered by a reload below what was tried
])
def test_expired(attempts: int, now: float, why: str | None) -> None:
    p = Plan("https://x.example/", {}, 3, 1900.0)
    assert expired(StoredRow(attempts=attempts), p, now) == why


@pytest.mark.parametrize(("status", "error", "final", "retry_after", "attempt", "expected"), [
    (200, None, False, None, 1, ("delivered", None, None)),
    (503, None, False, None, 1, ("retry", 0.0, "HTTP 503")),
    (None, "timeout", False, None, 2, ("retry", 0.0, "timeout")),
    (408, None, False, None, 1, ("retry", 0.0, "HTTP 408")),
    (429, None, False, "120", 1, ("retry", 120.0, "HTTP 429")),   # Retry-After honoured
    (503, None, False, "7", 1, ("retry", 7.0, "HTTP 503")),
    (500, None, False, "7", 1, ("retry", 0.0, "HTTP 500")),       # only on 429/503
    (429, None, False, "5000", 1, ("retry", 300.0, "HTTP 429")),  # capped
    (400, None, False, None, 1, ("dead", None, "HTTP 400")),
    (410, None, False, None, 1, ("dead", None, "HTTP 410")),
    (301, None, False, None, 1, ("dead", None, "HTTP 301")),
    (None, "invalid URL", True, None, 1, ("dead", None, "invalid URL")),
    (503, None, False, None, 3, ("dead", None, "max_attempts (3) reached: HTTP 503")),
])
def test_judge(monkeypatch, status, error, final, retry_after, attempt, expected) -> None:
    monkeypatch.setattr(retry, "BACKOFF_FIRST", (0.0, 0.0))  # the computed wait is 0
    monkeypatch.setattr(retry, "BACKOFF_CAP", 300.0)
    now = 1000.0
    v = judge(status, error, final, retry_after, attempt=attempt,
              p=Plan("https://x.example/", {}, 3, 1500.0), now=now, rng=FixedRng(0.5))
    wait = None if v.next_at is None else v.next_at - now
    assert (v.outcome, wait, v.error) == expected


def test_judge_a_retry_after_the_deadline_is_dead(monkeypatch) -> None:
    monkeypatch.setattr(retry, "BACKOFF_CAP", 300.0)
    p = Plan("https://x.example/", {}, 3, 1100.0)
    v = judge(503, None, False, "200", attempt=1, p=p, now=1000.0, rng=FixedRng(0.5))
    assert (v.outcome, v.next_at, v.error) == ("dead", None, "max_age exceeded: HTTP 503")
    v = judge(None, "timeout", False, None, attempt=1, p=p, now=1000.0, rng=FixedRng(0.5))
    assert v.outcome == "retry"  # 1-5 s is within the deadline


def simulate(clock: FakeTimers, row: StoredRow, config: Callable[[], WebhookConfig],
             status: int = 503) -> list[tuple[float, str]]:
    """Fail `row` until it is dead, as the sender would, on a fake clock: each
    attempt is planned under config() at that moment. Returns (time, verdict)."""
    seen: list[tuple[float, str]] = []
    rng = random.Random(7)
    while True:
        p = plan(row, config())
        why = expired(row, p, clock.wall())
        if why is not None:
            seen.append((clock.wall(), why))
            return seen
        v = judge(status, None, False, None, attempt=row.attempts + 1, p=p,
                  now=clock.wall(), rng=rng)
        row.attempts += 1
        seen.append((clock.wall(), v.error or v.outcome))
        if v.outcome != "retry":
            return seen
        assert v.next_at is not None
        clock.advance(v.next_at - clock.wall())


def test_max_attempts_counts_the_first_attempt_over_time(monkeypatch) -> None:
    monkeypatch.setattr(retry, "BACKOFF_FIRST", (1.0, 5.0))
    monkeypatch.setattr(retry, "BACKOFF_CAP", 300.0)
    clock = FakeTimers()
    row = StoredRow(created_at=clock.wall(), deadline=clock.wall() + 900)
    seen = simulate(clock, row, lambda: cfg(max_attempts=4, max_age=3600))
    assert row.attempts == 4
    assert seen[-1][1] == "max_attempts (4) reached: HTTP 503"
    gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:], strict=False)]
    assert 1 <= gaps[0] <= 5 and 2 <= gaps[1] <= 10 and 4 <= gaps[2] <= 20  # doubling


def test_max_age_ends_the_retries_over_time_and_a_reload_extends_it(monkeypatch) -> None:
    monkeypatch.setattr(retry, "BACKOFF_FIRST", (1.0, 5.0))
    monkeypatch.setattr(retry, "BACKOFF_CAP", 300.0)
    clock = FakeTimers()
    start = clock.wall()
    row = StoredRow(created_at=start, deadline=start + 900)
    seen = simulate(clock, row, lambda: cfg(max_attempts=100, max_age=900))
    assert seen[-1][1] == "max_age exceeded: HTTP 503"
    assert clock.wall() - start <= 900
    # the same failing row under a config reloaded to max_age 1h lives longer
    clock2 = FakeTimers()
    row2 = StoredRow(created_at=clock2.wall(), deadline=clock2.wall() + 900)
    config = cfg(max_attempts=100, max_age=900)

    def current() -> WebhookConfig:
        return config if clock2.now < 60 else cfg(max_attempts=100, max_age=3600)

    seen2 = simulate(clock2, row2, current)
    assert seen2[-1][1] == "max_age exceeded: HTTP 503"
    assert 900 < seen2[-1][0] - clock2.epoch <= 3600


# --------------------------------------------------------------------------- outcomes

def test_503_503_200_delivered_once_same_webhook_id(box, rx, make_sender) -> None:
    rx.script(503, 503, 200)
    (rid,) = add(box, "t", rx)
    sender, results = make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "delivered", what="delivered")
    reqs = rx.requests
    assert len(reqs) == 3
    assert len({r.headers["webhook-id"] for r in reqs}) == 1
    row = box.get(rid)
    assert row["attempts"] == 3 and row["last_status"] == 200
    assert [h["status"] for h in row["history"]] == [503, 503, 200]
    assert [r[1] for r in results] == ["retry", "retry", "delivered"]
    assert box.counts() == {"pending": 0, "delivered": 1, "dead": 0}
    assert not hasattr(sender, "handover") and not hasattr(sender, "offer")


def test_400_is_dead_after_one_attempt(box, rx, make_sender) -> None:
    rx.script(400)
    (rid,) = add(box, "t", rx)
    make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    row = box.get(rid)
    assert row["attempts"] == 1 and row["last_status"] == 400 and row["last_error"] == "HTTP 400"
    assert len(rx.requests) == 1


def test_a_redirect_is_final_and_not_followed(box, rx, rx2, make_sender) -> None:
    rx.script(Reply(307, {"Location": rx2.url + "/elsewhere"}))
    (rid,) = add(box, "t", rx)
    make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    assert box.get(rid)["last_error"] == "HTTP 307"
    assert len(rx.requests) == 1 and rx2.requests == []


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
    monkeypatch.setattr(retry, "BACKOFF_CAP", 10.0)
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
    assert seqs(rx) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_real_20_second_outage(box, rx, make_sender, monkeypatch) -> None:
    """The receiver refuses connections for 20 s while events keep coming."""
    monkeypatch.setattr(retry, "BACKOFF_FIRST", (0.2, 0.4))
    monkeypatch.setattr(retry, "BACKOFF_CAP", 1.0)
    sender, _ = make_sender(target("t", rx, max_attempts=100))
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
    assert seqs(rx) == list(range(23))  # nothing lost, nothing duplicated, in order
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
    make_sender(target("t", rx, max_age=0.6))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    row = box.get(rid)
    assert "max_age" in row["last_error"]
    assert 1 <= row["attempts"] <= 12


def test_max_age_already_passed_is_dead_without_an_attempt(box, rx, make_sender) -> None:
    (rid,) = add(box, "t", rx, max_age=10.0, now=time.time() - 60)
    make_sender(target("t", rx, max_age=10.0))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    assert box.get(rid)["attempts"] == 0 and rx.requests == []
    assert box.get(rid)["last_error"] == "max_age exceeded before the attempt"


def test_max_attempts_makes_it_dead(box, rx, make_sender) -> None:
    rx.default = Reply(503)
    (rid,) = add(box, "t", rx)
    make_sender(target("t", rx, max_attempts=2))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    row = box.get(rid)
    assert row["attempts"] == 2 and "max_attempts" in row["last_error"]
    assert len(rx.requests) == 2


def test_retry_of_a_dead_row_delivers_it_with_the_same_webhook_id(box, rx, make_sender) -> None:
    rx.script(400)
    (rid,) = add(box, "t", rx)
    sender, _ = make_sender(target("t", rx))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead")
    assert box.retry(rid, time.time())  # pending again behind the thread's back
    sender.wake(["t"])
    wait_until(lambda: status_of(box, rid) == "delivered", what="delivered")
    first, second = rx.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == box.get(rid)["webhook_id"]


def test_retry_of_an_old_dead_row_gets_a_new_window(box, rx, make_sender) -> None:
    """A delivery that died an hour ago, retried from the CLI: its max_age counts from
    the retry, not from when it was first stored."""
    (rid,) = add(box, "t", rx, max_age=60.0, now=time.time() - 3600)
    sender, _ = make_sender(target("t", rx, max_age=60.0))
    wait_until(lambda: status_of(box, rid) == "dead", what="dead: too old")
    assert rx.requests == []
    assert box.retry(rid, time.time())
    sender.wake(["t"])
    wait_until(lambda: status_of(box, rid) == "delivered", what="delivered after the retry")
    assert len(rx.requests) == 1


# --------------------------------------------------------------------------- the current config

def test_a_fixed_url_reaches_the_rows_already_queued(box, rx, make_sender) -> None:
    """The user had a wrong (constant) URL; rows pile up retrying; a reload with the
    right one sends them there, in order, each with its webhook-id."""
    wrong = refused_url()
    ids = add(box, "t", rx, 3, url=wrong)
    sender, _ = make_sender(target("t", wrong))
    wait_until(lambda: box.get(ids[0])["attempts"] >= 2, what="failing on the wrong URL")
    sender.reload({"t": target("t", rx.url + "/fixed")})
    wait_until(lambda: box.counts()["delivered"] == 3, what="delivered to the new URL")
    assert [r.path for r in rx.requests] == ["/fixed"] * 3
    assert seqs(rx) == [0, 1, 2]
    assert [r.headers["webhook-id"] for r in rx.requests] == \
        [box.get(i)["webhook_id"] for i in ids]


def test_a_per_event_url_keeps_the_url_rendered_for_the_row(box, rx, rx2, make_sender) -> None:
    ids = add(box, "t", rx, 2)
    rx.script(503)
    sender, _ = make_sender(target("t", rx))
    rx.wait_for(1)
    sender.reload({"t": target("t", rx2)})  # still a template: each row's own URL stands
    wait_until(lambda: box.counts()["delivered"] == 2, what="delivered")
    assert [r.path for r in rx.requests] == ["/hook?seq=0", "/hook?seq=0", "/hook?seq=1"]
    assert rx2.requests == [] and len(ids) == 2


def test_headers_follow_the_reload(box, rx, make_sender) -> None:
    """Constant headers are the config's now; a per-event one keeps the row's value;
    a header the config dropped is no longer sent."""
    rx.script(503)
    add(box, "t", rx, 1, headers={"X-Key": "old", "X-Dropped": "d"})
    old = {**SEQ_HEADER, "X-Key": Static("old"), "X-Dropped": Static("d")}
    sender, _ = make_sender(target("t", rx, headers=old))
    rx.wait_for(1)
    sender.reload({"t": target("t", rx, headers={**SEQ_HEADER, "X-Key": Static("new")})})
    first, second = rx.wait_for(2)
    assert (first.headers["x-key"], first.headers["x-dropped"]) == ("old", "d")
    assert second.headers["x-key"] == "new" and "x-dropped" not in second.headers
    assert first.headers["x-seq"] == second.headers["x-seq"] == "0"


def test_a_lower_max_attempts_applies_to_queued_rows(box, rx, make_sender, monkeypatch) -> None:
    monkeypatch.setattr(retry, "BACKOFF_FIRST", (0.3, 0.3))
    rx.default = Reply(503)
    (rid,) = add(box, "t", rx, max_attempts=12)
    sender, _ = make_sender(target("t", rx, max_attempts=12))
    wait_until(lambda: box.get(rid)["attempts"] >= 2, what="two attempts")
    sender.reload({"t": target("t", rx, max_attempts=2)})
    wait_until(lambda: status_of(box, rid) == "dead", what="dead under the new policy")
    assert box.get(rid)["last_error"].startswith("max_attempts (2) reached")


def test_a_longer_max_age_applies_to_queued_rows(box, rx, make_sender, monkeypatch) -> None:
    rx.default = Reply(503)
    (rid,) = add(box, "t", rx, max_age=1.0, max_attempts=100)
    sender, _ = make_sender(target("t", rx, max_age=30.0, max_attempts=100))
    time.sleep(1.5)  # past the age the row was stored with: real time passing
    assert status_of(box, rid) == "pending"
    rx.default = Reply(200)
    wait_until(lambda: status_of(box, rid) == "delivered", what="delivered")


def test_a_removed_target_is_dead_without_an_attempt(box, rx, make_sender) -> None:
    (orphan,) = add(box, "unknown", rx)
    make_sender(target("a", rx))
    wait_until(lambda: status_of(box, orphan) == "dead", what="orphan dead")
    assert box.get(orphan)["last_error"] == "target removed from config"
    assert box.get(orphan)["attempts"] == 0 and rx.requests == []


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


def test_url_credentials_are_basic_auth_and_never_stored(box, rx, make_sender) -> None:
    url = f"http://hooks:{PASSWORD.replace('@', '%40')}@127.0.0.1:{rx.port}/in"
    rx.script(503)
    (rid,) = add(box, "t", rx, url=url)
    sender, _ = make_sender(target("t", url))
    first, second = rx.wait_for(2)
    assert second.path == "/in"
    expected = "Basic " + base64.b64encode(f"hooks:{PASSWORD}".encode()).decode()
    assert first.headers["authorization"] == second.headers["authorization"] == expected
    wait_until(lambda: status_of(box, rid) == "delivered", what="delivered")
    # refused now: the error text names the cause, never the credentials
    rx.stop()
    (rid2,) = add(box, "t", rx, url=url, start=1)
    sender.wake(["t"])
    wait_until(lambda: box.get(rid2)["attempts"] >= 1, what="a failed attempt")
    error = box.get(rid2)["last_error"]
    assert "refused" in error.lower() and PASSWORD not in error and "hooks:" not in error
    health = sender.target_health()["t"]
    assert health["last_error"] == error


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


def test_unsendable_requests_are_final_and_quote_no_secret(box, rx, make_sender) -> None:
    bad_header = {**SEQ_HEADER, "Authorization": compile_template("{{ event.data.tok }}")}
    ids = add(box, "t", rx, 1, headers={"Authorization": "Bearer tok\r\nX: y"})
    ids += add(box, "t", rx, 1, start=1, url=rx.url + "/h?token=s3cr3t value")
    ids += add(box, "t", rx, 1, start=2, url="ftp://127.0.0.1/x")
    (good,) = add(box, "t", rx, start=3)
    make_sender(target("t", rx, headers=bad_header))
    wait_until(lambda: status_of(box, good) == "delivered", what="the good row delivered")
    for rid in ids:
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


def test_rows_stored_while_sending_go_once_in_order(box, rx, make_sender) -> None:
    """Commits and wakes racing the thread's claims: every row once, in order."""
    add(box, "t", rx, 30)  # before start: only in the database
    sender, _ = make_sender(target("t", rx))
    for i in range(30, 300, 10):
        add(box, "t", rx, 10, start=i)
        sender.wake(["t"])
    wait_until(lambda: box.counts()["delivered"] == 300, what="all delivered")
    assert seqs(rx) == list(range(300))


def test_reload_adds_and_removes_targets(box, rx, rx2, make_sender) -> None:
    sender, _ = make_sender(target("a", rx))
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
    wait_until(lambda: "a" not in sender.target_health(), what="a's health gone")
    sender.wake(["a", "nobody"])  # unknown names are ignored


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


def test_idle_sender_touches_nothing_and_never_wakes(box, rx, make_sender) -> None:
    counting = CountingOutbox(box)
    sender, _ = make_sender(target("t", rx), target("u", rx), outbox=counting)
    wait_until(lambda: counting.calls.count("next_due") >= 2, what="initial scan")
    wait_until(lambda: sender.heartbeat_age() == 0.0, what="both threads asleep")
    before = len(counting.calls)
    time.sleep(0.5)  # idle: no database access, and no timer wakes a thread
    assert len(counting.calls) == before
    assert sender.heartbeat_age() == 0.0  # asleep waiting for work counts as alive
    add(box, "t", rx)
    sender.wake(["t"])
    rx.wait_for(1)


def test_target_health(box, rx, make_sender) -> None:
    rx.script(503, 200)
    sender, _ = make_sender(target("t", rx), target("idle", rx))
    assert sender.target_health()["t"] == {"last_success": None, "last_error": None,
                                           "last_error_at": None}
    before = time.time()
    add(box, "t", rx)
    sender.wake(["t"])
    wait_until(lambda: box.counts()["delivered"] == 1, what="delivered")
    health = sender.target_health()
    assert health["idle"] == {"last_success": None, "last_error": None, "last_error_at": None}
    t = health["t"]
    assert t["last_error"] == "HTTP 503"
    assert t["last_error_at"] is not None and t["last_success"] is not None
    assert t["last_error_at"] <= t["last_success"]  # RFC 3339 UTC strings sort as times
    assert t["last_success"].endswith("Z")
    assert time.strftime("%Y-%m-%dT%H:%M", time.gmtime(before)) <= t["last_success"]


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


def test_a_failed_write_is_retried_without_resending(box, rx, make_sender,
                                                     monkeypatch) -> None:
    monkeypatch.setattr(delivery, "ERROR_PAUSE", 0.05)
    flaky = FlakyOutbox(box)
    add(box, "t", rx, 3)
    make_sender(target("t", rx), outbox=flaky)
    wait_until(lambda: box.counts()["delivered"] == 3, what="delivered")
    assert flaky.failed
    assert seqs(rx) == [0, 1, 2]  # no resend


class FlakyRetryOutbox(CountingOutbox):
    """An outbox whose first mark_retry fails."""

    def __init__(self, inner: Outbox) -> None:
        super().__init__(inner)
        self.failed = False

    def mark_retry(self, *args: Any) -> None:
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("disk I/O error")
        self.inner.mark_retry(*args)


def test_a_failed_record_gives_the_row_back_at_once(box, rx, make_sender, monkeypatch) -> None:
    """Recording an attempt fails: the row is not left leased (minutes) but tried again
    after the error pause, still first in its queue."""
    monkeypatch.setattr(delivery, "ERROR_PAUSE", 0.05)
    flaky = FlakyRetryOutbox(box)
    rx.script(503)
    add(box, "t", rx, 2)
    make_sender(target("t", rx), outbox=flaky)
    wait_until(lambda: box.counts()["delivered"] == 2, timeout=5, what="delivered")
    assert flaky.failed and seqs(rx) == [0, 0, 1]
