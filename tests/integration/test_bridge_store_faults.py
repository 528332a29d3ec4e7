"""The bridge when its state database fails: a full disk (a small tmpfs under state_dir, filled to the
last byte) and a lock held by another process. It stays up, says why (journal, STATUS=, and
`gatewayctl status` once a write succeeds), does not spin, never acknowledges an inbound message it
could not store, and delivers everything by itself once the fault is gone."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.bridge.service import STATE_EVERY_S
from tests.helpers.brokers import REPO_ROOT, free_port, start_simulator
from tests.integration.test_bridge_support import (
    DEVICE,
    TOKEN,
    NotifySocket,
    bridge_config,
    captured_seqs,
    check_complete_and_ordered,
    counters,
    dead_letters,
    fill,
    inbound,
    outbox_empty,
    start_bridge,
    state,
    wait_for,
)

pytestmark = pytest.mark.integration

TOTAL = 3000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/gw/state` on a 4 MiB tmpfs of its own (root only), unmounted afterwards."""
    mnt = tmp_path / "gw" / "state"
    mnt.mkdir(parents=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True, timeout=30)


def fill_disk(directory: Path) -> Path:
    """A file that takes every free byte of the file system."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 4096, 512, 1):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return path


def empty_the_wal(base: Path) -> None:
    """Checkpoint and truncate queues.db-wal, so the bridge's next write needs new space."""
    conn = sqlite3.connect(base / "state" / "queues.db", timeout=10)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ctl_status(cfg: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), "status", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=str(REPO_ROOT),
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    return json.loads(out.stdout)


def test_a_full_disk_keeps_the_bridge_up_and_everything_is_delivered_once_space_returns(
        tmp_path: Path, broker: Any, small_disk: Path) -> None:
    port, control = free_port(), free_port()
    base = tmp_path / "gw"
    fill(base, range(TOTAL))
    cfg = bridge_config(base, port, reconnect_max_s=0.5)
    notify = NotifySocket(tmp_path / "notify.sock")
    bridge = start_bridge(cfg, env=notify.env(2_000_000))  # ThingsBoard is not there yet
    sim = None
    filler = None
    try:
        bridge.wait_log("reconnecting in", 10)
        empty_the_wal(base)
        filler = fill_disk(small_disk)
        assert os.statvfs(small_disk).f_bavail == 0
        sim = start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN}, port=port, control_port=control,
                              capture=tmp_path / "capture.jsonl")
        bridge.wait_log("database or disk is full", 20)
        # it stays up, keeps its loop and watchdog going, says why, and does not spin
        before = cpu_seconds(bridge.pid)
        got = notify.drain(5.0)
        assert cpu_seconds(bridge.pid) - before < 2.5, "the bridge spins while the disk is full"
        pings = [t for t, m in got if m == "WATCHDOG=1"]
        assert len(pings) >= 3, got
        statuses = [m for _, m in got if m.startswith("STATUS=")] + [m for _, m in notify.messages
                                                                     if m.startswith("STATUS=")]
        assert any("state database unavailable" in m and "full" in m for m in statuses), statuses
        assert bridge.proc is not None and bridge.proc.poll() is None
        log = bridge.log()
        assert log.count("database or disk is full (SQLITE_FULL)") <= 3, log  # reported, not repeated
        assert not list(small_disk.glob("queues.db.corrupt-*"))  # a fault, not corruption
        # space returns: it resumes by itself and delivers everything, once
        filler.unlink()
        filler = None
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain after space returned")
        capture = tmp_path / "capture.jsonl"
        wait_for(lambda: len(set(captured_seqs(capture))) >= TOTAL, 20, what="all records captured")
        check_complete_and_ordered(captured_seqs(capture), TOTAL)
        c = counters(base)
        assert c["delivered"] == TOTAL and c["queued"] == 0 and c["dead_lettered"] == 0 and not dead_letters(base)
        assert c["ingested"] == c["delivered"] + c["queued"] + c["dead_lettered"] + c["dropped"]
        assert "recovered: state database unavailable: database or disk is full" in bridge.log()
        wait_for(lambda: state(base, "bridge.mqtt")["connected"], 10, what="connected again")
        st = ctl_status(cfg)
        assert "full" in (st["errors"]["bridge"] or ""), st["errors"]
        assert st["mqtt"]["connected"] is True
    finally:
        if filler is not None:
            with contextlib.suppress(OSError):
                filler.unlink()
        bridge.stop()
        notify.close()
        if sim is not None:
            sim.stop()


