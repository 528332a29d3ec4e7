#!/usr/bin/env python3
"""A fleet after a server outage: N real `gatewayd bridge` processes against one mosquitto that is
stopped for a while and started again (loopback only, bounded, every process stopped by its PID).

What it measures, as JSON lines (scripts/benchlib.py):
- fleet_reconnect_peak_connects_per_s: the most CONNECTs the broker accepted in one second after
  its return (mosquitto's "New client connected" log lines, by their epoch-second timestamp),
  with the ceiling it must stay under;
- fleet_all_reconnected_s: from the broker's return until every device was connected again;
- fleet_backlog_delivered_s: from the broker's return until every device's outbox (the backlog
  queued during the outage) was empty, i.e. delivered and acknowledged.

The backoff is the bridge's own (full jitter, cap doubling from 0.5 s to
`thingsboard.reconnect_max_s`). A fleet that loses its server together then reconnects at about
2 x devices / reconnect_max_s per second at the peak; the fleet rule is
`reconnect_max_s >= 3 x devices / ceiling`, which is the default here (`--reconnect-max-s` to try
another value, e.g. the default 5 s for comparison).

The bridges run as unprivileged uids (100 per uid): each holds an inotify instance, and the
default limit is 128 per user, shared with everything else root runs on this machine.
Usage: fleet_sim.py [--devices 200] [--outage-s 60] [--backlog 500] [--ceiling 50]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import emit, record_text, rss_mb

from gatewayd import topics
from gatewayd.store import queues
from gatewayd.store.db import transaction
from tests.helpers.brokers import MosquittoProcess, free_port, start_mosquitto
from tests.helpers.daemons import Daemon, write_config

FIRST_UID = 61000
DEVICES_PER_UID = 100
CONNECTED = re.compile(rb"^(\d+): New client connected from ", re.M)


def outbox_rows(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            return int(conn.execute("SELECT value FROM counters WHERE name = 'outbox_rows'").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return -1


def connected_now(d: Daemon, offset: int) -> bool:
    """The bridge logged a connection after `offset` bytes of its log."""
    try:
        with open(d.log_path, "rb") as f:
            f.seek(offset)
            return b"connected to" in f.read()
    except OSError:
        return False


def log_size(d: Daemon) -> int:
    try:
        return d.log_path.stat().st_size
    except OSError:
        return 0


def chown_tree(path: Path, uid: int) -> None:
    for dirpath, _dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, uid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), uid, uid)


def fill_backlog(db: Path, n: int, uid: int, seq0: int) -> None:
    """What the forwarder would have queued during the outage."""
    q = queues.open_queues(db)
    try:
        ts = int(time.time() * 1000)
        rows = [(0, queues.KIND_TELEMETRY, topics.TOPIC_TELEMETRY, record_text(ts + i, seq0 + i), ts + i, 1)
                for i in range(n)]
        with transaction(q):
            queues.append(q, rows)
    finally:
        q.close()
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db) + suffix)
        if p.exists():
            os.chown(p, uid, uid)


def connects_per_second(broker: MosquittoProcess) -> dict[int, int]:
    bins: dict[int, int] = {}
    for m in CONNECTED.finditer(broker.log_path.read_bytes()):
        s = int(m.group(1))
        bins[s] = bins.get(s, 0) + 1
    return bins


def run(base: Path, devices: int, outage_s: float, backlog: int, ceiling: float, reconnect_max_s: float,
        python: str, timeout_s: float) -> None:
    port = free_port()
    broker: MosquittoProcess | None = start_mosquitto(base, port=port, name="mosquitto-before")
    bridges: list[Daemon] = []
    uids: list[int] = []
    try:
        for i in range(devices):
            uid = FIRST_UID + i // DEVICES_PER_UID
            dev = base / f"dev{i:04d}"
            cfg = write_config(dev, {"thingsboard": {"host": "127.0.0.1", "port": port, "access_token": f"fleet-{i}",
                                                     "device_name": f"fleet-{i}",
                                                     "reconnect_max_s": reconnect_max_s}})
            chown_tree(dev, uid)
            bridges.append(Daemon("bridge", cfg, python=python,
                                  argv_prefix=["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]))
            uids.append(uid)
        t_start = time.monotonic()
        for k in range(0, devices, 20):  # a few at a time: 200 interpreters starting at once crowd 2 cores
            for d in bridges[k:k + 20]:
                d.start(wait_ready=False)
            for d in bridges[k:k + 20]:
                d.wait_log("connected to", timeout=120)
        started_s = time.monotonic() - t_start
        rss = [rss_mb(d.pid) for d in bridges]
        # the outage
        broker.stop()
        broker = None
        t_down = time.monotonic()
        marks = [log_size(d) for d in bridges]
        for i, d in enumerate(bridges):
            fill_backlog(d.config.parent / "state" / "queues.db", backlog, uids[i], i * backlog)
        time.sleep(max(0.0, t_down + outage_s - time.monotonic()))
        broker = start_mosquitto(base, port=port, name="mosquitto-after")
        t_back, wall_back = time.monotonic(), int(time.time())
        pending = set(range(devices))
        all_connected_s = None
        empty: set[int] = set()
        deadline = t_back + timeout_s
        while (pending or len(empty) < devices) and time.monotonic() < deadline:
            for i in list(pending):
                if connected_now(bridges[i], marks[i]):
                    pending.discard(i)
            if not pending and all_connected_s is None:
                all_connected_s = time.monotonic() - t_back
            for i in range(devices):
                if i not in empty and outbox_rows(bridges[i].config.parent / "state" / "queues.db") == 0:
                    empty.add(i)
            time.sleep(0.2)
        delivered_s = time.monotonic() - t_back
        assert not pending and len(empty) == devices, (
            f"{len(pending)} devices not reconnected, {devices - len(empty)} backlogs left after {timeout_s} s")
        bins = connects_per_second(broker)
        per_s = [bins.get(s, 0) for s in range(wall_back, max(bins) + 1)] if bins else []
        peak = max(per_s) if per_s else 0
    finally:
        for d in bridges:  # all told first: each takes a moment to shut down
            if d.proc is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        for d in bridges:
            if d.proc is not None:
                d.stop()
        if broker is not None:
            broker.stop()
    common = {"devices": devices, "outage_s": outage_s, "reconnect_max_s": reconnect_max_s}
    emit("fleet_reconnect_peak_connects_per_s", peak, "CONNECT/s", ceiling=ceiling, below_ceiling=peak < ceiling,
         connects_per_s_after_return=per_s, **common,
         note="real gatewayd bridge processes, one mosquitto; CONNECTs counted in mosquitto's log")
    emit("fleet_all_reconnected_s", all_connected_s or 0.0, "s", **common)
    emit("fleet_backlog_delivered_s", delivered_s, "s", backlog_per_device=backlog, **common,
         note="poll resolution 0.2 s, plus reading every outbox")
    emit("fleet_bridge_rss_mb", sum(rss) / len(rss), "MB", total_mb=round(sum(rss)), start_s=round(started_s, 1),
         **common)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--outage-s", type=float, default=60.0)
    ap.add_argument("--backlog", type=int, default=500, help="records queued per device during the outage")
    ap.add_argument("--ceiling", type=float, default=50.0, help="CONNECTs per second the broker may see at most")
    ap.add_argument("--reconnect-max-s", type=float, help="default: the fleet rule, 3 x devices / ceiling")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="give up this long after the broker's return")
    ap.add_argument("--python", default="/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable)
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("runs as root (the bridges run as unprivileged uids through setpriv)")
    reconnect_max_s = args.reconnect_max_s or 3 * args.devices / args.ceiling
    with tempfile.TemporaryDirectory(prefix="gatewayd-fleet-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        run(Path(tmp), args.devices, args.outage_s, args.backlog, args.ceiling, reconnect_max_s, args.python,
            args.timeout_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
