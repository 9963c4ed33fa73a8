"""The SQLite outbox against real files: transactions, states, leases, limits, idleness."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgehook import outbox as ob
from edgehook import outbox_marks
from edgehook.errors import EdgehookError
from edgehook.outbox import NewDelivery, Outbox, OutboxFull, OutboxLocked, daemon_holds


def item(n: int = 0, target: str = "t", max_attempts: int = 5, max_age: float = 900.0
         ) -> NewDelivery:
    return NewDelivery(target=target, event_id=f"ev{n}", url="http://127.0.0.1:9/h",
                       method="POST", headers={"X-N": str(n)}, body=b'{"n": %d}' % n,
                       content_type="application/json", max_attempts=max_attempts,
                       max_age=max_age)


@pytest.fixture
def box(tmp_path: Path):
    o = Outbox(tmp_path / "state" / "outbox.db")
    yield o
    o.close()


def real_counts(o: Outbox) -> dict[str, int]:
    """The rows on disk per status, once the delivered marks waiting in memory are written."""
    o.flush_marks()
    with o.tx() as c:
        got = dict(c.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status"))
    return {s: got.get(s, 0) for s in ob.STATUSES}


def test_open_creates_dir_wal_full_sync_and_small_pages(box: Outbox) -> None:
    assert box.path.exists()
    with box.tx() as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync per commit
        assert c.execute("PRAGMA page_size").fetchone()[0] == ob.PAGE_SIZE
        assert c.execute("PRAGMA busy_timeout").fetchone()[0] == ob.BUSY_TIMEOUT_MS


def test_tx_rolls_back_on_error(box: Outbox) -> None:
    box.add([item(1)])
    with pytest.raises(RuntimeError), box.tx() as c:
        c.execute("UPDATE deliveries SET status = 'dead'")
        raise RuntimeError("boom")
    assert real_counts(box)["pending"] == 1
    # The connection is usable afterwards.
    assert box.list()[0]["status"] == "pending"


def test_add_many_is_one_atomic_transaction(box: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = box.add([item(i) for i in range(100)])
    assert ids == list(range(1, 101))
    assert box.counts()["pending"] == 100
    # A batch whose third row fails stores none of its rows.
    bad = dataclasses.replace(item(2), content_type=None)  # type: ignore[arg-type]
    with pytest.raises(ob.OutboxError, match="NOT NULL"):
        box.add([item(0), item(1), bad])
    assert box.counts() == real_counts(box) == {"pending": 100, "delivered": 0, "dead": 0}


def test_claim_leases_in_order_and_reclaims_after_expiry(box: Outbox) -> None:
    box.add([item(i) for i in range(5)])
    now = time.time()
    rows = box.claim("t", 3, now, lease=10)
    assert [r.event_id for r in rows] == ["ev0", "ev1", "ev2"]
    assert rows[0].headers == {"X-N": "0"} and rows[0].body == b'{"n": 0}'
    # The head is leased: nothing can overtake it, and next_due is the lease's end.
    assert box.claim("t", 3, now + 1, lease=10) == []
    assert box.next_due("t") == pytest.approx(now + 10)
    # After the lease (a sender that died) the same rows are claimable again.
    again = box.claim("t", 10, now + 11, lease=10)
    assert [r.event_id for r in again] == [f"ev{i}" for i in range(5)]
    box.release([r.id for r in again])
    assert len(box.claim("t", 10, now + 11, lease=10)) == 5
    assert box.claim("other", 10, now + 11) == []


def test_head_backing_off_holds_back_later_rows(box: Outbox) -> None:
    box.add([item(i) for i in range(3)])
    now = time.time()
    head = box.claim("t", 1, now)[0]
    box.mark_retry(head.id, now, now + 30, "HTTP 503", 503)
    assert box.claim("t", 10, now + 1) == []  # rows 2 and 3 are due but wait behind the head
    assert box.next_due("t") == pytest.approx(now + 30)
    rows = box.claim("t", 10, now + 31)
    assert [r.event_id for r in rows] == ["ev0", "ev1", "ev2"]
    assert rows[0].attempts == 1


def test_states_counts_and_history(box: Outbox) -> None:
    box.add([item(i) for i in range(4)])
    now = time.time()
    rows = box.claim("t", 4, now)
    box.mark_retry(rows[0].id, now, now, "timeout", None)
    box.mark_delivered([(rows[0].id, 200), (rows[1].id, 204)], now + 1)
    box.mark_dead(rows[2].id, now, "HTTP 400", 400)
    box.mark_dead(rows[3].id, now, "max_age exceeded", None, attempted=False)
    assert box.counts() == real_counts(box) == {"pending": 0, "delivered": 2, "dead": 2}
    first = box.get(rows[0].id)
    assert first is not None
    assert first["status"] == "delivered" and first["attempts"] == 2
    assert [(h["status"], h["error"]) for h in first["history"]] == [(None, "timeout"), (200, None)]
    assert first["next_attempt_at"] is None and first["delivered_at"].endswith("Z")
    dead = box.list("dead")
    assert [d["id"] for d in dead] == [rows[3].id, rows[2].id]  # newest first
    assert dead[0]["attempts"] == 0 and dead[0]["history"] == []
    assert dead[1]["last_status"] == 400 and dead[1]["attempts"] == 1
    for d in box.list():
        assert "url" not in d and "headers" not in d and "body" not in d
    # Marking a row that is no longer pending changes nothing (and no counter).
    box.mark_delivered([(rows[2].id, 200)], now)
    assert box.counts() == real_counts(box)
    with pytest.raises(ValueError):
        box.list("bogus")


def test_retry_keeps_webhook_id_and_resets(box: Outbox) -> None:
    (rid,) = box.add([item(1, max_age=60)])
    now = time.time()
    row = box.claim("t", 1, now)[0]
    box.mark_dead(rid, now, "HTTP 400", 400)
    assert box.retry(rid, now + 100) is True
    again = box.claim("t", 1, now + 100)[0]
    assert again.webhook_id == row.webhook_id
    assert again.attempts == 0 and again.deadline == pytest.approx(now + 160)
    assert box.counts() == real_counts(box) == {"pending": 1, "delivered": 0, "dead": 0}
    box.mark_delivered([(rid, 200)], now + 101)
    assert box.retry(rid, now) is False  # delivered stays delivered
    assert box.retry(9999, now) is False


def test_retry_all_dead_and_purge(box: Outbox) -> None:
    ids = box.add([item(i) for i in range(3)])
    now = time.time()
    box.claim("t", 3, now)
    for i in ids:
        box.mark_dead(i, now, "x", None)
    assert box.retry_all_dead(now) == 3
    assert box.counts()["pending"] == 3
    for i in ids[:2]:
        box.mark_dead(i, now, "x", None)
    assert box.purge("dead") == 2
    assert box.counts() == real_counts(box) == {"pending": 1, "delivered": 0, "dead": 0}
    with pytest.raises(ValueError):
        box.purge("pending")
    # Ids are never reused after a purge of the newest rows.
    assert box.add([item(9)]) == [4]


def test_an_id_is_never_given_twice_whatever_deleted_the_newest_rows(box: Outbox) -> None:
    """A user who noted "row 3 is dead" and runs `outbox retry 3` later must not reach
    another delivery: purge, drop, drop --target and prune may delete the newest row,
    and new rows still get ids above every id given, across a restart too."""
    now = time.time()
    given: list[int] = []

    def add(n: int = 1, target: str = "t", at: float = now) -> list[int]:
        ids = box.add([item(i, target=target) for i in range(n)], at)
        assert min(ids) > max(given, default=0), (ids, given)
        given.extend(ids)
        return ids

    (one,) = add()
    assert box.drop(one)
    ids = add(2)
    for i in ids:
        box.claim("t", 2, now)
        box.mark_dead(i, now, "HTTP 400", 400)
    assert box.purge("dead") == 2
    add(2, target="gone")
    assert box.drop_target("gone") == 2
    (old,) = add(at=now - 3 * ob.RETENTION)
    box.claim("t", 1, now)
    box.mark_delivered([(old, 200)], now - 2 * ob.RETENTION)
    box.flush_marks()
    assert box.prune(now) == 1
    box.close()
    reopened = Outbox(box.path)
    try:
        (fresh,) = reopened.add([item(0)])
        assert fresh == max(given) + 1
    finally:
        reopened.close()


def test_prune_deletes_only_old_delivered(box: Outbox) -> None:
    now = time.time()
    ids = box.add([item(0)], now - 3 * ob.RETENTION) + box.add([item(1), item(2)], now - 1)
    box.claim("t", 3, now)
    box.mark_delivered([(ids[0], 200)], now - 2 * ob.RETENTION)
    box.mark_delivered([(ids[1], 200)], now)
    box.mark_dead(ids[2], now - 2 * ob.RETENTION, "x", None)
    assert box.prune(now) == 1
    assert box.counts() == real_counts(box) == {"pending": 0, "delivered": 1, "dead": 1}


def test_prune_piggybacks_on_writes(box: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    ids = box.add([item(0)], now - 20) + box.add([item(1)], now)
    box.claim("t", 2, now)
    box.mark_delivered([(ids[0], 200)], now - 10)
    monkeypatch.setattr(ob, "RETENTION", 5.0)
    monkeypatch.setattr(ob, "PRUNE_EVERY", 0.0)
    box.mark_delivered([(ids[1], 200)], now)
    box.flush_marks()  # the commit that writes the marks also prunes the older row
    assert box.counts() == real_counts(box) == {"pending": 0, "delivered": 1, "dead": 0}


def test_row_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "MAX_ROWS", 3)
    o = Outbox(tmp_path / "o.db")
    try:
        o.add([item(0), item(1)])
        with pytest.raises(OutboxFull):
            o.add([item(2), item(3)])  # would cross the cap: none stored
        assert o.counts()["pending"] == 2
        o.add([item(2)])
        assert o.health() == (False, "outbox full (3 undelivered rows, cap 3)")
        now = time.time()
        rows = o.claim("t", 3, now)
        o.mark_delivered([(rows[0].id, 200)], now)  # draining frees room
        assert o.health() == (True, "ok")
        o.add([item(4)])
    finally:
        o.close()


def test_disk_headroom_refuses_and_recovers(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "STATVFS_CACHE", 0.0)
    o = Outbox(tmp_path / "o.db")
    try:
        o.add([item(0)])
        monkeypatch.setattr(ob, "MIN_FREE_BYTES", 1 << 62)  # "the disk is nearly full"
        with pytest.raises(OutboxFull, match="disk nearly full"):
            o.add([item(1)])
        ok, why = o.health()
        assert not ok and "disk nearly full" in why
        # Draining still works (it must, or the outbox could never empty).
        now = time.time()
        o.mark_delivered([(o.claim("t", 1, now)[0].id, 200)], now)
        monkeypatch.setattr(ob, "MIN_FREE_BYTES", 8 * 1024 * 1024)  # space came back
        assert o.health() == (True, "ok")
        assert o.add([item(1)]) == [2]
    finally:
        o.close()


def test_statvfs_is_cached(box: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = os.statvfs
    monkeypatch.setattr(ob.os, "statvfs", lambda p: calls.append(p) or real(p))
    for i in range(20):
        box.add([item(i)])
    assert len(calls) <= 1


def test_failed_write_is_reported_then_forgotten(box: Outbox) -> None:
    with pytest.raises(ob.OutboxError, match="no such table"), box.tx() as c:
        c.execute("INSERT INTO no_such_table VALUES (1)")
    ok, why = box.health()
    assert not ok and why.startswith("outbox write failed")
    box.add([item(1)])
    assert box.health() == (True, "ok")


def test_one_daemon_per_state_dir_and_leases_cleared_at_open(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    first = Outbox(path)
    first.add([item(i) for i in range(3)])
    first.claim("t", 3, time.time(), lease=3600)
    with pytest.raises(OutboxLocked, match="another edgehook daemon"):
        Outbox(path)
    assert isinstance(OutboxLocked("x"), EdgehookError)
    first.close()  # (as if it had crashed holding leases)
    second = Outbox(path)
    try:
        assert len(second.claim("t", 10, time.time())) == 3
        assert second.counts()["pending"] == 3
    finally:
        second.close()
    with pytest.raises(EdgehookError):
        second.next_due("t")


def _stat(path: Path) -> list[tuple[str, int, int]]:
    out = []
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            st = p.stat()
            out.append((suffix, st.st_mtime_ns, st.st_size))
    return out


def test_no_write_when_idle(tmp_path: Path) -> None:
    o = Outbox(tmp_path / "o.db")
    try:
        ids = o.add([item(i) for i in range(3)])
        now = time.time()
        o.claim("t", 1, now)
        o.mark_retry(ids[0], now, now + 3600, "HTTP 503", 503)  # backing off for an hour
        before = _stat(o.path)
        time.sleep(0.05)  # let a write, if any, show up as a different mtime
        for _ in range(200):
            assert o.claim("t", 50, time.time()) == []
            assert o.claim("nobody", 50, time.time()) == []
            o.next_due("t")
            o.counts()
            o.list()
            o.targets_with_pending()
            o.health()
        assert _stat(o.path) == before
    finally:
        o.close()


def test_rows_survive_reopen(tmp_path: Path) -> None:
    o = Outbox(tmp_path / "o.db")
    o.add([item(i) for i in range(3)])
    o.close()
    o = Outbox(tmp_path / "o.db")
    try:
        assert o.counts()["pending"] == 3
        assert o.targets_with_pending() == {"t"}
    finally:
        o.close()


def test_daemon_holds_tells_whether_a_daemon_has_the_state_dir(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    assert not daemon_holds(path)  # no directory, no lock file
    box = Outbox(path)
    try:
        assert daemon_holds(path)
        assert daemon_holds(path)  # probing twice does not take the lock away
        with pytest.raises(OutboxLocked):
            Outbox(path)
    finally:
        box.close()
    assert not daemon_holds(path)
    Outbox(path).close()  # and the probe left nothing locked behind


# ---------------------------------------------------------------------- schema and plans

V1_TABLE = """CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, webhook_id TEXT NOT NULL UNIQUE,
    event_id TEXT NOT NULL, target TEXT NOT NULL, url TEXT NOT NULL, method TEXT NOT NULL,
    headers TEXT NOT NULL, body BLOB NOT NULL, content_type TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
    max_age REAL NOT NULL, created_at REAL NOT NULL, next_attempt_at REAL NOT NULL,
    deadline REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0, last_error TEXT,
    last_status INTEGER, delivered_at REAL, history TEXT NOT NULL DEFAULT '[]');
