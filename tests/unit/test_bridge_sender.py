"""The outbox sender and the server limits without MQTT: a real queues.db, a recording publisher."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd import topics
from gatewayd.bridge.limits import ServerLimits
from gatewayd.bridge.sender import Sender
from gatewayd.store import queues
from gatewayd.store.db import transaction

T = topics.TOPIC_TELEMETRY


class Wire:
    """Stands in for the MQTT session: records publishes, hands out packet ids."""

    def __init__(self) -> None:
        self.sent: dict[int, tuple[str, str]] = {}
        self.mid = 0

    def publish(self, topic: str, payload: str) -> tuple[int, int]:
        self.mid += 1
        self.sent[self.mid] = (topic, payload)
        return 0, self.mid


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = queues.open_queues(tmp_path / "queues.db")
    yield conn
    conn.close()


def fill(db: sqlite3.Connection, n: int, first: int = 0, prio: int = queues.PRIO_TELEMETRY,
         kind: str = queues.KIND_TELEMETRY, topic: str = T) -> None:
    with transaction(db):
        queues.append(db, [(prio, kind, topic, f'{{"ts":{i},"values":{{"seq":{i}}}}}', i, 1)
                           for i in range(first, first + n)])
        queues.bump(db, {"ingested": n})


def make(db: sqlite3.Connection, max_packet: int = 65536, inflight: int = 4) -> tuple[Sender, Wire, list[str]]:
    errors: list[str] = []
    sender = Sender(db, ServerLimits("tb:1883", max_packet, inflight, 0.0), errors.append)
    wire = Wire()
    sender.begin(wire.publish, 0.0)
    return sender, wire, errors


def test_sender_and_limits_need_no_mqtt_library() -> None:
    code = ("import sys, gatewayd.bridge.sender, gatewayd.bridge.limits; "
            "sys.exit(any(m.split('.')[0] == 'paho' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_rows_are_batched_and_deleted_only_after_their_puback(db: sqlite3.Connection) -> None:
    fill(db, 1000)
    sender, wire, _ = make(db, max_packet=4096, inflight=2)
    sender.fill(0.0)
    assert len(wire.sent) == 2 and sender.window.full
    assert all(p.startswith("[") for _, p in wire.sent.values())
    assert queues.counters(db)["outbox_rows"] == 1000
    sender.on_puback(1, 0)
    sender.handle_acks(1.0)
    c = queues.counters(db)
    assert c["outbox_rows"] == 1000 - wire.sent[1][1].count('"seq"') and c["delivered"] == 1000 - c["outbox_rows"]
    for _ in range(200):
        if not sender.window.items and queues.counters(db)["outbox_rows"] == 0:
            break
        sender.fill(1.0)
        for mid in list(sender.window.items):
            sender.on_puback(mid, 0)
        sender.handle_acks(1.0)
    c = queues.counters(db)
    assert c["outbox_rows"] == 0 and c["delivered"] == 1000 and c["queued"] == 0
    seqs = [s for _, p in wire.sent.values() for s in range(1000) if f'"seq":{s}}}' in p]
    assert seqs == list(range(1000))


def test_urgent_rows_go_first_and_alone(db: sqlite3.Connection) -> None:
    fill(db, 10)
    fill(db, 1, 100, queues.PRIO_RPC_REPLY, queues.KIND_RPC_REPLY, topics.rpc_response("7"))
    sender, wire, _ = make(db)
    sender.fill(0.0)
    assert wire.sent[1][0] == topics.rpc_response("7")
    assert wire.sent[2][1].count('"seq"') == 10


def test_a_session_end_forgets_what_was_in_flight_and_resends_from_the_head(db: sqlite3.Connection) -> None:
    fill(db, 50)
    sender, wire, _ = make(db, max_packet=1024, inflight=2)
    sender.fill(0.0)
    first = wire.sent[1][1]
    lost = sender.end()
    assert len(lost) == 2 and not sender.window.items
    sender.begin(wire.publish, 5.0)
    sender.fill(5.0)
    assert wire.sent[3][1] == first


def test_no_puback_for_the_stall_timeout_is_a_stall_whether_or_not_anything_is_in_flight(
        db: sqlite3.Connection) -> None:
    sender, wire, _ = make(db)
    assert sender.stalled(1000.0, 60.0) == 0.0  # nothing to send: waiting is never a stall
    fill(db, 5)
    assert sender.stalled(1001.0, 60.0) == 0.0  # the clock starts when the rows are seen
    assert sender.stalled(1061.0, 60.0) == 0.0
    assert sender.stalled(1062.0, 60.0) == pytest.approx(61.0)  # nothing was even sent
    sender.fill(1062.0)
    assert len(wire.sent) == 1 and sender.stalled(1063.0, 60.0) == pytest.approx(62.0)
    sender.on_puback(1, 0)
    sender.handle_acks(1063.0)
    assert sender.stalled(1064.0, 60.0) == 0.0  # delivered: the outbox is empty again


def test_a_refusal_is_no_progress(db: sqlite3.Connection) -> None:
    fill(db, 5)
    sender, wire, errors = make(db)
    assert sender.stalled(0.5, 60.0) == 0.0
    sender.fill(1.0)
    sender.on_puback(1, 0x97)
    sender.handle_acks(30.0)
    assert errors and sender.stalled(61.0, 60.0) == pytest.approx(60.5)


def run_with_refusals(db: sqlite3.Connection, refuse: Callable[[str], int], steps: int = 3000,
                      accepted_any: bool = True) -> tuple[Sender, Wire]:
    """Drive a sender against a server that answers each publish at once with `refuse(payload)`."""
    sender, wire, _ = make(db, max_packet=16384, inflight=20)
    now = 0.0
    for _ in range(steps):
        now += 0.1
        sender.fill(now)
        for mid in list(sender.window.items):
            code = refuse(wire.sent[mid][1])
            sender.on_puback(mid, code)
            sender.accepted_any = sender.accepted_any and accepted_any
        sender.handle_acks(now)
        sender.stalled(now, 60.0)
        if queues.counters(db)["outbox_rows"] == 0:
            break
    return sender, wire


@settings(max_examples=25, deadline=None)
@given(bad=st.sets(st.integers(0, 2999), min_size=1, max_size=3),
       code=st.sampled_from([0x80, 0x83, 0x87, 0x90, 0x97, 0x99]))
def test_refused_records_are_isolated_and_dead_lettered_the_rest_is_delivered(bad: set[int], code: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = queues.open_queues(Path(tmp) / "q.db")
        try:
            fill(db, 3000)
            run_with_refusals(db, lambda p: code if any(f'"seq":{b}}}' in p for b in bad) else 0)
            c = queues.counters(db)
            assert c["outbox_rows"] == 0 and c["dead_lettered"] == len(bad) and c["delivered"] == 3000 - len(bad)
            assert queues.depth(db, "dead_letters") == len(bad)
        finally:
            db.close()


def test_a_server_that_refuses_everything_gets_nothing_dead_lettered(db: sqlite3.Connection) -> None:
    fill(db, 500)
    sender, wire = run_with_refusals(db, lambda p: 0x97, steps=600, accepted_any=False)
    c = queues.counters(db)
    assert c["outbox_rows"] == 500 and c["dead_lettered"] == 0 and len(wire.sent) > 10
    assert sender.stalled(61.0, 60.0) > 0  # 600 steps of 0.1 s: refusals are no progress
