"""SQLite connections as every gatewayd process opens them.

WAL, `synchronous=FULL` (a commit is on disk when it returns), a `busy_timeout` so several
processes can share a file, explicit short transactions, numbered migrations guarded by
`PRAGMA user_version`. Opening costs the same whatever the file size: only a file SQLite
itself reports as damaged (SQLITE_CORRUPT / SQLITE_NOTADB) is moved aside (never deleted),
and only when gatewayd owns it; the full integrity check runs later (`store/check.py`).
Every other error (locked, full, read-only, I/O) propagates for the caller to retry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path

from gatewayd.store.errors import Fault, classify

log = logging.getLogger("gatewayd.store")

BUSY_TIMEOUT_MS = 5000
CORRUPT_SUFFIX = ".corrupt-"
SIDE_FILES = ("-wal", "-shm", "-journal")
DB_FILE_MODE = 0o640
SQLITE_HEADER = b"SQLite format 3\x00"
# Pages of the files gatewayd creates. A small transaction writes whole pages to the WAL (page
# 1, b-tree interior, counters, marks, the leaf): 2 KiB pages write about 30 % fewer bytes per
# record than SQLite's 4 KiB at a controller's pace, at no cost in bulk throughput (1 KiB would
# save another 15 % but costs 15-30 % of the bulk rates). Fixed when a file is created.
NEW_FILE_PAGE_SIZE = 2048


class NotADatabase(sqlite3.DatabaseError):
    """A non-empty file without SQLite's header: classified CORRUPT like SQLITE_NOTADB."""

    sqlite_errorcode = 26
    sqlite_errorname = "SQLITE_NOTADB"


class NotAFile(sqlite3.OperationalError):
    """A database path (or its -wal/-shm) that is a FIFO, a directory or a device: SQLite would
    block opening a FIFO for reading, for ever. Classified like SQLITE_CANTOPEN: a fault of the
    moment, reported and retried (a controller container can put anything at its paths)."""

    sqlite_errorcode = 14
    sqlite_errorname = "SQLITE_CANTOPEN"


