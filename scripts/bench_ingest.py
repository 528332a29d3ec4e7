#!/usr/bin/env python3
"""Ingest benchmarks for `make bench`: one JSON object per line, {"name", "value", "unit", ...}.

- ingest_mqtt_records_per_s: a local publisher sends 100,000 telemetry records with QoS 1 (100
  records per message, ThingsBoard device format) to a real local mosquitto; gatewayd ingest
  (persistent session, PUBACK after commit) -> controller queue -> forwarder -> outbox -> bridge
  -> the ThingsBoard simulator (`tests/tbsim`, on its own mosquitto). The clock runs
  from the first publish to the last distinct record counted at the simulator.
- ingest_http_records_per_s: the same 100,000 records POSTed to /api/v1/telemetry by 4 clients
  (keep-alive, 100 records per request), through the same chain to the simulator.
- idle_cpu_percent_ingest: the ingest daemon with all three adapters on and nothing arriving, 60 s.
- rss_mb_ingest: its VmRSS afterwards.

Everything runs on loopback in a temporary directory; every process is stopped by its PID.
Usage: bench_ingest.py [--records N] [--idle-s S] [--only mqtt,http,idle]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import emit, idle_cpu_percent, rss_mb

from tests.helpers.brokers import free_port, start_mosquitto, start_simulator
from tests.helpers.daemons import Daemon, wait_for
from tests.helpers.ingest import Publisher, batch_payload, ingest_config, publish_stream

DEVICE, TOKEN = "bench-ingest", "bench-ingest-token"
PER_MESSAGE = 100
HTTP_CLIENTS = 4
SIM_ARGS = ["--rate-limit-messages", "1000000:1,60000000:60", "--rate-limit-telemetry-messages",
            "1000000:1,60000000:60", "--rate-limit-telemetry-datapoints", "100000000:1,6000000000:60",
            "--keep-records", "10"]


def distinct_at_simulator(capture: Path, seen: set[int], offset: list[int]) -> int:
    """Read what the simulator appended since the last call; the number of distinct seqs so far."""
    with open(capture, "rb") as fh:
        fh.seek(offset[0])
        data = fh.read()
    end = data.rfind(b"\n") + 1
    offset[0] += end
    for line in data[:end].splitlines():
        try:
            seen.add(json.loads(line)["values"]["seq"])
        except (ValueError, KeyError, TypeError):
            pass
    return len(seen)


def post_all(port: int, first: int, total: int, errors: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for start in range(first, first + total, PER_MESSAGE):
            body = batch_payload(start, min(PER_MESSAGE, first + total - start))
            for _attempt in range(50):
                conn.request("POST", "/api/v1/telemetry", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    break
                if resp.status != 503:
                    errors.append(f"HTTP {resp.status}")
                    return
                time.sleep(0.05)
    finally:
        conn.close()


def run_chain(base: Path, mode: str, records: int, idle_s: float) -> None:
    base.mkdir(parents=True, exist_ok=True)
    local = start_mosquitto(base, name="local")
    cloud = start_mosquitto(base, name="cloud")
    sim = None
    daemons: list[Daemon] = []
    pub = None
    try:
        capture = base / "capture.jsonl"
        sim = start_simulator(base, cloud.port, devices={DEVICE: TOKEN}, capture=capture, extra_args=SIM_ARGS)
        http_port = free_port()
        spool = base / "spool"
        cfg = ingest_config(base, mqtt_port=local.port, http_port=http_port, spool=spool, tb_port=sim.port,
                            token=TOKEN, thingsboard={"max_inflight": 100})
        for name in ("forwarder", "bridge", "ingest"):
            daemons.append(Daemon(name, cfg).start())
        ingest = daemons[-1]
        ingest.wait_log("mqtt: connected")
        wait_for(lambda: sim.client.stats(DEVICE).get("connects", 0) > 0 if sim else False, 20,
                 what="the bridge to connect")
        seen: set[int] = set()
        offset = [0]
        capture.touch()
        errors: list[str] = []
        t0 = time.perf_counter()
        if mode == "mqtt":
            pub = Publisher("127.0.0.1", local.port, client_id="bench-publisher")
            sender = threading.Thread(target=publish_stream, args=(pub, records, PER_MESSAGE))
            sender.start()
        else:
            share = records // HTTP_CLIENTS
            clients = [threading.Thread(target=post_all, args=(http_port, i * share, share, errors))
                       for i in range(HTTP_CLIENTS)]
            for c in clients:
                c.start()
        wait_for(lambda: distinct_at_simulator(capture, seen, offset) >= records, 600, interval=0.05,
                 what=f"{records} distinct records at the simulator")
        elapsed = time.perf_counter() - t0
        if errors:
            raise RuntimeError(f"HTTP clients failed: {errors[:5]}")
        what = ("local publisher QoS 1 -> mosquitto -> ingest (MQTT) -> forwarder -> bridge -> tb_simulator"
                if mode == "mqtt" else
                f"{HTTP_CLIENTS} HTTP clients (keep-alive) -> ingest (HTTP) -> forwarder -> bridge -> tb_simulator")
        emit(f"ingest_{mode}_records_per_s", records / elapsed, "records/s", records=records,
             seconds=round(elapsed, 3), records_per_message=PER_MESSAGE, path=what,
             note="distinct records counted at the simulator; clock from the first send")
        if idle_s > 0:
            emit("idle_cpu_percent_ingest", idle_cpu_percent(ingest.pid, idle_s), "%", seconds=idle_s,
                 adapters="mqtt, http, spool")
            emit("rss_mb_ingest", rss_mb(ingest.pid), "MB")
    finally:
        if pub is not None:
            pub.close()
        for d in reversed(daemons):
            d.stop()
        if sim is not None:
            sim.stop()
        local.stop()
        cloud.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--only", default="mqtt,http,idle")
    p.add_argument("--keep", help="work in this directory and keep it")
    args = p.parse_args()
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        if "mqtt" in parts:
            run_chain(base / "mqtt", "mqtt", args.records, args.idle_s if "idle" in parts else 0.0)
        if "http" in parts:
            run_chain(base / "http", "http", args.records, 0.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
