#!/usr/bin/env python3
"""Forwarder benchmarks; prints one JSON object per line: {"name", "value", "unit", ...}.

forwarder_records_per_s: 1,000,000 controller rows moved to the outbox and the archive by the
real Forwarder (fsync'd per batch, default batch size) — timed from the first batch to the last.
forwarder_records_per_s_privacy: the same with a typical privacy policy of 3 rules (round the
GPS position, hash a serial number, drop an operator's name) that touches every record, whose
values carry those keys; `without_rules` is the same records with no policy.
idle_cpu_percent_forwarder, rss_mb_forwarder: an idle `gatewayd forwarder` process over 60 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import PLAIN, emit, fill_controller, idle_cpu_percent, rss_mb

from gatewayd.config import load
from gatewayd.forwarder.service import Forwarder
from gatewayd.schema import SCHEMA
from gatewayd.store import queues
from tests.helpers.daemons import Daemon, write_config

PERSONAL = ('{{"ts":{ts},"values":{{"temperature":{t}.5,"seq":{i},"gps_lat":48.13729{i},"gps_lon":11.57558{i},'
            '"serial":"SN-{i:08d}","operator":"Erika Mustermann"}}}}')
POLICY = {"rules": [{"match": "gps_*", "action": "round", "digits": 3},
                    {"match": "serial", "action": "hash"},
                    {"match": "operator", "action": "drop"}],
          "hash_key": "bench-hash-key-0123456789"}


def move_all(base: Path, n: int, template: str = PLAIN, privacy: dict[str, object] | None = None) -> float:
    """Seconds the real Forwarder takes to move n controller rows (outbox and archive)."""
    cfg = load(write_config(base, {"privacy": privacy} if privacy else None), env={})
    fwd = Forwarder(cfg)
    fwd.start()  # creates the controller tables
    fill_controller(cfg.controller_db, n, template=template)
    t0 = time.perf_counter()
    moved = 0
    while True:
        m = fwd.move_batch()
        if not m:
            break
        moved += m
    elapsed = time.perf_counter() - t0
    c = queues.counters(fwd.queues)  # type: ignore[arg-type]
    fwd.stop()
    assert moved == n and c["queued"] == n and c["archived"] == n, (moved, c)
    return elapsed


def bench_throughput(base: Path, n: int) -> None:
    elapsed = move_all(base, n)
    emit("forwarder_records_per_s", n / elapsed, "records/s", records=n, seconds=round(elapsed, 2),
         batch_size=SCHEMA["forwarder"]["batch_size"].default)


def bench_privacy(base: Path, n: int) -> None:
    plain = move_all(base / "none", n, PERSONAL)
    ruled = move_all(base / "rules", n, PERSONAL, POLICY)
    emit("forwarder_records_per_s_privacy", n / ruled, "records/s", records=n, seconds=round(ruled, 2),
         rules=len(POLICY["rules"]), without_rules=round(n / plain))  # type: ignore[arg-type]


def bench_idle(base: Path, seconds: float) -> None:
    d = Daemon("forwarder", write_config(base))
    d.python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    d.start()
    try:
        cpu = idle_cpu_percent(d.pid, seconds)
        rss = rss_mb(d.pid)
    finally:
        d.stop()
    emit("idle_cpu_percent_forwarder", cpu, "%", seconds=seconds)
    emit("rss_mb_forwarder", rss, "MB")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        bench_throughput(Path(tmp) / "throughput", args.records)
        bench_privacy(Path(tmp) / "privacy", args.records)
        bench_idle(Path(tmp) / "idle", args.idle_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
