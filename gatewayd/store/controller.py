"""The controller contract database (`<controller_data_dir>/communication_queue.db`).

Its schema belongs to the controllers written for the seed gateway, so gatewayd only ever
adds what is missing (IF NOT EXISTS) and never sets `user_version` on it. The file is the
controller's: gatewayd never moves it aside, whatever SQLite says about it.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gatewayd.clock import now_ms
from gatewayd.store.db import open_db, open_readonly, schema_version, transaction

log = logging.getLogger("gatewayd.store")

T = TypeVar("T")

CREATE_SQL = """
CREATE TABLE IF NOT EXISTS messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS health_check(id INTEGER PRIMARY KEY, timestamp_ms INTEGER);
CREATE TABLE IF NOT EXISTS gatewayd_meta(key TEXT PRIMARY KEY, value TEXT)
"""

# Short: a controller inserting while we delete must never wait long, and neither must we.
CONTROLLER_BUSY_TIMEOUT_MS = 2000


@dataclass(frozen=True, slots=True)
class Oversized:
    """Stands for a value longer than the reader's limit, which was not read."""

    length: int


# One controller row as stored, whatever its SQL types: (id, type, message). `type` and
# `message` are bytes for TEXT and BLOB values (never decoded by SQLite or the driver), int /
# float for INTEGER / REAL, None for NULL, Oversized for a value too long to read. Plain
# tuples: the forwarder reads millions of them.
Value = bytes | int | float | Oversized | None
Row = tuple[int, Value, Value]
FIRST_FETCH = 32


