"""Store behaviour under faults, against real SQLite files: what is moved aside and what never is,
file identity, bounded reads of whatever a controller stored, chunked clean-ups, disk headroom."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.store import archive as archive_store
from gatewayd.store import controller as controller_store
from gatewayd.store import queues
from gatewayd.store.controller import Oversized
from gatewayd.store.db import Tracked, corrupt_copies, move_aside, open_db, transaction
from gatewayd.store.errors import Fault, classify
from gatewayd.store.faults import FaultState
from gatewayd.store.space import Headroom, release_reserve, reserve_path


def test_a_locked_file_is_not_damaged(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t(a)")             # rollback journal: a writer blocks a mode change
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError) as e:
        open_db(path, ["CREATE TABLE u(b)"], busy_timeout_ms=100)
    assert classify(e.value) is Fault.TRANSIENT
    assert corrupt_copies(tmp_path) == []
    holder.execute("COMMIT")                        # the holder's commit still works
    holder.close()
    open_db(path, ["CREATE TABLE u(b)"]).close()


def test_move_aside_takes_the_journal_too(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    for suffix, data in (("", b"x" * 200), ("-journal", b"j"), ("-wal", b"w"), ("-shm", b"s")):
        Path(str(path) + suffix).write_bytes(data)
    target = move_aside(path, "test")
    assert not any(Path(str(path) + s).exists() for s in ("", "-journal", "-wal", "-shm"))
    assert Path(str(target) + "-journal").read_bytes() == b"j"
    assert corrupt_copies(tmp_path) == [str(target)]


def test_a_controller_file_is_never_moved(tmp_path: Path) -> None:
    path = tmp_path / "communication_queue.db"
    junk = b"\x00junk" * 1000
    path.write_bytes(junk)
    with pytest.raises(sqlite3.DatabaseError) as e:
        controller_store.open_controller(path)
    assert classify(e.value) is Fault.CORRUPT
    assert path.read_bytes() == junk and corrupt_copies(tmp_path) == []


def test_tracked_notices_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "queues.db"
    t = Tracked(path, queues.open_queues)
    conn = t.open()
    assert not t.replaced()
    os.replace(path, tmp_path / "elsewhere.db")
    assert t.replaced()                              # gone
    queues.open_queues(path).close()
    assert t.replaced()                              # a new file at the path
    assert t.reopen() is not conn and not t.replaced()
    t.close()


def _controller(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    conn.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type, message)")
    return conn


value = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.binary(max_size=300),
                  st.text(max_size=100), st.integers(0, 9000).map(lambda n: b"b" * n))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(value, value), min_size=1, max_size=40), st.integers(1, 50), st.sampled_from([1, 64, 8192]))
def test_read_batch_returns_values_as_stored_within_bounds(tmp_path: Path, rows: list[tuple[object, object]],
                                                           limit: int, max_total: int) -> None:
    conn = _controller(tmp_path)
    try:
        conn.executemany("INSERT INTO messages(type, message) VALUES (?, ?)", rows)
        max_value = 5000
        _, got = controller_store.read_batch(conn, 0, limit, max_value, max_total)
        assert 1 <= len(got) <= min(limit, len(rows))
        for (_, t, m), (t0, m0) in zip(got, rows, strict=False):
            for have, want in ((t, t0), (m, m0)):
                raw = want.encode() if isinstance(want, str) else want
                if isinstance(raw, bytes) and len(raw) > max_value:
                    assert have == Oversized(len(raw))
                else:
                    assert have == raw
    finally:
        conn.execute("DROP TABLE messages")
        conn.close()


def test_delete_ranges_refuses_after_a_schema_change(tmp_path: Path) -> None:
    conn = _controller(tmp_path)
    conn.executemany("INSERT INTO messages(type, message) VALUES ('t', ?)", [(str(i),) for i in range(10)])
    version, _ = controller_store.read_batch(conn, 0, 10, 10, 1000)
    conn.execute("DROP TABLE messages")
    conn.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type, message)")
    conn.executemany("INSERT INTO messages(type, message) VALUES ('t', ?)", [(str(i),) for i in range(5)])
    assert not controller_store.delete_ranges(conn, [(1, 10)], version)
    assert controller_store.depth(conn) == 5         # the new table's rows are untouched
    assert controller_store.delete_ranges(conn, [(1, 2), (4, 4)], None)
    assert [r[0] for r in conn.execute("SELECT id FROM messages")] == [3, 5]


def test_outbox_caps_in_chunks_that_each_commit(tmp_path: Path) -> None:
    conn = queues.open_queues(tmp_path / "queues.db")
    with transaction(conn):
        queues.append(conn, [(0, "telemetry", "t", "x" * 10, i, 1) for i in range(10_000)])
        queues.bump(conn, {"ingested": 10_000})
    other = queues.open_queues(tmp_path / "queues.db")
    dropped = queues.enforce_caps(conn, max_rows=1000, max_bytes=10**9, chunk=1000, budget_s=0)
    assert dropped == 1000                           # one chunk, then the budget ended the call ...
    assert queues.counters(other)["outbox_rows"] == 9000   # ... committed: another connection sees it
    while queues.over_caps(conn, 1000, 10**9):
        queues.enforce_caps(conn, max_rows=1000, max_bytes=10**9, chunk=1000, budget_s=0)
    c = queues.counters(other)
    assert c["outbox_rows"] == 1000 and c["dropped"] == 9000
    assert c["ingested"] == c["queued"] + c["dropped"]


def test_archive_limits_stop_at_their_budget(tmp_path: Path) -> None:
    conn = archive_store.open_archive(tmp_path / "archive.db")
    old = int((time.time() - 400 * 86400) * 1000)
    with transaction(conn):
        archive_store.insert(conn, [(old, "telemetry", "x")] * 50_000)
    assert archive_store.enforce_limits(conn, 10**12, 30, chunk=1000, budget_s=0) == 1000
    assert archive_store.count_range(conn, 0, 2**62) == 49_000
    assert archive_store.enforce_limits(conn, 10**12, 30, chunk=1000) == 49_000


def test_headroom_reserve(tmp_path: Path) -> None:
    free = Headroom(tmp_path, 0, 0).free()
    room = Headroom(tmp_path, min_free_bytes=1 << 20, reserve_bytes=1 << 20)
    assert not room.low() and reserve_path(tmp_path).stat().st_size == 1 << 20
    assert release_reserve(tmp_path) >= 1 << 20 and not reserve_path(tmp_path).exists()
    assert release_reserve(tmp_path) == 0
    assert Headroom(tmp_path, min_free_bytes=free * 2, reserve_bytes=0).low()


def test_fault_state_reports_once_backs_off_within_bounds_and_records_late(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The one fault policy of every daemon, on a real queues.db that first refuses writes."""
    caplog.set_level(logging.INFO, "gatewayd.test")
    path = tmp_path / "queues.db"
    queues.open_queues(path).close()
    usable: list[sqlite3.Connection] = []
    faults = FaultState("forwarder", logging.getLogger("gatewayd.test"), tmp_path,
                        lambda: usable[0] if usable else None, initial=0.25, maximum=2.0)
    reserve_path(tmp_path).write_bytes(b"\0" * 4096)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13
    full.sqlite_errorname = "SQLITE_FULL"
    delays = [faults.failed(full, 100.0, "queues.db") for _ in range(6)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]            # doubling, bounded
    assert faults.waiting(101.0) and not faults.waiting(102.5)
    assert not reserve_path(tmp_path).exists()                    # a full disk releases the reserve
    faults.failed(sqlite3.OperationalError("disk I/O error"), 100.0, "queues.db")  # another fault: said again
    logged = [r.getMessage() for r in caplog.records if r.getMessage().endswith("; will retry")]
    assert logged == ["queues.db: database or disk is full (SQLITE_FULL); will retry",
                      "queues.db: OperationalError: disk I/O error; will retry"]
    assert faults.unrecorded is not None                          # nothing could record it yet
    usable.append(queues.open_queues(path))
    try:
        faults.clear(130.0)
        assert "recovered: queues.db: OperationalError: disk I/O error (after 30 s)" in caplog.text
        assert not faults.faulted and faults.unrecorded is None and faults.backoff == 0
        assert queues.last_error(queues.all_state(usable[0]), "forwarder") == (
            "recovered: queues.db: OperationalError: disk I/O error")
        faults.clear(131.0)
        assert caplog.text.count("recovered:") == 1
    finally:
        usable[0].close()
