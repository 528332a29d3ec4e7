"""Helpers shared by the bridge integration tests (no tests in here)."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from gatewayd import topics
from gatewayd.store import queues
from gatewayd.store.db import transaction
from tests.helpers.daemons import Daemon, wait_for, write_config

TOPIC = topics.TOPIC_TELEMETRY
DEVICE = "bridge-dev"
TOKEN = "bridge-token-1"


def bridge_config(base: Path, port: int, **tb: Any) -> Path:
    keys: dict[str, Any] = {"host": "127.0.0.1", "port": port, "access_token": TOKEN, "device_name": DEVICE,
                            "reconnect_max_s": 1.0}
    keys.update(tb)
    return write_config(base, {"thingsboard": keys})


def record(seq: int, pad: int = 0) -> str:
    extra = ',"pad":"' + "x" * pad + '"' if pad else ""
    return f'{{"ts":{1_700_000_000_000 + seq},"values":{{"seq":{seq}{extra}}}}}'


def fill(base: Path, seqs: range | list[int], pad: int = 0) -> None:
    """Queue telemetry records in the outbox exactly as the forwarder does (counted ledger rows)."""
    q = queues.open_queues(base / "state" / "queues.db")
    try:
        with transaction(q):
            queues.append(q, [(queues.PRIO_TELEMETRY, queues.KIND_TELEMETRY, TOPIC, record(s, pad),
                               1_700_000_000_000 + s, 1) for s in seqs])
            queues.bump(q, {"ingested": len(seqs)})
    finally:
        q.close()


class Feeder(threading.Thread):
    """Queues `total` records in chunks while the test does other things."""

    def __init__(self, base: Path, total: int, chunk: int = 500, pause: float = 0.02, first: int = 0):
        super().__init__(daemon=True)
        self.base, self.total, self.chunk, self.pause, self.first = base, total, chunk, pause, first
        self.done = threading.Event()

    def run(self) -> None:
        """Records `first` .. `total - 1`."""
        for start in range(self.first, self.total, self.chunk):
            fill(self.base, range(start, min(self.total, start + self.chunk)))
            time.sleep(self.pause)
        self.done.set()


def ro(base: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{base / 'state' / 'queues.db'}?mode=ro", uri=True, timeout=10)


def counters(base: Path) -> dict[str, int]:
    c = ro(base)
    try:
        return dict(c.execute("SELECT name, value FROM counters").fetchall())
    finally:
        c.close()


def state(base: Path, key: str) -> Any:
    c = ro(base)
    try:
        row = c.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None
    finally:
        c.close()


def inbound(base: Path) -> list[tuple[str, bytes]]:
    c = ro(base)
    try:
        return [(t, bytes(p)) for t, p in c.execute("SELECT topic, payload FROM inbound ORDER BY id")]
    finally:
        c.close()


def dead_letters(base: Path) -> list[tuple[str, str]]:
    c = ro(base)
    try:
        return list(c.execute("SELECT message, reason FROM dead_letters ORDER BY id"))
    finally:
        c.close()


def outbox_empty(base: Path) -> bool:
    return counters(base)["outbox_rows"] == 0


def captured_seqs(capture: Path, device: str = DEVICE) -> list[int]:
    out: list[int] = []
    if not capture.exists():
        return out
    data = capture.read_bytes()
    # The simulator may be writing as we read: a last line without its newline is not complete yet.
    for line in data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("device") == device and "seq" in rec.get("values", {}):
            out.append(rec["values"]["seq"])
    return out


def check_complete_and_ordered(seqs: list[int], total: int) -> int:
    """Every record arrived; first arrivals are in order; returns the number of duplicates."""
    assert set(seqs) == set(range(total)), f"missing: {sorted(set(range(total)) - set(seqs))[:20]}"
    first: list[int] = []
    seen: set[int] = set()
    for s in seqs:
        if s not in seen:
            seen.add(s)
            first.append(s)
    assert first == list(range(total)), "records arrived out of order"
    return len(seqs) - total


class NotifySocket:
    """A fake systemd notify socket: collects the datagrams a daemon sends."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def env(self, watchdog_usec: int = 2_000_000) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(watchdog_usec)}

    def drain(self, seconds: float) -> list[tuple[float, str]]:
        """Collect for `seconds`; returns what came in during that time."""
        got: list[tuple[float, str]] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                continue
            for line in data.decode(errors="replace").splitlines():
                got.append((time.monotonic(), line))
        self.messages.extend(got)
        return got

    def close(self) -> None:
        self.sock.close()


def start_bridge(cfg: Path, env: dict[str, str] | None = None, python: str | None = None,
                 prefix: list[str] | None = None) -> Daemon:
    return Daemon("bridge", cfg, python=python, env=env, argv_prefix=prefix).start()


__all__ = ["wait_for"]
