"""What `gatewayd ingest` writes into the controller queue (`communication_queue.db`).

Ingest inserts rows exactly as a controller does (`messages(type, message)`), so the forwarder
validates, archives and counts them like any controller record. Its one addition is
`gatewayd_ingest_spool`: how far each spool file has been committed, written in the same
transaction as the file's rows, so a crash neither loses nor repeats a line.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence

from gatewayd.store.db import transaction

SPOOL_SQL = ("CREATE TABLE IF NOT EXISTS gatewayd_ingest_spool("
             "name TEXT PRIMARY KEY, ident TEXT NOT NULL, offset INTEGER NOT NULL, done INTEGER NOT NULL)")

# (type, message): message is text, or the undecodable bytes as received (the forwarder
# dead-letters those with the reason).
Row = tuple[str, "str | bytes"]
# (file name, identity "dev:ino", byte offset committed, whole file committed)
SpoolMark = tuple[str, str, int, bool]


def ensure_tables(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        conn.execute(SPOOL_SQL)


def insert_messages(conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
    """Insert as a controller does; the caller holds the transaction."""
    conn.executemany("INSERT INTO messages(type, message) VALUES (?, ?)", rows)


def depth_estimate(conn: sqlite3.Connection) -> int:
    """Rows waiting for the forwarder, from the id range (two index lookups, not a scan).

    Ids only grow and the forwarder deletes from the front, so the range is the depth,
    or more where a controller deleted rows itself.
    """
    row = conn.execute("SELECT max(id) - min(id) + 1 FROM messages").fetchone()
    return int(row[0] or 0)


def _key(name: str) -> str | bytes:
    """A file name as stored: text when it is UTF-8, else its bytes (a BLOB), so that a name
    some writer made in Latin-1 (`os.scandir` gives it lone surrogates) can be marked too."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name)
    return name


def set_spool_marks(conn: sqlite3.Connection, marks: Iterable[SpoolMark]) -> None:
    """The caller holds the transaction that inserts the marked rows."""
    conn.executemany(
        "INSERT INTO gatewayd_ingest_spool(name, ident, offset, done) VALUES (?,?,?,?) "
        "ON CONFLICT(name) DO UPDATE SET ident = excluded.ident, offset = excluded.offset, done = excluded.done",
        [(_key(name), ident, offset, int(done)) for name, ident, offset, done in marks])


def spool_marks(conn: sqlite3.Connection) -> dict[str, tuple[str, int, bool]]:
    rows = conn.execute("SELECT name, ident, offset, done FROM gatewayd_ingest_spool")
    return {os.fsdecode(name) if isinstance(name, bytes) else name: (ident, int(offset), bool(done))
            for name, ident, offset, done in rows}


def delete_spool_marks(conn: sqlite3.Connection, names: Iterable[str]) -> None:
    with transaction(conn):
        conn.executemany("DELETE FROM gatewayd_ingest_spool WHERE name = ?", [(_key(n),) for n in names])
