#!/usr/bin/env python3
"""What a record costs the device, for `make bench`: one JSON object per line.

- cpu_s_per_million_records: CPU seconds (utime + stime of `gatewayd forwarder` and `gatewayd
  bridge`, children included, from /proc/<pid>/stat) to move 1,000,000 controller records to
  PUBACK: controller db -> forwarder -> archive + outbox -> bridge -> mosquitto (direct). The
  daemons run and are connected first; the clock and the CPU readings start when the controller
  (this script) begins inserting, in transactions of 10,000 rows, and stop at the last PUBACK's
  delete. mosquitto's own CPU is given beside it, not counted.
- disk_bytes_written_per_record: bytes the daemons caused to be written to storage
  (/proc/<pid>/io write_bytes: WAL frames, checkpoints, archive, outbox, deletes) per record,
  while a controller process inserts `--disk-rate` records/s in transactions of `--disk-batch`
  rows; `_payload_ratio` divides by the bytes of the records themselves. The controller's own
  writes (its inserts into its WAL, and the checkpoints its commits run) are given beside it,
  and both together give the lifetime of a 32 GB SD card rated for 3,000 write cycles at
  100 records/s (`sd_card_days_32gb`: no wear levelling losses counted).

Everything runs on loopback in a temporary directory on the disk (write_bytes of tmpfs is 0);
every process is stopped by its PID.
Usage: bench_cost.py [--records N] [--disk-seconds S] [--only cpu,disk]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import cpu_seconds, emit, fill_controller, record_text, write_bytes

from tests.helpers.brokers import start_mosquitto, wait_until
from tests.helpers.daemons import Daemon, write_config

SD_CARD_BYTES = 32e9
SD_CARD_CYCLES = 3000
LIFETIME_RATE = 100.0  # records/s


def counters(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(conn.execute("SELECT name, value FROM counters").fetchall())
    finally:
        conn.close()


def delivered(db: Path) -> int:
    try:
        return counters(db).get("delivered", 0)
    except sqlite3.Error:
        return 0


class Pipeline:
    """mosquitto, `gatewayd forwarder` and `gatewayd bridge` on loopback, the bridge connected."""

    def __init__(self, base: Path, python: str, extra: dict[str, dict[str, object]] | None = None):
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.broker = start_mosquitto(base)
        sections: dict[str, dict[str, object]] = {
            "thingsboard": {"host": "127.0.0.1", "port": self.broker.port, "access_token": "bench"}}
        for k, v in (extra or {}).items():
            sections.setdefault(k, {}).update(v)
        self.cfg = write_config(base, sections)
        self.queues_db = base / "state" / "queues.db"
        self.controller_db = base / "controller" / "communication_queue.db"
        self.daemons: list[Daemon] = []
        try:
            for name in ("forwarder", "bridge"):
                self.daemons.append(Daemon(name, self.cfg, python=python).start())
            wait_until(lambda: "connected to" in self.daemons[1].log(), 20, what="the bridge to connect")
        except BaseException:
            self.stop()
            raise

    def pids(self) -> dict[str, int]:
        return {d.name: d.pid for d in self.daemons}

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        self.broker.stop()


def bench_cpu(base: Path, records: int, python: str) -> None:
    p = Pipeline(base, python)
    try:
        pids = p.pids()
        cpu0 = {n: cpu_seconds(pid, children=True) for n, pid in pids.items()}
        broker0 = cpu_seconds(p.broker.pid)
        t0 = time.perf_counter()
        fill_controller(p.controller_db, records, chunk=10_000)
        wait_until(lambda: delivered(p.queues_db) >= records, timeout=900, interval=0.05,
                   what="every record to be delivered")
        elapsed = time.perf_counter() - t0
        cpu = {n: cpu_seconds(pid, children=True) - cpu0[n] for n, pid in pids.items()}
        broker = cpu_seconds(p.broker.pid) - broker0
        c = counters(p.queues_db)
        assert c["delivered"] == records and c["ingested"] == records, c
    finally:
        p.stop()
    scale = 1_000_000 / records
    emit("cpu_s_per_million_records", sum(cpu.values()) * scale, "s", records=records,
         forwarder_s=round(cpu["forwarder"] * scale, 2), bridge_s=round(cpu["bridge"] * scale, 2),
         mosquitto_s_not_counted=round(broker * scale, 2), seconds=round(elapsed, 2),
         end_to_end_records_per_s=round(records / elapsed),
         path="controller db (10,000-row inserts) -> forwarder -> archive + outbox -> bridge -> mosquitto")


def controller_child(db: Path, rate: float, batch: int, seconds: float) -> None:
    """A controller inserting `rate` records/s in transactions of `batch`; prints its write_bytes
    and the payload bytes it inserted."""
    conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
    w0 = write_bytes(os.getpid())
    n = payload = 0
    start = time.monotonic()
    interval = batch / rate
    for k in range(int(seconds * rate / batch)):
        delay = start + k * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = int(time.time() * 1000)
        rows = [record_text(now, n + i) for i in range(batch)]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)", ((r,) for r in rows))
        conn.execute("COMMIT")
        n += batch
        payload += sum(map(len, rows))
    conn.close()
    print(n, payload, write_bytes(os.getpid()) - w0, flush=True)


def bench_disk(base: Path, rate: float, batch: int, seconds: float, python: str) -> None:
    p = Pipeline(base, python)
    try:
        pids = p.pids()
        w0 = {n: write_bytes(pid) for n, pid in pids.items()}
        child = subprocess.run([python, __file__, "--as-controller", str(p.controller_db), str(rate), str(batch),
                                str(seconds)], capture_output=True, text=True, timeout=seconds * 3 + 60, check=True)
        n, payload, controller_bytes = map(int, child.stdout.split())
        wait_until(lambda: delivered(p.queues_db) >= n, timeout=60, interval=0.05, what="every record delivered")
        time.sleep(1.0)  # the last deletes and status writes
        written = {name: write_bytes(pid) - w0[name] for name, pid in pids.items()}
    finally:
        p.stop()
    daemons = sum(written.values())
    per_record = daemons / n
    total_per_record = (daemons + controller_bytes) / n
    days = SD_CARD_BYTES * SD_CARD_CYCLES / (total_per_record * LIFETIME_RATE * 86400)
    emit("disk_bytes_written_per_record", per_record, "bytes", records=n, rate_per_s=rate, batch=batch,
         forwarder_bytes=written["forwarder"], bridge_bytes=written["bridge"],
         controller_bytes_per_record=round(controller_bytes / n, 1),
         note="daemons only; write_bytes counts 4 KiB pages dirtied")
    emit("disk_bytes_written_per_record_payload_ratio", per_record / (payload / n), "x",
         payload_bytes_per_record=round(payload / n, 1))
    emit("sd_card_days_32gb", days, "days", card_bytes=SD_CARD_BYTES, write_cycles=SD_CARD_CYCLES,
         records_per_s=LIFETIME_RATE, bytes_per_record=round(total_per_record, 1),
         note="daemons + the controller's own inserts; no wear-levelling overhead counted")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--as-controller":
        controller_child(Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--disk-rate", type=float, default=100.0)
    ap.add_argument("--disk-batch", type=int, default=10)
    ap.add_argument("--disk-seconds", type=float, default=60.0)
    ap.add_argument("--only", default="cpu,disk")
    ap.add_argument("--python", default="/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable,
                    help="the interpreter the daemons run on")
    ap.add_argument("--dir", help="work below this directory (on a disk, not tmpfs)", default="/var/tmp")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-", dir=args.dir) as tmp:
        if "cpu" in parts:
            bench_cpu(Path(tmp) / "cpu", args.records, args.python)
        if "disk" in parts:
            bench_disk(Path(tmp) / "disk", args.disk_rate, args.disk_batch, args.disk_seconds, args.python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
