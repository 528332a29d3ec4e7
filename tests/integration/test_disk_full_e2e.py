"""End to end: the disk under `state_dir` filled to the last byte while a controller keeps inserting,
every daemon restarted during the full period, then space freed.

Real peers: mosquitto, the ThingsBoard simulator in front of it, `gatewayd bridge`, `forwarder` and
`supervisor` as processes, a controller writing its queue from its own process, and a small tmpfs
mounted on `state_dir` (root only). Nothing may be moved aside, no daemon may exit on its own, each
fault is logged once with its reason and shows in `gatewayctl status --json`, every record the
controller committed reaches the simulator, in order, and the ledger says so; an RPC sent during
the full period is answered once space returns.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import start_simulator
from tests.helpers.daemons import Daemon, wait_for, write_config
from tests.helpers.datapath import (
    balanced,
    can_mount,
    controller_db,
    controller_depth,
    counters,
    fill,
    moved_aside,
    record,
    spec,
    status_json,
    tmpfs,
    writer,
)
from tests.integration.test_bridge_support import captured_seqs, check_complete_and_ordered

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs")]

DEVICE = "disk-full"
TOKEN = "disk-full-token"
MIB = 1 << 20
NAMES = ("bridge", "forwarder", "supervisor")


class Controller(threading.Thread):
    """Inserts records (seq 0, 1, …) in small transactions until told to stop; counts what committed."""

    def __init__(self, w: Any, chunk: int = 20, pause: float = 0.02):
        super().__init__(daemon=True)
        self.w, self.chunk, self.pause = w, chunk, pause
        self.ts = time.time_ns() // 1_000_000  # recent: nothing is past the archive's retention
        self.committed = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.wait(self.pause):
                self.w.insert([(spec("text", "telemetry"), record(i, self.ts))
                               for i in range(self.committed, self.committed + self.chunk)])
                self.committed += self.chunk
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def stop(self) -> int:
        self.halt.set()
        self.join(30)
        assert self.error is None, self.error
        return self.committed


def fault_lines(log: str) -> list[list[str]]:
    """Per run of a daemon (its log holds several), the fault reports: what it will retry."""
    runs: list[list[str]] = [[]]
    for line in log.splitlines():
        text = line.split(" ", 3)[-1]
        if text.endswith("; will retry") or text.endswith("; retrying"):
            runs[-1].append(text)
        elif "recovered: " in text or " started after: " in text:
            runs[-1].append("")
        elif text.endswith(" stopped"):
            runs.append([])
    return runs


def logged_once(d: Daemon) -> int:
    """Each fault said once while it lasts (again only after a recovery or by a new run); how many."""
    n = 0
    for run in fault_lines(d.log()):
        current = None
        for text in run:
            assert not text or text != current, f"{d.name} logged twice: {text}"
            current = text or None
            n += bool(text)
    return n


@contextlib.contextmanager
def gateway(tmp_path: Path, sim_port: int) -> Iterator[tuple[Path, dict[str, Daemon]]]:
    config = write_config(tmp_path / "gw", {
        "thingsboard": {"host": "127.0.0.1", "port": sim_port, "access_token": TOKEN, "device_name": DEVICE,
                        "reconnect_max_s": 0.5},
        "forwarder": {"min_free_bytes": 4 * MIB, "reserve_bytes": 2 * MIB},
        "supervisor": {"telemetry_interval_s": 1, "udev": False},
    })
    daemons = {name: Daemon(name, config) for name in NAMES}
    try:
        yield config, daemons
    finally:
        for d in daemons.values():
            d.stop()


def test_a_full_disk_and_a_restart_of_every_daemon_lose_nothing(tmp_path: Path, broker: Any) -> None:
    base = tmp_path / "gw"
    state = base / "state"
    capture = tmp_path / "capture.jsonl"
    sim = start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN}, capture=capture)
    rpc: list[Any] = []
    try:
        with tmpfs(state, 16 * MIB), writer(controller_db(base)) as w, gateway(tmp_path, sim.port) as (config,
                                                                                                   daemons):
            for d in daemons.values():
                d.start()
            sim.client.wait_connected(DEVICE, timeout=20)
            ctl = Controller(w)
            ctl.start()
            wait_for(lambda: len(captured_seqs(capture, DEVICE)) >= 300, 30, what="records flowing")
            reserve = state / ".gatewayd-reserve"
            wait_for(reserve.exists, 10, what="the disk reserve")

            # the disk fills up (someone else's file), then the reserve is released and it fills again
            fill(state, "filler1")
            wait_for(lambda: not reserve.exists(), 20, what="the reserve released")
            daemons["forwarder"].wait_log("wait in the controller queue", 20)
            fill(state, "filler2")
            assert os.statvfs(state).f_bavail == 0
            caller = threading.Thread(target=lambda: rpc.append(
                sim.client.rpc(DEVICE, "ping", {"during": "full"}, timeout=120, persistent=True)), daemon=True)
            caller.start()

            # every daemon restarted while not one byte is free: each stops cleanly (what their
            # shutdown frees, a checkpointed WAL, is taken at once) and comes back
            for d in daemons.values():
                assert d.stop() == 0, d.log()[-3000:]
            fill(state, "filler3")
            assert os.statvfs(state).f_bavail == 0
            for d in daemons.values():
                d.start()          # READY although it cannot use its databases yet

            seen: dict[str, str] = {}

            def faults_shown() -> bool:
                code, st = status_json(config)
                seen.update({n: f for n, f in (st.get("faults") or {}).items() if f})
                return all(n in seen for n in NAMES)

            wait_for(faults_shown, 30, interval=0.3, what="every daemon's fault in gatewayctl status")
            depth = controller_depth(base)
            until = time.monotonic() + 4.0   # the full period goes on: retries, the controller inserting
            while time.monotonic() < until:
                faults_shown()
                time.sleep(0.3)
            assert controller_depth(base) > depth + 200   # nothing taken that could not be stored
            assert os.statvfs(state).f_bavail == 0
            for name, fault in seen.items():                # each with its reason
                assert "full" in fault or "bytes free" in fault, (name, fault)
            for d in daemons.values():
                assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]

            # space returns: everything flows again by itself
            for n in (1, 2, 3):
                (state / f"filler{n}").unlink()
            caller.join(90)
            assert rpc and rpc[0]["pong"] is True, rpc
            total = ctl.stop()
            wait_for(lambda: len(set(captured_seqs(capture, DEVICE))) >= total, 60,
                     what=f"all {total} records at the simulator")
            wait_for(lambda: counters(base)["queued"] == 0, 30, what="the outbox drained")
            c = counters(base)
            # every committed record, first arrivals in order (at least once: what was in flight when a
            # session ended may arrive twice), and the ledger says exactly that: nothing dropped
            check_complete_and_ordered(captured_seqs(capture, DEVICE), total)
            assert c["ingested"] == total and balanced(c), c
            assert c["delivered"] == total and c["dead_lettered"] == c["dropped"] == 0, c
            assert controller_depth(base) == 0
            wait_for(reserve.exists, 30, what="the reserve allocated again")
            wait_for(lambda: not any(status_json(config)[1]["faults"].values()), 30, what="the faults cleared")
            code, st = status_json(config)
            assert st["stale_queues_db"] == [] and st["ledger"]["balanced"], st
            for d in daemons.values():
                assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
                assert logged_once(d) >= 1, d.log()[-3000:]
                assert "Traceback" not in d.log(), d.log()
            assert moved_aside(base) == []
    finally:
        sim.stop()