CREATE INDEX deliveries_pending ON deliveries(target, id) WHERE status = 'pending';
CREATE INDEX deliveries_status ON deliveries(status, id);"""


def make_v1(path: Path) -> None:
    """A file as version 1 of the schema left it: AUTOINCREMENT, a UNIQUE webhook-id,
    an index over every row's status, 4 KiB pages, WAL; 2 pending, 2 delivered, 1 dead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript("PRAGMA page_size = 4096; PRAGMA journal_mode = WAL;" + V1_TABLE)
    now = time.time()
    for i, status in enumerate(["delivered", "delivered", "dead", "pending", "pending"]):
        db.execute("INSERT INTO deliveries (webhook_id, event_id, target, url, method, headers,"
                   " body, content_type, status, max_attempts, max_age, created_at,"
                   " next_attempt_at, deadline, delivered_at) VALUES"
                   " (?, 'e', 't', 'http://127.0.0.1:9/', 'POST', '{}', x'7b7d',"
                   " 'application/json', ?, 3, 60, ?, ?, ?, ?)",
                   (f"msg_{i}", status, now, now, now + 60,
                    now if status == "delivered" else None))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


def indexes(path: Path) -> dict[str, str | None]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
    finally:
        db.close()


@pytest.mark.parametrize("exclusive", [True, False])
def test_a_version_1_file_is_migrated_on_open(tmp_path: Path, exclusive: bool) -> None:
    path = tmp_path / "state" / "outbox.db"
    make_v1(path)
    assert "deliveries_status" in indexes(path)
    box = Outbox(path, exclusive=exclusive)  # the daemon, or the CLI beside it
    if exclusive:  # the daemon also rewrites it with small pages
        with box.tx() as c:
            assert c.execute("PRAGMA page_size").fetchone()[0] == ob.PAGE_SIZE
    try:
        with box.tx() as c:
            assert c.execute("PRAGMA user_version").fetchone()[0] == ob.SCHEMA_VERSION == 5
        # only the dead rows' partial index: no status, pending or webhook-id index
        assert set(indexes(path)) == {"deliveries_dead"}
        assert box.counts() == {"pending": 2, "delivered": 2, "dead": 1}
        assert [r["status"] for r in box.list("dead")] == ["dead"]
        assert [r["status"] for r in box.list("pending")] == ["pending", "pending"]
        assert len(box.claim("t", 10, time.time())) == 2
        assert box.add([item(9)]) == [6]  # ids go on after the old ones
    finally:
        box.close()
    Outbox(path).close()  # a second open finds it current and changes nothing


