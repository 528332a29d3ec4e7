"""The supervisor's side of queues.db: inbound rows, the RPC ledger, inbound dead letters.

An RPC request is taken in two transactions:
1. `begin`: the request `(rpc id, digest of the payload)` is recorded as `started`, with the
   inbound row that carries it;
2. `finish`: the reply is queued in the outbox, the request marked `done` with its reply, and
   the inbound row deleted — one transaction, so a reply is queued exactly once per row.

After a crash between the two, the inbound row is still there and its request is `started`:
it is answered with an error ("interrupted") instead of being run a second time. Nothing in
this module looks at the wall clock to decide that: a `started` request leaves the ledger
only by being finished (or when its inbound row is gone, `purge_orphans`). A duplicate
delivery of a finished request (same id and payload) gets the stored reply again, without
running anything. `done` requests are forgotten by `purge_done` below an inbound row id the
caller chose (the supervisor ages them by its own monotonic clock): ThingsBoard reuses RPC
ids after its own restart, so an old id must eventually become a new request.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from typing import NamedTuple

from gatewayd import topics
from gatewayd.clock import now_ms
from gatewayd.store import queues
from gatewayd.store.db import transaction

STAGE = "supervisor"
# How much of an unusable message a dead letter keeps: text, or the first bytes base64-encoded.
KEPT_TEXT_CHARS = 100_000
KEPT_BINARY_BYTES = 65_536
BASE64_PREFIX = "base64:"


class Begun(NamedTuple):
    state: str  # "new" (now recorded as started), "started" or "done"
    reply: str | None  # the stored reply of a done request
    inbound_id: int | None  # the inbound row that started (or last answered) the request


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:32]


def text(value: str) -> str:
    """`value` as storable UTF-8 text: lone surrogates become visible backslash escapes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def fetch_inbound(conn: sqlite3.Connection, limit: int, after: int = 0) -> list[tuple[int, str, bytes, int]]:
    """The oldest rows; the topic is read as bytes, so a row with a broken topic still comes out."""
    rows = conn.execute("SELECT id, CAST(topic AS BLOB), payload, received_ms FROM inbound WHERE id > ? "
                        "ORDER BY id LIMIT ?", (after, limit)).fetchall()
    out = []
    for rid, topic, payload, received in rows:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        out.append((int(rid), bytes(topic or b"").decode("utf-8", "replace"), bytes(payload or b""),
                    int(received or 0)))
    return out


def begin(conn: sqlite3.Connection, rpc_id: str, dig: str, method: str | None, inbound_id: int) -> Begun:
    """Look the request up; a new one is recorded as started by `inbound_id`."""
    with transaction(conn):
        row = conn.execute("SELECT state, reply, inbound_id FROM rpc_requests WHERE rpc_id = ? AND digest = ?",
                           (rpc_id, dig)).fetchone()
        if row is not None:
            return Begun(str(row[0]), row[1], None if row[2] is None else int(row[2]))
        now = now_ms()
        conn.execute("INSERT INTO rpc_requests(rpc_id, digest, method, state, reply, received_ms, updated_ms, "
                     "inbound_id) VALUES (?,?,?,?,?,?,?,?)",
                     (rpc_id, dig, method, "started", None, now, now, inbound_id))
    return Begun("new", None, inbound_id)


def _queue_reply(conn: sqlite3.Connection, rpc_id: str, payload: str) -> int:
    queues.append(conn, [(queues.PRIO_RPC_REPLY, queues.KIND_RPC_REPLY, topics.rpc_response(rpc_id),
                          payload, None, 0)])
    return int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])


def finish(conn: sqlite3.Connection, rpc_id: str, dig: str, method: str | None, inbound_id: int | None,
           payload: str) -> int:
    """Queue the reply (JSON text), mark the request done and delete its inbound row, in one transaction.

    `inbound_id` None: the row was in a queues.db replaced since; nothing is deleted.

    Returns the outbox id of the reply (0 if the request had been finished already: a replay).
    """
    with transaction(conn):
        row = conn.execute("SELECT state FROM rpc_requests WHERE rpc_id = ? AND digest = ?",
                           (rpc_id, dig)).fetchone()
        conn.execute("DELETE FROM inbound WHERE id = ?", (inbound_id,))
        if row is not None and row[0] == "done":
            return 0
        outbox_id = _queue_reply(conn, rpc_id, payload)
        now = now_ms()
        conn.execute("INSERT INTO rpc_requests(rpc_id, digest, method, state, reply, received_ms, updated_ms, "
                     "inbound_id) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(rpc_id, digest) DO UPDATE SET "
                     "state = excluded.state, reply = excluded.reply, updated_ms = excluded.updated_ms, "
                     "inbound_id = excluded.inbound_id",
                     (rpc_id, dig, method, "done", payload, now, now, inbound_id))
    return outbox_id


def answer_again(conn: sqlite3.Connection, rpc_id: str, inbound_id: int, payload: str) -> int:
    """A duplicate delivery of a finished request: queue the stored reply, delete the row (one transaction)."""
    with transaction(conn):
        conn.execute("DELETE FROM inbound WHERE id = ?", (inbound_id,))
        return _queue_reply(conn, rpc_id, payload)


def delete_inbound(conn: sqlite3.Connection, inbound_id: int) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM inbound WHERE id = ?", (inbound_id,))


def dead_letter_inbound(conn: sqlite3.Connection, inbound_id: int, topic: str, payload: bytes, reason: str) -> None:
    """Keep a message we cannot use, with why, and take it off the inbound queue (one transaction)."""
    try:
        body = payload.decode("utf-8")
    except UnicodeDecodeError:
        body = BASE64_PREFIX + base64.b64encode(payload[:KEPT_BINARY_BYTES]).decode("ascii")
    with transaction(conn):
        conn.execute("DELETE FROM inbound WHERE id = ?", (inbound_id,))
        queues.add_dead_letters(conn, STAGE, [(inbound_id, text(topic), body[:KEPT_TEXT_CHARS], text(reason))])


def outbox_has(conn: sqlite3.Connection, outbox_id: int) -> bool:
    return conn.execute("SELECT 1 FROM outbox WHERE id = ?", (outbox_id,)).fetchone() is not None


def last_inbound_id(conn: sqlite3.Connection) -> int:
    """The highest inbound row id ever given out (ids are never reused)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'inbound'").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def purge_done(conn: sqlite3.Connection, up_to_inbound_id: int) -> int:
    """Forget finished requests last answered for an inbound row at or below the id given."""
    with transaction(conn):
        return conn.execute("DELETE FROM rpc_requests WHERE state = 'done' AND "
                            "(inbound_id IS NULL OR inbound_id <= ?)", (up_to_inbound_id,)).rowcount


def purge_orphans(conn: sqlite3.Connection) -> int:
    """Forget started requests whose inbound row is gone (deleted by hand): nothing can answer them."""
    with transaction(conn):
        return conn.execute("DELETE FROM rpc_requests WHERE state = 'started' AND inbound_id IS NOT NULL AND "
                            "NOT EXISTS (SELECT 1 FROM inbound WHERE inbound.id = rpc_requests.inbound_id)"
                            ).rowcount
