"""What every `make bench` script shares: the JSON line format and /proc readings of a process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def idle_cpu_percent(pid: int, seconds: float, settle: float = 2.0) -> float:
    """CPU used by an idle process, in percent of one core, after it settled."""
    time.sleep(settle)
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    return 100 * (c1 - c0) / (t1 - t0)
