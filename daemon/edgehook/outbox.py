"""The durable outbox: every outbound webhook is a SQLite row until a 2xx says otherwise.

A delivery moves ``pending -> delivered | dead``. It is marked delivered only after a
2xx (never on dequeue), and a row claimed by a sender that died is claimable again
once its lease runs out. Every access, reads included, goes through one
``with outbox.tx():`` (a lock, ``BEGIN IMMEDIATE``, commit, rollback on error).

Fsync policy: WAL with ``synchronous=NORMAL``. A commit is appended to the WAL
without an fsync; the WAL is fsynced when it is checkpointed into the database.
Measured on this machine (issue 3): 500 single-row commits take 0.14 s with NORMAL
(11 fdatasyncs) against 0.38 s with FULL (512), and after ``kill -9`` every
acknowledged commit was present in both modes. So a crash of edgehook, or a clean
reboot, loses nothing. What NORMAL gives up is the last commits before a *power
loss or kernel crash* (those since the last checkpoint); the database itself stays
consistent. A lost "delivered" mark only means a redelivery with the same
``webhook-id``; a lost new row is an event from the last moment before the power
went. We accept that for an SD card, where FULL's fsync per commit costs
milliseconds each and wears the card; set ``SYNCHRONOUS = "FULL"`` to trade it back.
Bursts are written with group commits anyway: :meth:`Outbox.add` writes a whole
batch in one transaction.

Checkpoints off the hot path: with ``synchronous=NORMAL`` the only fsyncs are those
of a WAL checkpoint, and SQLite's automatic checkpoint runs inside whichever commit
crosses 1,000 WAL pages, so about one delivery in a hundred waited for its fsyncs (the
p99 of the MQTT -> webhook latency, issue 6). The daemon's outbox turns the automatic
checkpoint off and kicks a checkpointer thread of its own connection every
``CHECKPOINT_EVERY`` write transactions (about 3 pages each, so about as often as
SQLite's own 1,000-page default: the power-loss window described above stays the
same); a PASSIVE checkpoint there never blocks a writer. Its fsyncs still slow the
filesystem for a moment, so fewer of them is also a shorter latency tail. The
thread sleeps until kicked, so an idle daemon still never wakes. SQLite starts the
WAL file over only at a write that finds all of it checkpointed; a write during
the checkpoint (the very delivery that kicked it, marked delivered a millisecond
later) leaves it short of that, and under a steady stream the WAL grew without
end (61 MB after 2,000 deliveries 4 ms apart). So the thread checkpoints again
until one run finds nothing new (the later ones copy only the few pages written
meanwhile). After ``CATCH_UP`` runs without that (a burst writing all the while) it
runs one more holding the outbox's lock, which blocks writers for that short run
(1-2 ms here, once per ``CHECKPOINT_EVERY`` writes of a burst): the WAL stays at a
few MB whatever the load.

Frugal on the SD card: when nothing happens nothing is written (reads never write;
claims that find nothing write nothing; pruning runs at open and then at most every
``PRUNE_EVERY`` seconds, and only as part of a write that happened anyway).

A full disk makes even DELETE fail, so the outbox refuses new rows (``OutboxFull``)
while ``MAX_ROWS`` undelivered rows exist or the free space under the state
directory drops below ``MIN_FREE_BYTES``, and :meth:`Outbox.health` says why; both
recover by themselves as rows drain or space returns.

One daemon per state directory: the outbox holds an exclusive ``flock`` on
``<dir>/edgehook.lock`` while open, which is what makes it safe to clear the leases
of a crashed predecessor at open.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from .errors import EdgehookError
from .events import compact_json, new_id, rfc3339

_LOG = logging.getLogger(__name__)

MAX_ROWS = 50_000            # pending + dead rows; beyond this add() refuses
MIN_FREE_BYTES = 8 * 1024 * 1024  # free space kept under the state dir
RETENTION = 24 * 3600.0      # delivered rows are kept this long, then pruned
LEASE = 300.0                # default claim lease (seconds)
PRUNE_EVERY = 600.0          # prune at most this often, and only alongside a write
STATVFS_CACHE = 1.0          # seconds a free-space reading is reused
BUSY_TIMEOUT_MS = 5000
HISTORY_MAX = 50             # attempts kept per row (the oldest are dropped)
WRITE_ERROR_HOLD = 60.0      # a failed write is reported this long once space is back
SYNCHRONOUS = "NORMAL"       # see the module docstring
CHECKPOINT_EVERY = 256       # write transactions between two background WAL checkpoints
CATCH_UP = 8                 # checkpoints in a row at most, until one finds nothing new
LOCK_NAME = "edgehook.lock"
STATUSES = ("pending", "delivered", "dead")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are never reused
    webhook_id      TEXT    NOT NULL UNIQUE,
    event_id        TEXT    NOT NULL,
    target          TEXT    NOT NULL,
    url             TEXT    NOT NULL,
    method          TEXT    NOT NULL,
    headers         TEXT    NOT NULL,
    body            BLOB    NOT NULL,
    content_type    TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL,
    max_age         REAL    NOT NULL,
    created_at      REAL    NOT NULL,
    next_attempt_at REAL    NOT NULL,
    deadline        REAL    NOT NULL,
    lease_until     REAL    NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_status     INTEGER,
    delivered_at    REAL,
    history         TEXT    NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries(target, id)
    WHERE status = 'pending';
-- Partial indexes only: a new row is pending, so storing it writes the table, the
-- webhook-id index and deliveries_pending, and none of these (issue 6).
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries(id) WHERE status = 'dead';
CREATE INDEX IF NOT EXISTS deliveries_delivered ON deliveries(delivered_at)
    WHERE status = 'delivered';
"""
SCHEMA_VERSION = 2
# Version 1 had one index over every row's status; each new row wrote a page of it
# too: dropping it took an add() from 79 to 68 us (p50) and 395 to 290 us (p99).
_MIGRATIONS = {2: "DROP INDEX IF EXISTS deliveries_status;"}
# Each status's rows have an index of their own; naming it lets SQLite read only it
# (counting, listing) rather than walk a table that holds a day of delivered rows.
_STATUS_INDEX = {"pending": "deliveries_pending", "dead": "deliveries_dead",
                 "delivered": "deliveries_delivered"}

