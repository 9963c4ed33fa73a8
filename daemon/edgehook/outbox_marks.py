"""Delivered marks that wait in memory to share the next commit, to spare the SD card.

A mixin of :class:`outbox.Outbox`, which holds the connection, the lock, the
counters and the leases. A 2xx is counted at once; its row's UPDATE waits (at most
``MARK_LAG`` seconds, or until ``MARK_MAX`` wait) for the next commit that happens
anyway, or is written by a thread of its own. Lost in a crash, a mark means one
more delivery with the same webhook-id, which receivers de-duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import outbox_sql as sql

_LOG = logging.getLogger("edgehook.outbox")

MARK_LAG = 2.0   # seconds a delivered mark may wait to share a commit
MARK_MAX = 64    # marks waiting beyond this are written at once (a burst)


class DeliveredMarks:
    """Marking rows delivered, with the marks written later in a shared commit."""

    if TYPE_CHECKING:
        _lock: threading.RLock
        _closed: bool
        _leased: dict[int, tuple[float, str]]

        def tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...
        def _apply(self, delta: dict[str, int]) -> None: ...
        def _unlease(self, row_id: int) -> None: ...
        def _maybe_prune(self, c: sqlite3.Connection, now: float) -> int: ...

    def _init_marks(self) -> None:
        """The marks' state; the outbox calls this from its constructor."""
        # delivered, mark not written yet: row id -> (target, the mark's UPDATE arguments)
        self._settled: dict[int, tuple[str, tuple[Any, ...]]] = {}
        # the oldest waiting mark's time; a thread of its own writes them MARK_LAG later
        self._marks_since = 0.0
        self._mark_wake = threading.Condition(self._lock)
        self._mark_thread: threading.Thread | None = None
        self._marks_idle = False  # that thread waits for marks with no timeout
        self._marks_failing = 0   # writes of marks that failed in a row

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
                claimed = self._leased.get(row_id, (0.0, None))[1]
                self._unlease(row_id)
                if row_id in self._settled:
                    continue
                target = claimed or self._target_of(row_id)
                if target is None:
                    continue  # not pending any more (dropped, or marked by someone else)
                self._settled[row_id] = (target, (status, now, row_id))
                n += 1
            self._apply({"pending": -n, "delivered": n})
            if len(self._settled) >= MARK_MAX:
                self.flush_marks()  # a burst: one commit per MARK_MAX deliveries, and
                # claims do not wade through a long run of delivered rows
            elif n and len(self._settled) == n and not self._closed:
                self._marks_since = time.monotonic()  # the first to wait
                if self._mark_thread is None:
                    self._mark_thread = threading.Thread(
                        target=self._write_marks_later, name="edgehook-marks", daemon=True)
                    self._mark_thread.start()
                elif self._marks_idle:  # (else it is on a timeout that will see these:
                    self._mark_wake.notify()  # no wake-up per delivery)

    def _write_marks_later(self) -> None:
        """The marks' own thread: writes waiting marks once the oldest is ``MARK_LAG``
        old, unless a commit took them first. Sleeps without a timeout while none wait
        (an idle daemon never wakes); a failed write is tried again later and later."""
        with self._mark_wake:
            while not self._closed:
                left = self._marks_since + MARK_LAG - time.monotonic()
                if not self._settled:
                    self._marks_idle = True
                    self._mark_wake.wait()
                    self._marks_idle = False
                elif left > 0:
                    self._mark_wake.wait(left)
                else:
                    self.flush_marks()
                    # after a failure (a full disk): try again later and later, up to a
                    # minute apart
                    self._marks_since = time.monotonic() + min(
                        MARK_LAG * (2 ** min(self._marks_failing, 6) - 1), 60.0)

    def _target_of(self, row_id: int) -> str | None:
        with self.tx() as c:
            return sql.pending_target(c, row_id)

    @contextlib.contextmanager
    def _write_tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction that changes rows, carrying the waiting delivered marks, written
        first: a row delivered a moment ago is still pending in the file, and whatever
        changes rows must find it delivered (not give up on it, not count it twice).
        Pruning rides along too, so an idle daemon never writes."""
        with self._lock:
            with self.tx() as c:
                if self._settled:
                    marks = [args for _, args in self._settled.values()]
                    gone = len(marks) - sql.mark_delivered(c, marks)  # dropped meanwhile
                    pruned = self._maybe_prune(c, time.time())
                    self._apply({"delivered": -gone - pruned})
                yield c
            self._settled.clear()  # on disk now
            if self._marks_failing:
                _LOG.info("outbox: delivered marks written again")
                self._marks_failing = 0

    def flush_marks(self) -> None:
        """Write the delivered marks waiting in memory now (their thread, listings, close)."""
        with self._lock:
            if not self._settled or self._closed:
                return
            try:
                with self._write_tx():
                    pass
            except sqlite3.Error as exc:  # (an OutboxError) kept: the next commit tries again
                if not self._marks_failing:  # once per outage, not once per try
                    _LOG.warning("outbox: could not write delivered marks yet: %s", exc)
                self._marks_failing += 1

    def _stop_marks(self) -> None:
        """After the outbox closed: let the marks' thread end."""
        with self._lock:
            self._mark_wake.notify_all()
        if self._mark_thread is not None and self._mark_thread is not threading.current_thread():
            self._mark_thread.join(5)
