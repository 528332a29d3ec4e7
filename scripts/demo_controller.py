#!/usr/bin/env python3
"""A demo controller, written the way a seed-gateway controller is: plain sqlite3, its own tables,
one INSERT INTO messages(type, message) per record, and an upsert of health_check row 1.

Usage: demo_controller.py DB RATE_PER_S. Runs until SIGTERM, then prints `sent N` and exits.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time

stop = False


def _stop(_sig: int, _frame: object) -> None:
    global stop
    stop = True


def main() -> int:
    db, rate = sys.argv[1], float(sys.argv[2])
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    conn = sqlite3.connect(db, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
    conn.execute("CREATE TABLE IF NOT EXISTS health_check (id INTEGER PRIMARY KEY, timestamp_ms INTEGER)")
    conn.commit()
    seq = 0
    period = 1.0 / rate
    next_t = time.monotonic()
    last_health = 0.0
    while not stop:
        now_ms = int(time.time() * 1000)
        conn.execute("INSERT INTO messages (type, message) VALUES (?, ?)",
                     ("telemetry", json.dumps({"ts": now_ms, "values": {"seq": seq, "temperature": 20 + seq % 10}})))
        if time.monotonic() - last_health >= 1.0:
            last_health = time.monotonic()
            conn.execute("INSERT OR REPLACE INTO health_check (id, timestamp_ms) VALUES (1, ?)", (now_ms,))
        conn.commit()
        seq += 1
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))
    conn.close()
    print(f"sent {seq}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