_ROW_COLUMNS = ("id, webhook_id, event_id, target, url, method, headers, body, content_type, "
                "attempts, max_attempts, created_at, next_attempt_at, deadline")

# Append one attempt to the JSON history, dropping the oldest beyond HISTORY_MAX.
_HISTORY_APPEND = (
    "history = json_insert(CASE WHEN json_array_length(history) >= ?"
    " THEN json_remove(history, '$[0]') ELSE history END, '$[#]', json(?))"
)


class OutboxFull(EdgehookError):
    """A delivery was refused: the row cap is reached or the disk is nearly full."""


class OutboxLocked(EdgehookError):
    """Another edgehook process holds this state directory."""


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """One rendered webhook action, ready to be stored."""

    target: str
    event_id: str
    url: str
    method: str
    headers: dict[str, str]
    body: bytes
    content_type: str
    max_attempts: int
    max_age: float


@dataclass(frozen=True, slots=True)
class Row:
    """A claimed pending delivery, everything the sender needs to attempt it."""

    id: int
    webhook_id: str
    event_id: str
    target: str
    url: str
    method: str
    headers: dict[str, str]
    body: bytes
    content_type: str
    attempts: int
    max_attempts: int
    created_at: float
    next_attempt_at: float
    deadline: float


class Handover(Protocol):
    """Who gets new rows before they are stored (``delivery.Handover``; typed here:
    edges never import each other)."""

    def offer(self, rows: Sequence[Row]) -> None: ...
    def settle(self, rows: Sequence[Row] | None) -> None: ...


def _attempt(now: float, status: int | None, error: str | None) -> str:
    return json.dumps({"at": rfc3339(now), "status": status, "error": error})


