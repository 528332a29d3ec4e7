"""The supervisor's side of queues.db: inbound rows, the RPC ledger, inbound dead letters.

An RPC request is taken in two transactions:
1. `begin`: the request `(rpc id, digest of the payload)` is recorded as `started`;
2. `finish`: the reply is queued in the outbox, the request marked `done` with its reply, and
   the inbound row deleted — one transaction, so a reply is queued exactly once.

After a crash between the two, the inbound row is still there and its request is `started`:
it is answered with an error ("interrupted") instead of being run a second time. A
duplicate delivery of a finished request (same id and payload, e.g. the broker redelivered
it after a bridge crash) is dropped without a second reply. The ledger keeps requests for
`rpc_dedup_window_s`: ThingsBoard reuses RPC ids after its own restart, so an old id with
another payload is a new request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from typing import Any

from gatewayd.store import queues
from gatewayd.store.db import now_ms, transaction

STAGE = "supervisor"


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:32]


def fetch_inbound(conn: sqlite3.Connection, limit: int, after: int = 0) -> list[tuple[int, str, bytes, int]]:
    rows = conn.execute("SELECT id, topic, payload, received_ms FROM inbound WHERE id > ? ORDER BY id LIMIT ?",
                        (after, limit)).fetchall()
    out = []
    for rid, topic, payload, received in rows:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        out.append((int(rid), str(topic), bytes(payload or b""), int(received or 0)))
    return out


def begin(conn: sqlite3.Connection, rpc_id: str, dig: str, method: str | None) -> tuple[str, str | None]:
    """('new' | 'started' | 'done', stored reply) — 'new' rows are now recorded as started."""
    with transaction(conn):
        row = conn.execute("SELECT state, reply FROM rpc_requests WHERE rpc_id = ? AND digest = ?",
                           (rpc_id, dig)).fetchone()
        if row is not None:
            return str(row[0]), row[1]
        now = now_ms()
        conn.execute("INSERT INTO rpc_requests(rpc_id, digest, method, state, reply, received_ms, updated_ms) "
                     "VALUES (?,?,?,?,?,?,?)", (rpc_id, dig, method, "started", None, now, now))
    return "new", None


def reply_payload(reply: dict[str, Any]) -> str:
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False, default=str)


def finish(conn: sqlite3.Connection, rpc_id: str, dig: str, method: str | None, inbound_id: int,
           reply: dict[str, Any]) -> int:
    """Queue the reply, mark the request done and delete its inbound row in one transaction.

    Returns the outbox id of the reply (0 if the request had been finished already).
    """
    payload = reply_payload(reply)
    with transaction(conn):
        row = conn.execute("SELECT state FROM rpc_requests WHERE rpc_id = ? AND digest = ?",
                           (rpc_id, dig)).fetchone()
        conn.execute("DELETE FROM inbound WHERE id = ?", (inbound_id,))
        if row is not None and row[0] == "done":
            return 0
        queues.append(conn, [(queues.PRIO_RPC_REPLY, queues.KIND_RPC_REPLY, queues.TOPIC_RPC_RESPONSE + rpc_id,
                              payload, None, 0)])
        outbox_id = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
        conn.execute("INSERT INTO rpc_requests(rpc_id, digest, method, state, reply, received_ms, updated_ms) "
                     "VALUES (?,?,?,?,?,?,?) ON CONFLICT(rpc_id, digest) DO UPDATE SET state = excluded.state, "
                     "reply = excluded.reply, updated_ms = excluded.updated_ms",
                     (rpc_id, dig, method, "done", payload, now_ms(), now_ms()))
    return outbox_id


def delete_inbound(conn: sqlite3.Connection, inbound_id: int) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inbound WHERE id = ?", (inbound_id,))


def dead_letter_inbound(conn: sqlite3.Connection, inbound_id: int, topic: str, payload: bytes, reason: str) -> None:
    """Keep a message we cannot use, with why, and take it off the inbound queue (one transaction)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = "base64:" + base64.b64encode(payload[:65536]).decode("ascii")
    with transaction(conn):
        conn.execute("DELETE FROM inbound WHERE id = ?", (inbound_id,))
        queues.add_dead_letters(conn, STAGE, [(inbound_id, topic, text[:100000], reason)])


def outbox_has(conn: sqlite3.Connection, outbox_id: int) -> bool:
    return conn.execute("SELECT 1 FROM outbox WHERE id = ?", (outbox_id,)).fetchone() is not None


def purge(conn: sqlite3.Connection, older_than_ms: int) -> int:
    with transaction(conn):
        return conn.execute("DELETE FROM rpc_requests WHERE updated_ms < ?",
                            (older_than_ms,)).rowcount