def test_a_delivered_row_keeps_its_record_and_gives_up_its_payload(box: Outbox) -> None:
    """Nothing reads a delivered row's URL, headers or body again; dropping them keeps
    the page that takes the next row from splitting (SD-card writes)."""
    ids = box.add([item(i) for i in range(3)])
    now = time.time()
    box.mark_delivered([(ids[0], 204)], now)
    box.flush_marks()
    with box.tx() as c:
        rows = c.execute("SELECT id, url, headers, length(body), content_type, history"
                         " FROM deliveries ORDER BY id").fetchall()
    assert rows[0][1:] == ("", "{}", 0, "", "[]")  # the delivering attempt is not stored
    assert rows[1][1] != "" and rows[1][3] > 0       # a pending row keeps everything
    listed = box.get(ids[0])
    assert listed is not None and listed["history"] == [
        {"at": listed["delivered_at"], "status": 204, "error": None}]
    assert listed["webhook_id"].startswith("msg_") and listed["event_id"] == "ev0"
    assert not box.retry(ids[0], now)  # and a delivered row cannot be sent again


def on_disk(path: Path) -> dict[int, str]:
    """Row statuses as another connection reads them: what has been committed."""
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT id, status FROM deliveries"))
    finally:
        db.close()


def test_a_delivered_mark_waits_for_a_commit_then_is_written_by_itself(
        box: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_marks, "MARK_LAG", 0.3)
    for round_ in range(2):  # and the second time by the same thread
        (row_id,) = box.add([item(round_)])
        box.mark_delivered([(row_id, 204)], time.time())
        assert on_disk(box.path)[row_id] == "pending"  # waiting to share a commit
        assert box.counts()["delivered"] == round_ + 1  # counted at once
        deadline = time.monotonic() + 10
        while on_disk(box.path)[row_id] != "delivered":
            assert time.monotonic() < deadline, "the mark was never written"
            time.sleep(0.02)
    assert [t.name for t in threading.enumerate()].count("edgehook-marks") == 1


