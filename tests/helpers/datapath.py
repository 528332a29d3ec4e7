"""The data path seen from outside: a controller writing its queue from another process, the
state the forwarder leaves in the databases, `gatewayctl status`, and file-system faults
(a tmpfs that fills up, read-only bind mounts) made with real mounts.

Everything started here is stopped by PID, everything mounted is unmounted, every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.helpers.daemons import ROOT

# A controller in its own process, driven line by line over stdin (one JSON command per line,
# one JSON answer per line), so a test can hold a transaction open across other events.
# Values travel as {"t": kind, "v": ...}: "text" (str), "textbytes" (bytes stored as TEXT, which
# may be invalid UTF-8), "blob", "int", "real", "null", "big" (n bytes of JSON text made here).
WRITER = r"""
import base64, json, sqlite3, sys
db, journal = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(db, timeout=30, isolation_level=None)
if journal != "keep":
    conn.execute(f"PRAGMA journal_mode={journal}")

def value(spec):
    t, v = spec["t"], spec.get("v")
    if t == "text":
        return v, "?"
    if t == "textbytes":
        return base64.b64decode(v), "CAST(? AS TEXT)"
    if t == "blob":
        return base64.b64decode(v), "?"
    if t == "big":
        return '{"ts":1,"values":{"x":"' + "x" * int(v) + '"}}', "?"
    if t in ("int", "real"):
        return v, "?"
    return None, "?"

for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    try:
        if op == "sql":
            conn.execute(cmd["sql"])
            out = {"ok": True}
        elif op == "insert":
            ids = []
            for type_spec, msg_spec in cmd["rows"]:
                tv, tsql = value(type_spec)
                mv, msql = value(msg_spec)
                cur = conn.execute(f"INSERT INTO messages(type, message) VALUES ({tsql}, {msql})", (tv, mv))
                ids.append(cur.lastrowid)
            out = {"ok": True, "ids": ids}
        else:
            out = {"ok": True}
            break
    except sqlite3.Error as e:
        out = {"ok": False, "error": str(e), "name": getattr(e, "sqlite_errorname", None)}
    print(json.dumps(out), flush=True)
