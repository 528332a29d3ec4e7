"""What a controller may do to its own database beyond writing rows, tried against the real
daemons: migrations while a delete is pending (each record still moved exactly once, the
ledger adding up), any value in `health_check` (status and /health stay readable)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers.daemons import Daemon, wait_for, write_config
from tests.helpers.datapath import balanced, controller_db, controller_depth, counters, outbox_seqs, writer
from tests.helpers.gateway import gateway

pytestmark = pytest.mark.integration

MIGRATIONS = {
    "index": ["CREATE INDEX by_type ON messages(type)"],
    "column": ["ALTER TABLE messages ADD COLUMN source TEXT"],
    "trigger": ["CREATE TABLE audit(id)", "CREATE TRIGGER audit_delete AFTER DELETE ON messages "
                "BEGIN INSERT INTO audit VALUES (old.id); END"],
    # SQLite's own recipe for a change ALTER TABLE cannot make: a new table, the rows copied
    # with their ids, the old one dropped, the new one renamed.
    "rebuild-keeping-ids": [
        "CREATE TABLE messages_new(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT, note TEXT)",
        "INSERT INTO messages_new(id, type, message) SELECT id, type, message FROM messages",
        "DROP TABLE messages", "ALTER TABLE messages_new RENAME TO messages"],
    # A new table with new rows: ids restart at 1, so the rows at the mark are not the ones moved.
    "recreated": ["DROP TABLE messages",
                  "CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)"],
}


@pytest.mark.parametrize("migration", sorted(MIGRATIONS))
def test_a_migration_while_a_delete_is_pending_moves_each_record_once(tmp_path: Path, daemons: list[Daemon],
                                                                     migration: str) -> None:
    """The controller's migration holds its write lock past the forwarder's busy timeout, so the
    rows just moved cannot be deleted; then the schema changes. Before, any schema change with
    those rows still present was taken for a recreated table: a new epoch and the whole last
    batch queued, archived and counted a second time."""
    fwd = Daemon("forwarder", write_config(tmp_path))
    daemons.append(fwd)
    fwd.start()
    with writer(controller_db(tmp_path)) as w:
        w.records(range(0, 5))
        wait_for(lambda: controller_depth(tmp_path) == 0, 30, what="the first rows moved")
        os.kill(fwd.pid, signal.SIGSTOP)
        try:
            w.records(range(5, 10))
            w.sql("BEGIN IMMEDIATE")
            for statement in MIGRATIONS[migration]:
                w.sql(statement)
        finally:
            os.kill(fwd.pid, signal.SIGCONT)
        wait_for(lambda: len(outbox_seqs(tmp_path)) >= 10, 30, what="rows 5-9 moved")
        fwd.wait_log("database is locked", 30)     # their delete waited out the busy timeout
        time.sleep(0.5)
        new = 0
        if migration == "recreated":
            new = 12                                 # ids 1..12: past the mark of 10
            w.records(range(10, 10 + new))
        w.sql("COMMIT")
        w.records(range(10 + new, 20 + new))
        n = 20 + new
        wait_for(lambda: len(outbox_seqs(tmp_path)) >= n and controller_depth(tmp_path) == 0, 30,
                 what="every record moved")
    seqs = outbox_seqs(tmp_path)
    assert seqs == list(range(n)), seqs
    c = counters(tmp_path)
    assert c["ingested"] == c["queued"] == n and balanced(c), c
    assert ("new epoch" in fwd.log()) == (migration == "recreated")


HEALTH_CHECK_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.floats().map(lambda f: "9e999" if f == float("inf") else "-9e999" if f == float("-inf") else repr(f)
                    if f == f else "NULL"),
    st.text(st.characters(min_codepoint=1, max_codepoint=0xD7FF), max_size=30).map(
        lambda t: "'" + t.replace("'", "''") + "'"),
    st.binary(max_size=30).map(lambda b: f"x'{b.hex()}'"),
    st.integers(300, 400).map(lambda n: f"'1{'0' * n}'"),   # INTEGER affinity turns it into infinity
    st.sampled_from(["9e999", "-9e999", "zeroblob(1000000)", "'abc'", "' 17 '"]),
)


def test_any_health_check_value_leaves_status_and_health_readable(tmp_path: Path) -> None:
    """`health_check.timestamp_ms` is whatever the controller stored. A REAL infinity (`9e999`,
    or a long run of digits, which INTEGER affinity makes one) crashed `gatewayctl status`
    (traceback, exit 1 = "degraded") and `/health` (500), and made the supervisor's controller
    thread fail every tick before it could judge the controller's health."""
    with gateway(tmp_path, daemons=("forwarder",)) as gw:
        db = controller_db(gw.base)
        wait_for(db.exists, 20, what="the controller database")
        with contextlib.closing(sqlite3.connect(db, timeout=10, isolation_level=None)) as conn:

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
            @given(HEALTH_CHECK_VALUES)
            @example("9e999")
            @example("'1" + "0" * 400 + "'")
            def check(value: str) -> None:
                conn.execute(f"INSERT OR REPLACE INTO health_check(id, timestamp_ms) VALUES (1, {value})")
                stored = conn.execute("SELECT timestamp_ms FROM health_check").fetchone()[0]
                r = gw.ctl("status", "--json")
                assert r.returncode in (0, 1) and "Traceback" not in r.stderr, (value, r.stderr[-2000:])
                shown = json.loads(r.stdout)["controller"]["last_health_check_ms"]
                assert shown is None or (isinstance(shown, int) and -(2**63) <= shown < 2**63), shown
                if isinstance(stored, int):
                    assert shown == stored
                code, _, body = gw.get("/health")
                assert code in (200, 503), (value, code, body[:500])
                json.loads(body)

            check()