def test_marks_that_cannot_be_written_are_retried_and_said_once(
        box: Outbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds the write lock (as a full disk would refuse the write):
    the marks' thread keeps trying, later and later, says so once, and says when the
    marks are on disk again."""
    monkeypatch.setattr(outbox_marks, "MARK_LAG", 0.02)
    caplog.set_level(logging.INFO, logger="edgehook.outbox")
    box._db.execute("PRAGMA busy_timeout = 10")
    (row_id,) = box.add([item(0)])
    assert [r.id for r in box.claim("t", 1, time.time() + 60)] == [row_id]  # as a sender does
    other = sqlite3.connect(box.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # nobody else may write now
        box.mark_delivered([(row_id, 204)], time.time())
        deadline = time.monotonic() + 10
        while box._marks_failing < 3:
            assert time.monotonic() < deadline, "the marks were not tried again"
            time.sleep(0.01)
        said = [r for r in caplog.records if "could not write delivered marks" in r.message]
        assert len(said) == 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    deadline = time.monotonic() + 10
    while on_disk(box.path)[row_id] != "delivered":
        assert time.monotonic() < deadline, "the marks were never written"
        time.sleep(0.02)
    assert "delivered marks written again" in caplog.text


def test_a_waiting_mark_shares_the_next_commit(box: Outbox,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_marks, "MARK_LAG", 60.0)
    (first,) = box.add([item(0)])
    box.mark_delivered([(first, 204)], time.time())
    (second,) = box.add([item(1)])
    assert on_disk(box.path) == {first: "delivered", second: "pending"}


def test_marks_of_a_burst_are_written_once_mark_max_wait(
        box: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_marks, "MARK_LAG", 60.0)
    ids = box.add([item(i) for i in range(ob.MARK_MAX)])
    box.mark_delivered([(i, 204) for i in ids[:-1]], time.time())
    assert set(on_disk(box.path).values()) == {"pending"}
    box.mark_delivered([(ids[-1], 204)], time.time())
    assert set(on_disk(box.path).values()) == {"delivered"}


def test_a_version_3_file_slims_its_delivered_rows_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    box = Outbox(path)
    ids = box.add([item(i) for i in range(2)])
    box.close()
    db = sqlite3.connect(path)  # as version 3 left a delivered row: payload and attempt kept
    db.execute("UPDATE deliveries SET status = 'delivered', attempts = 2, last_status = 200,"
               " delivered_at = created_at, history = '[{\"at\":\"x\",\"status\":503,"
               "\"error\":\"HTTP 503\"},{\"at\":\"y\",\"status\":200,\"error\":null}]'"
               " WHERE id = ?", (ids[0],))
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    for _ in range(2):  # the second open finds it current: the history is not cut again
        box = Outbox(path)
        try:
            row = box.get(ids[0])
            assert row is not None
            assert [h["status"] for h in row["history"]] == [503, 200]
            with box.tx() as c:
                assert c.execute("SELECT length(body), url FROM deliveries WHERE id = ?",
                                 (ids[0],)).fetchone() == (0, "")
                assert c.execute("SELECT length(body) FROM deliveries WHERE id = ?",
                                 (ids[1],)).fetchone()[0] > 0
        finally:
            box.close()


def test_every_index_but_the_webhook_id_one_is_partial(box: Outbox) -> None:
    """A new row writes the table and as few index pages as possible: none (the one
    index there is takes only dead rows)."""
    full = [name for name, sql in indexes(box.path).items()
            if sql is not None and " WHERE " not in sql.upper()]
    assert full == []


def test_pending_rows_are_found_wherever_their_ids_fall(box: Outbox) -> None:
    """Pending rows have no index: queries start at each target's first pending id,
    kept in memory. A row made pending below it (a dead row retried, another process's
    write) must still be found."""
    now = time.time()
    soon = now + 60  # rows added later in the test are due by then
    a = box.add([item(i, target="a") for i in range(3)])
    b = box.add([item(i, target="b") for i in range(2)])
    box.mark_delivered([(i, 200) for i in a + b], now)
    assert box.claim("a", 10, soon) == [] and box.next_due("b") is None
    box.purge("delivered")
    (reused,) = box.add([item(7, target="a")])
    assert reused == b[-1] + 1  # the purged ids do not come back
    assert [r.id for r in box.claim("a", 10, soon)] == [reused]
    box.mark_dead(reused, now, "HTTP 400", 400)
    later = box.add([item(8, target="a")])
    assert [r.id for r in box.claim("a", 10, soon)] == later
    assert box.retry(reused, now)  # below the head the claim just moved to
    box.release(later)
    assert [r.id for r in box.claim("a", 10, soon)] == [reused] + later
    assert box.pending_by_target() == {"a": 2}
    assert [r["id"] for r in box.list("pending")] == later + [reused]
    with box.tx() as c:  # another process (the CLI beside a stopped API) adds a row
        c.execute("UPDATE deliveries SET status = 'pending' WHERE id = ?", (reused,))
        c.execute("INSERT INTO deliveries (id, webhook_id, event_id, target, url, method,"
                  " headers, body, content_type, max_attempts, max_age, created_at,"
                  " next_attempt_at, deadline) VALUES (0, 'msg_x', 'e', 'b', 'http://x/',"
                  " 'POST', '{}', x'', 'text/plain', 3, 60, 0, 0, 1e12)")
    box.recount()
    assert [r.id for r in box.claim("b", 10, soon)] == [0]


def test_a_retry_made_in_the_file_beside_the_daemon_is_claimed_after_recount(
        box: Outbox) -> None:
    """`edgehook outbox retry` writes the file itself when the daemon's API is away;
    the daemon's reload recounts (its first pending ids included) before any claim."""
    now = time.time()
    soon = now + 60
    (old,) = box.add([item(0)])
    box.mark_dead(old, now, "HTTP 500", 500)
    later = box.add([item(1)])
    assert [r.id for r in box.claim("t", 10, soon)] == later
    box.mark_delivered([(later[0], 204)], now)
    beside = Outbox(box.path, exclusive=False)  # the CLI
    try:
        assert beside.retry(old, now)
    finally:
        beside.close()
    box.recount()
    assert [r.id for r in box.claim("t", 10, soon)] == [old]
    assert box.counts() == {"pending": 1, "delivered": 1, "dead": 0}


def test_queries_that_grow_with_the_table_use_an_index(box: Outbox) -> None:
    """Delivered rows pile up for 24 h (thousands a day): pruning and listing a status
    must not scan the whole table. (Only :meth:`Outbox.recount`, at open and after
    another process wrote to the file, walks all of it.)"""
    now = time.time()
    ids = box.add([item(i) for i in range(20)], now - 2 * ob.RETENTION)
    box.mark_delivered([(i, 200) for i in ids[:15]], now - 2 * ob.RETENTION)
    box.mark_dead(ids[15], now, "HTTP 400", 400)
    sqls: list[str] = []
    box._db.set_trace_callback(sqls.append)
    try:
        box.prune(now)
        box.list("dead")
        box.list("pending")  # (list("delivered") walks the rowid: nearly every row is one)
        box.retry_all_dead(now)
        box.purge("dead")
        box.claim("t", 10, now)
        box.next_due("t")
        box.targets_with_pending()
    finally:
        box._db.set_trace_callback(None)
    statements = [s for s in sqls if s.split()[0].upper() in ("SELECT", "UPDATE", "DELETE")
                  and "status" in s and "last_insert_rowid" not in s]
    assert len(statements) >= 8
    with box.tx() as c:
        for sql in statements:
            plan = " | ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql))
            # one of our indexes (all partial: scanning one reads only its rows)
            assert re.search(r"USING ((COVERING )?INDEX deliveries_|INTEGER PRIMARY KEY)",
                             plan), (sql, plan)


@pytest.mark.parametrize("gap", [0.0, 0.001])
def test_wal_stays_small_under_a_steady_stream(tmp_path: Path, gap: float) -> None:
    """SQLite starts the WAL over only at a write that finds all of it checkpointed:
    under a steady stream of writes the WAL must still stay a few MB."""
    o = Outbox(tmp_path / "state" / "outbox.db")
    wal = tmp_path / "state" / "outbox.db-wal"
    largest = 0
    try:
        for i in range(1500):
            (row,) = o.add_rows([item(i)])
            o.mark_delivered([(row.id, 200)], time.time())
            largest = max(largest, wal.stat().st_size)
            if gap:
                time.sleep(gap)
        assert largest < 16 * 1024 * 1024, f"WAL reached {largest / 1e6:.1f} MB"
        assert real_counts(o)["delivered"] == 1500
    finally:
        o.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "scrambled"])
