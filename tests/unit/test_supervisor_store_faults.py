"""The supervisor object when queues.db fails or is replaced under it, on real SQLite files.

A write lock held by another connection (SQLITE_BUSY), a database that may not grow
(`max_page_count`: SQLITE_FULL) and a file renamed aside are real faults of SQLite; the test
plays the bridge on its own connection. The supervisor must stay healthy, report each fault once,
keep what it could not store (an RPC reply, telemetry) and store it once the fault is gone: a
request that ran is answered with its real reply, never as "interrupted".
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd import topics
from gatewayd.config import load
from gatewayd.store import queues
from gatewayd.store.db import file_identity, transaction
from gatewayd.store.space import reserve_path
from gatewayd.supervisor.service import Supervisor
from tests.helpers.daemons import wait_for, write_config

RPC = "v1/devices/me/rpc/request/"


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    cfg = load(write_config(tmp_path, {
        "supervisor": {"udev": False, "telemetry_interval_s": 3600, "run_command_allow": ["/bin/sleep *"]},
        "files": {"check_interval_s": 3600}}), env={})
    s = Supervisor(cfg)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def bridge(sup: Supervisor) -> Iterator[sqlite3.Connection]:
    """The bridge's connection to the same queues.db."""
    conn = queues.open_queues(sup.cfg.queues_db, check=False)
    try:
        yield conn
    finally:
        conn.close()


def replies(conn: sqlite3.Connection, rpc_id: int) -> list[dict[str, object]]:
    return [json.loads(p) for (p,) in conn.execute("SELECT payload FROM outbox WHERE topic = ? ORDER BY id",
                                                   (f"v1/devices/me/rpc/response/{rpc_id}",))]


def inbound_ids(conn: sqlite3.Connection) -> list[int]:
    return [r for (r,) in conn.execute("SELECT id FROM inbound ORDER BY id")]


def retry_now(sup: Supervisor) -> tuple[bool, float]:
    sup.faults.retry_at = 0.0
    return sup.step()


def faults_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().endswith("; will retry")]


