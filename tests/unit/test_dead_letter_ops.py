"""Dead letters as a workflow, against real SQLite files and the real forwarder code:
requeue goes back to the stage that refused, purge counts as dropped, ack ends the degraded
state, and the ledger adds up after every step, also across a crash between the databases."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd import dead_letters, topics
from gatewayd.config import Config, load
from gatewayd.forwarder.service import Forwarder
from gatewayd.store import controller as controller_store
from gatewayd.store import dead_letters as dl_store
from gatewayd.store import queues
from gatewayd.store import rpc as rpc_store
from gatewayd.store.db import open_db, transaction
from gatewayd.supervisor import commands
from gatewayd.supervisor.jobs import Jobs
from tests.helpers.daemons import write_config

GOOD = json.dumps({"ts": 1_700_000_000_000, "values": {"t": 1}})
BAD = ["not json", '{"ts": 1}', '{"values": {"a": 1}}', "[1, 2]", None]


class World:
    """A forwarder (in-process, real code) and the paths of its databases."""

    def __init__(self, base: Path):
        self.cfg: Config = load(write_config(base, {"forwarder": {"batch_size": 50}}), env={})
        self.fwd = Forwarder(self.cfg)
        self.fwd.start()

    @property
    def q(self) -> sqlite3.Connection:
        assert self.fwd.queues is not None
        return self.fwd.queues

    def insert(self, *messages: Any, type_: str = "telemetry") -> None:
        assert self.fwd.ctrl is not None
        self.fwd.ctrl.executemany("INSERT INTO messages(type, message) VALUES (?, ?)", [(type_, m) for m in messages])

    def forward(self) -> None:
        for _ in range(100):
            if not self.fwd.move_batch():
                return

    def counters(self) -> dict[str, int]:
        return queues.counters(self.q)

    def dead(self) -> list[dl_store.DeadLetter]:
        return dl_store.page(self.q, 0, 1 << 62, 10_000)

    def controller_rows(self) -> list[tuple[Any, Any]]:
        assert self.fwd.ctrl is not None
        return self.fwd.ctrl.execute("SELECT type, message FROM messages ORDER BY id").fetchall()

    def close(self) -> None:
        self.fwd.stop()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def balanced(c: dict[str, int]) -> bool:
    return c["ingested"] == c["delivered"] + c["queued"] + c["dead_lettered"] + c["dropped"]


def test_requeue_through_the_controller_queue(world: World) -> None:
    world.insert(GOOD, "not json", '{"ts": 1}')
    world.forward()
    assert [d.reason for d in world.dead()] == ["message is not valid JSON: Expecting value: line 1 column 1 (char 0)",
                                               "'values' is missing"]
    before = world.counters()
    ids = [d.id for d in world.dead()]
    out = dead_letters.requeue(world.cfg, ids)
    assert (out["requeued"], out["to_controller_queue"], out["not_found"]) == (2, 2, [])
    assert out["ledger"]["balanced"] and balanced(world.counters())
    # exactly what the controller stored, once, in order; out of the ledger until read again
    assert world.controller_rows() == [("telemetry", "not json"), ("telemetry", '{"ts": 1}')]
    assert world.dead() == []
    c = world.counters()
    assert (c["ingested"], c["dead_lettered"], c["requeued"]) == (before["ingested"] - 2, 0, 2)
    # the forwarder validates them again: still invalid, so back in the dead letters (new ids)
    world.forward()
    again = world.dead()
    assert len(again) == 2 and min(d.id for d in again) > max(ids)
    c = world.counters()
    assert balanced(c) and (c["ingested"], c["dead_lettered"]) == (before["ingested"], 2)


def test_a_requeue_cut_by_a_crash_between_the_databases_is_finished_once(world: World) -> None:
    world.insert("not json")
    world.forward()
    (d,) = world.dead()
    assert world.fwd.ctrl is not None
    # what a crash leaves: the copy and its marker committed, the dead letter not yet deleted
    controller_store.requeue_insert(world.fwd.ctrl, [((d.id, d.created_ms), d.type, d.message)])
    assert balanced(world.counters())
    # a second requeue of it (or any other dead-letter operation) finishes the move first
    out = dead_letters.requeue(world.cfg, [d.id])
    assert out["requeued"] == 0 and out["not_found"] == [d.id]
    assert world.controller_rows() == [("telemetry", "not json")]  # one copy, not two
    assert world.dead() == [] and controller_store.requeue_pending(world.fwd.ctrl) == []
    c = world.counters()
    assert balanced(c) and c["dead_lettered"] == 0 and c["requeued"] == 1
    # a marker whose dead letter is gone (crash after the delete) is just forgotten
    controller_store.requeue_insert(world.fwd.ctrl, [((999, 1), "telemetry", "x")])
    assert dead_letters.ack(world.cfg)["total"] == 0
    assert controller_store.requeue_pending(world.fwd.ctrl) == []


def test_requeue_keeps_the_exact_bytes_and_refuses_what_was_kept_in_part(world: World) -> None:
    """A value that is not UTF-8 goes back byte for byte; one too large to read whole was kept
    only in part (its first bytes), so it cannot go back."""
    huge = "x" * (world.fwd.max_message + 10)
    world.insert(b"\xff\xfe not text", huge)
    world.forward()
    dead = world.dead()
    assert [d.raw_size is not None for d in dead] == [True, True]
    out = dead_letters.requeue(world.cfg, None)
    assert out["requeued"] == 1 and len(out["refused"]) == 1
    assert out["refused"][0]["reason"] == (f"only the first {len(dead[1].raw or b'')} of its "
                                           f"{len(huge)} bytes were kept")
    assert world.controller_rows() == [("telemetry", b"\xff\xfe not text")]
    world.forward()
    again = world.dead()
    assert {d.raw for d in again} >= {b"\xff\xfe not text"} and balanced(world.counters())


def _outbox_dead_letter(q: sqlite3.Connection, kind: str, topic: str, payload: str, counted: int,
                        priority: int) -> None:
    with transaction(q):
        queues.append(q, [(priority, kind, topic, payload, None, counted)])
        if counted:
            queues.bump(q, {"ingested": counted})
    row = queues.peek(q, 1)[0]
    queues.dead_letter_outbox(q, row, "the server refused this record", "bridge")


def test_requeue_of_what_the_bridge_refused_goes_back_to_the_outbox(world: World) -> None:
    q = world.q
    _outbox_dead_letter(q, "telemetry", topics.TOPIC_TELEMETRY, GOOD, 1, queues.PRIO_TELEMETRY)
    _outbox_dead_letter(q, "rpc_reply", topics.rpc_response("7"), '{"ok":1}', 0, queues.PRIO_RPC_REPLY)
    c = world.counters()
    assert balanced(c) and c["dead_lettered"] == 1 and c["outbox_rows"] == 0
    out = dead_letters.requeue(world.cfg, None)
    assert (out["requeued"], out["to_outbox"]) == (2, 2)
    rows = {(r.kind, r.topic, r.payload, r.priority, r.counted) for r in queues.peek(q, 10)}
    assert rows == {("telemetry", topics.TOPIC_TELEMETRY, GOOD, 0, 1),
                    ("rpc_reply", topics.rpc_response("7"), '{"ok":1}', queues.PRIO_RPC_REPLY, 0)}
    c = world.counters()
    assert balanced(c) and (c["dead_lettered"], c["queued"], c["outbox_rows"]) == (0, 1, 2)


def test_requeue_of_a_thingsboard_message_goes_back_to_inbound(world: World) -> None:
    q = world.q
    for payload in (b'{"method": "ping"}', b"\xff\xfe binary"):
        queues.put_inbound(q, "v1/devices/me/rpc/request/3", payload)
        rid = q.execute("SELECT max(id) FROM inbound").fetchone()[0]
        rpc_store.dead_letter_inbound(q, rid, "v1/devices/me/rpc/request/3", payload, "handler failed")
    # kept only in part: not requeued
    big = b"\xff" * (rpc_store.KEPT_BINARY_BYTES + 1)
    queues.put_inbound(q, "v1/x", big)
    rpc_store.dead_letter_inbound(q, q.execute("SELECT max(id) FROM inbound").fetchone()[0], "v1/x", big, "no")
    before = world.counters()
    out = dead_letters.requeue(world.cfg, None)
    assert out["to_inbound"] == 2 and [r["reason"] for r in out["refused"]] == [
        f"only the first {rpc_store.KEPT_BINARY_BYTES} bytes of its message were kept"]
    assert q.execute("SELECT topic, payload FROM inbound ORDER BY id").fetchall() == [
        ("v1/devices/me/rpc/request/3", b'{"method": "ping"}'), ("v1/devices/me/rpc/request/3", b"\xff\xfe binary")]
    after = world.counters()
    assert {k: after[k] for k in queues.LEDGER} == {k: before[k] for k in queues.LEDGER}  # not ledger records


def test_purge_counts_ledger_records_as_dropped(world: World) -> None:
    world.insert(*[m for m in BAD if m is not None], GOOD)
    world.forward()
    _outbox_dead_letter(world.q, "rpc_reply", topics.rpc_response("1"), "{}", 0, queues.PRIO_RPC_REPLY)
    dead = world.dead()
    assert len(dead) == 5
    out = dead_letters.purge(world.cfg, [dead[0].id, 12345])
    assert (out["purged"], out["not_found"]) == (1, [12345]) and out["ledger"]["balanced"]
    assert world.counters()["dropped"] == 1
    # before a date: none are that old; all of them are younger than tomorrow
    assert dead_letters.purge(world.cfg, before_ms=dead_letters.parse_before("2000-01-01"))["purged"] == 0
    tomorrow = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    assert dead_letters.purge(world.cfg, before_ms=dead_letters.parse_before(tomorrow))["purged"] == 4
    c = world.counters()
    assert balanced(c) and (c["dead_lettered"], c["dropped"], c["purged"]) == (0, 4, 5)  # the reply was no record
    with pytest.raises(dead_letters.DeadLetterError):
        dead_letters.purge(world.cfg)


def test_ack_is_a_watermark(world: World) -> None:
    world.insert("x", "y")
    world.forward()
    s = dl_store.summary(world.q)
    assert (s["total"], s["unacknowledged"]) == (2, 2)
    out = dead_letters.ack(world.cfg)
    assert (out["total"], out["unacknowledged"], out["acked_id"]) == (2, 0, s["newest_id"])
    listed = dead_letters.listing(world.cfg, 10)
    assert all(r["acknowledged"] for r in listed["dead_letters"])
    world.insert("z")
    world.forward()
    assert dl_store.summary(world.q)["unacknowledged"] == 1  # a new one is news again
    # a requeued record that fails again is news again too
    dead_letters.ack(world.cfg)
    dead_letters.requeue(world.cfg, [world.dead()[0].id])
    world.forward()
    assert dl_store.summary(world.q)["unacknowledged"] == 1


def test_listing_and_show_cut_long_messages(world: World) -> None:
    world.insert("x" * 5000)
    world.forward()
    (row,) = dead_letters.listing(world.cfg, 5)["dead_letters"]
    assert len(row["message"]) == dead_letters.LIST_TEXT_CHARS and row["message_truncated"]
    shown = dead_letters.show(world.cfg, row["id"])
    assert shown is not None and shown["message"] == "x" * 5000 and shown["ledger_record"] is True
    assert dead_letters.show(world.cfg, 99999) is None


def _rpc_context(cfg: Config) -> commands.Context:
    def unused() -> Any:
        raise AssertionError("dead_letters_list needs only the config")
    return commands.Context(cfg=cfg, jobs=cast(Jobs, None), controller=None, uptime_s=unused,
                            status_report=unused, sw_report=unused, init_files=unused, devices=unused,
                            reply_budget=16_384)


def test_rpc_listing_withholds_raw_records_under_a_privacy_policy(world: World, tmp_path: Path) -> None:
    """A dead letter is the record before the policy: the RPC reply (to ThingsBoard) must not carry
    it once a policy is configured; the device's own gatewayctl still shows it."""
    world.insert('{"ts": 1, "values": {"operator": "Jane Doe"}, "extra": ')
    world.forward()
    plain = commands.m_dead_letters_list(_rpc_context(world.cfg), {})
    assert isinstance(plain, dict) and "Jane Doe" in plain["dead_letters"][0]["message"]
    for policy in ({"rules": [{"match": "operator", "action": "drop"}]}, {"drop_record_if": ["operator"]}):
        cfg = load(write_config(tmp_path, {"forwarder": {"batch_size": 50}, "privacy": policy}), env={})
        out = commands.m_dead_letters_list(_rpc_context(cfg), {"limit": 5})
        assert isinstance(out, dict) and out["total"] == 1
        (row,) = out["dead_letters"]
        assert row["message"] is None and "privacy" in row["message_withheld"], row
        assert "Jane Doe" not in json.dumps(out) and row["reason"]
        shown = dead_letters.show(cfg, row["id"])
        assert shown is not None and "Jane Doe" in shown["message"]