"""

SEED_SCHEMA = ("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT); "
               "CREATE TABLE IF NOT EXISTS health_check (id INTEGER PRIMARY KEY, timestamp_ms INTEGER)")
# Columns without a declared type keep every value in the storage class it was given (a TEXT
# column turns INTEGER and REAL values into text): what a controller may well create.
UNTYPED_SCHEMA = SEED_SCHEMA.replace("type TEXT, message TEXT", "type, message")


def big_message(n: int) -> str:
    """What the writer stores for spec("big", n): a record about n bytes long."""
    return '{"ts":1,"values":{"x":"' + "x" * n + '"}}'


def spec(kind: str, value: Any = None) -> dict[str, Any]:
    """A value for the writer: bytes are sent base64-encoded."""
    if isinstance(value, bytes):
        value = base64.b64encode(value).decode()
    return {"t": kind, "v": value}


def record(seq: int, ts: int = 1_700_000_000_000, **values: Any) -> dict[str, Any]:
    return spec("text", json.dumps({"ts": ts + seq, "values": {"seq": seq, **values}}))


class Writer:
    """The controller process: `sql()` and `insert()` return its answer; `begin()` opens a transaction."""

    def __init__(self, db: Path, journal: str = "WAL"):
        db.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), journal], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def _ask(self, cmd: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"controller writer did not answer {cmd['op']} within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"controller writer exited with {self.proc.wait(5)}")
        return dict(json.loads(line))

    def sql(self, statement: str, check: bool = True) -> dict[str, Any]:
        out = self._ask({"op": "sql", "sql": statement})
        if check and not out["ok"]:
            raise RuntimeError(f"{statement}: {out['error']}")
        return out

    def insert(self, rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[int]:
        out = self._ask({"op": "insert", "rows": rows})
        if not out["ok"]:
            raise RuntimeError(out["error"])
        return list(out["ids"])

    def records(self, seqs: range, type_: str = "telemetry") -> list[int]:
        return self.insert([(spec("text", type_), record(i)) for i in seqs])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def writer(db: Path, journal: str = "WAL", schema: str | None = SEED_SCHEMA) -> Iterator[Writer]:
    w = Writer(db, journal)
    try:
        if schema:
            for stmt in schema.split("; "):
                w.sql(stmt)
        yield w
    finally:
        w.close()


# -- what the forwarder left -----------------------------------------------------------------

def controller_db(base: Path) -> Path:
    return base / "controller" / "communication_queue.db"


def ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def counters(base: Path) -> dict[str, int]:
    with contextlib.closing(ro(base / "state" / "queues.db")) as c:
        return dict(c.execute("SELECT name, value FROM counters").fetchall())


def balanced(c: dict[str, int]) -> bool:
    return c["ingested"] == c["delivered"] + c["queued"] + c["dead_lettered"] + c["dropped"]


def outbox_payloads(base: Path) -> list[dict[str, Any]]:
    with contextlib.closing(ro(base / "state" / "queues.db")) as c:
        return [json.loads(p) for (p,) in c.execute("SELECT payload FROM outbox ORDER BY id")]


def outbox_seqs(base: Path) -> list[int]:
    return [p["values"]["seq"] for p in outbox_payloads(base) if "seq" in p.get("values", {})]


def controller_depth(base: Path) -> int:
    path = controller_db(base)
    if not path.exists():
        return -1
    with contextlib.closing(ro(path)) as c:
        return int(c.execute("SELECT count(*) FROM messages").fetchone()[0])


def moved_aside(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*.corrupt-*"))


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def status_json(config: Path) -> tuple[int, dict[str, Any]]:
    r = ctl(config, "status", "--json")
    return r.returncode, json.loads(r.stdout)


# -- file-system faults (root only) ------------------------------------------------------------

def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A small tmpfs mounted on `path` (created if needed), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


class ReadOnly:
    """`path` (a directory) bind-mounted onto itself; `on()` makes it read-only, `off()` writable again."""

    def __init__(self, path: Path):
        self.path = path
        self.mounted = False

    def on(self) -> None:
        if not self.mounted:
            _run("mount", "--bind", str(self.path), str(self.path))
            self.mounted = True
        _run("mount", "-o", "remount,bind,ro", str(self.path))

    def off(self) -> None:
        if self.mounted:
            _run("mount", "-o", "remount,bind,rw", str(self.path))

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=60)
            self.mounted = False


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[ReadOnly]:
    r = ReadOnly(path)
    try:
        yield r
    finally:
        r.close()


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """`chattr +i` the files that exist: even open file descriptors can no longer write them
    (a read-only remount is refused while a file is open for writing)."""
    done: list[Path] = []
    try:
        for p in paths:
            if p.exists():
                _run("chattr", "+i", str(p))
                done.append(p)
        yield
    finally:
        for p in done:
            subprocess.run(["chattr", "-i", str(p)], capture_output=True, timeout=60)


def can_chattr(directory: Path) -> bool:
    probe = directory / ".chattr-probe"
    probe.touch()
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, timeout=60).returncode == 0
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True, timeout=60)
        return ok
    except OSError:
        return False
    finally:
        probe.unlink()


def sidecars(db: Path) -> list[Path]:
    """A database file and its -wal: what a writer writes. (The -shm is memory-mapped: an
    immutable one turns a write into SIGBUS, which no real fault does.)"""
    return [db, Path(str(db) + "-wal")]


def fill(directory: Path, name: str = "filler") -> Path:
    """Write to a file until the file system holding `directory` has not one byte left."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            block = b"\0" * chunk
            for _ in range(1 << 20):
                try:
                    os.write(fd, block)
                except OSError:
                    break
    finally:
        os.close(fd)
    return path
