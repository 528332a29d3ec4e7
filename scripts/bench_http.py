#!/usr/bin/env python3
"""HTTP endpoint figures for `make bench`: idle_cpu_percent_http, rss_mb_http,
http_start_cpu_ms (what one socket activation costs) and http_scrape_cpu_ms (one /metrics).

`gatewayd http` in the foreground over the databases a forwarder left: idle for 60 s (as it
sits between scrapes, until it exits idle under systemd), then scraped 50 times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import cpu_seconds, emit, idle_cpu_percent, rss_mb

from tests.helpers.brokers import free_port
from tests.helpers.daemons import Daemon, write_config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--scrapes", type=int, default=50)
    args = ap.parse_args()
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        port = free_port()
        cfg = write_config(Path(tmp), {"http": {"listen": f"127.0.0.1:{port}"}})
        fwd = Daemon("forwarder", cfg, python=python).start()
        http = Daemon("http", cfg, python=python).start()
        try:
            start_cpu = cpu_seconds(http.pid)
            cpu = idle_cpu_percent(http.pid, args.idle_seconds)
            rss = rss_mb(http.pid)
            c0 = cpu_seconds(http.pid)
            t0 = time.perf_counter()
            for i in range(args.scrapes):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                    r.read()
                if i == 0:
                    first = time.perf_counter() - t0
                time.sleep(1.05)  # past the report cache: each scrape reads the stores
            per_scrape = (cpu_seconds(http.pid) - c0) / args.scrapes
        finally:
            http.stop()
            fwd.stop()
    emit("idle_cpu_percent_http", cpu, "%", seconds=args.idle_seconds)
    emit("rss_mb_http", rss, "MB")
    emit("http_start_cpu_ms", start_cpu * 1000, "ms", note="CPU until ready: the cost of one socket activation")
    emit("http_scrape_cpu_ms", per_scrape * 1000, "ms", scrapes=args.scrapes, first_scrape_ms=round(first * 1000, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
