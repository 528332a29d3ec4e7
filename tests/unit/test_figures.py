"""The ledger and queue figures sent as telemetry: the numbers `gatewayctl status` shows, adding up."""

from __future__ import annotations

from pathlib import Path

from gatewayd import topics
from gatewayd.store import dead_letters as dl_store
from gatewayd.store import figures, queues
from gatewayd.store.db import transaction


def test_telemetry_figures_add_up_and_match_the_ledger(tmp_path: Path) -> None:
    conn = queues.open_queues(tmp_path / "queues.db")
    try:
        rows = [(queues.PRIO_TELEMETRY, queues.KIND_TELEMETRY, topics.TOPIC_TELEMETRY, f'{{"ts":{i},"values":{{}}}}',
                 i, 1) for i in range(10)]
        with transaction(conn):
            queues.append(conn, rows, created_ms=1_000)
            queues.add_dead_letters(conn, "forwarder", [(11, "telemetry", "x", "not JSON")])
            queues.bump(conn, {"ingested": 11, "dead_lettered": 1})
        queues.put_inbound(conn, "v1/devices/me/attributes", b"{}")
        queues.mark_delivered(conn, [r.id for r in queues.peek(conn, 4)])
        with transaction(conn):
            queues.append(conn, [(queues.PRIO_RPC_REPLY, queues.KIND_RPC_REPLY, "r", "{}", None, 0)])  # not a record
        queues.enforce_caps(conn, 6, 10**9)  # drops 1 record: 5 records + 1 reply remain
        r = figures.read(conn)
        ledger = queues.ledger(queues.counters(conn))
    finally:
        conn.close()
    t = r.telemetry(controller=7, now_ms=31_000)
    assert t == {"gw_ingested": 11, "gw_delivered": 4, "gw_queued": 5, "gw_dead_lettered": 1, "gw_dropped": 1,
                 "gw_archived": 0, "gw_queue_outbox": 6, "gw_queue_inbound": 1, "gw_queue_dead_letters": 1,
                 "gw_queue_dead_letters_unacknowledged": 1,
                 "gw_queue_controller": 7, "gw_oldest_queued_age_s": 30.0, "gw_dropped_outbox_cap": 1}
    assert t["gw_ingested"] == t["gw_delivered"] + t["gw_queued"] + t["gw_dead_lettered"] + t["gw_dropped"]
    assert ledger["balanced"] and all(t[f"gw_{k}"] == v for k, v in ledger.items() if k != "balanced")
    assert "gw_queue_controller" not in r.telemetry(controller=None, now_ms=31_000)


def test_acknowledged_dead_letters_are_no_longer_counted_as_unacknowledged(tmp_path: Path) -> None:
    conn = queues.open_queues(tmp_path / "queues.db")
    try:
        with transaction(conn):
            queues.add_dead_letters(conn, "forwarder", [(1, "telemetry", "x", "not JSON"), (2, "telemetry", "y", "no")])
        first = figures.read(conn).telemetry(controller=None, now_ms=0)
        dl_store.ack(conn)
        with transaction(conn):
            queues.add_dead_letters(conn, "forwarder", [(3, "telemetry", "z", "not JSON")])
        later = figures.read(conn).telemetry(controller=None, now_ms=0)
    finally:
        conn.close()
    assert (first["gw_queue_dead_letters"], first["gw_queue_dead_letters_unacknowledged"]) == (2, 2)
    assert (later["gw_queue_dead_letters"], later["gw_queue_dead_letters_unacknowledged"]) == (3, 1)