def test_migration_keeps_old_dead_letters_and_their_ledger(tmp_path: Path) -> None:
    """A queues.db from before the workflow: controller records stay ledger records, an
    RPC reply refused by the bridge does not."""
    path = tmp_path / "queues.db"
    conn = open_db(path, queues.MIGRATIONS[:3])
    conn.execute("INSERT INTO dead_letters(stage, src_id, type, message, reason, created_ms) VALUES "
                 "('forwarder', 1, 'telemetry', 'x', 'bad', 1), ('bridge', 2, 'rpc_reply', '{}', 'big', 2), "
                 "('bridge', 3, 'telemetry', '{}', 'big', 3)")
    conn.execute("UPDATE counters SET value = 2 WHERE name IN ('ingested', 'dead_lettered')")
    conn.close()
    q = queues.open_queues(path)
    assert q.execute("SELECT stage, type, counted FROM dead_letters ORDER BY id").fetchall() == [
        ("forwarder", "telemetry", 1), ("bridge", "rpc_reply", 0), ("bridge", "telemetry", 1)]
    assert queues.counters(q)["requeued"] == 0
    q.close()


@given(st.one_of(st.text(max_size=40), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
                 st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1)).map(
                     lambda d: d.isoformat())))
@settings(max_examples=300, deadline=None)
def test_parse_before_takes_dates_and_ms_and_refuses_the_rest(value: Any) -> None:
    try:
        ms = dead_letters.parse_before(value)
    except dead_letters.DeadLetterError:
        assert not isinstance(value, int) or isinstance(value, bool)
        return
    assert isinstance(ms, int)
    if isinstance(value, str) and "T" in value:
        assert ms == int(dt.datetime.fromisoformat(value).astimezone().timestamp() * 1000)


