"""The outbox's SQL: row shapes and the statements each operation runs, on a connection
inside the caller's transaction. No lock, no state: outbox.py holds those.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .events import compact_json, rfc3339

HISTORY_MAX = 50  # attempts kept per row (the oldest are dropped)

# Dead rows have an index of their own; naming it lets SQLite read only it (counting,
# listing) rather than walk a table that holds a day of delivered rows. Pending rows
# have none (it would be one more page in every commit): every query for them starts
# at `low`, an id at or below the first pending row that outbox.py keeps in memory,
# and walks the rowid from there, over the few rows since.
DEAD_INDEX = "deliveries_dead"

ROW_COLUMNS = ("id, webhook_id, event_id, target, url, method, headers, body, content_type, "
                "attempts, max_attempts, created_at, next_attempt_at, deadline")

# What a delivered row no longer holds (see mark_delivered).
CLEARED = "url = '', headers = '{}', body = x'', content_type = ''"

# Append one attempt to the JSON history, dropping the oldest beyond HISTORY_MAX.
HISTORY_APPEND = (
    "history = json_insert(CASE WHEN json_array_length(history) >= ?"
    " THEN json_remove(history, '$[0]') ELSE history END, '$[#]', json(?))"
)


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


def attempt_json(now: float, status: int | None, error: str | None) -> str:
    """One attempt as its history entry."""
    return json.dumps({"at": rfc3339(now), "status": status, "error": error})


def insert(c: sqlite3.Connection, items: Sequence[NewDelivery], webhook_ids: Sequence[str],
           now: float) -> int:
    """INSERT new rows, created and due at `now`; returns the first id. A batch's ids
    are consecutive and above every id given before, deleted rows' included
    (:func:`delete`), so an id names one delivery for the file's life."""
    first = int(c.execute(f"SELECT max(coalesce((SELECT max(id) FROM deliveries), 0),"
                          f" coalesce(({_ID_FLOOR}), 0)) + 1").fetchone()[0])
    c.executemany(
        "INSERT INTO deliveries (id, webhook_id, event_id, target, url, method, headers,"
        " body, content_type, max_attempts, max_age, created_at, next_attempt_at, deadline)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [(first + i, w, d.event_id, d.target, d.url, d.method, compact_json(d.headers),
          bytes(d.body), d.content_type, int(d.max_attempts), float(d.max_age), now, now,
          now + float(d.max_age))
         for i, (w, d) in enumerate(zip(webhook_ids, items, strict=True))])
    return first


_ID_FLOOR = "SELECT value FROM outbox_meta WHERE key = 'id_floor'"


def delete(c: sqlite3.Connection, where: str, args: tuple[Any, ...] = ()) -> int:
    """DELETE rows; returns how many. When the newest row goes, its id is kept as the
    floor of new ids: a user's ``outbox retry 12`` never reaches a later delivery that
    took the id of a purged one. (Only then: the meta page is not in every commit.)"""
    newest = "SELECT max(id) FROM deliveries"
    top = c.execute(newest).fetchone()[0]
    n = c.execute(f"DELETE FROM deliveries {where}", args).rowcount
    if n and top is not None and (c.execute(newest).fetchone()[0] or 0) < top:
        c.execute("INSERT INTO outbox_meta (key, value) VALUES ('id_floor', ?) ON CONFLICT"
                  " (key) DO UPDATE SET value = max(value, excluded.value)", (top,))
    return n


def pending_rows(c: sqlite3.Connection, target: str, low: int, n: int,
                 columns: str) -> sqlite3.Cursor:
    """The first `n` pending rows of a target from id `low` on, oldest first (`columns`
    of each; ``id`` first)."""
    return c.execute(f"SELECT {columns} FROM deliveries WHERE id >= ? AND target = ?"
                     " AND status = 'pending' ORDER BY id LIMIT ?", (low, target, n))


def to_row(r: Sequence[Any]) -> Row:
    """A :data:`ROW_COLUMNS` record as a :class:`Row`."""
    return Row(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8], r[9], r[10],
               r[11], r[12], r[13])


def pending_target(c: sqlite3.Connection, row_id: int) -> str | None:
    """The target of a row that is still pending, else None."""
    r = c.execute("SELECT target FROM deliveries WHERE id = ? AND status = 'pending'",
                  (row_id,)).fetchone()
    return None if r is None else r[0]


def mark_delivered(c: sqlite3.Connection, marks: Sequence[tuple[Any, ...]]) -> int:
    """Write delivered marks (status, time, id); returns how many rows were still pending.

    A delivered row keeps its record (ids, times, attempts, the failed attempts'
    history) and gives up its payload (URL, headers, body), which nothing reads again
    (a delivered row cannot be retried). The delivering attempt is not appended to
    the history: :func:`listing` shows it from ``delivered_at`` and ``last_status``.
    Both keep a delivered row small, so one 1 KiB page holds five of them and the
    commit that adds the next row seldom has to split a page.
    """
    return c.executemany(
        "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1,"
        f" {CLEARED}, last_status = ?, last_error = NULL, delivered_at = ?,"
        " lease_until = 0 WHERE id = ? AND status = 'pending'", marks).rowcount


