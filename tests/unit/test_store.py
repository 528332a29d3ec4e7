from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd import topics
from gatewayd.store import archive as archive_store
from gatewayd.store import controller as controller_store
from gatewayd.store import queues
from gatewayd.store.check import BackgroundCheck
from gatewayd.store.db import corrupt_copies, get_mark, migrate, open_db, set_mark, transaction
from tests.helpers.daemons import wait_for


def qconn(tmp_path: Path) -> sqlite3.Connection:
    return queues.open_queues(tmp_path / "queues.db")


def balanced(c: dict[str, int]) -> bool:
    return c["ingested"] == c["delivered"] + c["queued"] + c["dead_lettered"] + c["dropped"]


def test_wal_and_schema_version(tmp_path: Path) -> None:
    conn = qconn(tmp_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(queues.MIGRATIONS)
    conn.close()
    conn = qconn(tmp_path)  # reopening does not migrate again
    assert queues.counters(conn)["ingested"] == 0


def test_migrations_step_by_step(tmp_path: Path) -> None:
    steps = ["CREATE TABLE a(x)", "ALTER TABLE a ADD COLUMN y; CREATE TABLE b(z)"]
    conn = open_db(tmp_path / "m.db", steps[:1])
    conn.execute("INSERT INTO a(x) VALUES (1)")
    migrate(conn, steps)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT x, y FROM a").fetchall() == [(1, None)]


def test_concurrent_openers_migrate_once(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            queues.open_queues(tmp_path / "queues.db").close()
        except BaseException as e:  # noqa: BLE001 - collected, and asserted to be none below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    conn = qconn(tmp_path)
    assert conn.execute("SELECT count(*) FROM counters WHERE name = 'ingested'").fetchone()[0] == 1


def test_newer_schema_refused(tmp_path: Path) -> None:
    conn = qconn(tmp_path)
    conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer than this gatewayd"):
        migrate(conn, queues.MIGRATIONS + ["SELECT 1"])


def test_corrupt_file_moved_aside_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "queues.db"
    garbage = b"this is not a database" * 500
    path.write_bytes(garbage)
    conn = queues.open_queues(path)
    assert queues.counters(conn)["ingested"] == 0
    moved = corrupt_copies(tmp_path)
    assert len(moved) == 1 and Path(moved[0]).read_bytes() == garbage


def test_damaged_pages_found_by_the_background_check(tmp_path: Path) -> None:
    path = tmp_path / "queues.db"
    conn = qconn(tmp_path)
    with transaction(conn):
        queues.append(conn, [(0, "telemetry", "t", "x" * 500, 1, 1)] * 2000)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    for off in range(page * 3, page * 6):
        data[off] = 0x5A
    path.write_bytes(bytes(data))
    # Opening reads page 1 only, so it costs the same whatever the file size ...
    queues.open_queues(path).close()
    assert corrupt_copies(tmp_path) == []
    # ... and the full check, run in the background, finds the damage.
    check = BackgroundCheck([path, tmp_path / "missing.db"]).start()
    wait_for(check.done, 30, what="integrity check")
    results = {r.path: r.problem for r in check.results()}
    assert results[tmp_path / "missing.db"] is None
    problem = results[path]
    assert problem is not None and ("integrity check failed" in problem or "malformed" in problem), problem


def test_outbox_priority_then_age(tmp_path: Path) -> None:
    conn = qconn(tmp_path)
    with transaction(conn):
        queues.append(conn, [(0, "telemetry", "t", "t1", 1, 1), (0, "telemetry", "t", "t2", 2, 1)])
    queues.enqueue(conn, queues.KIND_RPC_REPLY, topics.rpc_response("7"), '{"ok":1}', queues.PRIO_RPC_REPLY)
    with transaction(conn):
        queues.append(conn, [(queues.PRIO_ATTRIBUTES, "attributes", "a", "a1", 3, 1)])
    rows = queues.peek(conn, 10)
    assert [r.payload for r in rows] == ['{"ok":1}', "a1", "t1", "t2"]
    assert [r.payload for r in queues.peek(conn, 10, min_priority=1)] == ['{"ok":1}', "a1"]


def test_ledger_through_delivery_dead_letter_and_drop(tmp_path: Path) -> None:
    conn = qconn(tmp_path)
    with transaction(conn):
        queues.append(conn, [(0, "telemetry", "t", f"r{i}", i, 1) for i in range(10)])
        queues.bump(conn, {"ingested": 10})
    rows = queues.peek(conn, 3)
    assert queues.mark_delivered(conn, [r.id for r in rows]) == 3
    assert queues.mark_delivered(conn, [r.id for r in rows]) == 0  # a late duplicate PUBACK counts nothing
    queues.dead_letter_outbox(conn, queues.peek(conn, 1)[0], "too big", "bridge")
    dropped = queues.enforce_caps(conn, max_rows=4, max_bytes=10**9)
    c = queues.counters(conn)
    assert (c["delivered"], c["dead_lettered"], c["dropped"], c["queued"]) == (3, 1, dropped, 4)
    assert dropped == 2 and c["outbox_rows"] == 4
    assert balanced(c)
    assert [r.payload for r in queues.peek(conn, 10)] == ["r6", "r7", "r8", "r9"]
    dl = conn.execute("SELECT stage, reason, message FROM dead_letters").fetchall()
    assert dl == [("bridge", "too big", "r3")]


def test_caps_never_drop_attributes_or_replies(tmp_path: Path) -> None:
    conn = qconn(tmp_path)
    with transaction(conn):
        queues.append(conn, [(queues.PRIO_ATTRIBUTES, "attributes", "a", "a" * 100, 1, 1)] * 5)
        queues.append(conn, [(0, "telemetry", "t", "t" * 100, 1, 1)] * 5)
        queues.bump(conn, {"ingested": 10})
    queues.enqueue(conn, queues.KIND_RPC_REPLY, "r", "{}", queues.PRIO_RPC_REPLY)
    assert queues.enforce_caps(conn, max_rows=2, max_bytes=10**9) == 5
    kinds = sorted(r.kind for r in queues.peek(conn, 100))
    assert kinds == ["attributes"] * 5 + ["rpc_reply"]
    assert balanced(queues.counters(conn))


def test_byte_cap(tmp_path: Path) -> None:
    conn = qconn(tmp_path)
    with transaction(conn):
        queues.append(conn, [(0, "telemetry", "t", "x" * 1000, i, 1) for i in range(100)])
    queues.enforce_caps(conn, max_rows=10**6, max_bytes=50_000)
    c = queues.counters(conn)
    assert c["outbox_bytes"] == 50_000 and c["outbox_rows"] == 50
    assert c["outbox_bytes"] == conn.execute("SELECT sum(length(payload)) FROM outbox").fetchone()[0]


def test_marks_and_state(tmp_path: Path) -> None:
    conn = qconn(tmp_path)
    assert get_mark(conn, "x") == ("", 0)
    with transaction(conn):
        set_mark(conn, "x", "e1", 5)
        queues.set_state(conn, "bridge.mqtt", {"connected": True})
    assert get_mark(conn, "x") == ("e1", 5)
    assert queues.get_state(conn, "bridge.mqtt") == {"connected": True}
    assert queues.get_state(conn, "nope", 3) == 3


def test_inbound(tmp_path: Path) -> None:
    conn = qconn(tmp_path)
    queues.put_inbound(conn, "v1/devices/me/rpc/request/1", b'{"method":"ping"}')
    assert queues.depth(conn, "inbound") == 1


def test_controller_contract_tables_created(tmp_path: Path) -> None:
    conn = controller_store.open_controller(tmp_path / "communication_queue.db")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"messages", "health_check"} <= tables
    e1 = controller_store.epoch(conn)
    assert controller_store.epoch(conn) == e1 and len(e1) == 32
    controller_store.touch_health(conn)
    assert controller_store.last_health_check_ms(conn)


def test_controller_table_without_autoincrement_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "communication_queue.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY, type TEXT, message TEXT)")
    raw.execute("INSERT INTO messages(type, message) VALUES ('telemetry', 'keep me')")
    raw.commit()
    raw.close()
    conn = controller_store.open_controller(path)
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    assert "AUTOINCREMENT" in sql
    assert conn.execute("SELECT id, message FROM messages").fetchall() == [(1, "keep me")]
    conn.execute("INSERT INTO messages(id, type, message) VALUES (100, 'telemetry', '{}')")
    conn.execute("DELETE FROM messages")
    assert controller_store.enqueue(conn, "telemetry", "{}") == 101  # never an id used before


