"""The dead-letter table of `queues.db` as an operator works it: list, show, requeue, purge, ack.

Ledger rules (the ledger adds up after every transaction here):
- purge: a ledger record leaves `dead_lettered` for `dropped` (`purged` counts purges);
- requeue to the outbox (a record the bridge refused): it leaves `dead_lettered` for `queued`;
- requeue through the controller queue (a record the forwarder refused): it leaves the ledger
  (`ingested` and `dead_lettered` each go down by one; `requeued` counts it) and the
  forwarder counts it in again as ingested when it reads it back, so `ingested` counts each
  record once however often it was requeued;
- ack moves a watermark (state `dead_letters.acked_id`): rows at or below it are seen.
gatewayd's own messages (counted = 0) move without touching the ledger.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gatewayd.clock import now_ms
from gatewayd.store import rpc
from gatewayd.store.db import transaction
from gatewayd.store.queues import append, bump, get_state, set_state

ACKED_KEY = "dead_letters.acked_id"
STAGE_FORWARDER = "forwarder"  # controller records: back into the controller queue
STAGE_SUPERVISOR = rpc.STAGE  # messages from ThingsBoard: back into the inbound queue


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    stage: str
    src_id: int | None
    type: str | None
    message: Any
    reason: str
    created_ms: int
    counted: int
    topic: str | None
    priority: int | None
    raw: bytes | None  # the exact bytes when `message` cannot hold them; a prefix if raw_size is larger
    raw_size: int | None


_COLUMNS = "id, stage, src_id, type, message, reason, created_ms, counted, topic, priority, raw, raw_size"


def controller_value(row: DeadLetter) -> tuple[object, str | None]:
    """(what the controller stored, as exactly as it was kept; why it cannot be requeued)."""
    if row.raw is not None:
        if row.raw_size is not None and row.raw_size > len(row.raw):
            return None, f"only the first {len(row.raw)} of its {row.raw_size} bytes were kept"
        return row.raw, None
    return row.message, None


def inbound_payload(row: DeadLetter) -> bytes | str:
    """The bytes of a message from ThingsBoard as its dead letter kept them, or why they
    cannot be had whole."""
    message = row.message
    if not isinstance(message, str) or not row.type:
        return "its message or topic was not kept"
    if message.startswith(rpc.BASE64_PREFIX):
        try:
            payload = base64.b64decode(message[len(rpc.BASE64_PREFIX):], validate=True)
        except ValueError:
            return "its message is not valid base64"
        if len(payload) >= rpc.KEPT_BINARY_BYTES:
            return f"only the first {rpc.KEPT_BINARY_BYTES} bytes of its message were kept"
        return payload
    if len(message) >= rpc.KEPT_TEXT_CHARS:
        return f"only the first {rpc.KEPT_TEXT_CHARS} characters of its message were kept"
    return message.encode()


def acked_id(conn: sqlite3.Connection) -> int:
    value = get_state(conn, ACKED_KEY, 0)
    return value if isinstance(value, int) else 0


def summary(conn: sqlite3.Connection) -> dict[str, Any]:
    """Counts for status: all dead letters, those not yet acknowledged, the watermark."""
    seen = acked_id(conn)
    total, unacked, newest = conn.execute(
        "SELECT count(*), coalesce(sum(id > ?), 0), max(id) FROM dead_letters", (seen,)).fetchone()
    return {"total": int(total), "unacknowledged": int(unacked), "acked_id": seen,
            "newest_id": None if newest is None else int(newest)}


def newest(conn: sqlite3.Connection, limit: int, text_chars: int) -> list[dict[str, Any]]:
    """The `limit` newest dead letters, oldest of them first, message cut to `text_chars`."""
    rows = conn.execute(
        "SELECT id, stage, src_id, type, substr(CAST(message AS TEXT), 1, ?), length(message), reason, "
        "created_ms, counted, length(raw), raw_size FROM dead_letters ORDER BY id DESC LIMIT ?",
        (text_chars, limit)).fetchall()
    keys = ("id", "stage", "src_id", "type", "message", "message_length", "reason", "created_ms", "counted",
            "raw_bytes", "raw_size")
    return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]


def get(conn: sqlite3.Connection, dl_id: int) -> DeadLetter | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM dead_letters WHERE id = ?", (dl_id,)).fetchone()
    return DeadLetter(*row) if row else None


def page(conn: sqlite3.Connection, after_id: int, upto_id: int, limit: int,
         ids: Sequence[int] | None = None, before_ms: int | None = None) -> list[DeadLetter]:
    """Dead letters with after_id < id <= upto_id in id order, optionally only `ids` or those
    dead-lettered before `before_ms`."""
    sql = f"SELECT {_COLUMNS} FROM dead_letters WHERE id > ? AND id <= ?"
    args: list[Any] = [after_id, upto_id]
    if ids is not None:
        sql += " AND id IN (SELECT value FROM json_each(?))"
        args.append(json.dumps(list(ids)))
    if before_ms is not None:
        sql += " AND created_ms < ?"
        args.append(before_ms)
    return [DeadLetter(*r) for r in conn.execute(sql + " ORDER BY id LIMIT ?", (*args, limit))]


def _delete(conn: sqlite3.Connection, keys: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Delete rows given as (id, created_ms) — both must match, so a replaced database's
    rows are never taken for the ones meant; (rows, ledger rows) deleted."""
    n = counted = 0
    for (c,) in conn.execute(
            "DELETE FROM dead_letters WHERE (id, created_ms) IN "
            "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)) RETURNING counted",
            (json.dumps([list(k) for k in keys]),)):
        n += 1
        counted += c
    return n, counted