def test_an_inbound_message_that_cannot_be_stored_is_not_acknowledged_and_nothing_spins(
        tmp_path: Path, broker: Any) -> None:
    """Another process holds queues.db's write lock for a while: the RPC that arrives meanwhile is not
    acknowledged (the session is closed instead); the bridge waits with a backoff and is back once the
    lock is released, and the next RPC lands in the inbound table."""
    sim = start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN})
    base = tmp_path / "gw"
    bridge = start_bridge(bridge_config(base, sim.port, reconnect_max_s=0.5))
    locker = None
    try:
        sim.client.wait_connected(DEVICE, timeout=15)
        bridge.wait_log("session limits from", 10)  # its own writes after connecting are done
        time.sleep(STATE_EVERY_S + 0.5)
        locker = sqlite3.connect(base / "state" / "queues.db", timeout=10, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        connects = sim.client.stats(DEVICE)["connects"]
        with contextlib.suppress(Exception):
            sim.client.rpc(DEVICE, "ping", {"n": 1}, timeout=1.0)
        bridge.wait_log("cannot store an inbound message (not acknowledged): database is locked", 20)
        time.sleep(8)
        assert bridge.proc is not None and bridge.proc.poll() is None
        # a backoff, not a reconnect storm
        assert sim.client.stats(DEVICE)["connects"] - connects <= 3
        locker.execute("ROLLBACK")
        locker.close()
        locker = None
        bridge.wait_log("recovered: state database unavailable: database is locked", 30)
        sim.client.wait_connected(DEVICE, timeout=15)
        wait_for(lambda: sim.client.stats(DEVICE)["connects"] > connects, 15, what="a new session")
        time.sleep(0.5)
        with contextlib.suppress(Exception):
            sim.client.rpc(DEVICE, "ping", {"n": 2}, timeout=1.0)
        wait_for(lambda: any(json.loads(p).get("params") == {"n": 2} for t, p in inbound(base)
                             if t.startswith("v1/devices/me/rpc/request/")), 15, what="the next RPC stored")
        # the first one was never stored, and never acknowledged as if it had been
        assert not any(json.loads(p).get("params") == {"n": 1} for t, p in inbound(base)
                       if t.startswith("v1/devices/me/rpc/request/"))
        assert "database is locked" in (state(base, "bridge.last_error") or {}).get("message", "")
    finally:
        if locker is not None:
            with contextlib.suppress(sqlite3.Error):
                locker.execute("ROLLBACK")
            locker.close()
        bridge.stop()
        sim.stop()


def test_a_replaced_queues_db_is_followed_and_what_was_in_flight_touches_nothing_in_the_new_file(
        tmp_path: Path, broker: Any) -> None:
    """queues.db moved aside (as a daemon does with a damaged file) while publishes are in flight: the
    bridge forgets them (their ids name rows of the old file) and delivers every row of the new one."""
    capture = tmp_path / "capture.jsonl"
    sim = start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN}, capture=capture)
    base = tmp_path / "gw"
    fill(base, range(0, 20000))
    cfg = bridge_config(base, sim.port, reconnect_max_s=0.5)
    bridge = start_bridge(cfg)
    new = range(100_000, 103_000)          # ids 1..3000 in the new file, where the old ones in flight were
    try:
        wait_for(lambda: len(captured_seqs(capture)) >= 1000, 30, what="the old file flowing")
        os.kill(bridge.pid, signal.SIGSTOP)
        try:
            time.sleep(0.5)                # PUBACKs for what is in flight arrive meanwhile
            q = base / "state" / "queues.db"
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{q}{suffix}").exists():
                    os.replace(f"{q}{suffix}", f"{base / 'state' / 'old-queues.db'}{suffix}")
            fill(base, new)
        finally:
            os.kill(bridge.pid, signal.SIGCONT)
        bridge.wait_log("was replaced under the bridge", 10)
        wait_for(lambda: outbox_empty(base), 60, what="the new outbox drained")
        # the simulator records what its broker delivers, a moment after the PUBACK
        wait_for(lambda: set(new) <= set(captured_seqs(capture)), 15, what="the new rows captured")
        arrived = [s for s in captured_seqs(capture) if s >= new.start]
        assert set(arrived) == set(new), sorted(set(new) - set(arrived))[:20]
        c = counters(base)
        assert c["delivered"] == len(new) and c["queued"] == 0, c
        st = ctl_status(cfg)
        assert st["stale_queues_db"] == [] and st["faults"]["bridge"] is None, st
    finally:
        bridge.stop()
        sim.stop()
