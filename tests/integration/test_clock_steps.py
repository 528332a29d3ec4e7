"""Clock steps with the real forwarder, bridge and ThingsBoard simulator. The forwarder's clock is
a test source (`GATEWAYD_TEST_CLOCK`, a JSON file rewritten by the test): the process starts at
1970 with an unsynchronised clock and is stepped, or rebooted, while a controller writes.
Nothing is lost, timestamps are corrected (or kept and flagged), retention deletes nothing
because of a step."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import start_mosquitto, start_simulator
from tests.helpers.daemons import ROOT, Daemon, wait_for, write_config
from tests.helpers.datapath import balanced, controller_db, controller_depth, counters, ro

pytestmark = pytest.mark.integration

DEVICE, TOKEN = "clock-dev", "clock-token-1"
HOUR = 3_600_000
DAY = 24 * HOUR


def real_ms() -> int:
    return time.time_ns() // 1_000_000


def boot_ms() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000


class FakeClock:
    """The file the forwarder's clock reads: wall = real + offset_ms, boot = real + boot_offset_ms."""

    def __init__(self, path: Path):
        self.path = path
        self.spec: dict[str, Any] = {}

    def set(self, **spec: Any) -> None:
        self.spec = {**self.spec, **spec}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.spec))
        os.replace(tmp, self.path)

    def now(self) -> int:
        return real_ms() + int(self.spec.get("offset_ms", 0))


class Gateway:
    def __init__(self, tmp: Path, sim: Any):
        self.base = tmp / "gw"
        self.sim = sim
        self.clock = FakeClock(tmp / "clock.json")
        self.env = {"GATEWAYD_TEST_CLOCK": str(self.clock.path)}
        self.forwarder: Daemon | None = None
        self.bridge: Daemon | None = None

    def config(self, **forwarder: Any) -> Path:
        return write_config(self.base, {
            "thingsboard": {"host": "127.0.0.1", "port": self.sim.port, "access_token": TOKEN,
                            "device_name": DEVICE, "reconnect_max_s": 1.0},
            "archive": {"retention_days": 1},
            "forwarder": forwarder,
        })

    def start(self, **forwarder: Any) -> None:
        cfg = self.config(**forwarder)
        self.forwarder = Daemon("forwarder", cfg, env=self.env).start()
        if self.bridge is None:
            self.bridge = Daemon("bridge", cfg).start()

    def running_forwarder(self) -> Daemon:
        assert self.forwarder is not None, "start() first"
        return self.forwarder

    def write(self, seqs: range, stamp: Any) -> dict[int, int]:
        """Rows the controller stamps with its (the system's) clock; {seq: ts}."""
        stamps = {s: stamp() for s in seqs}
        with contextlib.closing(sqlite3.connect(controller_db(self.base), timeout=10)) as c, c:
            c.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
                          [(json.dumps({"ts": ts, "values": {"seq": s}}),) for s, ts in stamps.items()])
        return stamps

    def delivered(self) -> dict[int, int]:
        return {r["values"]["seq"]: r["ts"] for r in self.sim.client.telemetry(DEVICE) if "seq" in r["values"]}

    def archive(self) -> dict[int, tuple[int, int]]:
        with contextlib.closing(ro(self.base / "state" / "archive.db")) as a:
            return {json.loads(m)["values"]["seq"]: (ts, clock)
                    for ts, clock, m in a.execute("SELECT ts, clock, message FROM archive")}

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(self.base / "gatewayd.toml"),
                               *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                              env={**os.environ, **self.env})

    def stop(self) -> None:
        for d in (self.forwarder, self.bridge):
            if d is not None:
                d.stop()


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    broker = start_mosquitto(tmp_path)
    sim = None
    g = None
    try:
        sim = start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN})
        g = Gateway(tmp_path, sim)
        yield g
    finally:
        if g is not None:
            g.stop()
        if sim is not None:
            sim.stop()
        broker.stop()


def at_1970(clock: FakeClock, **extra: Any) -> None:
    """The clock of a device without RTC, an hour after boot: 1970-01-01T01:00, unsynchronised."""
    clock.set(offset_ms=HOUR - real_ms(), synced=False, **extra)


def test_records_wait_for_the_clock_and_are_corrected_by_the_measured_step(gw: Gateway) -> None:
    at_1970(gw.clock)
    gw.start()
    stamped_real = real_ms()
    stamps = gw.write(range(300), gw.clock.now)
    gw.running_forwarder().wait_log("waiting for the system clock")
    time.sleep(1.5)
    assert controller_depth(gw.base) == 300 and counters(gw.base)["ingested"] == 0 and not gw.delivered()
    status = gw.ctl("status", "--json")
    st = json.loads(status.stdout)
    assert status.returncode == 1 and st["clock"]["forwarder_waiting"] is True
    assert "controller records wait for the system clock to be set" in st["degraded_reasons"]
    check = gw.ctl("check")
    assert "[FAIL] clock: system time 1970-01-01" in check.stdout and check.returncode == 1

    offset_1970 = gw.clock.spec["offset_ms"]
    gw.clock.set(offset_ms=0, synced=True)  # NTP steps the clock and vouches for it
    got = wait_for(lambda: (d := gw.delivered()) and len(d) == 300 and d, 30, what="all records at the simulator")
    # corrected by the measured step: the true time they were stamped at, within the sampling jitter
    for seq, ts in got.items():
        assert abs(ts - (stamps[seq] - offset_1970)) <= 50, (seq, ts)
        assert stamped_real - 1000 <= ts <= stamped_real + 5000, (seq, ts)
    archived = gw.archive()
    assert len(archived) == 300 and {clock for _, clock in archived.values()} == {1}
    assert all(archived[s][0] == got[s] for s in got)
    c = counters(gw.base)
    assert c["clock.corrected"] == 300 and c["delivered"] == 300 and balanced(c)
    check = gw.ctl("check")
    assert "[ ok ] clock:" in check.stdout and "synchronised (test)" in check.stdout
    st = json.loads(gw.ctl("status", "--json").stdout)
    assert st["clock"]["forwarder_waiting"] is False and st["clock"]["corrected"] == 300
    assert st["clock"]["steps_this_boot"] == 1

    # retention (1 day) ran right after the correction and removed none of them; a record that
    # is really 3 days old goes at the next pass (a restart runs one at once)
    gw.write(range(300, 301), lambda: real_ms() - 3 * DAY)
    wait_for(lambda: 300 in gw.archive(), 10, what="the old record archived")
    assert gw.forwarder is not None
    gw.forwarder.stop()
    gw.forwarder.start()
    wait_for(lambda: 300 not in gw.archive(), 10, what="the 3-day-old record removed by retention")
    assert len(gw.archive()) == 300