def purge(conn: sqlite3.Connection, rows: Sequence[DeadLetter]) -> int:
    """Delete dead letters for good; ledger records count as dropped."""
    with transaction(conn):
        n, counted = _delete(conn, [(r.id, r.created_ms) for r in rows])
        bump(conn, {"dead_lettered": -counted, "dropped": counted, "dropped.purged": counted, "purged": n})
    return n


def requeue_to_outbox(conn: sqlite3.Connection, rows: Sequence[DeadLetter],
                      routes: Sequence[tuple[int, str, str]]) -> int:
    """Put dead letters back into the outbox, `routes[i]` = (priority, kind, topic) of `rows[i]`,
    in the transaction that deletes them; rows already gone are skipped."""
    with transaction(conn):
        requeued = 0
        for row, (priority, kind, topic) in zip(rows, routes, strict=True):
            n, counted = _delete(conn, [(row.id, row.created_ms)])
            if not n:
                continue
            append(conn, [(priority, kind, topic, str(row.message), None, counted)])
            bump(conn, {"dead_lettered": -counted, "requeued": 1})
            requeued += 1
    return requeued


def requeue_to_inbound(conn: sqlite3.Connection, rows: Sequence[DeadLetter], payloads: Sequence[bytes]) -> int:
    """Put messages from ThingsBoard back into the inbound queue, `payloads[i]` of `rows[i]`, in
    the transaction that deletes them (they are not ledger records)."""
    with transaction(conn):
        requeued = 0
        for row, payload in zip(rows, payloads, strict=True):
            n, _ = _delete(conn, [(row.id, row.created_ms)])
            if n:
                conn.execute("INSERT INTO inbound(topic, payload, received_ms) VALUES (?,?,?)",
                             (row.type, payload, now_ms()))
                requeued += 1
        bump(conn, {"requeued": requeued})
    return requeued


def present(conn: sqlite3.Connection, keys: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    """Which of the (id, created_ms) keys are still dead letters."""
    return {(int(i), int(c)) for i, c in conn.execute(
        "SELECT id, created_ms FROM dead_letters WHERE (id, created_ms) IN "
        "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))",
        (json.dumps([list(k) for k in keys]),))}


def take_out_of_ledger(conn: sqlite3.Connection, keys: Sequence[tuple[int, int]]) -> int:
    """The queues.db half of a requeue through the controller queue (whose copy is committed):
    delete the dead letters and take them out of the ledger. The caller holds the transaction."""
    n, counted = _delete(conn, keys)
    bump(conn, {"ingested": -counted, "dead_lettered": -counted, "requeued": n})
    return n


def ack(conn: sqlite3.Connection) -> dict[str, Any]:
    """Mark every dead letter present as seen; returns the new summary."""
    with transaction(conn):
        row = conn.execute("SELECT max(id) FROM dead_letters").fetchone()
        if row[0] is not None and int(row[0]) > acked_id(conn):
            set_state(conn, ACKED_KEY, int(row[0]))
    return summary(conn)


def max_id(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(id) FROM dead_letters").fetchone()
    return int(row[0]) if row and row[0] is not None else 0