def open_controller(path: Path) -> sqlite3.Connection:
    """Open the controller's file; errors (damage included) reach the caller, the file stays where it is."""
    conn = open_db(path, check=False, create_sql=CREATE_SQL, busy_timeout_ms=CONTROLLER_BUSY_TIMEOUT_MS)
    try:
        ensure_autoincrement(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def ensure_autoincrement(conn: sqlite3.Connection) -> bool:
    """Row ids must never be reused, or a replay after a crash could skip a new row.

    A `messages` table created without AUTOINCREMENT is rebuilt with it in one transaction;
    returns True when it was.
    """
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'").fetchone()
    if row is None or "AUTOINCREMENT" in str(row[0]).upper():
        return False
    log.warning("controller table 'messages' lacks AUTOINCREMENT; rebuilding it so row ids are never reused")
    with transaction(conn):
        conn.execute("ALTER TABLE messages RENAME TO messages_gatewayd_old")
        conn.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
        conn.execute("INSERT INTO messages(id, type, message) SELECT id, type, message FROM messages_gatewayd_old")
        conn.execute("DROP TABLE messages_gatewayd_old")
    return True


def epoch(conn: sqlite3.Connection) -> str:
    """A random id of this database file; a new file (replaced or recreated) gets a new one."""
    row = conn.execute("SELECT value FROM gatewayd_meta WHERE key = 'epoch'").fetchone()
    if row:
        return str(row[0])
    with transaction(conn):
        row = conn.execute("SELECT value FROM gatewayd_meta WHERE key = 'epoch'").fetchone()
        if row:
            return str(row[0])
        value = uuid.uuid4().hex
        conn.execute("INSERT INTO gatewayd_meta(key, value) VALUES ('epoch', ?)", (value,))
    return value


def new_epoch(conn: sqlite3.Connection) -> str:
    """Start a new epoch in the same file: its `messages` table is not the one the marks refer to."""
    value = uuid.uuid4().hex
    with transaction(conn):
        conn.execute("INSERT INTO gatewayd_meta(key, value) VALUES ('epoch', ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (value,))
    return value


def sequence(conn: sqlite3.Connection) -> int | None:
    """The AUTOINCREMENT high-water mark of `messages` (None: no row was ever inserted in this table).

    `sqlite_sequence` is an ordinary table a controller can write; for a value that is not an
    integer, SQLite's next id follows the largest one present, and so does this."""
    row = conn.execute("SELECT CASE WHEN typeof(seq) = 'integer' THEN seq ELSE (SELECT max(id) FROM messages) END "
                       "FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    return int(row[0]) if row and row[0] is not None else None


def has_rows_upto(conn: sqlite3.Connection, upto: int) -> bool:
    return conn.execute("SELECT 1 FROM messages WHERE id <= ? LIMIT 1", (upto,)).fetchone() is not None


def read_batch(conn: sqlite3.Connection, after: int, limit: int, max_value: int,
               max_total: int) -> tuple[int, list[Row]]:
    """(schema version, rows with id > after in id order), read in one snapshot.

    Values are read as stored (see `Row`); a value longer than `max_value` bytes is not read at
    all (Oversized). Memory stays bounded whatever the controller wrote: the fast path reads
    with SQLite's length limit lowered so that `limit` rows fit in `max_total` bytes; a batch
    holding a longer value is read again by the careful path, which stops after about
    `max_total` bytes.
    """
    factory = conn.text_factory
    conn.text_factory = bytes
    try:
        conn.execute("BEGIN")
        try:
            version = schema_version(conn)
            cap = max(4096, max_total // max(limit, 1))
            if cap < max_value:
                rows = _read_fast(conn, after, limit, cap)
                if rows is not None:
                    return version, rows
            return version, _read_careful(conn, after, limit, max_value, max_total)
        finally:
            conn.execute("COMMIT")
    finally:
        conn.text_factory = factory


def _read_fast(conn: sqlite3.Connection, after: int, limit: int, cap: int) -> list[Row] | None:
    """None when a value is longer than `cap` (SQLite refuses to load it: SQLITE_TOOBIG)."""
    default = conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, cap)
    try:
        return conn.execute("SELECT id, type, message FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                            (after, limit)).fetchall()
    except sqlite3.DataError:
        return None
    finally:
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, default)


def _read_careful(conn: sqlite3.Connection, after: int, limit: int, max_value: int, max_total: int) -> list[Row]:
    cur = conn.execute(
        "SELECT id, CASE WHEN length(CAST(type AS BLOB)) <= ?1 THEN type END, "
        "CASE WHEN length(CAST(message AS BLOB)) <= ?1 THEN message END, "
        "coalesce(length(CAST(type AS BLOB)), 0), coalesce(length(CAST(message AS BLOB)), 0) "
        "FROM messages WHERE id > ?2 ORDER BY id LIMIT ?3", (max_value, after, limit))
    rows: list[Row] = []
    total = 0
    size = FIRST_FETCH
    while total < max_total:
        chunk = cur.fetchmany(size)
        if not chunk:
            break
        for rid, type_, message, type_len, message_len in chunk:
            rows.append((rid, Oversized(type_len) if type_len > max_value else type_,
                         Oversized(message_len) if message_len > max_value else message))
            total += min(type_len, max_value) + min(message_len, max_value) + 64
        size = max(1, min(4096, (max_total - total) * len(rows) // max(total, 1)))
    cur.close()
    return rows


def read_prefix(conn: sqlite3.Connection, row_id: int, column: str, size: int) -> bytes | None:
    """The first `size` bytes of one value, for keeping what an oversized row held."""
    if column not in ("type", "message"):
        raise ValueError(column)
    row = conn.execute(f"SELECT substr(CAST({column} AS BLOB), 1, ?) FROM messages WHERE id = ?",
                       (size, row_id)).fetchone()
    return bytes(row[0]) if row and row[0] is not None else None


def delete_ranges(conn: sqlite3.Connection, ranges: Sequence[tuple[int, int]], expect_schema: int | None) -> bool:
    """Delete the rows moved, given as inclusive id ranges, in one short transaction.

    With `expect_schema`, nothing is deleted (False is returned) if the schema changed since the
    rows were read: the table may have been dropped and recreated, and its ids are new rows.
    """
    if not ranges:
        return True
    with transaction(conn):
        if expect_schema is not None and schema_version(conn) != expect_schema:
            return False
        conn.executemany("DELETE FROM messages WHERE id BETWEEN ? AND ?", ranges)
    return True


def enqueue(conn: sqlite3.Connection, type_: str, message: str) -> int:
    """Insert a record exactly as a controller does (used by `gatewayctl send`)."""
    with transaction(conn):
        cur = conn.execute("INSERT INTO messages(type, message) VALUES (?, ?)", (type_, message))
    return int(cur.lastrowid or 0)


def last_health_check_ms(conn: sqlite3.Connection) -> int | None:
    """Row 1 of `health_check` in epoch ms; None when missing or not a number that fits 64 bits
    (the controller writes it: `9e999`, or a 400-digit text INTEGER affinity turns into one, is
    infinity)."""
    row = conn.execute("SELECT timestamp_ms FROM health_check WHERE id = 1").fetchone()
    if not row or row[0] is None:
        return None
    try:
        value = int(row[0])   # text and blobs of digits too; an infinite REAL raises OverflowError
    except (TypeError, ValueError, OverflowError):
        return None
    return value if -(2**63) <= value < 2**63 else None


def _read_file(path: Path, read: Callable[[sqlite3.Connection], T], missing: T | None,
               busy_timeout_ms: int) -> T | None:
    """`read` on a read-only connection that waits little; `missing` without a file, None when unreadable."""
    if not path.exists():
        return missing
    try:
        conn = open_readonly(path, busy_timeout_ms)
        try:
            return read(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def read_health_check_ms(path: Path, busy_timeout_ms: int = 1000) -> int | None:
    """`last_health_check_ms` of a file, read-only and without waiting long; None when unreadable."""
    return _read_file(path, last_health_check_ms, None, busy_timeout_ms)


def depth(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


def read_depth(path: Path, busy_timeout_ms: int = 1000) -> int | None:
    """`depth` of a file, read-only and without waiting long; 0 when there is no file, None when unreadable."""
    return _read_file(path, depth, 0, busy_timeout_ms)


def touch_health(conn: sqlite3.Connection) -> None:
    """What a controller does to say it is alive (demo controller, tests)."""
    with transaction(conn):
        conn.execute("INSERT INTO health_check(id, timestamp_ms) VALUES (1, ?) "
                     "ON CONFLICT(id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms", (now_ms(),))


# -- dead letters sent back through the controller queue --------------------------------------
# The copy and a marker naming the dead letter commit together here; the dead letter is
# deleted from queues.db afterwards and the marker last. A crash in between leaves a marker,
# and the next dead-letter operation finishes the move: never lost, never queued twice.
REQUEUE_PREFIX = "requeue:"


def requeue_insert(conn: sqlite3.Connection, items: list[tuple[tuple[int, int], object, object]]) -> int:
    """Insert `(key, type, message)` rows, each unless its marker (`key` = (dead letter id,
    created_ms)) is already there; one transaction. Returns how many were inserted."""
    inserted = 0
    with transaction(conn):
        for (dl_id, created), type_, message in items:
            key = f"{REQUEUE_PREFIX}{dl_id}:{created}"
            if conn.execute("SELECT 1 FROM gatewayd_meta WHERE key = ?", (key,)).fetchone():
                continue
            cur = conn.execute("INSERT INTO messages(type, message) VALUES (?, ?)", (type_, message))
            conn.execute("INSERT INTO gatewayd_meta(key, value) VALUES (?, ?)", (key, str(cur.lastrowid)))
            inserted += 1
    return inserted


def requeue_pending(conn: sqlite3.Connection) -> list[tuple[int, int]]:
    """Markers of requeues whose dead letter may still exist: (dead letter id, created_ms)."""
    out = []
    for (key,) in conn.execute("SELECT key FROM gatewayd_meta WHERE key LIKE ?", (REQUEUE_PREFIX + "%",)):
        dl_id, _, created = key[len(REQUEUE_PREFIX):].partition(":")
        if dl_id.isdigit() and created.isdigit():
            out.append((int(dl_id), int(created)))
    return out


def requeue_forget(conn: sqlite3.Connection, keys: list[tuple[int, int]]) -> None:
    with transaction(conn):
        conn.executemany("DELETE FROM gatewayd_meta WHERE key = ?",
                         [(f"{REQUEUE_PREFIX}{i}:{c}",) for i, c in keys])
