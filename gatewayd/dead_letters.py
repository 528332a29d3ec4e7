"""Dead letters as a workflow (`gatewayctl dead-letters …` and the supervisor's RPCs).

list/show read only. requeue sends each dead letter back to the stage that refused it, so it
is validated again and a record that is still invalid returns to the dead letters (with a new
id, so it counts as unacknowledged again): a record the forwarder refused goes back into the
controller queue exactly as the controller stored it; one the bridge refused (for example
too large for the server) goes back into the outbox; a message from ThingsBoard the
supervisor could not handle goes back into the inbound queue. purge deletes (ledger records count as
dropped); ack marks everything present as seen, which ends the degraded state. How each
counts in the ledger is in `gatewayd.store.dead_letters`.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Sequence
from typing import Any

from gatewayd import topics
from gatewayd.config import Config
from gatewayd.store import controller as controller_store
from gatewayd.store import dead_letters as dl_store
from gatewayd.store import queues
from gatewayd.store.db import open_readonly, transaction

BATCH = 500
MAX_BATCHES = 1_000_000  # a bound on every loop; 500 million rows is far beyond any queue
LIST_TEXT_CHARS = 200
SHOW_TEXT_CHARS = 1_000_000
SHOW_RAW_BYTES = 4096

# An outbox dead letter without a stored route (dead-lettered by an older version).
DEFAULT_ROUTES = {
    queues.KIND_TELEMETRY: (queues.PRIO_TELEMETRY, topics.TOPIC_TELEMETRY),
    queues.KIND_ATTRIBUTES: (queues.PRIO_ATTRIBUTES, topics.TOPIC_ATTRIBUTES),
}


class DeadLetterError(Exception):
    """A request that cannot be carried out as asked (bad date, nothing selected)."""


def parse_before(value: Any) -> int:
    """A cut-off as epoch ms: an integer (ms), or an ISO 8601 date or date-time (local time
    unless it names an offset or Z)."""
    if isinstance(value, bool):
        raise DeadLetterError("before must be a date, a date-time or epoch milliseconds")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit() and text.isascii():  # "²" is a digit to isdigit(), not to int()
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise DeadLetterError(f"cannot read {text[:60]!r} as a date (YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS][+HH:MM]) "
                              "or epoch milliseconds") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return int(when.timestamp() * 1000)


# -- reading -------------------------------------------------------------------------------------

def _read(cfg: Config) -> sqlite3.Connection | None:
    return open_readonly(cfg.queues_db) if cfg.queues_db.exists() else None


def listing(cfg: Config, limit: int, text_chars: int = LIST_TEXT_CHARS) -> dict[str, Any]:
    """The newest `limit` dead letters (oldest of them first) and the counts."""
    conn = _read(cfg)
    if conn is None:
        return {"total": 0, "unacknowledged": 0, "acked_id": 0, "newest_id": None, "dead_letters": []}
    try:
        out = dl_store.summary(conn)
        rows = dl_store.newest(conn, limit, text_chars)
    finally:
        conn.close()
    for r in rows:
        r["acknowledged"] = r["id"] <= out["acked_id"]
        r["message_truncated"] = (r["message_length"] or 0) > len(r["message"] or "")
    out["dead_letters"] = rows
    return out


def show(cfg: Config, dl_id: int) -> dict[str, Any] | None:
    conn = _read(cfg)
    if conn is None:
        return None
    try:
        row = dl_store.get(conn, dl_id)
        seen = dl_store.acked_id(conn)
    finally:
        conn.close()
    if row is None:
        return None
    message = row.message
    if isinstance(message, bytes):
        message = message.decode("utf-8", "backslashreplace")
    return {"id": row.id, "stage": row.stage, "src_id": row.src_id, "type": row.type, "reason": row.reason,
            "created_ms": row.created_ms, "ledger_record": bool(row.counted), "topic": row.topic,
            "priority": row.priority, "acknowledged": row.id <= seen,
            "message": message if message is None or len(message) <= SHOW_TEXT_CHARS else message[:SHOW_TEXT_CHARS],
            "message_length": None if row.message is None else len(row.message),
            "raw_bytes": None if row.raw is None else len(row.raw), "raw_size": row.raw_size,
            "raw_hex": None if row.raw is None else row.raw[:SHOW_RAW_BYTES].hex()}


# -- changing --------------------------------------------------------------------------------------

class _Stores:
    """queues.db for writing, and the controller database only when a requeue needs it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.q = queues.open_queues(cfg.queues_db, check=False)
        self._ctrl: sqlite3.Connection | None = None

    def ctrl(self) -> sqlite3.Connection:
        if self._ctrl is None:
            self._ctrl = controller_store.open_controller(self.cfg.controller_db)
        return self._ctrl

    def close(self) -> None:
        for c in (self._ctrl, self.q):
            if c is not None:
                c.close()

    def finish_pending(self) -> int:
        """Complete requeues a crash interrupted between the two databases."""
        if self._ctrl is None and not self.cfg.controller_db.exists():
            return 0
        keys = controller_store.requeue_pending(self.ctrl())
        if not keys:
            return 0
        with transaction(self.q):
            n = dl_store.take_out_of_ledger(self.q, keys)
        controller_store.requeue_forget(self.ctrl(), keys)
        return n