def _require_files(path: Path) -> None:
    """Raise NotAFile unless `path` and its side files, where present, are regular files.

    One lstat each (stat for the database itself: a controller may link it); without O_NONBLOCK
    nothing here or in SQLite could wait on a FIFO."""
    for p, look in ((path, os.stat), *((Path(str(path) + ext), os.lstat) for ext in SIDE_FILES)):
        try:
            mode = look(p).st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            raise NotAFile(f"unable to open database file {p}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise NotAFile(f"unable to open database file {p}: not a regular file")


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def open_readonly(path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A connection that can never write nor create a file (gatewayctl, the HTTP endpoint).

    `mode=ro` alone still creates the -wal and -shm files of a WAL database no process has
    open (and fails where it may not). Without a -wal file no writer is active and the main
    file is the whole database, so it is read `immutable` then, which touches nothing else.
    """
    if not path.exists():
        raise sqlite3.OperationalError(f"unable to open database file {path}: it does not exist")
    _require_files(path)
    extra = "" if Path(str(path) + "-wal").exists() else "&immutable=1"
    conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro{extra}", uri=True,
                           timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
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


def move_aside(path: Path, reason: str) -> Path:
    """Rename a damaged database (and its -wal/-shm/-journal) out of the way, kept for forensics.

    Only for files gatewayd owns: a controller's file is reported, never renamed.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{stamp}.{n}")
        n += 1
    os.replace(path, target)
    for ext in SIDE_FILES:
        side = Path(str(path) + ext)
        if side.exists():
            os.replace(side, Path(str(target) + ext))
    log.critical("database %s is damaged (%s); moved aside to %s and starting a new one", path, reason, target)
    return target


def check_header(path: Path) -> None:
    """Raise NotADatabase when a non-empty file does not start like an SQLite database.

    Costs one read of 16 bytes, so it can run before READY whatever the file size.
    """
    _require_files(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    if head and head != SQLITE_HEADER:
        raise NotADatabase(f"{path} is not an SQLite database (header {head[:16]!r})")


def open_db(path: Path, migrations: Sequence[str] = (), *, check: bool = True,
            busy_timeout_ms: int = BUSY_TIMEOUT_MS, create_sql: str = "") -> sqlite3.Connection:
    """Open (creating if needed) a database in WAL mode and bring its schema up to date.

    `migrations[i]` takes the schema from user_version i to i+1. `create_sql` is run with
    IF NOT EXISTS semantics for files whose schema we do not own (the controller's).
    With `check`, a file SQLite reports as damaged is moved aside and replaced by a new one;
    without it (and for every other error) the exception reaches the caller.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _open(path, migrations, busy_timeout_ms, create_sql)
    except Exception as e:
        if not check or classify(e) is not Fault.CORRUPT:
            raise
        move_aside(path, str(e))
    return _open(path, migrations, busy_timeout_ms, create_sql)


def _open(path: Path, migrations: Sequence[str], busy_timeout_ms: int, create_sql: str) -> sqlite3.Connection:
    _own_file(path)
    check_header(path)
    conn = _connect(path, busy_timeout_ms)
    try:
        if os.path.getsize(path) == 0:
            conn.execute(f"PRAGMA page_size = {NEW_FILE_PAGE_SIZE}")
        # Reading the schema first makes a damaged page 1 fail here, before anything is written.
        conn.execute("PRAGMA schema_version").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            log.warning("%s: journal_mode is %s, not wal", path, mode)
        conn.execute("PRAGMA synchronous = FULL")
        if create_sql:
            _create_missing(conn, create_sql)
        if migrations:
            migrate(conn, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def _create_missing(conn: sqlite3.Connection, script: str) -> None:
    """Run `CREATE … IF NOT EXISTS` statements, taking the write lock only when something is missing."""
    stmts = _statements(script)
    existing = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    missing = [s for s in stmts if _created_name(s) not in existing]
    if missing:
        with transaction(conn):
            for stmt in missing:
                conn.execute(stmt)


def _created_name(stmt: str) -> str:
    """The object name of `CREATE TABLE|INDEX IF NOT EXISTS name(...)`."""
    words = stmt.replace("(", " ").split()
    return words[5] if len(words) > 5 and words[2:5] == ["IF", "NOT", "EXISTS"] else ""


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
        try:
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full, I/O) may leave the transaction open: end it, or the
            # next BEGIN fails with "cannot start a transaction within a transaction".
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise


# Rows per INSERT statement, largest first: one statement per row (executemany) costs SQLite a
# statement start and end per row, and with AUTOINCREMENT a sqlite_sequence update per row;
# many rows per statement cost that once (about three times faster in the forwarder's batches).
# Few sizes, so that the driver's statement cache holds every text.
INSERT_CHUNKS = (256, 32, 4, 1)
_insert_sql: dict[tuple[str, str, str, int], str] = {}


def insert_rows(conn: sqlite3.Connection, head: str, row: str, rows: Sequence[Sequence[object]], tail: str = "",
                shared: Sequence[object] = ()) -> None:
    """`head` + `row` once per row, comma-separated, + `tail`: e.g. "INSERT INTO t(a, b) VALUES " and
    "(?, ?)", or "INSERT INTO t(a, b, c) SELECT column1, column2, ?1 FROM (VALUES ", "(?, ?)", ")"
    with `shared` = (c,): values bound once per statement as ?1, ?2, … ahead of the rows'."""
    i, n = 0, len(rows)
    for size in INSERT_CHUNKS:
        if n - i < size:
            continue
        key = (head, row, tail, size)
        sql = _insert_sql.get(key)
        if sql is None:
            sql = _insert_sql[key] = head + ",".join([row] * size) + tail
        while n - i >= size:
            params = list(shared)
            params.extend(chain.from_iterable(rows[i:i + size]))
            conn.execute(sql, params)
            i += size


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


def schema_version(conn: sqlite3.Connection) -> int:
    """Changes whenever any connection changes the schema (a table dropped, created, altered)."""
    return int(conn.execute("PRAGMA schema_version").fetchone()[0])


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none: a replaced file differs."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Tracked:
    """A connection that knows which file it was opened on, to notice the file being replaced.

    Another process may move a damaged database aside and start a new one, or an operator may
    restore a file: a connection to the old inode would go on reading and writing a file nobody
    else sees. Call `replaced()` once per loop iteration (one `stat`) and `reopen()` when true.
    """

    def __init__(self, path: Path, opener: Callable[[Path], sqlite3.Connection]):
        self.path = path
        self._opener = opener
        self.conn: sqlite3.Connection | None = None
        self.identity: tuple[int, int] | None = None

    def open(self) -> sqlite3.Connection:
        if self.conn is None:
            for attempt in range(3):  # the file may be swapped between the open and the stat
                before = file_identity(self.path)
                conn = self._opener(self.path)
                after = file_identity(self.path)
                if before in (after, None) or attempt == 2:
                    break
                conn.close()
            self.conn, self.identity = conn, after
        return self.conn

    def replaced(self) -> bool:
        return self.conn is not None and file_identity(self.path) != self.identity

    def reopen(self) -> sqlite3.Connection:
        self.close()
        return self.open()

    def follow(self, who: str) -> bool:
        """Close the connection when the path names another file now (said once); True when it did.

        The caller forgets what it knew about the old file and opens the new one."""
        if not self.replaced():
            return False
        log.warning("%s was replaced under the %s; reopening it", self.path, who)
        self.close()
        return True

    def move_aside(self, reason: str) -> bool:
        """The file is damaged: close the connection and move the file aside (kept, `move_aside`), unless
        the path already names another file than the one this connection had open (another daemon moved
        it first: nothing to do but follow). True when moved here."""
        current = file_identity(self.path)
        ours = self.identity is None or current == self.identity
        self.close()
        if current is None or not ours:
            return False
        move_aside(self.path, reason)
        return True

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        self.conn = None
        self.identity = None


def corrupt_copies(*dirs: Path) -> list[str]:
    """Files moved aside by `move_aside`, for status reports."""
    found: list[str] = []
    for d in dirs:
        try:
            found.extend(str(p) for p in sorted(d.glob(f"*.db{CORRUPT_SUFFIX}*"))
                         if not str(p).endswith(SIDE_FILES))
        except OSError:
            pass
    return found
