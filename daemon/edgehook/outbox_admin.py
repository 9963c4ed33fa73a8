"""What a user does to the outbox's rows: list them, retry, re-time, drop and purge them.

A mixin of :class:`outbox.Outbox`, which holds the connection, the lock and the
counters; these are the operations the CLI and the API call, off the event path.
Each writes in a transaction that carries the waiting delivered marks, written first.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from typing import TYPE_CHECKING, Any

from . import outbox_sql

_LOG = logging.getLogger("edgehook.outbox")
STATUSES = ("pending", "delivered", "dead")


class RowAdmin:
    """The user's operations on rows, on top of what Outbox provides (below)."""

    if TYPE_CHECKING:
        _lock: threading.RLock

        def tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...
        def flush_marks(self) -> None: ...
        def _write_tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...
        def _apply(self, delta: dict[str, int]) -> None: ...
        def _unlease(self, row_id: int) -> None: ...
        def _low(self, target: str | None = None) -> int | None: ...
        def _lower_head(self, target: str, row_id: int) -> None: ...
        _heads: dict[str, int]

    def retry(self, id: int, now: float) -> bool:
        """Make a dead row pending again, due now, with a fresh deadline and its webhook-id.

        A pending row is made due now (its attempts kept). False when there is no
        such row or it was already delivered. The last error is cleared: the row is
        a new try (its history keeps every attempt).
        """
        with self._lock:
            with self._write_tx() as c:
                r = c.execute("SELECT status, target FROM deliveries WHERE id = ?",
                              (id,)).fetchone()
                if r is None or r[0] == "delivered":
                    return False
                if r[0] == "pending":
                    c.execute("UPDATE deliveries SET next_attempt_at = ? WHERE id = ?", (now, id))
                    return True
                outbox_sql.requeue(c, now, "id = ?", (id,))
            self._lower_head(r[1], id)
            self._apply({"dead": -1, "pending": 1})
        return True

    def make_due(self, target: str, now: float) -> int:
        """Make a target's waiting rows due now (its config changed: a fixed URL must
        not wait out a backoff computed for the broken one); returns how many."""
        with self.tx() as c:
            low = self._low(target)
            return 0 if low is None else outbox_sql.make_due(c, target, low, now)

    def retry_all_dead(self, now: float) -> int:
        """Make every dead row pending again (see :meth:`retry`); returns how many."""
        with self._lock:
            with self._write_tx() as c:
                firsts = c.execute(f"SELECT target, MIN(id) FROM deliveries INDEXED BY"
                                   f" {outbox_sql.DEAD_INDEX} WHERE status = 'dead'"
                                   " GROUP BY target").fetchall()
                n = outbox_sql.requeue(c, now, "status = 'dead'", ())
            for target, first in firsts:
                self._lower_head(target, first)
            self._apply({"dead": -n, "pending": n})
        return n

    def purge(self, status: str = "dead") -> int:
        """Delete all rows of a final status (dead or delivered); returns how many."""
        if status not in ("dead", "delivered"):
            raise ValueError("only dead or delivered rows can be purged")
        with self._lock:
            with self._write_tx() as c:
                n = outbox_sql.delete(c, f"WHERE status = '{status}'")
            self._apply({status: -n})
        return n

    def drop(self, id: int) -> bool:
        """Delete one pending or dead row (the user gave up on it); False if none."""
        with self._lock:
            with self._write_tx() as c:
                r = c.execute("SELECT status FROM deliveries WHERE id = ? AND status != "
                              "'delivered'", (id,)).fetchone()
                if r is None:
                    return False
                outbox_sql.delete(c, "WHERE id = ?", (id,))
            self._unlease(id)
            self._apply({r[0]: -1})
        _LOG.warning("outbox: row %d (%s) dropped by the user", id, r[0])
        return True

    def drop_target(self, target: str) -> int:
        """Delete every pending and dead row of a target; returns how many."""
        with self._lock:
            low = self._low(target)
            with self._write_tx() as c:
                n = {"pending": 0 if low is None else outbox_sql.delete(
                    c, "WHERE id >= ? AND status = 'pending' AND target = ?", (low, target)),
                     "dead": outbox_sql.delete(
                    c, f"INDEXED BY {outbox_sql.DEAD_INDEX} WHERE status = 'dead'"
                    " AND target = ?", (target,))}
            self._heads.pop(target, None)
            self._leased.clear()  # the target's worker claims afresh
            self._apply({s: -k for s, k in n.items()})
        total = sum(n.values())
        if total:
            _LOG.warning("outbox: %d %s of target %s dropped by the user", total,
                         "row" if total == 1 else "rows", target)
        return total

    def list(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Rows for the API and CLI, newest first; never the URL, headers or body."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        if status is None or status == "delivered":
            # nearly every row: newest first along the rowid stops after `limit` rows
            where = "" if status is None else "WHERE status = 'delivered'"
            return self._select(where, (), limit)
        # A few pending or dead rows among a day of delivered ones: dead ones through
        # their own (partial) index, pending ones along the rowid from the first of
        # them, never by walking the whole table back from the newest row.
        if status == "dead":
            return self._select(f"INDEXED BY {outbox_sql.DEAD_INDEX} WHERE status = 'dead'",
                                (), limit)
        with self._lock:
            low = self._low()
            if low is None:
                return []
            return self._select("WHERE id >= ? AND status = 'pending'", (low,), limit)

    def get(self, id: int) -> dict[str, Any] | None:
        """One row in the :meth:`list` shape, or None."""
        found = self._select("WHERE id = ?", (id,), 1)
        return found[0] if found else None

    def _select(self, where: str, args: tuple[Any, ...], limit: int) -> list[dict[str, Any]]:
        self.flush_marks()  # a listing shows what is on disk
        with self.tx() as c:
            low = self._low()
            return outbox_sql.listing(c, where, args, limit, 1 << 62 if low is None else low)
