"""The controller contract database (`<controller_data_dir>/communication_queue.db`).

Its schema belongs to the controllers written for the seed gateway, so gatewayd only ever
adds what is missing (IF NOT EXISTS) and never sets `user_version` on it.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gatewayd.store.db import now_ms, open_db, open_readonly, transaction

log = logging.getLogger("gatewayd.store")

T = TypeVar("T")

CREATE_SQL = """
CREATE TABLE IF NOT EXISTS messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT);
CREATE TABLE IF NOT EXISTS health_check(id INTEGER PRIMARY KEY, timestamp_ms INTEGER);
CREATE TABLE IF NOT EXISTS gatewayd_meta(key TEXT PRIMARY KEY, value TEXT)
"""

# Short: a controller inserting while we delete must never wait long, and neither must we.
CONTROLLER_BUSY_TIMEOUT_MS = 2000


def open_controller(path: Path, check: bool = True) -> sqlite3.Connection:
    conn = open_db(path, check=check, create_sql=CREATE_SQL, busy_timeout_ms=CONTROLLER_BUSY_TIMEOUT_MS)
    _ensure_autoincrement(conn)
    return conn


def _ensure_autoincrement(conn: sqlite3.Connection) -> None:
    """Row ids must never be reused, or a replay after a crash could skip a new row.

    A `messages` table created without AUTOINCREMENT is rebuilt with it in one transaction.
    """
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'").fetchone()[0]
    if "AUTOINCREMENT" in sql.upper():
        return
    log.warning("controller table 'messages' lacks AUTOINCREMENT; rebuilding it so row ids are never reused")
    with transaction(conn):
        conn.execute("ALTER TABLE messages RENAME TO messages_gatewayd_old")
        conn.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
        conn.execute("INSERT INTO messages(id, type, message) SELECT id, type, message FROM messages_gatewayd_old")
        conn.execute("DROP TABLE messages_gatewayd_old")


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


def protect_ids(conn: sqlite3.Connection, above: int) -> None:
    """Make sure the next row id the controller gets is above `above` (ids already moved)."""
    with transaction(conn):
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        if row is None:
            conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('messages', ?)", (above,))
        elif row[0] < above:
            conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'messages'", (above,))


def enqueue(conn: sqlite3.Connection, type_: str, message: str) -> int:
    """Insert a record exactly as a controller does (used by `gatewayctl send`)."""
    with transaction(conn):
        cur = conn.execute("INSERT INTO messages(type, message) VALUES (?, ?)", (type_, message))
    return int(cur.lastrowid or 0)


def last_health_check_ms(conn: sqlite3.Connection) -> int | None:
    """Row 1 of `health_check` in epoch ms; None when missing or not a number (the controller writes it)."""
    row = conn.execute("SELECT timestamp_ms FROM health_check WHERE id = 1").fetchone()
    if not row or row[0] is None:
        return None
    try:
        return int(row[0])
    except (TypeError, ValueError):
        return None


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
