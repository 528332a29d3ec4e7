"""The gateway's own queues (`<state_dir>/queues.db`): outbox, inbound, dead letters, ledger, state.

Every write to the outbox goes through this module so that the counters kept beside it
(`outbox_rows`, `outbox_bytes`, and the ledger's `queued`) change in the same transaction
as the rows they count.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from gatewayd.clock import now_ms
from gatewayd.redact import redact
from gatewayd.store.db import insert_rows, open_db, transaction

KIND_TELEMETRY = "telemetry"
KIND_ATTRIBUTES = "attributes"
KIND_RPC_REPLY = "rpc_reply"
KIND_RAW = "raw"

PRIO_LOG = -10  # gatewayd's own log lines: bulk rows (sent in id order), never in the ledger
PRIO_TELEMETRY = 0
PRIO_ATTRIBUTES = 50
PRIO_RPC_REPLY = 100

LEDGER = ("ingested", "archived", "delivered", "dead_lettered", "dropped", "queued")
STATS = ("outbox_rows", "outbox_bytes", "inbound_total", "published")

MIGRATIONS = [
    """
    CREATE TABLE outbox(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        priority INTEGER NOT NULL DEFAULT 0,
        kind TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload TEXT NOT NULL,
        ts INTEGER,
        created_ms INTEGER NOT NULL,
        counted INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX outbox_urgent ON outbox(priority DESC, id) WHERE priority > 0;
    CREATE TABLE inbound(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        received_ms INTEGER NOT NULL
    );
    CREATE TABLE dead_letters(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        stage TEXT NOT NULL,
        src_id INTEGER,
        type TEXT,
        message TEXT,
        reason TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE marks(name TEXT PRIMARY KEY, epoch TEXT NOT NULL, value INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE state(key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_ms INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO counters(name, value) VALUES
        ('ingested', 0), ('archived', 0), ('delivered', 0), ('dead_lettered', 0), ('dropped', 0),
        ('queued', 0), ('outbox_rows', 0), ('outbox_bytes', 0), ('inbound_total', 0), ('published', 0)
    """,
    # 2: the supervisor's RPC ledger. A request is marked 'started' before it runs and 'done'
    # in the transaction that queues its reply and deletes its inbound row, so a reply is
    # never lost nor sent twice, and a command cut short by a crash is not run again.
    """
    CREATE TABLE rpc_requests(
        rpc_id TEXT NOT NULL,
        digest TEXT NOT NULL,
        method TEXT,
        state TEXT NOT NULL,
        reply TEXT,
        received_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (rpc_id, digest)
    ) WITHOUT ROWID;
    CREATE INDEX rpc_requests_updated ON rpc_requests(updated_ms)
    """,
    # 3: the inbound row that started (then last answered) each request. A started request is
    # recognised by its row, never by its age, so no clock step can make it look new.
    """
    ALTER TABLE rpc_requests ADD COLUMN inbound_id INTEGER
    """,
    # 4: a dead letter keeps what the controller stored even when it is not text: `raw` holds
    # the exact bytes (a prefix of `raw_size` bytes for an oversized value), `message` a
    # readable rendering.
    """
    ALTER TABLE dead_letters ADD COLUMN raw BLOB;
    ALTER TABLE dead_letters ADD COLUMN raw_size INTEGER
    """,
    # 5: what a dead letter needs to go back where it came from (its outbox topic and
    # priority) and whether it is a ledger record (controller data) or one of gatewayd's
    # own messages; counters of the dead-letter workflow. Older rows from the bridge are
    # taken as ledger records when they were telemetry/attributes and the ledger has room.
    """
    ALTER TABLE dead_letters ADD COLUMN counted INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE dead_letters ADD COLUMN topic TEXT;
    ALTER TABLE dead_letters ADD COLUMN priority INTEGER;
    UPDATE dead_letters SET counted = 0 WHERE stage != 'forwarder' AND (type NOT IN ('telemetry', 'attributes')
        OR (SELECT value FROM counters WHERE name = 'dead_lettered')
           <= (SELECT count(*) FROM dead_letters WHERE stage = 'forwarder'));
    INSERT OR IGNORE INTO counters(name, value) VALUES ('requeued', 0), ('purged', 0)
    """,
]


@dataclass(frozen=True)
class OutboxRow:
    id: int
    priority: int
    kind: str
    topic: str
    payload: str
    counted: int


# (priority, kind, topic, payload, ts, counted)
NewRow = tuple[int, str, str, str, int | None, int]
_PAYLOAD, _COUNTED = itemgetter(3), itemgetter(5)


@dataclass(slots=True)
class DeadLetter:
    """A record refused with its reason; `raw` when `message` cannot hold the stored value exactly."""

    src_id: int | None
    type: str | None
    message: str | None
    reason: str
    raw: bytes | None = None
    raw_size: int | None = None


def open_queues(path: Path, check: bool = True) -> sqlite3.Connection:
    return open_db(path, MIGRATIONS, check=check)


def bump(conn: sqlite3.Connection, deltas: dict[str, int]) -> None:
    """Add to counters (a name not seen before starts at 0); call inside the transaction that made
    the change being counted."""
    conn.executemany("INSERT INTO counters(name, value) VALUES (?, ?) "
                     "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                     [(k, v) for k, v in deltas.items() if v])


DROPPED_PREFIX = "dropped."  # `dropped.<reason>`: the part of `dropped` each reason accounts for


def dropped_by_reason(c: dict[str, int]) -> dict[str, int]:
    """`{reason: count}` from `counters()` (records dropped before reasons were counted have none)."""
    return {k[len(DROPPED_PREFIX):]: v for k, v in sorted(c.items()) if k.startswith(DROPPED_PREFIX)}


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    return {name: int(value) for name, value in conn.execute("SELECT name, value FROM counters")}


def ledger(c: dict[str, int]) -> dict[str, Any]:
    """The ledger part of `counters()`, and whether it adds up
    (ingested = delivered + queued + dead_lettered + dropped)."""
    out: dict[str, Any] = {k: c.get(k, 0) for k in ("ingested", "delivered", "queued", "dead_lettered", "dropped",
                                                     "archived")}
    out["balanced"] = out["ingested"] == out["delivered"] + out["queued"] + out["dead_lettered"] + out["dropped"]
    return out


def append(conn: sqlite3.Connection, rows: Sequence[NewRow], created_ms: int | None = None) -> None:
    """Insert outbox rows; the caller holds the transaction."""
    if not rows:
        return
    created = created_ms if created_ms is not None else now_ms()
    insert_rows(conn, "INSERT INTO outbox(created_ms, priority, kind, topic, payload, ts, counted) SELECT ?1, "
                "column1, column2, column3, column4, column5, column6 FROM (VALUES ", "(?,?,?,?,?,?)", rows, ")",
                (created,))
    bump(conn, {
        "outbox_rows": len(rows),
        "outbox_bytes": sum(map(len, map(_PAYLOAD, rows))),
        "queued": sum(map(_COUNTED, rows)),
    })


def enqueue(conn: sqlite3.Connection, kind: str, topic: str, payload: str, priority: int,
            ts: int | None = None) -> None:
    """Queue one message of the gateway's own (an RPC reply, device telemetry) durably."""
    with transaction(conn):
        append(conn, [(priority, kind, topic, payload, ts, 0)])


def peek(conn: sqlite3.Connection, limit: int, min_priority: int | None = None) -> list[OutboxRow]:
    """The next rows to send: highest priority first, then oldest.

    Urgent rows (priority > 0) have a partial index of their own, so the telemetry stream,
    read in rowid order, pays for no index on insert.
    """
    rows = [OutboxRow(*r) for r in conn.execute(
        "SELECT id, priority, kind, topic, payload, counted FROM outbox WHERE priority > 0 "
        "ORDER BY priority DESC, id LIMIT ?", (limit,))]
    if min_priority is not None:
        return [r for r in rows if r.priority >= min_priority]
    if len(rows) < limit:
        rows.extend(OutboxRow(*r) for r in conn.execute(
            "SELECT id, priority, kind, topic, payload, counted FROM outbox WHERE priority <= 0 "
            "ORDER BY id LIMIT ?", (limit - len(rows),)))
    return rows


def _delete(conn: sqlite3.Connection, ids: Iterable[int]) -> tuple[int, int, int]:
    """Delete rows by id; (rows, bytes, counted rows) actually deleted."""
    cur = conn.execute(
        "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?)) RETURNING length(payload), counted",
        (json.dumps(list(ids)),))
    n = size = counted = 0
    for length, c in cur:
        n += 1
        size += length
        counted += c
    return n, size, counted


def mark_delivered(conn: sqlite3.Connection, ids: Iterable[int]) -> int:
    """Remove rows the broker acknowledged; returns how many were still there."""
    with transaction(conn):
        n, size, counted = _delete(conn, ids)
        _count_delivered(conn, n, size, counted)
    return n


def _count_delivered(conn: sqlite3.Connection, rows: int, size: int, counted: int) -> None:
    bump(conn, {"outbox_rows": -rows, "outbox_bytes": -size, "queued": -counted,
                "delivered": counted, "published": rows})


def dead_letter_outbox(conn: sqlite3.Connection, row: OutboxRow, reason: str, stage: str) -> None:
    """Move an outbox row that can never be published to the dead letters, with why."""
    with transaction(conn):
        n, size, counted = _delete(conn, [row.id])
        if not n:
            return
        conn.execute(
            "INSERT INTO dead_letters(stage, src_id, type, message, reason, created_ms, counted, topic, priority) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (stage, row.id, row.kind, row.payload, reason, now_ms(), counted, row.topic, row.priority))
        bump(conn, {"outbox_rows": -1, "outbox_bytes": -size, "queued": -counted, "dead_lettered": counted})


def add_dead_letters(conn: sqlite3.Connection, stage: str,
                     items: Sequence[tuple[int | None, str | None, str | None, str]]) -> None:
    """(src_id, type, message, reason) rows; the caller holds the transaction and the counters.
    The forwarder's are controller records, in the ledger; any other stage's are gatewayd's own."""
    created = now_ms()
    counted = 1 if stage == "forwarder" else 0
    conn.executemany(
        "INSERT INTO dead_letters(stage, src_id, type, message, reason, created_ms, counted) VALUES (?,?,?,?,?,?,?)",
        [(stage, s, t, m, r, created, counted) for s, t, m, r in items])


def add_controller_dead_letters(conn: sqlite3.Connection, stage: str, items: Sequence[DeadLetter]) -> None:
    """Dead letters with the raw value kept; the caller holds the transaction and the counters."""
    created = now_ms()
    conn.executemany(
        "INSERT INTO dead_letters(stage, src_id, type, message, reason, created_ms, raw, raw_size) "
        "VALUES (?,?,?,?,?,?,?,?)",
        [(stage, d.src_id, d.type, d.message, d.reason, created, d.raw, d.raw_size) for d in items])


def over_caps(conn: sqlite3.Connection, max_rows: int, max_bytes: int) -> bool:
    c = counters(conn)
    return c["outbox_rows"] > max_rows or c["outbox_bytes"] > max_bytes


def enforce_caps(conn: sqlite3.Connection, max_rows: int, max_bytes: int, chunk: int = 5000,
                 budget_s: float | None = None) -> int:
    """Drop the oldest telemetry until the outbox fits its caps; attributes and replies are kept.

    One transaction per chunk, so the write lock is never held for long whatever the backlog;
    with `budget_s` the call returns once that much time is spent (call again for the rest).
    Returns the number of rows dropped (each counted in `dropped` when it was a ledger row).
    """
    dropped = 0
    deadline = time.monotonic() + budget_s if budget_s is not None else float("inf")
    for _ in range(1_000_000):
        with transaction(conn):
            c = counters(conn)
            rows, size = c["outbox_rows"], c["outbox_bytes"]
            if rows <= max_rows and size <= max_bytes:
                break
            want = max(rows - max_rows, 1)
            if size > max_bytes:
                want = max(want, min(chunk, -(-(size - max_bytes) // max(1, size // max(rows, 1)))))
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM outbox WHERE priority <= ? AND kind = ? ORDER BY id LIMIT ?",
                (PRIO_TELEMETRY, KIND_TELEMETRY, min(want, chunk)))]
            if not ids:
                break
            n, nbytes, counted = _delete(conn, ids)
            bump(conn, {"outbox_rows": -n, "outbox_bytes": -nbytes, "queued": -counted, "dropped": counted,
                        DROPPED_PREFIX + "outbox_cap": counted})
        dropped += n
        if time.monotonic() >= deadline:
            break
    return dropped


def set_state(conn: sqlite3.Connection, key: str, value: Any) -> None:
    """Small JSON facts other processes read (connection state, last error)."""
    conn.execute("INSERT INTO state(key, value, updated_ms) VALUES (?,?,?) "
                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
                 (key, json.dumps(value), now_ms()))


def record_error(conn: sqlite3.Connection, daemon: str, text: str) -> None:
    """Remember a daemon's last error (`<daemon>.last_error`), which `gatewayctl status` shows."""
    with transaction(conn):
        set_state(conn, f"{daemon}.last_error", {"message": redact(text), "ms": now_ms()})


def last_error(state: dict[str, Any], daemon: str) -> str | None:
    """The message `record_error` left, from `all_state()`."""
    return (state.get(f"{daemon}.last_error") or {}).get("message")


def record_status(conn: sqlite3.Connection, daemon: str, text: str) -> None:
    """Remember what a daemon is doing (its STATUS= line, `<daemon>.status`) for `gatewayctl status`."""
    with transaction(conn):
        set_state(conn, f"{daemon}.status", {"text": redact(text), "ms": now_ms()})


def daemon_report(state: dict[str, Any], daemon: str) -> dict[str, Any]:
    """What `record_status` and `record_error` left for one daemon, from `all_state()`."""
    status = state.get(f"{daemon}.status") or {}
    error = state.get(f"{daemon}.last_error") or {}
    return {"doing": status.get("text"), "doing_ms": status.get("ms"),
            "last_error": error.get("message"), "last_error_ms": error.get("ms")}


def get_state(conn: sqlite3.Connection, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else default


def all_state(conn: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM state")}


def put_inbound(conn: sqlite3.Connection, topic: str, payload: bytes) -> None:
    """Keep one message from ThingsBoard durably; the bridge acknowledges it only after this."""
    with transaction(conn):
        conn.execute("INSERT INTO inbound(topic, payload, received_ms) VALUES (?,?,?)",
                     (topic, payload, now_ms()))
        bump(conn, {"inbound_total": 1})


def depth(conn: sqlite3.Connection, table: str) -> int:
    """Rows in the inbound or dead-letter table (small tables; the outbox has a counter)."""
    if table not in ("inbound", "dead_letters"):
        raise ValueError(table)
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def oldest_created_ms(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT min(created_ms) FROM (SELECT created_ms FROM outbox ORDER BY id LIMIT 1)"
                       ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


# -- the bridge's fast path (additive; see gatewayd/bridge) ------------------------------------

def next_urgent_priority(conn: sqlite3.Connection, below: int | None = None) -> int | None:
    """The highest urgent priority (> 0) present (below `below` when given): a partial-index seek."""
    if below is None:
        row = conn.execute("SELECT max(priority) FROM outbox WHERE priority > 0").fetchone()
    else:
        row = conn.execute("SELECT max(priority) FROM outbox WHERE priority > 0 AND priority < ?",
                           (below,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def max_urgent_id(conn: sqlite3.Connection, priority: int) -> int:
    """The newest row id of one urgent priority (0 when none): a partial-index seek."""
    row = conn.execute("SELECT max(id) FROM outbox WHERE priority > 0 AND priority = ?", (priority,)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def peek_after(conn: sqlite3.Connection, priority: int | None, after_id: int,
               limit: int) -> list[tuple[int, int, str, str, str]]:
    """Rows with id > after_id, oldest first, as plain tuples `(id, priority, kind, topic, payload)`
    (no per-row objects: the bridge reads millions): one urgent priority (> 0), or with
    `priority=None` the bulk rows (priority <= 0) in rowid order, like `peek`."""
    if priority is None:
        return conn.execute(
            "SELECT id, priority, kind, topic, payload FROM outbox WHERE priority <= 0 AND id > ? "
            "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
    return conn.execute(
        "SELECT id, priority, kind, topic, payload FROM outbox WHERE priority > 0 AND priority = ? AND id > ? "
        "ORDER BY priority DESC, id LIMIT ?", (priority, after_id, limit)).fetchall()


def mark_delivered_ranges(conn: sqlite3.Connection, ranges: Iterable[tuple[int, int, int]]) -> int:
    """Remove acknowledged rows given as `(priority, first_id, last_id)` ranges, in one transaction.

    A range must cover exactly the rows of that priority that were sent together: ids are never
    reused (AUTOINCREMENT), so no row can appear inside a range after it was read.
    Returns how many rows were still there.
    """
    total = size = counted = 0
    with transaction(conn):
        for prio, first, last in ranges:
            n, s, c = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(sum(counted), 0) FROM outbox "
                "WHERE priority = ? AND id BETWEEN ? AND ?", (prio, first, last)).fetchone()
            if n:
                conn.execute("DELETE FROM outbox WHERE priority = ? AND id BETWEEN ? AND ?",
                             (prio, first, last))
            total += n
            size += s
            counted += c
        _count_delivered(conn, total, size, counted)
    return total


def outbox_kind(conn: sqlite3.Connection, row_id: int) -> str | None:
    """The kind of one outbox row, None when it is gone."""
    row = conn.execute("SELECT kind FROM outbox WHERE id = ?", (row_id,)).fetchone()
    return str(row[0]) if row else None


def save_state(conn: sqlite3.Connection, key: str, value: Any) -> None:
    """`set_state` in a transaction of its own."""
    with transaction(conn):
        set_state(conn, key, value)
