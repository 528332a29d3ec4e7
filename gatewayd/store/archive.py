"""The archive (`<state_dir>/archive.db`): every controller record except logs, for republishing."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from gatewayd.store.db import open_db, transaction

MIGRATIONS = [
    """
    CREATE TABLE archive(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts INTEGER NOT NULL,
        type TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE TABLE marks(name TEXT PRIMARY KEY, epoch TEXT NOT NULL, value INTEGER NOT NULL) WITHOUT ROWID
    """,
]


def open_archive(path: Path, check: bool = True) -> sqlite3.Connection:
    """`check`: move the file aside if SQLite reports it damaged (the forwarder, which owns it)."""
    return open_db(path, MIGRATIONS, check=check)


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes held by live pages (free pages are reused, so they do not count against the cap)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def insert(conn: sqlite3.Connection, rows: Sequence[tuple[int, str, str]]) -> None:
    """Archive `(ts, type, message)` rows; the caller holds the transaction."""
    conn.executemany("INSERT INTO archive(ts, type, message) VALUES (?,?,?)", rows)


def enforce_limits(conn: sqlite3.Connection, max_bytes: int, retention_days: float, chunk: int = 10000,
                   budget_s: float | None = None) -> int:
    """Delete records older than the retention, then the oldest until under the size cap.

    Records arrive roughly in time order, so age is judged from the oldest rows by id: no
    index on `ts` slows the forwarder's inserts, and a pass costs one short range scan. Each
    chunk is its own transaction, so the write lock is never held for long; with `budget_s`
    the call returns once that much time is spent (the caller comes back for the rest).
    """
    removed = 0
    deadline = time.monotonic() + budget_s if budget_s is not None else float("inf")
    cutoff = int((time.time() - retention_days * 86400) * 1000)
    for _ in range(10_000):
        with transaction(conn):
            n = conn.execute("DELETE FROM archive WHERE id IN (SELECT id FROM (SELECT id, ts FROM archive "
                             "ORDER BY id LIMIT ?) WHERE ts < ?)", (chunk, cutoff)).rowcount
        removed += n
        if n < chunk or time.monotonic() >= deadline:
            break
    for _ in range(1000):
        if time.monotonic() >= deadline or used_bytes(conn) <= max_bytes:
            break
        with transaction(conn):
            n = conn.execute("DELETE FROM archive WHERE id IN (SELECT id FROM archive ORDER BY id LIMIT ?)",
                             (chunk,)).rowcount
        removed += n
        if not n:
            break
    return removed


def count_range(conn: sqlite3.Connection, start_ms: int, end_ms: int) -> int:
    return int(conn.execute("SELECT count(*) FROM archive WHERE ts >= ? AND ts < ?",
                            (start_ms, end_ms)).fetchone()[0])


def page_range(conn: sqlite3.Connection, start_ms: int, end_ms: int, after: tuple[int, int] | None,
               limit: int) -> list[tuple[int, int, str, str]]:
    """`(id, ts, type, message)` with start <= ts < end, in (ts, id) order, after the `(ts, id)` given.

    Paging by the pair never skips records sharing a timestamp.
    """
    last_ts, last_id = after if after is not None else (start_ms, -1)
    return conn.execute("SELECT id, ts, type, message FROM archive WHERE ts >= ? AND ts < ? AND (ts, id) > (?, ?) "
                        "ORDER BY ts, id LIMIT ?", (start_ms, end_ms, last_ts, last_id, limit)).fetchall()


def discard_range(conn: sqlite3.Connection, start_ms: int, end_ms: int, batch: int = 10000) -> int:
    """Delete records with start <= ts < end in short transactions; the real number deleted."""
    count = 0
    while True:
        with transaction(conn):
            n = conn.execute("DELETE FROM archive WHERE id IN (SELECT id FROM archive WHERE ts >= ? AND ts < ? "
                             "LIMIT ?)", (start_ms, end_ms, batch)).rowcount
        count += n
        if n < batch:
            return count