def test_after_the_longest_wait_records_flow_flagged_and_the_archive_is_corrected_later(gw: Gateway) -> None:
    at_1970(gw.clock)
    gw.start(wait_for_clock_max_s=1)
    gw.write(range(100), gw.clock.now)
    got = wait_for(lambda: (d := gw.delivered()) and len(d) == 100 and d, 30, what="records flowing after the wait")
    assert all(ts < DAY for ts in got.values())  # ThingsBoard got what the clock said: documented
    gw.running_forwarder().wait_log("waited 1 s for the clock")
    c = counters(gw.base)
    assert c["clock.unsynced"] == 100 and c.get("clock.corrected", 0) == 0
    # retention does not judge ages by an unsynchronised clock (they look 56 years old)
    assert gw.forwarder is not None
    gw.forwarder.stop()
    gw.forwarder.start()
    time.sleep(1)
    assert len(gw.archive()) == 100

    offset_1970 = gw.clock.spec["offset_ms"]
    gw.clock.set(offset_ms=0, synced=True)
    wait_for(lambda: {clock for _, clock in gw.archive().values()} == {1}, 20, what="the archive corrected")
    for seq, (ts, _) in gw.archive().items():
        assert abs(ts - (got[seq] - offset_1970)) <= 50, seq
    gw.running_forwarder().wait_log("archive: corrected the timestamps of 100 records")
    gw.forwarder.stop()
    gw.forwarder.start()  # a retention pass now, by a trusted clock: the corrected records are young
    time.sleep(1)
    assert len(gw.archive()) == 100 and balanced(counters(gw.base))


def test_a_reboot_before_the_clock_was_set_flags_that_boots_records_and_corrects_the_next(gw: Gateway) -> None:
    """Boot A never gets a synchronised clock: what it archived and what it left queued is kept
    with its 1970 stamps, flagged (clock = 2) and never removed for its age. Boot B starts at
    1970 again (the same stamps!) and is corrected once NTP answers: ids tell the two apart."""
    boot_a = {"boot_id": "boot-a", "boot_offset_ms": 60_000 - boot_ms()}
    at_1970(gw.clock, **boot_a)
    gw.start(wait_for_clock="no")
    gw.write(range(20), gw.clock.now)                       # flow at once, archived unflagged
    wait_for(lambda: len(gw.archive()) == 20, 20, what="boot A's first records archived")
    assert gw.forwarder is not None
    gw.forwarder.stop()
    gw.start(wait_for_clock="set")                          # the same boot: now records wait
    gw.running_forwarder().wait_log("waiting for the system clock")
    gw.write(range(20, 60), gw.clock.now)
    wait_for(lambda: json.loads(gw.ctl("status", "--json").stdout)["clock"]["forwarder_waiting"], 10,
             what="the wait in the status")
    time.sleep(1.5)                                         # the forwarder notes how far boot A's ids go
    gw.forwarder.kill9()                                    # power lost

    boot_b = {"boot_id": "boot-b", "boot_offset_ms": 60_000 - boot_ms()}
    at_1970(gw.clock, **boot_b)                             # 1970 again, the same wall times as boot A
    gw.start(wait_for_clock="set")
    gw.running_forwarder().wait_log("waiting for the system clock")
    stamped_real = real_ms()
    gw.write(range(60, 90), gw.clock.now)
    time.sleep(1)
    offset_1970 = gw.clock.spec["offset_ms"]
    gw.clock.set(offset_ms=0, synced=True)
    got = wait_for(lambda: (d := gw.delivered()) and len(d) == 90 and d, 30, what="all 90 records delivered")
    archived = wait_for(lambda: (a := gw.archive()) and {a[s][1] for s in range(20)} == {2} and a, 20,
                        what="boot A's archived records flagged")
    for s in range(60):                                     # boot A: kept as stamped, flagged
        assert got[s] < DAY and archived[s] == (got[s], 2), s
    for s in range(60, 90):                                 # boot B: corrected
        assert archived[s] == (got[s], 1) and stamped_real - 1000 <= got[s] <= stamped_real + 5000, s
        assert got[s] - offset_1970 > 0
    c = counters(gw.base)
    assert c["clock.corrected"] == 30 and c["ingested"] == 90 and balanced(c)
    gw.forwarder.stop()
    gw.forwarder.start()  # retention by a trusted clock: the 1970 records are kept (flagged)
    time.sleep(1)
    assert len(gw.archive()) == 90