def test_archive_limits(tmp_path: Path) -> None:
    conn = archive_store.open_archive(tmp_path / "archive.db")
    now = int(time.time() * 1000)
    with transaction(conn):
        conn.executemany("INSERT INTO archive(ts, type, message) VALUES (?,?,?)",
                         [(now - 10 * 86400 * 1000, "telemetry", "old")] * 10
                         + [(now, "telemetry", json.dumps({"v": "x" * 200}))] * 3000)
    assert archive_store.count_range(conn, 0, now) == 10
    removed = archive_store.enforce_limits(conn, max_bytes=10**9, retention_days=5)
    assert removed == 10
    before = archive_store.used_bytes(conn)
    archive_store.enforce_limits(conn, max_bytes=before // 2, retention_days=10**6)
    assert archive_store.used_bytes(conn) <= before // 2


def test_last_error_recorded_per_daemon(tmp_path: Path) -> None:
    conn = qconn(tmp_path)
    queues.record_error(conn, "bridge", "boom")
    state = queues.all_state(conn)
    assert queues.last_error(state, "bridge") == "boom"
    assert queues.last_error(state, "forwarder") is None


def test_files_gatewayd_creates_get_small_pages_and_existing_files_keep_theirs(tmp_path: Path) -> None:
    from gatewayd.store.db import NEW_FILE_PAGE_SIZE
    for opener in (queues.open_queues, archive_store.open_archive, controller_store.open_controller):
        conn = opener(tmp_path / f"{opener.__name__}.db")
        assert conn.execute("PRAGMA page_size").fetchone()[0] == NEW_FILE_PAGE_SIZE
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    # a controller that created its file first keeps its page size
    own = tmp_path / "communication_queue.db"
    c = sqlite3.connect(own)
    c.execute("PRAGMA page_size = 4096")
    c.execute("PRAGMA journal_mode = WAL")
    c.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
    c.close()
    conn = controller_store.open_controller(own)
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    conn.close()


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1) | st.none(), st.text() | st.binary(),
                               st.floats(allow_nan=False)), max_size=700))
def test_insert_rows_stores_every_row_in_order_whatever_the_count(rows: list[tuple[object, ...]]) -> None:
    from gatewayd.store.db import insert_rows
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY AUTOINCREMENT, a, b, c)")
    insert_rows(conn, "INSERT INTO t(a, b, c) VALUES ", "(?, ?, ?)", rows)
    assert conn.execute("SELECT a, b, c FROM t ORDER BY id").fetchall() == rows
    assert conn.execute("SELECT count(*), coalesce(max(id), 0) FROM t").fetchone() == (len(rows), len(rows))
    conn.execute("CREATE TABLE u(id INTEGER PRIMARY KEY AUTOINCREMENT, a, b, c, d)")
    insert_rows(conn, "INSERT INTO u(d, a, b, c) SELECT ?1, column1, column2, column3 FROM (VALUES ", "(?, ?, ?)",
                rows, ")", ("shared",))
    assert conn.execute("SELECT a, b, c FROM u ORDER BY id").fetchall() == rows
    assert conn.execute("SELECT count(*) FROM u WHERE d IS NOT 'shared'").fetchone() == (0,)
