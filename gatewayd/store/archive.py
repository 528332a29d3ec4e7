"""The archive (`<state_dir>/archive.db`): every controller record except logs, for republishing."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from gatewayd import clock
from gatewayd.clock import PLAUSIBLE_SINCE_MS
from gatewayd.store.db import insert_rows, open_db, transaction

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
    # 2: how far `ts` can be trusted: 0 stamped by a clock not known to be wrong, 1 corrected by a
    # measured clock step, 2 stamped by a clock known to be wrong and not correctable (age
    # retention keeps these; only the size cap removes them).
    """
    ALTER TABLE archive ADD COLUMN clock INTEGER NOT NULL DEFAULT 0
    """,
]
CLOCK_UNCORRECTABLE = 2


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
    """Archive `(ts, type, message)` rows; the caller holds the transaction. A ts before 2025 was
    not stamped by a set clock: such a row is flagged (clock = 2), so age never removes it."""
    insert_rows(conn, "INSERT INTO archive(ts, type, message, clock) SELECT column1, column2, column3, CASE WHEN "
                f"column1 < {PLAUSIBLE_SINCE_MS} THEN {CLOCK_UNCORRECTABLE} ELSE 0 END FROM (VALUES ", "(?,?,?)",
                rows, ")")


def insert_flagged(conn: sqlite3.Connection, rows: Sequence[tuple[int, str, str, int]]) -> None:
    """Archive `(ts, type, message, clock)` rows; the caller holds the transaction."""
    insert_rows(conn, "INSERT INTO archive(ts, type, message, clock) VALUES ", "(?, ?, ?, ?)", rows)


def sequence(conn: sqlite3.Connection) -> int:
    """The highest archive id ever given (ids are never reused)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'archive'").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def fix_clock(conn: sqlite3.Connection, after_id: int, upto_id: int, lo: int, hi: int, delta: int | None,
              chunk: int = 20000) -> tuple[int, int]:
    """Correct by `delta` (or, None, flag as uncorrectable) the rows after_id < id <= upto_id not yet
    touched whose ts lies in [lo, hi]; one chunk of ids per call, its own transaction.
    Returns (rows changed, the id up to which it is done)."""
    end = min(upto_id, after_id + chunk)
    with transaction(conn):
        if delta is None:
            n = conn.execute("UPDATE archive SET clock = ? WHERE id > ? AND id <= ? AND clock = 0 AND ts BETWEEN ? "
                             "AND ?", (CLOCK_UNCORRECTABLE, after_id, end, lo, hi)).rowcount
        else:
            n = conn.execute("UPDATE archive SET ts = ts + ?, clock = 1 WHERE id > ? AND id <= ? AND clock = 0 "
                             "AND ts BETWEEN ? AND ?", (delta, after_id, end, lo, hi)).rowcount
    return n, end


def clock_counts(conn: sqlite3.Connection) -> dict[int, int]:
    """Rows per `clock` value other than 0 (a full scan: for diagnostics, not the loop)."""
    return {int(c): int(n) for c, n in conn.execute("SELECT clock, count(*) FROM archive WHERE clock != 0 "
                                                   "GROUP BY clock")}


def enforce_limits(conn: sqlite3.Connection, max_bytes: int, retention_days: float, chunk: int = 10000,
                   budget_s: float | None = None, now_ms: int | None = None, by_age: bool = True) -> int:
    """Delete records older than the retention, then the oldest until under the size cap.

    Records arrive roughly in time order, so age is judged from the oldest rows by id: no
    index on `ts` slows the forwarder's inserts, and a pass costs one short range scan. It
    goes on past rows kept because their ts is untrustworthy (`clock = 2`) and stops at the
    first chunk holding a record younger than the cutoff. `by_age=False` (the clock cannot be
    trusted now) leaves the age limit alone; the size cap always applies. Each chunk is its
    own transaction, so the write lock is never held for long; with `budget_s` the call
    returns once that much time is spent (the caller comes back for the rest).
    """
    removed = 0
    deadline = time.monotonic() + budget_s if budget_s is not None else float("inf")
    now = clock.now_ms() if now_ms is None else now_ms
    cutoff = now - int(retention_days * 86_400_000)
    after = 0
    for _ in range(10_000 if by_age else 0):
        with transaction(conn):
            head = "SELECT id, ts, clock FROM archive WHERE id > ? ORDER BY id LIMIT ?"
            last, young = conn.execute(f"SELECT max(id), count(*) FILTER (WHERE ts >= ? AND clock != 2) "
                                       f"FROM ({head})", (cutoff, after, chunk)).fetchone()
            if last is None:
                break
            n = conn.execute(f"DELETE FROM archive WHERE id IN (SELECT id FROM ({head}) WHERE ts < ? AND "
                             "clock != 2)", (after, chunk, cutoff)).rowcount
        removed += n
        after = last
        if young or time.monotonic() >= deadline:
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
