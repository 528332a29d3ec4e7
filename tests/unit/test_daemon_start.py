"""Start-up survives transient faults: READY, a STATUS= that says why, watchdog fed, retries;
a real fault (a bug) still ends the process. The runtime status file carries the fault to gatewayctl."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import load
from gatewayd.ctl import daemon_faults
from gatewayd.daemon import Runner, RuntimeStatus, read_runtime_status
from gatewayd.notify import Notifier
from gatewayd.store.space import reserve_path
from tests.helpers.daemons import wait_for, write_config
from tests.unit.test_notify_daemon_log import drain, notify_socket


class FlakyStart:
    name = "flaky"

    def __init__(self, failures: list[BaseException]):
        self.failures = failures
        self.starts = self.stops = self.steps = 0

    def start(self) -> None:
        self.starts += 1
        if self.failures:
            raise self.failures.pop(0)

    def step(self) -> tuple[bool, float]:
        self.steps += 1
        return True, 0.01

    def status(self) -> str:
        return "running"

    def health(self) -> dict[str, Any]:
        return {"fault": None, "files": {"queues.db": [1, 2]}}

    def report_error(self, text: str) -> None:
        pass

    def stop(self) -> None:
        self.stops += 1


def test_transient_start_faults_are_waited_out(tmp_path: Path, notifier: Callable[..., Notifier]) -> None:
    s, path = notify_socket(tmp_path)
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = 5
    locked.sqlite_errorname = "SQLITE_BUSY"
    svc = FlakyStart([locked, OSError(28, "No space left on device")])
    state = tmp_path / "state"
    state.mkdir()
    reserve_path(state).write_bytes(b"\0" * 4096)
    runner = Runner(svc, tmp_path, notifier(NOTIFY_SOCKET=path, WATCHDOG_USEC="100000"), state_dir=state)
    t = threading.Thread(target=runner.run)
    t.start()
    msgs: list[str] = []
    try:
        def started() -> bool:
            msgs.extend(drain(s))  # a datagram queue holds a few messages only: keep it empty
            return svc.steps > 0

        wait_for(started, 10, what="the service started")
        msgs.extend(drain(s))
        assert msgs[0].startswith("READY=1\nSTATUS=waiting: cannot start yet: database is locked (SQLITE_BUSY)")
        assert "WATCHDOG=1" in msgs                     # waiting is not being stuck
        assert any("No space left" in m for m in msgs)
        assert "STATUS=running" in msgs
        assert svc.starts == 3 and svc.stops == 2       # each failed start was cleaned up
        assert not reserve_path(state).exists()         # the full disk released the reserve
        st = read_runtime_status(tmp_path, "flaky")
        assert st is not None and st["fault"] is None and st["files"] == {"queues.db": [1, 2]}
    finally:
        runner.request_stop()
        t.join(10)
    assert read_runtime_status(tmp_path, "flaky") is None


def test_a_bug_at_start_still_ends_the_process(tmp_path: Path, notifier: Callable[..., Notifier]) -> None:
    runner = Runner(FlakyStart([RuntimeError("schema version 9 is newer than this gatewayd")]), tmp_path,
                    notifier())
    with pytest.raises(RuntimeError):
        runner.run()


def test_gatewayctl_sees_faults_and_a_replaced_queues_db(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), env={})
    cfg.ensure_dirs()
    cfg.queues_db.write_bytes(b"")
    ident = cfg.queues_db.stat()
    RuntimeStatus(cfg.runtime_dir, "forwarder").update("queues.db: disk full", {"queues.db": [ident.st_dev,
                                                                                          ident.st_ino]})
    RuntimeStatus(cfg.runtime_dir, "bridge").update(None, {"queues.db": [ident.st_dev, ident.st_ino + 1]})
    (cfg.runtime_dir / "supervisor.status").write_text(json.dumps({"pid": 2**22 + 7, "fault": "gone"}))
    got = daemon_faults(cfg)
    assert got["faults"]["forwarder"] == "queues.db: disk full"
    assert got["faults"]["bridge"] is None and got["faults"]["supervisor"] is None
    assert got["stale_queues_db"] == ["bridge"]
    status = read_runtime_status(cfg.runtime_dir, "forwarder")
    assert status is not None and status["pid"] == os.getpid()


def test_runtime_status_written_only_on_change(tmp_path: Path) -> None:
    rs = RuntimeStatus(tmp_path, "x")
    rs.update("a")
    first = (tmp_path / "x.status").stat().st_mtime_ns
    since = json.loads((tmp_path / "x.status").read_text())["since_ms"]
    time.sleep(0.02)
    rs.update("a")
    assert (tmp_path / "x.status").stat().st_mtime_ns == first
    rs.update("a", {"queues.db": [1, 1]})
    assert json.loads((tmp_path / "x.status").read_text())["since_ms"] == since  # the same fault goes on
    rs.clear()
    assert not (tmp_path / "x.status").exists()