def _selection(stores: _Stores, ids: Sequence[int] | None, before_ms: int | None) -> tuple[int, list[int]]:
    """The id ceiling of this run (rows dead-lettered while it runs are left alone) and the
    requested ids that do not exist."""
    upto = dl_store.max_id(stores.q)
    if ids is None:
        return upto, []
    have: set[int] = set()
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        have.update(r.id for r in dl_store.page(stores.q, 0, upto, len(chunk), ids=chunk))
    return upto, sorted(set(ids) - have)


def _batches(stores: _Stores, upto: int, ids: Sequence[int] | None,
             before_ms: int | None) -> Any:
    after = 0
    for _ in range(MAX_BATCHES):
        rows = dl_store.page(stores.q, after, upto, BATCH, ids=ids, before_ms=before_ms)
        if not rows:
            return
        after = rows[-1].id
        yield rows


def _check_selection(ids: Sequence[int] | None, before_ms: int | None, everything: bool) -> None:
    if ids is None and before_ms is None and not everything:
        raise DeadLetterError("name dead letters by id, or choose all of them")


def requeue(cfg: Config, ids: Sequence[int] | None) -> dict[str, Any]:
    """Requeue the dead letters `ids` (None: all of them)."""
    stores = _Stores(cfg)
    try:
        stores.finish_pending()
        upto, missing = _selection(stores, ids, None)
        via_controller = via_outbox = via_inbound = 0
        refused: list[dict[str, Any]] = []
        for rows in _batches(stores, upto, ids, None):
            controller_rows: list[tuple[dl_store.DeadLetter, object]] = []
            outbox_rows, routes, inbound_rows, payloads = [], [], [], []
            for r in rows:
                if r.stage == dl_store.STAGE_FORWARDER:
                    value, problem = dl_store.controller_value(r)
                    if problem is None:
                        controller_rows.append((r, value))
                    else:
                        refused.append({"id": r.id, "reason": problem})
                    continue
                if r.stage == dl_store.STAGE_SUPERVISOR:
                    payload = dl_store.inbound_payload(r)
                    if isinstance(payload, bytes):
                        inbound_rows.append(r)
                        payloads.append(payload)
                        continue
                    route: tuple[int, str, str] | str = payload
                else:
                    route = _outbox_route(r)
                if isinstance(route, str):
                    refused.append({"id": r.id, "reason": route})
                else:
                    outbox_rows.append(r)
                    routes.append(route)
            if controller_rows:
                via_controller += _through_controller(stores, controller_rows)
            if outbox_rows:
                via_outbox += dl_store.requeue_to_outbox(stores.q, outbox_rows, routes)
            if inbound_rows:
                via_inbound += dl_store.requeue_to_inbound(stores.q, inbound_rows, payloads)
        led = queues.ledger(queues.counters(stores.q))
    finally:
        stores.close()
    return {"requeued": via_controller + via_outbox + via_inbound, "to_controller_queue": via_controller,
            "to_outbox": via_outbox, "to_inbound": via_inbound, "refused": refused, "not_found": missing,
            "ledger": led}


def _outbox_route(r: dl_store.DeadLetter) -> tuple[int, str, str] | str:
    if not isinstance(r.message, str):
        return "its message was not kept as text"
    kind = r.type or ""
    prio, topic = DEFAULT_ROUTES.get(kind, (None, None))
    topic = r.topic or topic
    if topic is None:
        return f"its MQTT topic was not kept (a {kind or 'message'} dead-lettered by an older version)"
    priority = r.priority if r.priority is not None else prio
    return (priority if priority is not None else queues.PRIO_ATTRIBUTES), kind, topic


def _through_controller(stores: _Stores, rows: list[tuple[dl_store.DeadLetter, object]]) -> int:
    """Copy rows (with the values to insert) into the controller queue and delete them here,
    holding queues.db's write lock throughout, so no other dead-letter operation can act on
    them in between."""
    ctrl = stores.ctrl()
    keys = [(r.id, r.created_ms) for r, _ in rows]
    with transaction(stores.q):
        still = dl_store.present(stores.q, keys)
        chosen = [(r, v) for r, v in rows if (r.id, r.created_ms) in still]
        controller_store.requeue_insert(ctrl, [((r.id, r.created_ms), r.type, v) for r, v in chosen])
        n = dl_store.take_out_of_ledger(stores.q, [(r.id, r.created_ms) for r, _ in chosen])
    controller_store.requeue_forget(ctrl, keys)
    return n


def purge(cfg: Config, ids: Sequence[int] | None = None, before_ms: int | None = None,
          everything: bool = False) -> dict[str, Any]:
    """Delete the dead letters `ids`, those dead-lettered before `before_ms`, or all."""
    _check_selection(ids, before_ms, everything)
    stores = _Stores(cfg)
    try:
        stores.finish_pending()
        upto, missing = _selection(stores, ids, before_ms)
        purged = 0
        for rows in _batches(stores, upto, ids, before_ms):
            purged += dl_store.purge(stores.q, rows)
        led = queues.ledger(queues.counters(stores.q))
    finally:
        stores.close()
    return {"purged": purged, "not_found": missing, "ledger": led}


def ack(cfg: Config) -> dict[str, Any]:
    stores = _Stores(cfg)
    try:
        stores.finish_pending()
        return {**dl_store.ack(stores.q), "ledger": queues.ledger(queues.counters(stores.q))}
    finally:
        stores.close()
