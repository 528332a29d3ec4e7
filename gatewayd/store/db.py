"""SQLite connections as every gatewayd process opens them.

WAL, `synchronous=FULL` (a commit is on disk when it returns), a `busy_timeout` so several
processes can share a file, explicit short transactions, numbered migrations guarded by
`PRAGMA user_version`, and a start-up integrity check that moves a corrupt file aside
(never deletes it) and starts a fresh one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("gatewayd.store")

BUSY_TIMEOUT_MS = 5000
CORRUPT_SUFFIX = ".corrupt-"
DB_FILE_MODE = 0o640


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def _own_file(path: Path) -> None:
    """Create a missing database file with mode 0640 (SQLite alone gives 0644 minus the umask),
    or bring one of ours back to 0640. SQLite gives the -wal and -shm files it creates the mode
    (and, running as root, the owner) of the database file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, DB_FILE_MODE)
    except FileExistsError:
        for p in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != DB_FILE_MODE:
                    os.chmod(p, DB_FILE_MODE)
        return
    try:
        os.fchmod(fd, DB_FILE_MODE)
    finally:
        os.close(fd)


def open_readonly(path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A read-only connection to a file another process owns; it never creates nor changes it."""
    conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, timeout=busy_timeout_ms / 1000,
                           isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def move_aside(path: Path, reason: str) -> Path:
    """Rename a damaged database (and its -wal/-shm) out of the way, keeping it for forensics."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{stamp}.{n}")
        n += 1
    os.replace(path, target)
    for ext in ("-wal", "-shm"):
        side = Path(str(path) + ext)
        if side.exists():
            os.replace(side, Path(str(target) + ext))
    log.critical("database %s is damaged (%s); moved aside to %s and starting a new one", path, reason, target)
    return target


def _check(path: Path, busy_timeout_ms: int) -> str | None:
    """None when healthy, else why not."""
    try:
        conn = _connect(path, busy_timeout_ms)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if "locked" in str(e) or "busy" in str(e):
            return None
        return str(e)
    result = "; ".join(str(r[0]) for r in rows[:5])
    return None if result == "ok" else result


def open_db(path: Path, migrations: Sequence[str] = (), *, check: bool = True,
            busy_timeout_ms: int = BUSY_TIMEOUT_MS, create_sql: str = "") -> sqlite3.Connection:
    """Open (creating if needed) a database in WAL mode and bring its schema up to date.

    `migrations[i]` takes the schema from user_version i to i+1. `create_sql` is run with
    IF NOT EXISTS semantics for files whose schema we do not own (the controller's).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if check and path.exists() and path.stat().st_size > 0:
        problem = _check(path, busy_timeout_ms)
        if problem:
            move_aside(path, problem)
    _own_file(path)
    conn = _connect(path, busy_timeout_ms)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    except sqlite3.DatabaseError as e:
        conn.close()
        if not check:
            raise
        move_aside(path, str(e))
        _own_file(path)
        conn = _connect(path, busy_timeout_ms)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        log.warning("%s: journal_mode is %s, not wal", path, mode)
    conn.execute("PRAGMA synchronous = FULL")
    if create_sql:
        with transaction(conn):
            for stmt in _statements(create_sql):
                conn.execute(stmt)
    if migrations:
        migrate(conn, migrations)
    return conn


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def migrate(conn: sqlite3.Connection, migrations: Sequence[str]) -> None:
    """Apply the missing steps, one transaction each; safe when several processes race."""
    target = len(migrations)
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > target:
        raise RuntimeError(f"database schema version {current} is newer than this gatewayd ({target})")
    if current == target:
        return
    with transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > target:
            raise RuntimeError(f"database schema version {version} is newer than this gatewayd ({target})")
        for step in range(version, target):
            for stmt in _statements(migrations[step]):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {step + 1}")
            log.info("database schema migrated to version %d", step + 1)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT: take the write lock up front so no transaction deadlocks mid-way."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


def get_mark(conn: sqlite3.Connection, name: str) -> tuple[str, int]:
    """How far a stage has consumed a source: (epoch of the source file, last row id)."""
    row = conn.execute("SELECT epoch, value FROM marks WHERE name = ?", (name,)).fetchone()
    return (row[0], int(row[1])) if row else ("", 0)


def set_mark(conn: sqlite3.Connection, name: str, epoch: str, value: int) -> None:
    conn.execute("INSERT INTO marks(name, epoch, value) VALUES (?,?,?) "
                 "ON CONFLICT(name) DO UPDATE SET epoch = excluded.epoch, value = excluded.value",
                 (name, epoch, value))


def data_version(conn: sqlite3.Connection) -> int:
    """Changes whenever another connection commits to the file: a cheap 'anything new?' poll."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def corrupt_copies(*dirs: Path) -> list[str]:
    """Files moved aside by `move_aside`, for status reports."""
    found: list[str] = []
    for d in dirs:
        try:
            found.extend(str(p) for p in sorted(d.glob(f"*.db{CORRUPT_SUFFIX}*"))
                         if not str(p).endswith(("-wal", "-shm")))
        except OSError:
            pass
    return found