def test_a_reply_that_cannot_be_stored_waits_and_is_never_turned_into_interrupted(
        sup: Supervisor, bridge: sqlite3.Connection, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gatewayd")
    run = json.dumps({"method": "run_command", "params": {"command": "/bin/sleep 0.3"}}).encode()
    queues.put_inbound(bridge, RPC + "7", run)
    sup.step()                                     # started (recorded), running in the background
    assert sup.rpc.pending
    locker = sqlite3.connect(sup.cfg.queues_db, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")          # another process holds the write lock
        assert sup.conn is not None
        sup.conn.execute("PRAGMA busy_timeout = 50")
        ping = json.dumps({"method": "ping"}).encode()
        deadline = time.monotonic() + 10
        while sup.rpc.pending and time.monotonic() < deadline:
            healthy, _ = sup.step()                # the reply cannot be committed: kept
            assert healthy
            time.sleep(0.05)
        assert not sup.rpc.pending and len(sup.rpc.unsent) == 1
        assert "database is locked" in (sup.health()["fault"] or "")
        assert sup.status().startswith("queues.db: database is locked")
        sup.publish_telemetry({"during": 1})       # what a component queues meanwhile is kept too
        for _ in range(5):
            healthy, wait = retry_now(sup)
            assert healthy and 0 < wait <= 10
        assert len(faults_logged(caplog)) == 1     # reported once
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    queues.put_inbound(bridge, RPC + "8", ping)
    queues.put_inbound(bridge, RPC + "7", run)     # ThingsBoard delivers the request again
    retry_now(sup)
    sup.step()
    assert sup.health()["fault"] is None
    first = replies(bridge, 7)
    assert first[0]["exit_code"] == 0 and "interrupted" not in json.dumps(first)  # the real reply
    assert first == [first[0], first[0]]           # the duplicate got the same reply, nothing ran twice
    assert replies(bridge, 8)[0]["pong"] is True
    assert inbound_ids(bridge) == []
    telemetry = [json.loads(p) for (p,) in bridge.execute("SELECT payload FROM outbox WHERE topic = ?",
                                                          (topics.TOPIC_TELEMETRY,))]
    assert any(t["values"] == {"during": 1} for t in telemetry)
    assert any(r.getMessage().startswith("recovered: queues.db: database is locked") for r in caplog.records)
    error = queues.get_state(bridge, "supervisor.last_error")["message"]
    assert error.startswith("recovered: queues.db: database is locked")


def test_a_full_database_releases_the_reserve_and_nothing_queued_is_lost(
        sup: Supervisor, bridge: sqlite3.Connection, caplog: pytest.LogCaptureFixture) -> None:
    reserve = reserve_path(sup.cfg.state_dir)
    reserve.write_bytes(b"\0" * 65536)
    assert sup.conn is not None
    pages = sup.conn.execute("PRAGMA page_count").fetchone()[0]
    sup.conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL for anything that needs a page
    sup.publish_telemetry({"pad": "x" * 20000})  # a component's telemetry: it needs pages
    queues.put_inbound(bridge, RPC + "1", json.dumps({"method": "ping"}).encode())
    for _ in range(4):
        healthy, _ = retry_now(sup)
        assert healthy
    assert "database or disk is full" in (sup.health()["fault"] or "")
    assert not reserve.exists()                    # released for the small commits that matter
    assert len(faults_logged(caplog)) == 1
    assert inbound_ids(bridge) != []               # the request waits where it is
    sup.conn.execute("PRAGMA max_page_count = 1073741823")  # space returns
    retry_now(sup)
    sup.step()
    assert sup.health()["fault"] is None
    assert replies(bridge, 1)[0]["pong"] is True and inbound_ids(bridge) == []
    assert bridge.execute("SELECT count(*) FROM outbox WHERE payload LIKE '%xxxxxxxxxx%'").fetchone()[0] == 1


def test_a_replaced_queues_db_is_followed_and_old_ids_touch_nothing_in_the_new_file(
        sup: Supervisor, bridge: sqlite3.Connection, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gatewayd")
    path = sup.cfg.queues_db
    run = json.dumps({"method": "run_command", "params": {"command": "/bin/sleep 0.5"}}).encode()
    queues.put_inbound(bridge, RPC + "7", run)
    sup.step()
    assert [p.inbound_id for p in sup.rpc.pending] == [1]
    # another daemon moves the file aside and starts a new one: ids start at 1 again
    bridge.close()
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            os.replace(f"{path}{suffix}", f"{path}.corrupt-test{suffix}")
    new = queues.open_queues(path)
    try:
        queues.put_inbound(new, RPC + "9", json.dumps({"method": "ping"}).encode())
        queues.put_inbound(new, RPC + "10", json.dumps({"method": "ping"}).encode())
        sup.step()
        assert "was replaced under the supervisor" in caplog.text
        assert sup.health()["files"]["queues.db"] == file_identity(path)
        wait_for(lambda: sup.step() and not sup.rpc.pending, 10, what="the command's reply")
        assert replies(new, 7)[0]["exit_code"] == 0  # the reply still goes out, from the new file
        assert replies(new, 9)[0]["pong"] is True and replies(new, 10)[0]["pong"] is True
        assert inbound_ids(new) == []              # answered, none deleted unanswered
    finally:
        new.close()


def test_replies_not_stored_survive_a_restart_of_the_supervisor(
        sup: Supervisor, bridge: sqlite3.Connection) -> None:
    """Stopped while queues.db takes no writes (a restart during a full disk): the reply waits in the
    runtime directory and the next run stores it, instead of answering "interrupted"."""
    run = json.dumps({"method": "run_command", "params": {"command": "/bin/sleep 0.2"}}).encode()
    queues.put_inbound(bridge, RPC + "5", run)
    sup.step()
    locker = sqlite3.connect(sup.cfg.queues_db, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        assert sup.conn is not None
        sup.conn.execute("PRAGMA busy_timeout = 50")
        wait_for(lambda: sup.step() and sup.rpc.unsent, 10, what="a reply that cannot be stored")
        sup.stop()
        kept = sup.cfg.runtime_dir / "supervisor.replies.json"
        assert kept.exists()
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    again = Supervisor(sup.cfg)
    again.start()
    try:
        assert not kept.exists() and len(again.rpc.unsent) == 1
        again.step()
        assert replies(bridge, 5)[0]["exit_code"] == 0      # the real reply, once
        assert len(replies(bridge, 5)) == 1 and inbound_ids(bridge) == []
    finally:
        again.stop()


def test_a_queues_db_found_damaged_while_running_is_moved_aside_and_a_new_one_started(
        sup: Supervisor, bridge: sqlite3.Connection, caplog: pytest.LogCaptureFixture) -> None:
    """Real damage (pages overwritten on disk), found by the supervisor: only this moves a file aside."""
    with transaction(bridge):
        bridge.executemany("INSERT INTO inbound(topic, payload, received_ms) VALUES (?, ?, 0)",
                           [("some/other/topic", b"x" * 500) for _ in range(3000)])
    bridge.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path = sup.cfg.queues_db
    sup.q.close()
    data = bytearray(path.read_bytes())
    data[4096 * 3:4096 * 6] = b"\x5a" * (4096 * 3)
    path.write_bytes(bytes(data))
    sup.step()                                      # opens (page 1 is intact), reads the inbound rows
    moved = [p for p in path.parent.glob("queues.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(moved) == 1                          # kept for forensics
    assert "SQLITE_CORRUPT" in caplog.text
    new = queues.open_queues(path)
    try:
        queues.put_inbound(new, RPC + "3", json.dumps({"method": "ping"}).encode())
        retry_now(sup)
        sup.step()
        assert sup.health()["fault"] is None and sup.health()["files"]["queues.db"] == file_identity(path)
        assert replies(new, 3)[0]["pong"] is True
    finally:
        new.close()