def daemon_holds(path: str | Path) -> bool:
    """True when a daemon holds the state directory of the outbox at `path`."""
    try:
        fd = os.open(Path(path).parent / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops a lock this probe got
    return False


class Outbox:
    """The SQLite outbox of one state directory; thread-safe, one connection and a lock."""

    def __init__(self, path: str | Path, *, max_rows: int | None = None,
                 min_free_bytes: int | None = None, exclusive: bool = True) -> None:
        """Open (creating the directory and schema) and take the state-dir lock.

        :param max_rows: cap on pending + dead rows (default ``MAX_ROWS`` at call time).
        :param min_free_bytes: free space to keep (default ``MIN_FREE_BYTES``).
        :param exclusive: take the one-daemon lock, clear stale leases and prune; a
            read-mostly tool opening the file beside a running daemon passes False.
        """
        self.path = Path(path)
        self._max_rows = max_rows
        self._min_free_bytes = min_free_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None
        if exclusive:
            self._lock_fd = self._take_dir_lock()
        self._free_at = -1e18
        self._free = 0
        self._write_error: tuple[float, str] | None = None
        self._last_prune = -1e18
        self._changes_seen = 0
        self._closed = False
        created = not self.path.exists()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000,
                                       isolation_level=None, check_same_thread=False)
        except Exception:
            self._release_dir_lock()
            raise
        if created:
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)  # rendered URLs and headers can carry tokens
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
        db.execute("PRAGMA journal_size_limit = 4194304")  # keep the WAL file small
        self._checkpointer: _Checkpointer | None = None
        self._writes = 0
        if exclusive:
            db.execute("PRAGMA wal_autocheckpoint = 0")  # ours runs in the background
            self._checkpointer = _Checkpointer(self.path, self._lock)
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'deliveries'").fetchone() is None:
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION};"
                             " COMMIT;")
        else:
            self._migrate(db)
        self.recount()
        with self.tx() as c:
            if exclusive:
                # Leases of a predecessor that crashed: nobody else can hold them now.
                c.execute("UPDATE deliveries SET lease_until = 0"
                          " WHERE status = 'pending' AND lease_until > 0")
        if exclusive:
            self.prune(time.time())

    @property
    def max_rows(self) -> int:
        """The row cap: the constructor's, else ``MAX_ROWS`` as it is now."""
        return MAX_ROWS if self._max_rows is None else self._max_rows

    @property
    def min_free_bytes(self) -> int:
        """The disk headroom: the constructor's, else ``MIN_FREE_BYTES`` as it is now."""
        return MIN_FREE_BYTES if self._min_free_bytes is None else self._min_free_bytes

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring an older file's schema up to SCHEMA_VERSION, whoever opens it first (an
        older daemon still running works with the new schema: it only loses an index)."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        steps = "".join(_MIGRATIONS.get(v, "") for v in range(version + 1, SCHEMA_VERSION + 1))
        db.executescript(f"BEGIN IMMEDIATE; {steps} {_SCHEMA}"
                         f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        _LOG.info("outbox: schema version %d -> %d", version, SCHEMA_VERSION)

    def _take_dir_lock(self) -> int:
        lock_path = self.path.parent / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutboxLocked(
                    f"another edgehook daemon is using the state directory {self.path.parent} "
                    f"(it holds {lock_path})") from None
            raise
        return fd

    def _release_dir_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: lock, BEGIN IMMEDIATE, commit; rollback and re-raise on error.

        Nested use joins the outer transaction. A failed write is remembered for
        :meth:`health` and forgotten at the next successful commit.
        """
        with self._lock:
            if self._closed:
                raise EdgehookError("the outbox is closed")
            if self._depth:
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled back already
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                self._write_error = (time.monotonic(), f"{type(exc).__name__}: {exc}")
                raise
            finally:
                self._depth = 0
            if self._db.total_changes != self._changes_seen:  # a real write succeeded
                self._changes_seen = self._db.total_changes
                self._write_error = None
                if self._checkpointer is not None:
                    self._writes += 1
                    if self._writes >= CHECKPOINT_EVERY:
                        self._writes = 0
                        self._checkpointer.kick()

    def _free_bytes(self) -> int:
        now = time.monotonic()
        if now - self._free_at >= STATVFS_CACHE:
            st = os.statvfs(self.path.parent)
            self._free = st.f_bavail * st.f_frsize
            self._free_at = now
        return self._free

    def _apply(self, delta: dict[str, int]) -> None:
        for status, n in delta.items():
            self._counts[status] += n

    # ------------------------------------------------------------------ writing

    def add(self, items: Sequence[NewDelivery], now: float | None = None) -> list[int]:
        """Store deliveries, all in one transaction (a group commit); returns their ids."""
        return [row.id for row in self.add_rows(items, now)]

    def add_rows(self, items: Sequence[NewDelivery], now: float | None = None, *,
                 handover: Handover | None = None) -> list[Row]:
        """:meth:`add`, returning the stored rows as :meth:`claim` would (for the sender).

        With a `handover` (``Sender.handover()``), the rows go to it twice under this
        outbox's lock, which every read takes too: before the INSERT, without ids
        (id 0), and once the transaction settled, as stored (or None when it failed).
        Raises ``OutboxFull`` (storing none of them) when the row cap or the disk
        headroom would be crossed.
        """
        if not items:
            return []
        now = time.time() if now is None else now
        with self._lock:
            undelivered = self._counts["pending"] + self._counts["dead"]
            if undelivered + len(items) > self.max_rows:
                raise OutboxFull(f"outbox full: {undelivered} undelivered rows "
                                 f"(cap {self.max_rows})")
            free = self._free_bytes()
            if free < self.min_free_bytes:
                raise OutboxFull(f"disk nearly full: {free // 1024} KiB free under "
                                 f"{self.path.parent} (keeping {self.min_free_bytes // 1024} KiB)")
            new = [Row(0, "msg_" + new_id(now), d.event_id, d.target, d.url, d.method,
                       dict(d.headers), bytes(d.body), d.content_type, 0, int(d.max_attempts),
                       now, now, now + float(d.max_age)) for d in items]
            try:
                if handover is not None:  # first: the sender may start while we write
                    handover.offer(new)
                with self.tx() as c:
                    c.executemany(
                        "INSERT INTO deliveries (webhook_id, event_id, target, url, method,"
                        " headers, body, content_type, max_attempts, max_age, created_at,"
                        " next_attempt_at, deadline) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        [(r.webhook_id, r.event_id, r.target, r.url, r.method,
                          compact_json(r.headers), r.body,
                          r.content_type, r.max_attempts, float(d.max_age), now, now,
                          r.deadline) for r, d in zip(new, items, strict=True)])
                    # AUTOINCREMENT under the write lock: one batch gets consecutive ids.
                    first = c.execute("SELECT last_insert_rowid()").fetchone()[0] \
                        - len(items) + 1
            except BaseException:
                if handover is not None:
                    handover.settle(None)
                raise
            stored = [replace(r, id=first + i) for i, r in enumerate(new)]
            self._apply({"pending": len(items)})
            if handover is not None:
                handover.settle(stored)
        return stored

    def claim(self, target: str, limit: int, now: float, lease: float = LEASE) -> list[Row]:
        """Lease the due head of a target's queue, oldest first.

        Rows of one target are sent in order, so the claim stops at the first pending
        row that is not due yet (backing off) or still leased: a later row never
        overtakes an earlier one. Writes nothing when nothing is due.
        """
        with self.tx() as c:
            cur = c.execute(
                f"SELECT {_ROW_COLUMNS}, lease_until FROM deliveries"
                " WHERE status = 'pending' AND target = ? ORDER BY id LIMIT ?",
                (target, int(limit)))
            rows: list[Row] = []
            for r in cur.fetchall():
                if r[12] > now or r[14] > now:
                    break
                rows.append(Row(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7],
                                r[8], r[9], r[10], r[11], r[12], r[13]))
            if rows:
                c.executemany("UPDATE deliveries SET lease_until = ? WHERE id = ?",
                              [(now + lease, row.id) for row in rows])
        return rows

    def release(self, ids: Sequence[int]) -> None:
        """Give back leases of claimed rows that were not attempted (stop, head backing off)."""
        if not ids:
            return
        with self.tx() as c:
            c.executemany("UPDATE deliveries SET lease_until = 0 WHERE id = ? AND "
                          "status = 'pending'", [(i,) for i in ids])

    def next_due(self, target: str) -> float | None:
        """When the head of a target's queue is due (None: nothing pending).

        This is the head row's time, not the earliest of all rows: rows are sent in
        order, so a later row that is due cannot go before a head that is backing off.
        """
        with self.tx() as c:
            r = c.execute("SELECT next_attempt_at, lease_until FROM deliveries"
                          " WHERE status = 'pending' AND target = ? ORDER BY id LIMIT 1",
                          (target,)).fetchone()
        return None if r is None else max(r[0], r[1])

    def mark_delivered(self, ids_with_status: Sequence[tuple[int, int]], now: float) -> None:
        """Mark rows delivered after a 2xx, one commit for the batch."""
        if not ids_with_status:
            return
        entries = [(HISTORY_MAX, _attempt(now, status, None), status, now, row_id)
                   for row_id, status in ids_with_status]
        with self._lock:
            with self.tx() as c:
                cur = c.executemany(
                    f"UPDATE deliveries SET status = 'delivered', attempts = attempts + 1,"
                    f" {_HISTORY_APPEND}, last_status = ?, last_error = NULL, delivered_at = ?,"
                    f" lease_until = 0 WHERE id = ? AND status = 'pending'", entries)
                n = cur.rowcount
                pruned = self._maybe_prune(c, now)
            self._apply({"pending": -n, "delivered": n - pruned})

    def mark_retry(self, id: int, now: float, next_at: float, error: str,
                   status: int | None) -> None:
        """Record a failed attempt and when to try again."""
        with self.tx() as c:
            c.execute(
                f"UPDATE deliveries SET attempts = attempts + 1, {_HISTORY_APPEND},"
                f" next_attempt_at = ?, last_error = ?, last_status = ?, lease_until = 0"
                f" WHERE id = ? AND status = 'pending'",
                (HISTORY_MAX, _attempt(now, status, error), next_at, error, status, id))

    def mark_dead(self, id: int, now: float, error: str, status: int | None, *,
                  attempted: bool = True) -> None:
        """Give up on a row; it stays visible as dead.

        :param attempted: False when no request was made (max_age passed before the
            attempt, target removed): the attempt count and history stay as they are.
        """
        with self._lock:
            with self.tx() as c:
                if attempted:
                    cur = c.execute(
                        f"UPDATE deliveries SET status = 'dead', attempts = attempts + 1,"
                        f" {_HISTORY_APPEND}, last_error = ?, last_status = ?, lease_until = 0"
                        f" WHERE id = ? AND status = 'pending'",
                        (HISTORY_MAX, _attempt(now, status, error), error, status, id))
                else:
                    cur = c.execute(
                        "UPDATE deliveries SET status = 'dead', last_error = ?, lease_until = 0"
                        " WHERE id = ? AND status = 'pending'", (error, id))
                n = cur.rowcount
            self._apply({"pending": -n, "dead": n})

    def mark_target_dead(self, target: str, now: float, error: str) -> int:
        """Mark every pending row of a target dead without an attempt (target removed)."""
        with self._lock:
            with self.tx() as c:
                n = c.execute("UPDATE deliveries SET status = 'dead', last_error = ?,"
                              " lease_until = 0 WHERE status = 'pending' AND target = ?",
                              (error, target)).rowcount
            self._apply({"pending": -n, "dead": n})
        return n

    def retry(self, id: int, now: float) -> bool:
        """Make a dead row pending again, due now, with a fresh deadline and its webhook-id.

        A pending row is made due now (its attempts kept). False when there is no
        such row or it was already delivered.
        """
        with self._lock:
            with self.tx() as c:
                r = c.execute("SELECT status FROM deliveries WHERE id = ?", (id,)).fetchone()
                if r is None or r[0] == "delivered":
                    return False
                if r[0] == "pending":
                    c.execute("UPDATE deliveries SET next_attempt_at = ? WHERE id = ?", (now, id))
                    return True
                c.execute("UPDATE deliveries SET status = 'pending', attempts = 0,"
                          " next_attempt_at = ?, deadline = ? + max_age, lease_until = 0"
                          " WHERE id = ?", (now, now, id))
            self._apply({"dead": -1, "pending": 1})
        return True

    def retry_all_dead(self, now: float) -> int:
        """Make every dead row pending again (see :meth:`retry`); returns how many."""
        with self._lock:
            with self.tx() as c:
                n = c.execute("UPDATE deliveries SET status = 'pending', attempts = 0,"
                              " next_attempt_at = ?, deadline = ? + max_age, lease_until = 0"
                              " WHERE status = 'dead'", (now, now)).rowcount
            self._apply({"dead": -n, "pending": n})
        return n

    def purge(self, status: str = "dead") -> int:
        """Delete all rows of a final status (dead or delivered); returns how many."""
        if status not in ("dead", "delivered"):
            raise ValueError("only dead or delivered rows can be purged")
        with self._lock:
            with self.tx() as c:
                n = c.execute(f"DELETE FROM deliveries WHERE status = '{status}'").rowcount
            self._apply({status: -n})
        return n

    def prune(self, now: float, keep_delivered: float | None = None) -> int:
        """Delete delivered rows older than the retention period; returns how many."""
        keep = RETENTION if keep_delivered is None else keep_delivered
        with self._lock:
            with self.tx() as c:
                n = c.execute("DELETE FROM deliveries WHERE status = 'delivered'"
                              " AND delivered_at < ?", (now - keep,)).rowcount
            self._last_prune = time.monotonic()
            self._apply({"delivered": -n})
        return n

    def _maybe_prune(self, c: sqlite3.Connection, now: float) -> int:
        # Piggybacks on a write that is happening anyway, so an idle daemon never writes.
        if time.monotonic() - self._last_prune < PRUNE_EVERY:
            return 0
        self._last_prune = time.monotonic()
        return c.execute("DELETE FROM deliveries WHERE status = 'delivered'"
                         " AND delivered_at < ?", (now - RETENTION,)).rowcount

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        """Rows per status, from counters kept up to date on every write (no query)."""
        with self._lock:
            return dict(self._counts)

    def recount(self) -> dict[str, int]:
        """Re-read the counters from the table (after another process wrote to it)."""
        with self.tx() as c:
            counts = {status: c.execute(
                f"SELECT COUNT(*) FROM deliveries INDEXED BY {_STATUS_INDEX[status]}"
                f" WHERE status = '{status}'").fetchone()[0] for status in STATUSES}
            self._counts = counts
        return dict(counts)

    def targets_with_pending(self) -> set[str]:
        """Targets that have at least one pending row."""
        with self.tx() as c:
            return {r[0] for r in c.execute(
                "SELECT DISTINCT target FROM deliveries WHERE status = 'pending'")}

    def list(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Rows for the API and CLI, newest first; never the URL, headers or body."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        if status is None or status == "delivered":
            # nearly every row: newest first along the rowid stops after `limit` rows
            where = "" if status is None else "WHERE status = 'delivered'"
            return self._select(where, (), limit)
        # A literal (checked above), not a parameter, and the partial index named: a
        # few pending or dead rows among a day of delivered ones are found through
        # their own index, not by walking the table back from the newest row.
        return self._select(f"INDEXED BY {_STATUS_INDEX[status]} WHERE status = '{status}'",
                            (), limit)

    def get(self, id: int) -> dict[str, Any] | None:
        """One row in the :meth:`list` shape, or None."""
        found = self._select("WHERE id = ?", (id,), 1)
        return found[0] if found else None

    def _select(self, where: str, args: tuple[Any, ...], limit: int) -> list[dict[str, Any]]:
        sql = ("SELECT id, webhook_id, event_id, target, status, attempts, max_attempts,"
               " next_attempt_at, last_error, last_status, created_at, delivered_at, deadline,"
               f" history FROM deliveries {where} ORDER BY id DESC LIMIT ?")
        with self.tx() as c:
            rows = c.execute(sql, (*args, int(limit))).fetchall()
        return [{
            "id": r[0], "webhook_id": r[1], "event_id": r[2], "target": r[3], "status": r[4],
            "attempts": r[5], "max_attempts": r[6],
            "next_attempt_at": rfc3339(r[7]) if r[4] == "pending" else None,
            "last_error": r[8], "last_status": r[9], "created_at": rfc3339(r[10]),
            "delivered_at": rfc3339(r[11]) if r[11] is not None else None,
            "deadline": rfc3339(r[12]), "history": json.loads(r[13]),
        } for r in rows]

    def health(self) -> tuple[bool, str]:
        """(True, "ok") or (False, why): full, disk low, or a write failed recently."""
        with self._lock:
            undelivered = self._counts["pending"] + self._counts["dead"]
            if undelivered >= self.max_rows:
                return False, f"outbox full ({undelivered} undelivered rows, cap {self.max_rows})"
            try:
                free = self._free_bytes()
            except OSError as exc:
                return False, f"cannot check free space: {exc}"
            if free < self.min_free_bytes:
                return False, f"disk nearly full ({free // 1024} KiB free)"
            if self._write_error is not None:
                at, why = self._write_error
                if time.monotonic() - at < WRITE_ERROR_HOLD:
                    return False, f"outbox write failed: {why}"
                self._write_error = None
            return True, "ok"

    def close(self) -> None:
        """Close the database and drop the state-dir lock; later calls raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # from here on tx() raises
        try:
            if self._checkpointer is not None:
                self._checkpointer.stop()  # not under the lock: its last run may wait for it
            with self._lock:
                self._db.close()  # the last connection to close checkpoints the rest
        finally:
            self._release_dir_lock()


class _Checkpointer:
    """A thread with its own connection that runs PASSIVE WAL checkpoints when kicked."""

    def __init__(self, path: Path, writers: threading.RLock) -> None:
        self._path = path
        self._writers = writers  # the outbox's lock: every write of the daemon takes it
        self._kick = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.runs = 0

    def kick(self) -> None:
        """Ask for a checkpoint soon (the thread starts on the first kick)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgehook-checkpoint",
                                            daemon=True)
            self._thread.start()
        self._kick.set()

    def stop(self) -> None:
        self._stopping = True
        self._kick.set()
        if self._thread is not None:
            self._thread.join(10)

    def _catch_up(self, db: sqlite3.Connection) -> None:
        """PASSIVE checkpoints until one finds the WAL as the one before left it (no
        write in between: all of it is in the database, and the next write starts
        the file over); after ``CATCH_UP`` tries, one with the writers held."""
        last = None
        for _ in range(CATCH_UP):
            frames = self._checkpoint(db)
            if frames == last:
                return
            last = frames
        with self._writers:  # writing all the while (a burst): one run with writers held
            if not self._stopping:
                self._checkpoint(db)

    def _checkpoint(self, db: sqlite3.Connection) -> int:
        """One PASSIVE checkpoint; the WAL's size in frames when it began."""
        _busy, frames, _done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.runs += 1
        return int(frames)

    def _run(self) -> None:
        db = None
        try:
            db = sqlite3.connect(str(self._path), timeout=BUSY_TIMEOUT_MS / 1000,
                                 isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            while True:
                self._kick.wait()
                self._kick.clear()
                if self._stopping:
                    return
                try:
                    self._catch_up(db)
                except sqlite3.Error as exc:  # the next kick tries again
                    _LOG.warning("outbox: WAL checkpoint failed: %s", exc)
        except Exception:
            _LOG.exception("outbox: checkpointer stopped")
        finally:
            if db is not None:
                db.close()
