"""The durable outbox: every outbound webhook is a SQLite row until a 2xx says otherwise.

A delivery moves ``pending -> delivered | dead``, marked delivered only after a 2xx.
Every access goes through one ``with outbox.tx():`` (a lock, ``BEGIN IMMEDIATE``,
commit, rollback on error); each commit is fsynced (``synchronous=FULL``), and the
dispatcher stores a batch of events in one of them, so whatever a source was told
is on disk. This class keeps what lives in memory: the row counters, leases of
claimed rows, and each target's first pending id (there is no index over pending
rows: the queries for them walk the rowid from there). It refuses new rows
(``OutboxFull``) at ``MAX_ROWS`` undelivered rows or below ``MIN_FREE_BYTES`` free,
before SQLite itself fails on a full disk; any SQLite failure is an
:class:`OutboxError`. Delivered marks that wait to share a commit are
outbox_marks.py's, the statements outbox_sql.py's, opening the file (schema, lock,
a corrupt file moved aside) outbox_file.py's; what survives what is in
docs/delivery.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import outbox_sql as sql
from .errors import EdgehookError
from .events import new_id
from .outbox_admin import STATUSES, RowAdmin  # noqa: F401  (STATUSES re-exported)
from .outbox_file import (  # noqa: F401  (re-exported: the outbox's public names)
    BUSY_TIMEOUT_MS,
    PAGE_SIZE,
    SCHEMA_VERSION,
    SYNCHRONOUS,
    OutboxLocked,
    corrupt_files,
    daemon_holds,
    open_or_replace,
    take_dir_lock,
)
from .outbox_marks import MARK_LAG, MARK_MAX, DeliveredMarks  # noqa: F401  (re-exported)
from .outbox_sql import HISTORY_MAX, NewDelivery, Row  # noqa: F401  (re-exported)

_LOG = logging.getLogger(__name__)

MAX_ROWS = 50_000            # pending + dead rows; beyond this add() refuses
MIN_FREE_BYTES = 8 * 1024 * 1024  # free space kept under the state dir
RETENTION = 24 * 3600.0      # delivered rows are kept this long, then pruned
LEASE = 300.0                # default claim lease (seconds)
PRUNE_EVERY = 600.0          # prune at most this often, and only alongside a write
STATVFS_CACHE = 1.0          # seconds a free-space reading is reused
WRITE_ERROR_HOLD = 60.0      # a failed write is reported this long once space is back

class OutboxError(EdgehookError, sqlite3.Error):
    """SQLite failed (I/O error, disk full, corrupt page, locked): nothing was stored.

    Also a ``sqlite3.Error``, so code that catches those keeps working."""


class OutboxFull(OutboxError):
    """A delivery was refused: the row cap is reached or the disk is nearly full."""


class Outbox(DeliveredMarks, RowAdmin):
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
        # claimed row id -> (lease end, target): leases live in memory only
        self._leased: dict[int, tuple[float, str]] = {}
        self._init_marks()
        # target -> an id no pending row of it is below (exact after each claim); a
        # target that is not here has none. There is no index over pending rows (one
        # more page per commit on the SD card): their queries walk the rowid from here.
        self._heads: dict[str, int] = {}
        try:
            self._db = open_or_replace(self.path, exclusive)
        except sqlite3.DatabaseError as exc:
            self._release_dir_lock()
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from None
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

    def _refusal(self, more: int) -> str | None:
        """Why `more` new rows would be refused (row cap, disk headroom), or None; with
        0, why the outbox refuses rows now. Caller holds the lock."""
        undelivered = self._counts["pending"] + self._counts["dead"]
        if undelivered + max(more, 1) > self.max_rows:  # room for this many, at least one
            return f"outbox full ({undelivered} undelivered rows, cap {self.max_rows})"
        try:
            free = self._free_bytes()
        except OSError as exc:
            return f"cannot check free space: {exc}"
        if free < self.min_free_bytes:
            return (f"disk nearly full ({free // 1024} KiB free under {self.path.parent},"
                    f" keeping {self.min_free_bytes // 1024} KiB)")
        return None

    def _apply(self, delta: dict[str, int]) -> None:
        for status, n in delta.items():
            self._counts[status] += n

    def _low(self, target: str | None = None) -> int | None:
        """The id no pending row (of `target`, or of any target) is below; None when
        there is no such row. Caller holds the lock."""
        if target is not None:
            return self._heads.get(target)
        return min(self._heads.values(), default=None)

    def _lower_head(self, target: str, row_id: int) -> None:
        """Row `row_id` of `target` is pending now (new, or retried)."""
        head = self._heads.get(target)
        if head is None or row_id < head:
            self._heads[target] = row_id

    def _found_head(self, target: str, first: int | None) -> None:
        """A walk from the target's head found its first pending row (None: none)."""
        if first is None:
            self._heads.pop(target, None)
        else:
            self._heads[target] = first

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
            why = self._refusal(len(items))
            if why is not None:
                raise OutboxFull(why)
            webhook_ids = ["msg_" + new_id(now) for _ in items]
            with self._write_tx() as c:
                first = sql.insert(c, items, webhook_ids, now)
            self._apply({"pending": len(items)})
            rows = [Row(first + i, webhook_id, d.event_id, d.target, d.url, d.method,
                        dict(d.headers), bytes(d.body), d.content_type, 0, int(d.max_attempts),
                        now, now, now + float(d.max_age))
                    for i, (webhook_id, d) in enumerate(zip(webhook_ids, items, strict=True))]
            for row in rows:
                self._lower_head(row.target, row.id)
        return rows

    def claim(self, target: str, limit: int, now: float, lease: float = LEASE) -> list[Row]:
        """Lease the due head of a target's queue, oldest first.

        Rows of one target are sent in order, so the claim stops at the first pending
        row that is not due yet (backing off) or still leased: a later row never
        overtakes an earlier one. Leases live in memory (one daemon per state
        directory, and a crash ends them anyway): a claim writes nothing.
        """
        with self.tx() as c:
            rows: list[Row] = []
            for r in self._queue_head(c, target, int(limit), sql.ROW_COLUMNS):
                row = sql.to_row(r)
                if row.next_attempt_at > now or self._lease_end(row.id) > now:
                    break
                rows.append(row)
            for row in rows:
                self._leased[row.id] = (now + lease, row.target)
        return rows

    def _queue_head(self, c: sqlite3.Connection, target: str, n: int,
                    columns: str) -> list[tuple[Any, ...]]:
        """The first `n` pending rows of a target (`columns` of each, ``id`` first),
        passing over delivered ones whose marks wait; learns the target's first
        pending id on the way. Caller holds the lock."""
        low = self._low(target)
        if low is None:
            return []
        found = sql.pending_rows(c, target, low, n + len(self._settled), columns).fetchall()
        self._found_head(target, found[0][0] if found else None)
        return [r for r in found if r[0] not in self._settled][:n]

    def _unlease(self, row_id: int) -> None:
        self._leased.pop(row_id, None)

    def _lease_end(self, row_id: int) -> float:
        return self._leased.get(row_id, (0.0, ""))[0]

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
            head = self._queue_head(c, target, 1, "id, next_attempt_at")
        return max(head[0][1], self._lease_end(head[0][0])) if head else None

    def mark_retry(self, id: int, now: float, next_at: float, error: str,
                   status: int | None) -> None:
        """Record a failed attempt and when to try again."""
        with self._lock:
            self._unlease(id)
            with self._write_tx() as c:
                sql.record_failure(c, id, sql.attempt_json(now, status, error), error,
                                   status, HISTORY_MAX, next_at=next_at)

    def mark_dead(self, id: int, now: float, error: str, status: int | None, *,
                  attempted: bool = True) -> None:
        """Give up on a row; it stays visible as dead.

        :param attempted: False when no request was made (max_age passed before the
            attempt, target removed): the attempt count and history stay as they are.
        """
        with self._lock:
            self._unlease(id)
            with self._write_tx() as c:
                if attempted:
                    n = sql.record_failure(c, id, sql.attempt_json(now, status, error), error,
                                           status, HISTORY_MAX)
                else:
                    n = sql.give_up(c, error, "id = ?", (id,))
            self._apply({"pending": -n, "dead": n})

    def mark_target_dead(self, target: str, now: float, error: str) -> int:
        """Mark every pending row of a target dead without an attempt (target removed)."""
        with self._lock:
            low = self._low(target)
            if low is None:
                return 0
            with self._write_tx() as c:
                n = sql.give_up(c, error, "id >= ? AND target = ?", (low, target))
            self._heads.pop(target, None)
            self._apply({"pending": -n, "dead": n})
        return n

    def prune(self, now: float, keep_delivered: float | None = None) -> int:
        """Delete delivered rows older than the retention period; returns how many."""
        keep = RETENTION if keep_delivered is None else keep_delivered
        with self._lock:
            with self._write_tx() as c:
                n = sql.delete_delivered_before(c, now - keep)
            self._last_prune = time.monotonic()
            self._apply({"delivered": -n})
        return n

    def _maybe_prune(self, c: sqlite3.Connection, now: float) -> int:
        # Piggybacks on a write that is happening anyway, so an idle daemon never writes.
        if time.monotonic() - self._last_prune < PRUNE_EVERY:
            return 0
        self._last_prune = time.monotonic()
        return sql.delete_delivered_before(c, now - RETENTION)

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        """Rows per status, from counters kept up to date on every write (no query)."""
        with self._lock:
            return dict(self._counts)

    def recount(self) -> dict[str, int]:
        """Re-read the counters from the table (after another process wrote to it)."""
        with self._write_tx() as c:  # (the waiting marks too: the census counts them)
            counts, self._heads = sql.census(c)
            self._counts = counts
        return dict(counts)

    def targets_with_pending(self) -> set[str]:
        """Targets that have at least one pending row."""
        return set(self.pending_by_target())

    def pending_by_target(self) -> dict[str, int]:
        """Pending rows per target (delivered marks still in memory count as delivered)."""
        with self.tx() as c:
            low = self._low()
            counts = {} if low is None else sql.pending_counts(c, low)
            for target, _ in self._settled.values():
                counts[target] = counts.get(target, 0) - 1
        return {t: n for t, n in counts.items() if n > 0}

    def health(self) -> tuple[bool, str]:
        """(True, "ok") or (False, why): full, disk low, or a write failed recently."""
        with self._lock:
            why = self._refusal(0)
            if why is not None:
                return False, why
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
        self._stop_marks()
        try:
            with self._lock:
                self._db.close()  # the last connection to close checkpoints the rest
        finally:
            self._release_dir_lock()
