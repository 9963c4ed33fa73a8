"""The outbox's SQLite file: schema and migrations, pragmas, the one-daemon lock, and
a corrupt file moved aside. outbox.py does everything with the rows.

Every index is a page a commit may rewrite, and a commit writes whole pages to the
SD card: see the comment on the schema.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path

from .errors import EdgehookError
from .outbox_sql import CLEARED

_LOG = logging.getLogger("edgehook.outbox")

BUSY_TIMEOUT_MS = 5000
SYNCHRONOUS = "FULL"         # every commit is fsynced before it returns
PAGE_SIZE = 1024             # bytes per page: a commit writes whole pages
LOCK_NAME = "edgehook.lock"

_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id              INTEGER PRIMARY KEY,  -- the rowid: a new row is the newest id
    webhook_id      TEXT    NOT NULL,     -- random (80 bits): unique without an index
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
    lease_until     REAL    NOT NULL DEFAULT 0,  -- unused: leases live in memory
    last_error      TEXT,
    last_status     INTEGER,
    delivered_at    REAL,
    history         TEXT    NOT NULL DEFAULT '[]'
);
"""
# Every index is a page a commit may rewrite, and a commit writes whole pages to the
# SD card: a new row and the delivered mark of the one before it write one table page
# and nothing else. Neither delivered nor pending rows have an index: delivered ones
# are listed and pruned along the rowid (ids grow with time), pending ones are found
# along the rowid from the first of them, which the outbox keeps in memory. Dead rows,
# rare and kept until a user acts, have a partial index.
_SCHEMA = _TABLE.format(name="deliveries") + """
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries(id) WHERE status = 'dead';
CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)
    WITHOUT ROWID;
"""
SCHEMA_VERSION = 5
# 1 -> 2 dropped an index over every row's status. 2 -> 3 rebuilds the table without
# AUTOINCREMENT (a sqlite_sequence page per insert) and the webhook_id UNIQUE index,
# and drops deliveries_delivered: two to three pages fewer per event. 3 -> 4 drops
# deliveries_pending (a page per commit), and delivered rows no longer keep their
# payload nor store their delivering attempt in the history (outbox_sql.mark_delivered),
# so five of them share a page instead of two. 4 -> 5 adds outbox_meta, where a delete
# that removes the newest row leaves the highest id given (``id_floor``): ids are never
# given twice, so an ID a user noted still names the same delivery or none.
_REBUILD = (_TABLE.format(name="deliveries_v3") +
            " INSERT INTO deliveries_v3 SELECT * FROM deliveries;"
            " DROP TABLE deliveries; ALTER TABLE deliveries_v3 RENAME TO deliveries;")
_SLIM_DELIVERED = ("UPDATE deliveries SET history = json_remove(history, '$[#-1]'),"
                   f" {CLEARED} WHERE status = 'delivered';")
_MIGRATIONS = {2: "DROP INDEX IF EXISTS deliveries_status;", 3: _REBUILD,
               4: "DROP INDEX IF EXISTS deliveries_pending; " + _SLIM_DELIVERED}


class OutboxLocked(EdgehookError):
    """Another edgehook process holds this state directory."""


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


def take_dir_lock(path: Path) -> int:
    """Hold ``<dir>/edgehook.lock`` exclusively (one daemon per state directory)."""
    lock_path = path.parent / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutboxLocked(
                f"another edgehook daemon is using the state directory {path.parent} "
                f"(it holds {lock_path})") from None
        raise
    return fd


def open_db(path: Path, exclusive: bool) -> sqlite3.Connection:
    """Connect, set the pragmas, create or migrate the schema; with `exclusive` (the
    daemon) also check the file and rewrite it with ``PAGE_SIZE`` pages. Raises
    sqlite3.DatabaseError for a file that is not a sound database."""
    created = not path.exists()
    db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000,
                         isolation_level=None, check_same_thread=False)
    try:
        if created:
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)  # rendered URLs and headers can carry tokens
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if exclusive and not created:
            _check(db)
            _resize_pages(db)
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
        db.execute("PRAGMA journal_size_limit = 4194304")  # keep the WAL file small
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'deliveries'"
                      ).fetchone() is None:
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA}"
                             f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        else:
            _migrate(db)
        if created:
            fsync_dir(path.parent)  # the new file's name survives a power cut
    except BaseException:
        db.close()
        raise
    return db

def _check(db: sqlite3.Connection) -> None:
    """Raise sqlite3.DatabaseError unless the file reads as a sound database."""
    result = db.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise sqlite3.DatabaseError(f"quick_check: {result[0] if result else 'no answer'}")

def _resize_pages(db: sqlite3.Connection) -> None:
    """Rewrite an older file with ``PAGE_SIZE`` pages (once; VACUUM needs the
    rollback journal for that, WAL is switched back on right after)."""
    if db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE:
        return
    db.execute("PRAGMA journal_mode = DELETE")
    db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    db.execute("VACUUM")
    _LOG.info("outbox: rewritten with %d-byte pages", PAGE_SIZE)

def corrupt_files(path: Path) -> list[Path]:
    """Corrupt outbox files moved aside earlier and still there."""
    return sorted(p for p in path.parent.glob(path.name + ".corrupt-*")
                  if not p.name.endswith(("-wal", "-shm")))


def open_or_replace(path: Path, exclusive: bool) -> sqlite3.Connection:
    """:func:`open_db`; for the daemon (`exclusive`), a file that is not a sound database
    is moved aside (:func:`move_aside`) and a fresh one opened. An I/O error
    (``sqlite3.OperationalError``) is raised as it is: the file may be fine."""
    try:
        return open_db(path, exclusive)
    except sqlite3.DatabaseError as exc:
        if not exclusive or isinstance(exc, sqlite3.OperationalError):
            raise
        move_aside(path, exc)
        return open_db(path, exclusive)


def move_aside(path: Path, exc: Exception) -> None:
    """Rename a corrupt outbox (and its WAL) out of the way, loudly."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(aside) + suffix))
    fsync_dir(path.parent)
    _LOG.error("OUTBOX CORRUPT: %s could not be read (%s); moved aside as %s and a fresh "
               "outbox started. Undelivered webhooks in it were NOT sent; keep the file "
               "for inspection or delete it.", path, exc, aside)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older file's schema up to SCHEMA_VERSION (the daemon does, at open)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    steps = "".join(_MIGRATIONS.get(v, "") for v in range(version + 1, SCHEMA_VERSION + 1))
    db.executescript(f"BEGIN IMMEDIATE; {steps} {_SCHEMA}"
                     f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    _LOG.info("outbox: schema version %d -> %d", version, SCHEMA_VERSION)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a file created or renamed in it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
