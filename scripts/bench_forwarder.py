#!/usr/bin/env python3
"""Forwarder benchmarks; prints one JSON object per line: {"name", "value", "unit", ...}.

forwarder_records_per_s: 1,000,000 controller rows moved to the outbox and the archive by the
real Forwarder (fsync'd per batch, default batch size) — timed from the first batch to the last.
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

from benchlib import emit, fill_controller, idle_cpu_percent, rss_mb  # noqa: E402

from gatewayd.config import load  # noqa: E402
from gatewayd.forwarder.service import Forwarder  # noqa: E402
from gatewayd.store import queues  # noqa: E402
from tests.helpers.daemons import Daemon, write_config  # noqa: E402


def bench_throughput(base: Path, n: int) -> None:
    cfg = load(write_config(base), env={})
    fwd = Forwarder(cfg)
    fwd.start()  # creates the controller tables
    fill_controller(cfg.controller_db, n)
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
    emit("forwarder_records_per_s", n / elapsed, "records/s", records=n, seconds=round(elapsed, 2),
         batch_size=cfg["forwarder"]["batch_size"])


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
        bench_idle(Path(tmp) / "idle", args.idle_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
