#!/usr/bin/env python3
"""Bridge benchmarks for `make bench`: prints one JSON object per line, {"name", "value", "unit", ...}.

- drain_records_per_s: 1,000,000 telemetry records queued in the outbox (filled directly with
  `queues.append`) while the broker is down; the bridge is already running and retrying
  (`reconnect_max_s = 0.5`, so it notices the broker within half a second); the clock starts
  when mosquitto accepts connections and stops when the outbox is empty, i.e. after the last
  PUBACK and its delete.
- drain_records_per_s_tls: the same drain to a TLS listener of mosquitto (a test CA made here with
  openssl; the bridge verifies the server against it and its address).
- e2e_latency_p50_ms / e2e_latency_p99_ms: a controller thread INSERTs one row every 5 ms
  (200 records/s) into the controller database for ~20 s; forwarder -> outbox -> bridge ->
  mosquitto (directly, no simulator) -> a subscriber in this process. Latency = arrival at the
  subscriber - return of the controller's COMMIT.
- idle_cpu_percent_bridge: the bridge connected, outbox empty, for 60 s (/proc/<pid>/stat).
- rss_mb_bridge: VmRSS of the bridge after all of the above.

Everything runs on loopback in a temporary directory; every process is stopped by its PID.
Usage: bench_bridge.py [--records N] [--latency-s S] [--idle-s S] [--only drain,tls,latency]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import cpu_seconds, emit, rss_mb

from gatewayd import topics
from gatewayd.store import queues
from gatewayd.store.db import transaction
from tests.helpers.brokers import MqttDevice, free_port, start_mosquitto, wait_until
from tests.helpers.daemons import Daemon, write_config
from tests.helpers.netfaults import make_tls_files

TOPIC = topics.TOPIC_TELEMETRY


def outbox_rows(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT value FROM counters WHERE name = 'outbox_rows'").fetchone()[0])
    finally:
        conn.close()


def bench_drain(base: Path, records: int, tls: bool = False) -> None:
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tb: dict[str, Any] = {"host": "127.0.0.1", "port": port, "access_token": "bench", "reconnect_max_s": 0.5}
    listener: list[str] = []
    if tls:
        files = make_tls_files(base / "tls")
        tb.update(tls=True, ca_cert=str(files["ca"]))
        listener = ["user root", f"cafile {files['ca']}", f"certfile {files['cert']}", f"keyfile {files['key']}"]
    cfg = write_config(base, {"thingsboard": tb})
    db = base / "state" / "queues.db"
    q = queues.open_queues(db)
    ts0 = int(time.time() * 1000) - records
    chunk = 100_000
    for start in range(0, records, chunk):
        rows = [(0, "telemetry", TOPIC, f'{{"ts":{ts0 + i},"values":{{"seq":{i},"temperature":21.5,"ok":true}}}}',
                 ts0 + i, 1) for i in range(start, min(records, start + chunk))]
        with transaction(q):
            queues.append(q, rows)
    q.close()
    bridge = Daemon("bridge", cfg).start()
    broker = None
    try:
        time.sleep(1.0)  # the bridge is retrying against a closed port
        broker = start_mosquitto(base, port=port, extra_config=listener)
        t0 = time.perf_counter()
        wait_until(lambda: outbox_rows(db) == 0, timeout=600, interval=0.01, what="the outbox to drain")
        elapsed = time.perf_counter() - t0
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        c = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        conn.close()
        assert c["delivered"] == records, c
        emit("drain_records_per_s_tls" if tls else "drain_records_per_s", records / elapsed, "records/s",
             records=records, seconds=round(elapsed, 3),
             broker="mosquitto (direct)" + (", TLS listener" if tls else ""),
             note="clock from broker accepting connections to empty outbox")
    finally:
        bridge.stop()
        if broker is not None:
            broker.stop()


def bench_latency_idle(base: Path, latency_s: float, idle_s: float) -> None:
    base.mkdir(parents=True, exist_ok=True)
    broker = start_mosquitto(base)
    cfg = write_config(base, {"thingsboard": {"host": "127.0.0.1", "port": broker.port, "access_token": "bench"},
                              "archive": {"enabled": True}})
    daemons: list[Daemon] = []
    sub = MqttDevice("127.0.0.1", broker.port)
    try:
        forwarder = Daemon("forwarder", cfg).start()
        daemons.append(forwarder)
        bridge = Daemon("bridge", cfg).start()
        daemons.append(bridge)
        sub.connect()
        sub.subscribe(TOPIC)
        wait_until(lambda: bridge.log().count("connected to") > 0, 20, what="the bridge to connect")
        committed: dict[int, float] = {}
        arrived: dict[int, float] = {}
        lock = threading.Lock()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            now = time.perf_counter()
            data = json.loads(msg.payload)
            with lock:
                for rec in data if isinstance(data, list) else [data]:
                    arrived.setdefault(rec["values"]["seq"], now)

        sub.client.on_message = on_message
        ctrl = sqlite3.connect(str(base / "controller" / "communication_queue.db"), timeout=5,
                               isolation_level=None)
        ctrl.execute("PRAGMA journal_mode=WAL")
        ctrl.execute("CREATE TABLE IF NOT EXISTS messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, "
                     "message TEXT)")
        n = int(latency_s * 200)
        t_next = time.perf_counter()
        for i in range(n):
            t_next += 0.005
            delay = t_next - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            msg = json.dumps({"ts": int(time.time() * 1000), "values": {"seq": i, "v": i * 0.5}})
            ctrl.execute("INSERT INTO messages(type, message) VALUES ('telemetry', ?)", (msg,))
            committed[i] = time.perf_counter()
        wait_until(lambda: len(arrived) >= n, 30, what="all latency records to arrive")
        ctrl.close()
        lat = sorted((arrived[i] - committed[i]) * 1000 for i in range(n))
        emit("e2e_latency_p50_ms", lat[len(lat) // 2], "ms", records=n, rate_per_s=200,
             path="controller db -> forwarder -> bridge -> mosquitto (direct) -> subscriber")
        emit("e2e_latency_p99_ms", lat[min(len(lat) - 1, int(len(lat) * 0.99))], "ms", records=n)
        if idle_s > 0:
            time.sleep(2.0)
            c0, t0 = cpu_seconds(bridge.pid), time.monotonic()
            time.sleep(idle_s)
            c1, t1 = cpu_seconds(bridge.pid), time.monotonic()
            emit("idle_cpu_percent_bridge", 100 * (c1 - c0) / (t1 - t0), "%", seconds=round(t1 - t0, 1))
        emit("rss_mb_bridge", rss_mb(bridge.pid), "MB")
    finally:
        sub.close()
        for d in reversed(daemons):
            d.stop()
        broker.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--latency-s", type=float, default=20.0)
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--only", default="drain,tls,latency")
    p.add_argument("--keep", help="work in this directory and keep it")
    args = p.parse_args()
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        if "drain" in parts:
            bench_drain(base / "drain", args.records)
        if "tls" in parts:
            bench_drain(base / "drain-tls", args.records, tls=True)
        if "latency" in parts:
            bench_latency_idle(base / "latency", args.latency_s, args.idle_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
