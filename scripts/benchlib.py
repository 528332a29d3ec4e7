"""What every `make bench` script shares: the JSON line format, /proc readings of a process, a
controller database filled as a controller would."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime (+ cutime + cstime of waited-for children) of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def write_bytes(pid: int) -> int:
    """Bytes the process caused to be sent to storage (`/proc/<pid>/io` write_bytes), in pages dirtied."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


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


PLAIN = '{{"ts":{ts},"values":{{"temperature":{t}.5,"seq":{i}}}}}'


def record_text(ts: int, i: int, template: str = PLAIN) -> str:
    """One controller record of the benchmarks (about 60 bytes of JSON for PLAIN)."""
    return template.format(ts=ts, t=20 + i % 10, i=i)


def fill_controller(path: Path, n: int, chunk: int = 100_000, first: int = 0, template: str = PLAIN) -> None:
    """Insert `n` telemetry records as a controller does, `chunk` rows per transaction."""
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
    now = int(time.time() * 1000)
    for start in range(first, first + n, chunk):
        conn.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
                         ((record_text(now + i, i, template),) for i in range(start, min(first + n, start + chunk))))
        conn.commit()
    conn.close()