def moved(base: Path, n: int) -> bool:
    return controller_depth(base) == 0 and len(outbox_seqs(base)) >= n


def test_a_sequence_that_is_not_an_integer_stops_nothing(tmp_path: Path, daemons: list[Daemon]) -> None:
    """`sqlite_sequence` is a table the controller can write like any other. Text in `seq` made
    every loop of the forwarder fail on `int()` (nothing moved again, a traceback per second);
    SQLite itself then numbers the next row after the largest id, and so must the forwarder."""
    config = write_config(tmp_path)
    fwd = Daemon("forwarder", config)
    daemons.append(fwd)
    fwd.start()
    n = 0
    with writer(controller_db(tmp_path)) as w:
        for value in ("'abc'", "x'00ff'", "2.5", "'12'", "NULL"):
            w.records(range(n, n + 3))
            w.sql(f"UPDATE sqlite_sequence SET seq = {value} WHERE name = 'messages'")
            n += 3
            w.records(range(n, n + 3))
            n += 3
            wait_for(functools.partial(moved, tmp_path, n), 30, what=f"records after seq = {value}")
        fwd.stop()
        w.records(range(n, n + 3))   # read by a new start, which reconciles with that sequence
        n += 3
        fwd.start()
        wait_for(functools.partial(moved, tmp_path, n), 30, what="records after a restart")
    assert outbox_seqs(tmp_path) == list(range(n))
    c = counters(tmp_path)
    assert c["ingested"] == c["queued"] == n and balanced(c), c
    assert "Traceback" not in fwd.log(), fwd.log()[-3000:]


@pytest.mark.parametrize("when", ["running", "stopped"])
@pytest.mark.parametrize("commit", ["one", "each"])
def test_ids_restarted_in_the_same_table_lose_nothing(tmp_path: Path, daemons: list[Daemon], when: str,
                                                      commit: str) -> None:
    """`DELETE FROM messages; DELETE FROM sqlite_sequence` is SQLite's way to empty a table and
    restart its ids — no schema change. Before: a running forwarder never read the new rows at
    or below its mark (they waited, unreported, behind newer ones), and one started afterwards
    deleted those inside the last batch's recorded ranges unread: records lost silently."""
    fwd = Daemon("forwarder", write_config(tmp_path))
    daemons.append(fwd)
    fwd.start()
    with writer(controller_db(tmp_path)) as w:
        w.records(range(0, 3))
        w.records(range(3, 6))
        wait_for(lambda: controller_depth(tmp_path) == 0 and len(outbox_seqs(tmp_path)) == 6, 30,
                 what="the first rows moved")
        if when == "stopped":
            fwd.stop()
        w.sql("DELETE FROM messages")
        w.sql("DELETE FROM sqlite_sequence WHERE name = 'messages'")
        if commit == "one":
            w.sql("BEGIN")
        ids = w.records(range(6, 16))
        if commit == "one":
            w.sql("COMMIT")
        assert ids[0] == 1
        if when == "stopped":
            fwd.start()
        wait_for(lambda: controller_depth(tmp_path) == 0 and len(outbox_seqs(tmp_path)) >= 16, 30,
                 what="the rows with reused ids moved")
    assert outbox_seqs(tmp_path) == list(range(16))
    c = counters(tmp_path)
    assert c["ingested"] == c["queued"] == 16 and balanced(c), c
    assert "new epoch" in fwd.log()


def _remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(db) + suffix)


@pytest.mark.parametrize("where", ["", "-wal"])
def test_a_fifo_at_the_controller_database_blocks_nothing(tmp_path: Path, where: str) -> None:
    """The controller data directory is the container's: it can put a FIFO where its database
    (or the -wal) should be. Opening a FIFO for reading waits for a writer, for ever: the
    forwarder's loop stopped (its watchdog starved: a restart loop), `gatewayctl status`,
    `/health` and the supervisor's health-check read hung. Now it is a fault of the moment,
    reported with its reason, and the flow resumes when a database is back."""
    with gateway(tmp_path) as gw:
        db = controller_db(gw.base)
        with writer(db) as w:
            w.records(range(0, 3))
        wait_for(lambda: controller_depth(gw.base) == 0, 30, what="the first rows moved")
        gw.daemons["forwarder"].stop()
        if where:
            with contextlib.closing(sqlite3.connect(db)) as conn:  # a database without its -wal
                conn.execute("PRAGMA journal_mode = DELETE")
        else:
            _remove_db(db)
        os.mkfifo(str(db) + where)
        fwd = gw.daemons["forwarder"].start()
        fwd.wait_log("not a regular file", 20)
        r = gw.ctl("status", "--json", timeout=30)
        assert r.returncode == 1, r.stderr[-2000:]
        assert any("not a regular file" in reason for reason in json.loads(r.stdout)["degraded_reasons"])
        code, _, body = gw.get("/health", timeout=30)
        assert code == 503, body[:500]
        heartbeat = gw.base / "run" / "forwarder.heartbeat"
        before = heartbeat.stat().st_mtime_ns
        wait_for(lambda: heartbeat.stat().st_mtime_ns > before, 20, what="the forwarder's loop feeding its watchdog")
        _remove_db(db)
        with writer(db) as w:
            w.records(range(3, 6))
        wait_for(lambda: {v["seq"] for v in gw.delivered() if "seq" in v} == set(range(6)), 30,
                 what="records from the new database delivered")
        assert gw.daemons["supervisor"].proc is not None and gw.daemons["supervisor"].proc.poll() is None
        assert "Traceback" not in fwd.log()
