#!/usr/bin/env python3
"""Supervisor figures for `make bench`: idle_cpu_percent_supervisor and rss_mb_supervisor.

An idle `gatewayd supervisor` (controller disabled, so no Docker) for 60 s: its loop, the
device telemetry every telemetry_interval_s (default 20 s) and the udev watch included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import emit, idle_cpu_percent, rss_mb

from tests.helpers.daemons import Daemon, write_config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        d = Daemon("supervisor", write_config(Path(tmp), {"controller": {"enabled": False}}))
        d.python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        d.start()
        try:
            cpu = idle_cpu_percent(d.pid, args.idle_seconds)
            rss = rss_mb(d.pid)
        finally:
            d.stop()
    emit("idle_cpu_percent_supervisor", cpu, "%", seconds=args.idle_seconds, controller="disabled")
    emit("rss_mb_supervisor", rss, "MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
