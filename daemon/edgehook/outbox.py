"""The durable outbox: every outbound webhook is a SQLite row until a 2xx says otherwise.

A delivery moves ``pending -> delivered | dead``. It is marked delivered only after a
2xx (never on dequeue). Every access, reads included, goes through one
``with outbox.tx():`` (a lock, ``BEGIN IMMEDIATE``, commit, rollback on error).

Durability: WAL with ``synchronous=FULL``, so every commit fsyncs the WAL before it
returns. The dispatcher stores a whole batch of events in one transaction (group
commit: a burst costs one fsync per batch, not per message) and only then
acknowledges the events to their sources: whatever an MQTT publisher or a hook
caller was told is on disk, through a crash or a power cut. SQLite's own automatic
checkpoint copies the WAL into the database every ``wal_autocheckpoint`` pages.

What may lag is the "delivered" mark: :meth:`Outbox.mark_delivered` keeps it in
memory for up to ``MARK_LAG`` seconds so that it shares the commit of the next new row
(or is written alone when none comes). Losing it in a crash only means the webhook
is sent again with the same ``webhook-id``, which receivers de-duplicate.

Frugal on the SD card: pages of ``PAGE_SIZE`` bytes (a commit rewrites whole pages,
and a new row touches about four of them), leases of claimed rows kept in memory
(one daemon per state directory: a crash frees them anyway), delivered marks folded
into the next commit; when nothing happens nothing is written (reads never write;
pruning runs at open and then only alongside a write that happens anyway).

A full disk makes even DELETE fail, so the outbox refuses new rows (``OutboxFull``)
while ``MAX_ROWS`` undelivered rows exist or the free space under the state
directory drops below ``MIN_FREE_BYTES``, and :meth:`Outbox.health` says why; both
recover by themselves as rows drain or space returns. Any SQLite failure surfaces
as an :class:`OutboxError` (an ``EdgehookError``): the caller treats it as data.

A corrupt file (not a database, truncated, scrambled pages) is moved aside as
``outbox.db.corrupt-<UTC time>`` at open, logged, counted (:attr:`corrupt_moved`,
on /healthz while such files remain) and a fresh outbox starts: the doorbell keeps
working, and what can be saved from the old file is left for a human.

One daemon per state directory: the outbox holds an exclusive ``flock`` on
``<dir>/edgehook.lock`` while open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import EdgehookError
from .events import compact_json, new_id, rfc3339
from .outbox_file import (  # noqa: F401  (re-exported: the outbox's public names)
    BUSY_TIMEOUT_MS,
    PAGE_SIZE,
    SCHEMA_VERSION,
    SYNCHRONOUS,
    OutboxLocked,
    corrupt_files,
    daemon_holds,
    move_aside,
    open_db,
    take_dir_lock,
)

_LOG = logging.getLogger(__name__)

MAX_ROWS = 50_000            # pending + dead rows; beyond this add() refuses
MIN_FREE_BYTES = 8 * 1024 * 1024  # free space kept under the state dir
RETENTION = 24 * 3600.0      # delivered rows are kept this long, then pruned
LEASE = 300.0                # default claim lease (seconds)
PRUNE_EVERY = 600.0          # prune at most this often, and only alongside a write
STATVFS_CACHE = 1.0          # seconds a free-space reading is reused
HISTORY_MAX = 50             # attempts kept per row (the oldest are dropped)
WRITE_ERROR_HOLD = 60.0      # a failed write is reported this long once space is back
MARK_LAG = 2.0               # seconds a delivered mark may wait to share a commit
STATUSES = ("pending", "delivered", "dead")

# Pending and dead rows have an index of their own; naming it lets SQLite read only
# it (counting, listing) rather than walk a table that holds a day of delivered rows.
_STATUS_INDEX = {"pending": "deliveries_pending", "dead": "deliveries_dead"}

_ROW_COLUMNS = ("id, webhook_id, event_id, target, url, method, headers, body, content_type, "
                "attempts, max_attempts, created_at, next_attempt_at, deadline")

# Append one attempt to the JSON history, dropping the oldest beyond HISTORY_MAX.
_HISTORY_APPEND = (
    "history = json_insert(CASE WHEN json_array_length(history) >= ?"
    " THEN json_remove(history, '$[0]') ELSE history END, '$[#]', json(?))"
)


class OutboxError(EdgehookError, sqlite3.Error):
    """SQLite failed (I/O error, disk full, corrupt page, locked): nothing was stored.

    Also a ``sqlite3.Error``, so code that catches those keeps working."""


class OutboxFull(OutboxError):
    """A delivery was refused: the row cap is reached or the disk is nearly full."""


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


def _attempt(now: float, status: int | None, error: str | None) -> str:
    return json.dumps({"at": rfc3339(now), "status": status, "error": error})


class Outbox:
    """The SQLite outbox of one state directory; thread-safe, one connection and a lock."""

    def __init__(self, path: str | Path, *, max_rows: int | None = None,
                 min_free_bytes: int | None = None, exclusive: bool = True) -> None:
        """Open (creating the directory and schema) and take the state-dir lock.

        :param max_rows: cap on pending + dead rows (default ``MAX_ROWS`` at call time).
        :param min_free_bytes: free space to keep (default ``MIN_FREE_BYTES``).
        :param exclusive: take the one-daemon lock, move a corrupt file aside, migrate
            and prune; a tool opening the file beside a running daemon passes False.
        """
        self.path = Path(path)
        self._max_rows = max_rows
        self._min_free_bytes = min_free_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None
        if exclusive:
            self._lock_fd = take_dir_lock(self.path)
        self._free_at = -1e18
        self._free = 0
        self._write_error: tuple[float, str] | None = None
        self._last_prune = -1e18
        self._changes_seen = 0
        self._closed = False
        self._leased: dict[int, float] = {}     # claimed row id -> lease end (memory only)
        self._claimed: dict[int, str] = {}      # claimed row id -> its target
        self._settled: dict[int, str] = {}      # delivered in memory, not written: id -> target
        self._marks: list[tuple[Any, ...]] = []  # their UPDATE arguments
        self._mark_timer: threading.Timer | None = None
        try:
            try:
                self._db = open_db(self.path, exclusive)
            except sqlite3.DatabaseError as exc:
                if not exclusive or isinstance(exc, sqlite3.OperationalError):
                    raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from None
                move_aside(self.path, exc)
                self._db = open_db(self.path, exclusive)
        except BaseException:
            self._release_dir_lock()
            raise
        self.corrupt_moved = len(corrupt_files(self.path))
        self.recount()
        if exclusive:
            self.prune(time.time())

    def _release_dir_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    @property
    def max_rows(self) -> int:
        """The row cap: the constructor's, else ``MAX_ROWS`` as it is now."""
        return MAX_ROWS if self._max_rows is None else self._max_rows

    @property
    def min_free_bytes(self) -> int:
        """The disk headroom: the constructor's, else ``MIN_FREE_BYTES`` as it is now."""
        return MIN_FREE_BYTES if self._min_free_bytes is None else self._min_free_bytes

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: lock, BEGIN IMMEDIATE, commit; rollback and re-raise on error.

        Nested use joins the outer transaction. A SQLite error comes out as an
        :class:`OutboxError`; it is remembered for :meth:`health` and forgotten at the
        next successful commit.
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
                if isinstance(exc, OutboxError):
                    raise
                raise OutboxError(f"outbox: {exc}") from exc
            finally:
                self._depth = 0
            if self._db.total_changes != self._changes_seen:  # a real write succeeded
                self._changes_seen = self._db.total_changes
                self._write_error = None

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

    def add_rows(self, items: Sequence[NewDelivery], now: float | None = None) -> list[Row]:
        """:meth:`add`, returning the stored rows as :meth:`claim` would.

        One transaction, fsynced before it returns (delivered marks waiting in memory
        share it). Raises ``OutboxFull`` (storing none of them) when the row cap or
        the disk headroom would be crossed, ``OutboxError`` when SQLite fails.
        """
        if not items:
            return []
        now = time.time() if now is None else now
        with self._lock:
            undelivered = self._counts["pending"] + self._counts["dead"]
            if undelivered + len(items) > self.max_rows:
                raise OutboxFull(f"outbox full: {undelivered} undelivered rows "
                                 f"(cap {self.max_rows})")
            try:
                free = self._free_bytes()
            except OSError as exc:
                raise OutboxError(f"cannot check free space: {exc}") from None
            if free < self.min_free_bytes:
                raise OutboxFull(f"disk nearly full: {free // 1024} KiB free under "
                                 f"{self.path.parent} (keeping {self.min_free_bytes // 1024} KiB)")
            new = [Row(0, "msg_" + new_id(now), d.event_id, d.target, d.url, d.method,
                       dict(d.headers), bytes(d.body), d.content_type, 0, int(d.max_attempts),
                       now, now, now + float(d.max_age)) for d in items]
            with self.tx() as c:
                self._write_marks(c)
                c.executemany(
                    "INSERT INTO deliveries (webhook_id, event_id, target, url, method,"
                    " headers, body, content_type, max_attempts, max_age, created_at,"
                    " next_attempt_at, deadline) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(r.webhook_id, r.event_id, r.target, r.url, r.method,
                      compact_json(r.headers), r.body,
                      r.content_type, r.max_attempts, float(d.max_age), now, now,
                      r.deadline) for r, d in zip(new, items, strict=True)])
                # New rowids are max + 1, under the write lock: a batch's ids are consecutive.
                first = c.execute("SELECT last_insert_rowid()").fetchone()[0] - len(items) + 1
            self._marks_written()
            self._apply({"pending": len(items)})
        return [replace(r, id=first + i) for i, r in enumerate(new)]

    def claim(self, target: str, limit: int, now: float, lease: float = LEASE) -> list[Row]:
        """Lease the due head of a target's queue, oldest first.

        Rows of one target are sent in order, so the claim stops at the first pending
        row that is not due yet (backing off) or still leased: a later row never
        overtakes an earlier one. Leases live in memory (one daemon per state
        directory, and a crash ends them anyway): a claim writes nothing.
        """
        with self.tx() as c:
            cur = c.execute(
                f"SELECT {_ROW_COLUMNS} FROM deliveries"
                " WHERE status = 'pending' AND target = ? ORDER BY id LIMIT ?",
                (target, int(limit) + len(self._settled)))
            rows: list[Row] = []
            for r in cur.fetchall():
                if r[0] in self._settled:
                    continue  # delivered; its mark is not written yet
                if r[12] > now or self._leased.get(r[0], 0.0) > now or len(rows) >= limit:
                    break
                rows.append(Row(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7],
                                r[8], r[9], r[10], r[11], r[12], r[13]))
            for row in rows:
                self._leased[row.id] = now + lease
                self._claimed[row.id] = row.target
        return rows

    def _unlease(self, row_id: int) -> None:
        self._leased.pop(row_id, None)
        self._claimed.pop(row_id, None)

    def release(self, ids: Sequence[int]) -> None:
        """Give back leases of claimed rows that were not attempted (stop, head backing off)."""
        with self._lock:
            for i in ids:
                self._unlease(i)

    def next_due(self, target: str) -> float | None:
        """When the head of a target's queue is due (None: nothing pending).

        This is the head row's time, not the earliest of all rows: rows are sent in
        order, so a later row that is due cannot go before a head that is backing off.
        """
        with self.tx() as c:
            for row_id, due in c.execute(
                    "SELECT id, next_attempt_at FROM deliveries WHERE status = 'pending'"
                    " AND target = ? ORDER BY id LIMIT ?", (target, 1 + len(self._settled))):
                if row_id not in self._settled:
                    return max(due, self._leased.get(row_id, 0.0))
        return None

    def mark_delivered(self, ids_with_status: Sequence[tuple[int, int]], now: float) -> None:
        """Mark rows delivered after a 2xx.

        The mark waits in memory (at most ``MARK_LAG`` s) to share the commit of the
        next new row; the counters, claims and listings see it at once. Lost in a
        crash, it means one more delivery with the same webhook-id.
        """
        if not ids_with_status:
            return
        with self._lock:
            n = 0
            for row_id, status in ids_with_status:
                claimed = self._claimed.get(row_id)
                self._unlease(row_id)
                if row_id in self._settled:
                    continue
                target = claimed or self._target_of(row_id)
                if target is None:
                    continue  # not pending any more (dropped, or marked by someone else)
                self._settled[row_id] = target
                self._marks.append((HISTORY_MAX, _attempt(now, status, None), status, now,
                                    row_id))
                n += 1
            self._apply({"pending": -n, "delivered": n})
            if self._marks and self._mark_timer is None and not self._closed:
                self._mark_timer = threading.Timer(MARK_LAG, self.flush_marks)
                self._mark_timer.daemon = True
                self._mark_timer.start()

    def _target_of(self, row_id: int) -> str | None:
        with self.tx() as c:
            r = c.execute("SELECT target FROM deliveries WHERE id = ? AND status = 'pending'",
                          (row_id,)).fetchone()
        return None if r is None else r[0]

    def _write_marks(self, c: sqlite3.Connection) -> None:
        """Write the delivered marks waiting in memory, inside the caller's transaction."""
        if not self._marks:
            return
        cur = c.executemany(
            f"UPDATE deliveries SET status = 'delivered', attempts = attempts + 1,"
            f" {_HISTORY_APPEND}, last_status = ?, last_error = NULL, delivered_at = ?,"
            f" lease_until = 0 WHERE id = ? AND status = 'pending'", self._marks)
        gone = len(self._marks) - cur.rowcount  # rows dropped meanwhile: not delivered
        if gone:
            self._apply({"delivered": -gone})
        pruned = self._maybe_prune(c, time.time())
        self._apply({"delivered": -pruned})

    def _marks_written(self) -> None:
        """After the commit that held them: the marks are on disk."""
        self._marks.clear()
        self._settled.clear()
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None

    def flush_marks(self) -> None:
        """Write the delivered marks waiting in memory now (timer, listings, close)."""
        with self._lock:
            if not self._marks or self._closed:
                self._mark_timer = None
                return
            try:
                with self.tx() as c:
                    self._write_marks(c)
            except OutboxError as exc:  # kept in memory: the next commit tries again
                _LOG.warning("outbox: could not write delivered marks yet: %s", exc)
                self._mark_timer = None
                return
            self._marks_written()

    def mark_retry(self, id: int, now: float, next_at: float, error: str,
                   status: int | None) -> None:
        """Record a failed attempt and when to try again."""
        with self.tx() as c:
            self._unlease(id)
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
            self._unlease(id)
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
        such row or it was already delivered. The last error is cleared: the row is
        a new try (its history keeps every attempt).
        """
        with self._lock:
            self.flush_marks()
            with self.tx() as c:
                r = c.execute("SELECT status FROM deliveries WHERE id = ?", (id,)).fetchone()
                if r is None or r[0] == "delivered":
                    return False
                if r[0] == "pending":
                    c.execute("UPDATE deliveries SET next_attempt_at = ? WHERE id = ?", (now, id))
                    return True
                c.execute("UPDATE deliveries SET status = 'pending', attempts = 0,"
                          " next_attempt_at = ?, deadline = ? + max_age, lease_until = 0,"
                          " last_error = NULL, last_status = NULL WHERE id = ?", (now, now, id))
            self._apply({"dead": -1, "pending": 1})
        return True

    def make_due(self, target: str, now: float) -> int:
        """Make a target's waiting rows due now (its config changed: a fixed URL must
        not wait out a backoff computed for the broken one); returns how many."""
        with self.tx() as c:
            return c.execute("UPDATE deliveries SET next_attempt_at = ? WHERE status ="
                             " 'pending' AND target = ? AND next_attempt_at > ?",
                             (now, target, now)).rowcount

    def retry_all_dead(self, now: float) -> int:
        """Make every dead row pending again (see :meth:`retry`); returns how many."""
        with self._lock:
            with self.tx() as c:
                n = c.execute("UPDATE deliveries SET status = 'pending', attempts = 0,"
                              " next_attempt_at = ?, deadline = ? + max_age, lease_until = 0,"
                              " last_error = NULL, last_status = NULL"
                              " WHERE status = 'dead'", (now, now)).rowcount
            self._apply({"dead": -n, "pending": n})
        return n

    def purge(self, status: str = "dead") -> int:
        """Delete all rows of a final status (dead or delivered); returns how many."""
        if status not in ("dead", "delivered"):
            raise ValueError("only dead or delivered rows can be purged")
        with self._lock:
            self.flush_marks()
            with self.tx() as c:
                n = c.execute(f"DELETE FROM deliveries WHERE status = '{status}'").rowcount
            self._apply({status: -n})
        return n

    def drop(self, id: int) -> bool:
        """Delete one pending or dead row (the user gave up on it); False if none."""
        with self._lock:
            self.flush_marks()
            with self.tx() as c:
                r = c.execute("SELECT status FROM deliveries WHERE id = ? AND status != "
                              "'delivered'", (id,)).fetchone()
                if r is None:
                    return False
                c.execute("DELETE FROM deliveries WHERE id = ?", (id,))
            self._unlease(id)
            self._apply({r[0]: -1})
        _LOG.warning("outbox: row %d (%s) dropped by the user", id, r[0])
        return True

    def drop_target(self, target: str) -> int:
        """Delete every pending and dead row of a target; returns how many."""
        with self._lock:
            self.flush_marks()
            with self.tx() as c:
                n = {status: c.execute("DELETE FROM deliveries WHERE status = ? AND target = ?",
                                       (status, target)).rowcount
                     for status in ("pending", "dead")}
            self._leased.clear()  # the target's worker claims afresh
            self._claimed.clear()
            self._apply({s: -k for s, k in n.items()})
        total = sum(n.values())
        if total:
            _LOG.warning("outbox: %d row(s) of target %s dropped by the user", total, target)
        return total

    def prune(self, now: float, keep_delivered: float | None = None) -> int:
        """Delete delivered rows older than the retention period; returns how many."""
        keep = RETENTION if keep_delivered is None else keep_delivered
        with self._lock:
            self.flush_marks()
            with self.tx() as c:
                n = _delete_delivered_before(c, now - keep)
            self._last_prune = time.monotonic()
            self._apply({"delivered": -n})
        return n

    def _maybe_prune(self, c: sqlite3.Connection, now: float) -> int:
        # Piggybacks on a write that is happening anyway, so an idle daemon never writes.
        if time.monotonic() - self._last_prune < PRUNE_EVERY:
            return 0
        self._last_prune = time.monotonic()
        return _delete_delivered_before(c, now - RETENTION)

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        """Rows per status, from counters kept up to date on every write (no query)."""
        with self._lock:
            return dict(self._counts)

    def recount(self) -> dict[str, int]:
        """Re-read the counters from the table (after another process wrote to it)."""
        self.flush_marks()
        with self.tx() as c:
            counts = {status: c.execute(
                f"SELECT COUNT(*) FROM deliveries INDEXED BY {index}"
                f" WHERE status = '{status}'").fetchone()[0]
                for status, index in _STATUS_INDEX.items()}
            total = c.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
            counts["delivered"] = total - counts["pending"] - counts["dead"]
            self._counts = counts
        return dict(counts)

    def targets_with_pending(self) -> set[str]:
        """Targets that have at least one pending row."""
        return set(self.pending_by_target())

    def pending_by_target(self) -> dict[str, int]:
        """Pending rows per target (delivered marks still in memory count as delivered)."""
        with self.tx() as c:
            counts = dict(c.execute("SELECT target, COUNT(*) FROM deliveries"
                                    " INDEXED BY deliveries_pending WHERE status = 'pending'"
                                    " GROUP BY target").fetchall())
            for target in self._settled.values():
                counts[target] = counts.get(target, 0) - 1
        return {t: n for t, n in counts.items() if n > 0}

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
        self.flush_marks()  # a listing shows what is on disk
        with self.tx() as c:
            rows = c.execute(sql, (*args, int(limit))).fetchall()
            # the head of each target's queue: every later pending row waits behind it
            heads = dict(c.execute("SELECT target, MIN(id) FROM deliveries INDEXED BY"
                                   " deliveries_pending WHERE status = 'pending'"
                                   " GROUP BY target").fetchall())
        return [{
            "waiting_behind": heads[r[3]] if r[4] == "pending" and heads.get(r[3], r[0]) < r[0]
            else None,
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
        """Write waiting delivered marks, close the database, drop the state-dir lock."""
        with self._lock:
            if self._closed:
                return
            self.flush_marks()
            self._closed = True  # from here on tx() raises
            if self._mark_timer is not None:
                self._mark_timer.cancel()
        try:
            with self._lock:
                self._db.close()  # the last connection to close checkpoints the rest
        finally:
            self._release_dir_lock()


def _delete_delivered_before(c: sqlite3.Connection, cutoff: float) -> int:
    """Delete delivered rows older than `cutoff`, along the rowid: a row delivered before
    the cutoff was created before it, so only ids below the first newer row qualify
    (reading the old rows, which are the ones to delete, and no others)."""
    first_new = c.execute("SELECT id FROM deliveries WHERE created_at >= ? ORDER BY id"
                          " LIMIT 1", (cutoff,)).fetchone()
    bound = first_new[0] if first_new else (1 << 62)
    return c.execute("DELETE FROM deliveries WHERE id < ? AND status = 'delivered'"
                     " AND delivered_at < ?", (bound, cutoff)).rowcount