def test_a_corrupt_file_is_moved_aside_and_a_fresh_outbox_starts(
        tmp_path: Path, damage: str) -> None:
    path = tmp_path / "state" / "outbox.db"
    o = Outbox(path)
    o.add([item(i) for i in range(200)])
    o.close()
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:  # the b-tree header of every page but the first scrambled (what quick_check
        # sees; damage inside a row's payload alone is not detectable at open)
        page = ob.PAGE_SIZE
        raw = bytearray(data)
        for at in range(page, len(raw), page):
            raw[at: at + 8] = b"\xff" * 8
        path.write_bytes(bytes(raw))
    fresh = Outbox(path)
    try:
        aside = list(path.parent.glob("outbox.db.corrupt-*"))
        assert len(aside) == 1 and aside[0].stat().st_size > 0  # kept for a human
        assert fresh.counts() == {"pending": 0, "delivered": 0, "dead": 0}
        assert fresh.corrupt_moved == 1
        assert fresh.add([item(0)]) == [1]  # the doorbell keeps working
    finally:
        fresh.close()
    again = Outbox(path)  # the file stays aside and is still counted (healthz: degraded)
    try:
        assert again.corrupt_moved == 1 and again.counts()["pending"] == 1
    finally:
        again.close()


def test_a_requeued_dead_row_no_longer_shows_its_old_error(box: Outbox) -> None:
    (row_id,) = box.add([item(0)])
    box.mark_dead(row_id, time.time(), "max_attempts (3) reached", 503)
    assert box.get(row_id)["last_error"] == "max_attempts (3) reached"
    assert box.retry(row_id, time.time())
    row = box.get(row_id)
    assert row is not None and row["status"] == "pending" and row["last_error"] is None
    assert row["history"] and row["history"][-1]["status"] == 503  # the attempt is kept


