"""Faults of the controller's database, gatewayd's databases and the disk never stop the data path.

Real `gatewayd forwarder` processes, a controller in its own process, real mounts (a tmpfs
filled to the last byte, read-only bind mounts; root only). Each fault must be logged once with
its reason, shown by `gatewayctl status --json`, nothing may be moved aside that is not
damaged, and once the fault is gone every committed record is in the outbox, in order, once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.daemons import Daemon, wait_for, write_config
from tests.helpers.datapath import (
    balanced,
    can_chattr,
    can_mount,
    controller_db,
    controller_depth,
    counters,
    fill,
    immutable,
    moved_aside,
    outbox_seqs,
    read_only,
    sidecars,
    status_json,
    tmpfs,
    writer,
)

pytestmark = pytest.mark.integration
needs_root = pytest.mark.skipif(not can_mount(), reason="needs root to mount file systems")


def forwarder(base: Path, daemons: list[Daemon], **sections: dict[str, object]) -> Daemon:
    fwd = Daemon("forwarder", write_config(base, sections or None))
    daemons.append(fwd)
    return fwd


def outbox_holds(base: Path, n: int) -> bool:
    try:
        return len(outbox_seqs(base)) >= n
    except sqlite3.Error:  # not created yet
        return False


def all_arrived(base: Path, n: int) -> None:
    wait_for(lambda: outbox_holds(base, n), 60, what=f"{n} records in the outbox")
    wait_for(lambda: controller_depth(base) == 0, 30, what="the controller queue drained")
    assert outbox_seqs(base) == list(range(n))  # every committed record, in order, once
    c = counters(base)
    assert c["ingested"] == c["queued"] == n and balanced(c)


def logged_once(log: str) -> None:
    """Each fault is logged when it starts (and when it changes), never again while it lasts."""
    current = None
    faults = 0
    for line in log.splitlines():
        text = line.split(" ", 3)[-1]
        if text.endswith("; will retry"):
            assert text != current, f"logged twice: {text}"
            current = text
            faults += 1
        elif "recovered: " in text:
            current = None
    assert faults


def fault_of(base: Path, daemon: str = "forwarder") -> str:
    code, st = status_json(base / "gatewayd.toml")
    return (st.get("faults") or {}).get(daemon) or ""


@pytest.mark.parametrize("journal", ["WAL", "DELETE"])
def test_controller_transaction_open_while_the_forwarder_starts(tmp_path: Path, daemons: list[Daemon],
                                                                journal: str) -> None:
    with writer(controller_db(tmp_path), journal=journal) as w:
        w.records(range(0, 100))
        w.sql("BEGIN IMMEDIATE")
        w.records(range(100, 300))           # written, not committed yet
        fwd = forwarder(tmp_path, daemons)
        fwd.start()                          # READY although the controller holds its write lock
        wait_for(lambda: "database is locked" in fault_of(tmp_path), 30, what="the fault in gatewayctl status")
        time.sleep(2.5)                      # longer than the forwarder's busy timeout on that file
        w.sql("COMMIT")                      # the controller's COMMIT succeeds
        all_arrived(tmp_path, 300)
        w.records(range(300, 400))
        all_arrived(tmp_path, 400)
    assert moved_aside(tmp_path) == []
    assert "damaged" not in fwd.log()
    logged_once(fwd.log())


@contextlib.contextmanager
def frozen_after(fwd: Daemon, write: Callable[[], object], files: list[Path]) -> Iterator[None]:
    """With the daemon stopped (SIGSTOP), let the controller write, then make `files` immutable
    and let the daemon go on: it finds the new rows and a file it can no longer write."""
    with contextlib.ExitStack() as frozen:
        os.kill(fwd.pid, signal.SIGSTOP)
        try:
            write()
            frozen.enter_context(immutable(*files))
        finally:
            os.kill(fwd.pid, signal.SIGCONT)
        yield


@needs_root
def test_read_only_controller_file(tmp_path: Path, daemons: list[Daemon]) -> None:
    with writer(controller_db(tmp_path)) as w:
        w.records(range(0, 50))
    fwd = forwarder(tmp_path, daemons)
    with read_only(controller_db(tmp_path).parent) as mount:
        # Read-only from the start (a mount made read-only, a file the daemon may not write).
        mount.on()
        fwd.start()
        wait_for(lambda: "controller database" in fault_of(tmp_path), 30, what="the fault in gatewayctl status")
        time.sleep(2)                        # several retries
        assert fwd.log().count("will retry") == 1  # logged once, retried quietly
        assert counters(tmp_path)["ingested"] == 0
        mount.off()
        all_arrived(tmp_path, 50)
        wait_for(lambda: "recovered" in fwd.log(), 20, what="recovery logged")
    if not can_chattr(tmp_path):
        pytest.skip("the file system has no immutable flag")
    # Read-only while running: the rows are moved but cannot be deleted yet; none moves twice.
    with writer(controller_db(tmp_path)) as w:
        with frozen_after(fwd, lambda: w.records(range(50, 90)), sidecars(controller_db(tmp_path))):
            wait_for(lambda: "controller database" in fault_of(tmp_path), 30, what="the fault in gatewayctl status")
            wait_for(lambda: len(outbox_seqs(tmp_path)) == 90, 30, what="rows moved")
            time.sleep(1)
            assert controller_depth(tmp_path) == 40
        all_arrived(tmp_path, 90)
        w.records(range(90, 100))
        all_arrived(tmp_path, 100)
    assert moved_aside(tmp_path) == []
    wait_for(lambda: fault_of(tmp_path) == "", 20, what="the fault cleared")
    logged_once(fwd.log())


@needs_root
def test_queues_db_that_cannot_be_written(tmp_path: Path, daemons: list[Daemon]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "gatewayd.toml"
    fwd = forwarder(tmp_path, daemons)
    with read_only(state) as mount, writer(controller_db(tmp_path)) as w:
        mount.on()                           # the state directory read-only from the start
        fwd.start()
        w.records(range(0, 100))
        wait_for(lambda: "cannot start yet" in fault_of(tmp_path), 30, what="the start fault")
        code, st = status_json(config)
        assert code == 2 and "cannot read" in st["error"]   # no state yet, but the reason is there
        assert fwd.proc is not None and fwd.proc.poll() is None
        mount.off()
        all_arrived(tmp_path, 100)
    if not can_chattr(tmp_path):
        pytest.skip("the file system has no immutable flag")
    with writer(controller_db(tmp_path)) as w:
        with frozen_after(fwd, lambda: w.records(range(100, 300)), sidecars(state / "queues.db")):
            wait_for(lambda: "queues.db" in fault_of(tmp_path), 30, what="the fault in gatewayctl status")
            time.sleep(2)
            assert fwd.proc is not None and fwd.proc.poll() is None   # still up
            assert controller_depth(tmp_path) == 200                   # nothing taken that could not be stored
            code, st = status_json(config)
            assert code == 1 and any("queues.db" in r for r in st["degraded_reasons"])
        all_arrived(tmp_path, 300)
    assert moved_aside(tmp_path) == []
    logged_once(fwd.log())


@needs_root
def test_start_survives_a_locked_queues_db(tmp_path: Path, daemons: list[Daemon]) -> None:
    fwd = forwarder(tmp_path, daemons)
    fwd.start()
    fwd.stop()
    holder = sqlite3.connect(tmp_path / "state" / "queues.db", isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE counters SET value = value WHERE name = 'ingested'")
        holder.execute("COMMIT")             # the exclusive lock stays until the connection closes
        fwd.start()                          # READY anyway, waiting for the lock
        wait_for(lambda: "cannot start yet" in fault_of(tmp_path), 30, what="the start fault in status")
        with writer(controller_db(tmp_path)) as w:
            w.records(range(0, 100))
    finally:
        holder.close()
    all_arrived(tmp_path, 100)
    assert fwd.log().count("cannot start yet: database is locked (SQLITE_BUSY); retrying") == 1  # once
    assert moved_aside(tmp_path) == []


@needs_root
def test_disk_full_to_the_last_byte_with_a_restart(tmp_path: Path, daemons: list[Daemon]) -> None:
    mib = 1 << 20
    state = tmp_path / "state"
    with tmpfs(state, 24 * mib), writer(controller_db(tmp_path)) as w:
        fwd = forwarder(tmp_path, daemons, forwarder={"min_free_bytes": 4 * mib, "reserve_bytes": 2 * mib})
        fwd.start()
        reserve = state / ".gatewayd-reserve"
        w.records(range(0, 2000))
        all_arrived(tmp_path, 2000)
        assert reserve.exists()
        fill(state, "filler1")
        w.records(range(2000, 5000))       # committed by the controller while gatewayd's disk is full
        fwd.wait_log("released the")       # the reserve gives the small commits room ...
        fwd.wait_log("wait in the controller queue")  # ... and bulk records wait
        fill(state, "filler2")             # now really not one byte left
        assert os.statvfs(state).f_bavail == 0
        fwd.stop()
        fwd.start()                        # a restart during the full period still reaches READY
        w.records(range(5000, 6000))
        wait_for(lambda: fault_of(tmp_path) != "", 30, what="the fault in gatewayctl status")
        time.sleep(1)
        assert fwd.proc is not None and fwd.proc.poll() is None
        assert controller_depth(tmp_path) == 4000  # intact, nothing taken that could not be stored
        (state / "filler1").unlink()
        (state / "filler2").unlink()
        all_arrived(tmp_path, 6000)
        wait_for(reserve.exists, 30, what="the reserve allocated again")
        assert moved_aside(tmp_path) == []
        assert fault_of(tmp_path) == ""
        assert 1 <= fwd.log().count("wait in the controller queue") <= 2  # once per run at most
        logged_once(fwd.log())
        fwd.stop()


@pytest.mark.parametrize("case", ["running-fewer", "running-more", "stopped-more", "no-autoincrement"])
def test_table_dropped_and_recreated(tmp_path: Path, daemons: list[Daemon], case: str) -> None:
    """Ids restart at 1 in a recreated table: a new epoch, no row skipped or deleted unread."""
    fwd = forwarder(tmp_path, daemons)
    fwd.start()
    with writer(controller_db(tmp_path)) as w:
        w.records(range(0, 50))
        all_arrived(tmp_path, 50)
        if case.startswith("stopped"):
            fwd.stop()
        new = 20 if case.endswith("fewer") else 120   # ids 1..20 (below the mark) or 1..120 (past it)
        w.sql("BEGIN IMMEDIATE")
        w.sql("DROP TABLE messages")
        if case == "no-autoincrement":
            w.sql("CREATE TABLE messages (id INTEGER PRIMARY KEY, type TEXT, message TEXT)")
        else:
            w.sql("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
        ids = w.records(range(50, 50 + new))
        w.sql("COMMIT")
        assert ids[0] == 1
        if case.startswith("stopped"):
            fwd.start()
        all_arrived(tmp_path, 50 + new)
        w.records(range(50 + new, 60 + new))
        all_arrived(tmp_path, 60 + new)
    assert "recreated" in fwd.log() or "new epoch" in fwd.log()


def test_queues_db_replaced_under_the_forwarder(tmp_path: Path, daemons: list[Daemon]) -> None:
    """Another daemon may move a damaged queues.db aside: the forwarder follows the file identity."""
    fwd = forwarder(tmp_path, daemons)
    fwd.start()
    with writer(controller_db(tmp_path)) as w:
        w.records(range(0, 10))
        all_arrived(tmp_path, 10)
        q = tmp_path / "state" / "queues.db"
        for suffix in ("", "-wal", "-shm"):
            if Path(str(q) + suffix).exists():
                os.replace(str(q) + suffix, str(tmp_path / "state" / "old-queues.db") + suffix)
        fwd.wait_log("was replaced under the forwarder")
        w.records(range(10, 20))
        wait_for(lambda: outbox_seqs(tmp_path) == list(range(10, 20)), 30, what="rows in the new queues.db")
    code, st = status_json(tmp_path / "gatewayd.toml")
    assert st["stale_queues_db"] == []


def test_replaced_controller_file_is_drained_before_switching(tmp_path: Path, daemons: list[Daemon]) -> None:
    fwd = forwarder(tmp_path, daemons)
    fwd.start()
    db = controller_db(tmp_path)
    with writer(db) as w:
        w.records(range(0, 50))
        all_arrived(tmp_path, 50)
        os.kill(fwd.pid, signal.SIGSTOP)
        try:
            w.records(range(50, 80))         # committed to the old file, not yet moved
        finally:
            w.close()
            for suffix in ("", "-wal", "-shm"):
                if Path(str(db) + suffix).exists():
                    os.replace(str(db) + suffix, str(tmp_path / "controller" / "old.db") + suffix)
            with writer(db) as new:          # a new file at the same path, ids from 1 again
                new.records(range(80, 100))
            os.kill(fwd.pid, signal.SIGCONT)
    all_arrived(tmp_path, 100)
    log = fwd.log()
    assert log.index("moving what the old file still holds") < log.index("drained; switching")