def record_failure(c: sqlite3.Connection, row_id: int, entry: str, error: str,
                   status: int | None, history_max: int, *,
                   next_at: float | None = None) -> int:
    """Record a failed attempt: due again at `next_at`, or dead when it is None."""
    then = "next_attempt_at = ?" if next_at is not None else "status = 'dead'"
    return c.execute(
        f"UPDATE deliveries SET attempts = attempts + 1, {HISTORY_APPEND}, {then},"
        " last_error = ?, last_status = ?, lease_until = 0 WHERE id = ? AND status = 'pending'",
        (history_max, entry, *([next_at] if next_at is not None else []), error, status,
         row_id)).rowcount


def give_up(c: sqlite3.Connection, error: str, where: str, args: tuple[Any, ...]) -> int:
    """Pending rows matching `where` become dead without an attempt."""
    return c.execute(f"UPDATE deliveries SET status = 'dead', last_error = ?, lease_until = 0"
                     f" WHERE status = 'pending' AND {where}", (error, *args)).rowcount


def requeue(c: sqlite3.Connection, now: float, where: str, args: tuple[Any, ...]) -> int:
    """Rows matching `where` become pending again, due now, with a fresh deadline, no
    attempts and no last error (their history keeps every attempt)."""
    return c.execute("UPDATE deliveries SET status = 'pending', attempts = 0,"
                     " next_attempt_at = ?, deadline = ? + max_age, lease_until = 0,"
                     f" last_error = NULL, last_status = NULL WHERE {where}",
                     (now, now, *args)).rowcount


def make_due(c: sqlite3.Connection, target: str, low: int, now: float) -> int:
    """A target's pending rows (from id `low` on) waiting past `now` become due now."""
    return c.execute("UPDATE deliveries SET next_attempt_at = ? WHERE id >= ?"
                     " AND status = 'pending' AND target = ? AND next_attempt_at > ?",
                     (now, low, target, now)).rowcount


def census(c: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
    """Rows per status, and each target's first pending id: one walk of the whole table
    (at open, and after another process wrote to the file)."""
    counts = dict.fromkeys(("pending", "delivered", "dead"), 0)
    heads: dict[str, int] = {}
    for status, target, first, n in c.execute(
            "SELECT status, target, MIN(id), COUNT(*) FROM deliveries GROUP BY status, target"):
        counts[status] += n
        if status == "pending":
            heads[target] = first
    return counts, heads


def pending_counts(c: sqlite3.Connection, low: int) -> dict[str, int]:
    """Pending rows per target (none below id `low`)."""
    return dict(c.execute("SELECT target, COUNT(*) FROM deliveries WHERE id >= ?"
                          " AND status = 'pending' GROUP BY target", (low,)))


def listing(c: sqlite3.Connection, where: str, args: tuple[Any, ...], limit: int,
            low: int) -> list[dict[str, Any]]:
    """Rows for the API and CLI, newest first; never the URL, headers or body. A pending
    row that is not the head of its target's queue says which row it waits behind
    (no pending row is below id `low`)."""
    rows = c.execute("SELECT id, webhook_id, event_id, target, status, attempts, max_attempts,"
                     " next_attempt_at, last_error, last_status, created_at, delivered_at,"
                     f" deadline, history FROM deliveries {where} ORDER BY id DESC LIMIT ?",
                     (*args, int(limit))).fetchall()
    heads = dict(c.execute("SELECT target, MIN(id) FROM deliveries WHERE id >= ?"
                           " AND status = 'pending' GROUP BY target", (low,)))
    return [{
        "waiting_behind": heads[r[3]] if r[4] == "pending" and heads.get(r[3], r[0]) < r[0]
        else None,
        "id": r[0], "webhook_id": r[1], "event_id": r[2], "target": r[3], "status": r[4],
        "attempts": r[5], "max_attempts": r[6],
        "next_attempt_at": rfc3339(r[7]) if r[4] == "pending" else None,
        "last_error": r[8], "last_status": r[9], "created_at": rfc3339(r[10]),
        "delivered_at": rfc3339(r[11]) if r[11] is not None else None,
        "deadline": rfc3339(r[12]), "history": _history(r),
    } for r in rows]


def _history(r: Sequence[Any]) -> list[dict[str, Any]]:
    """A listed row's attempts, the delivering one (not stored) included."""
    history: list[dict[str, Any]] = json.loads(r[13])
    if r[4] == "delivered" and r[11] is not None:
        history = history[1 - HISTORY_MAX:]
        history.append({"at": rfc3339(r[11]), "status": r[9], "error": None})
    return history


def delete_delivered_before(c: sqlite3.Connection, cutoff: float) -> int:
    """Delete delivered rows older than `cutoff`, along the rowid: a row delivered before
    the cutoff was created before it, so only ids below the first newer row qualify
    (reading the old rows, which are the ones to delete, and no others)."""
    first_new = c.execute("SELECT id FROM deliveries WHERE created_at >= ? ORDER BY id"
                          " LIMIT 1", (cutoff,)).fetchone()
    bound = first_new[0] if first_new else (1 << 62)
    return delete(c, "WHERE id < ? AND status = 'delivered' AND delivered_at < ?",
                  (bound, cutoff))
