"""The bridge object itself when queues.db takes no writes at start (another process holds its write
lock past the busy timeout): it starts anyway, says why, waits with a backoff without touching the
file in between, and carries on once the lock is gone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gatewayd.bridge.service import Bridge
from gatewayd.config import load
from gatewayd.store import queues
from gatewayd.store.db import file_identity
from tests.helpers.brokers import free_port
from tests.helpers.daemons import write_config


def test_a_state_database_that_takes_no_writes_at_start_is_waited_out(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path, {"thingsboard": {"host": "127.0.0.1", "port": free_port(),
                                                       "access_token": "t"}}), env={})
    queues.open_queues(cfg.queues_db).close()
    locker = sqlite3.connect(cfg.queues_db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    bridge = Bridge(cfg)
    bridge.start()  # waits out the busy timeout once, then gives up for now
    try:
        assert bridge.store.faulted
        assert bridge.status().startswith("state database unavailable: database is locked (SQLITE_BUSY)")
        assert bridge.status().startswith(bridge.health()["fault"])
        assert bridge.health()["files"]["queues.db"] == file_identity(cfg.queues_db)  # open, takes no writes
        healthy, wait = bridge.step()
        assert healthy and 0 < wait <= 1.0  # a backoff, and the loop (and watchdog) go on
        assert bridge.store.faulted
        locker.execute("ROLLBACK")
        bridge.store.retry_at = 0.0
        bridge.step()
        assert not bridge.store.faulted and bridge.db is not None
        assert bridge.health()["fault"] is None
        # what went wrong reached `gatewayctl status` once the database took writes
        error = queues.get_state(bridge.db, "bridge.last_error")
        assert "state database unavailable: database is locked" in error["message"]
        assert queues.get_state(bridge.db, "bridge.mqtt")["connected"] is False
    finally:
        locker.close()
        bridge.stop()


def test_a_damaged_state_database_is_moved_aside_and_a_new_one_used(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path, {"thingsboard": {"host": "127.0.0.1", "port": free_port(),
                                                       "access_token": "t"}}), env={})
    conn = queues.open_queues(cfg.queues_db)
    for i in range(2000):
        queues.save_state(conn, f"filler.{i}", "x" * 500)    # the pages the bridge reads at start
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(cfg.queues_db.read_bytes())
    data[4096 * 2:] = b"\x5a" * (len(data) - 4096 * 2)    # all but the schema
    cfg.queues_db.write_bytes(bytes(data))
    bridge = Bridge(cfg)
    bridge.start()                                            # page 1 is intact: it opens, then reads
    try:
        assert bridge.store.faulted and "SQLITE_CORRUPT" in (bridge.health()["fault"] or "")
        assert [p.name for p in tmp_path.glob("state/queues.db.corrupt-*") if p.name[-4:] not in ("-wal", "-shm")]
        bridge.store.retry_at = 0.0
        bridge.step()
        assert not bridge.store.faulted
        assert bridge.health()["files"]["queues.db"] == file_identity(cfg.queues_db)  # the new file
        assert queues.get_state(bridge.db, "bridge.mqtt")["connected"] is False
    finally:
        bridge.stop()