def test_parse_before_offsets() -> None:
    assert dead_letters.parse_before("2024-05-01T00:00:00Z") == 1_714_521_600_000
    assert dead_letters.parse_before("2024-05-01T02:00:00+02:00") == 1_714_521_600_000
    assert dead_letters.parse_before(" 1714521600000 ") == 1_714_521_600_000


OPS = st.sampled_from(["bad", "good", "forward", "deliver", "requeue_one", "requeue_all", "purge_one",
                       "purge_all", "purge_before", "ack", "bridge_refuses"])


@given(st.lists(st.tuples(OPS, st.integers(0, 3)), min_size=1, max_size=25))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_ledger_adds_up_after_any_sequence(tmp_path_factory: pytest.TempPathFactory,
                                               steps: list[tuple[str, int]]) -> None:
    w = World(tmp_path_factory.mktemp("seq"))
    inserted = 0
    try:
        for op, n in steps:
            dead = w.dead()
            if op == "bad":
                w.insert(*[BAD[(n + i) % len(BAD)] for i in range(n + 1)])
                inserted += n + 1
            elif op == "good":
                w.insert(*[GOOD] * (n + 1))
                inserted += n + 1
            elif op == "forward":
                w.forward()
            elif op == "deliver":
                queues.mark_delivered(w.q, [r.id for r in queues.peek(w.q, n + 1)])
            elif op == "bridge_refuses":
                rows = queues.peek(w.q, 1)
                if rows:
                    queues.dead_letter_outbox(w.q, rows[0], "refused", "bridge")
            elif op == "requeue_one" and dead:
                dead_letters.requeue(w.cfg, [dead[n % len(dead)].id])
            elif op == "requeue_all":
                dead_letters.requeue(w.cfg, None)
            elif op == "purge_one" and dead:
                dead_letters.purge(w.cfg, [dead[n % len(dead)].id])
            elif op == "purge_all":
                dead_letters.purge(w.cfg, everything=True)
            elif op == "purge_before" and dead:
                dead_letters.purge(w.cfg, before_ms=dead[n % len(dead)].created_ms)
            elif op == "ack":
                dead_letters.ack(w.cfg)
            c = w.counters()
            assert balanced(c), (op, c)
            s = dl_store.summary(w.q)
            counted = w.q.execute("SELECT coalesce(sum(counted), 0) FROM dead_letters").fetchone()[0]
            assert counted == c["dead_lettered"] and 0 <= s["unacknowledged"] <= s["total"]
            assert c["queued"] == w.q.execute("SELECT coalesce(sum(counted), 0) FROM outbox").fetchone()[0]
        w.forward()
        c = w.counters()
        # every record counted once as ingested, however often it was requeued
        assert balanced(c) and c["ingested"] == inserted
    finally:
        w.close()