def test_a_row_delivered_a_moment_before_its_target_is_removed_stays_delivered(
        box: Outbox) -> None:
    """Its mark still waits in memory (the file says pending) when the reload that
    removed the target gives up on the target's rows: it must not go dead too."""
    now = time.time()
    done, waiting = box.add([item(0), item(1)])
    box.mark_delivered([(done, 204)], now)
    assert box.mark_target_dead("t", now, "target removed") == 1
    assert box.counts() == real_counts(box) == {"pending": 0, "delivered": 1, "dead": 1}
    assert box.get(done)["status"] == "delivered" and box.get(waiting)["status"] == "dead"


# ------------------------------------------------------------ first pending ids, at random

OPS = st.lists(st.tuples(st.sampled_from(["add", "claim", "deliver", "fail", "dead", "retry",
                                          "retry_all", "drop", "drop_target", "purge",
                                          "recount", "flush"]),
                         st.sampled_from(["a", "b"]), st.integers(0, 40)),
               max_size=25)


def pending_in_file(box: Outbox) -> dict[str, list[int]]:
    with box.tx() as c:
        return {t: [r[0] for r in c.execute(
            "SELECT id FROM deliveries WHERE status = 'pending' AND target = ? ORDER BY id",
            (t,))] for t in ("a", "b")}


@pytest.mark.parametrize("marks_wait", [False, True])
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_pending_rows_are_never_lost_from_view_whatever_the_operations(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        marks_wait: bool, ops: list[tuple[str, str, int]]) -> None:
    """Whatever users and senders do to rows, in any order, every pending row stays
    where the queries that walk from a target's first pending id find it: a claim far
    in the future gets exactly the pending rows that are neither delivered nor leased,
    in order, and the per-target counts match the file. With marks written at once,
    that is checked after every operation; with marks waiting, at the end."""
    monkeypatch.setattr(outbox_marks, "MARK_MAX", 64 if marks_wait else 1)
    box = Outbox(tmp_path_factory.mktemp("ops") / "outbox.db")
    far = time.time() + 10 * 365 * 86400.0
    try:
        for op, target, n in ops:
            now = time.time()
            with box.tx() as c:
                ids = [r[0] for r in c.execute("SELECT id FROM deliveries ORDER BY id")]
            row = ids[n % len(ids)] if ids else 0
            if op == "add":
                box.add([item(n, target=target) for _ in range(1 + n % 3)])
            elif op == "claim":
                box.claim(target, 1 + n % 4, far)
            elif op == "deliver":
                box.mark_delivered([(row, 200)], now)
            elif op == "fail":
                box.mark_retry(row, now, now, "timeout", None)
            elif op == "dead":
                box.mark_dead(row, now, "HTTP 400", 400)
            elif op == "retry":
                box.retry(row, now)
            elif op == "retry_all":
                box.retry_all_dead(now)
            elif op == "drop":
                box.drop(row)
            elif op == "drop_target":
                box.drop_target(target)
            elif op == "purge":
                box.purge("delivered" if n % 2 else "dead")
            elif op == "recount":
                box.recount()
            else:
                box.flush_marks()
            if not marks_wait:  # the file is the truth after every step
                for t, pending in pending_in_file(box).items():
                    box.release(pending)  # leases of earlier claims
                    assert [r.id for r in box.claim(t, 1000, far)] == pending, (op, t)
                    box.release(pending)
        box.flush_marks()
        truth = pending_in_file(box)
        assert box.pending_by_target() == {t: len(v) for t, v in truth.items() if v}
        assert box.counts() == real_counts(box)
        for t, pending in truth.items():
            box.release(pending)  # leases of earlier claims
            assert [r.id for r in box.claim(t, 1000, far)] == pending
    finally:
        box.close()
