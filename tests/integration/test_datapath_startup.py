"""Start-up that scales: READY never waits for an integrity check, whatever the file size; the
check runs only after an unclean shutdown, in slices, in the background, and a damaged file it
finds is moved aside while the forwarder carries on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gatewayd.store import archive as archive_store
from gatewayd.store import queues
from gatewayd.store.check import STEPS_PER_SLICE
from gatewayd.store.db import transaction
from tests.helpers.daemons import Daemon, wait_for, write_config
from tests.helpers.datapath import balanced, controller_db, counters, moved_aside, outbox_seqs, writer

pytestmark = pytest.mark.integration


def big_archive(path: Path, rows: int) -> int:
    """A real archive of `rows` 1 KB records, written in well under a second per 100 MB."""
    archive_store.open_archive(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                 "INSERT INTO archive(ts, type, message) SELECT i, 'telemetry', hex(randomblob(500)) FROM n", (rows,))
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return path.stat().st_size


def line_no(log: str, text: str) -> int:
    for i, line in enumerate(log.splitlines()):
        if text in line:
            return i
    raise AssertionError(f"{text!r} not in the log:\n{log[-3000:]}")


def test_large_archive_does_not_delay_ready(tmp_path: Path, daemons: list[Daemon]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    archive = state / "archive.db"
    size = big_archive(archive, 300_000)
    assert size > 300 << 20
    try:
        (state / ".forwarder.running").touch()   # the last run did not stop cleanly
        with writer(controller_db(tmp_path)) as w:
            w.records(range(0, 1000))
        fwd = Daemon("forwarder", write_config(tmp_path, {"archive": {"max_bytes": 1 << 40,
                                                                      "retention_days": 100_000}}))
        daemons.append(fwd)
        fwd.start()
        fwd.wait_log("integrity check of " + str(archive) + ": ok", 120)
        log = fwd.log()
        # READY came first; the check ran afterwards, paused often (its cost grows with the file,
        # READY's does not), and found the file sound.
        assert line_no(log, "forwarder ready") < line_no(log, f"integrity check of {archive} started")
        slices = int(log.split(f"integrity check of {archive}: ok (")[1].split(" in ")[1].split()[0])
        assert slices * STEPS_PER_SLICE > 300_000, slices
        wait_for(lambda: len(outbox_seqs(tmp_path)) == 1000, 30, what="the controller rows moved")
        assert moved_aside(tmp_path) == []
        # A clean stop and start: no check at all.
        fwd.stop()
        assert not (state / ".forwarder.running").exists()
        fwd.start()
        with writer(controller_db(tmp_path)) as w:
            w.records(range(1000, 1100))
        wait_for(lambda: len(outbox_seqs(tmp_path)) == 1100, 30, what="more rows moved")
        assert fwd.log().count("integrity check of") == 4   # started + ok, for queues.db and archive.db, once
    finally:
        archive.unlink(missing_ok=True)


def test_damage_found_after_ready_is_moved_aside_and_flow_goes_on(tmp_path: Path, daemons: list[Daemon]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    archive = state / "archive.db"
    conn = archive_store.open_archive(archive)
    with transaction(conn):
        archive_store.insert(conn, [(i, "telemetry", "x" * 500) for i in range(3000)])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(archive.read_bytes())
    data[4096 * 3:4096 * 6] = b"\x5a" * (4096 * 3)       # pages deep inside; page 1 intact
    archive.write_bytes(bytes(data))
    (state / ".forwarder.running").touch()
    fwd = Daemon("forwarder", write_config(tmp_path))
    daemons.append(fwd)
    fwd.start()                                          # opening reads page 1 only: READY at once
    with writer(controller_db(tmp_path)) as w:
        w.records(range(0, 200))
        fwd.wait_log("archive.db is damaged", 60)
        w.records(range(200, 300))
    wait_for(lambda: len(outbox_seqs(tmp_path)) == 300, 30, what="all rows moved")
    assert [p for p in moved_aside(tmp_path) if p.startswith("state/archive.db.corrupt-")]
    assert line_no(fwd.log(), "forwarder ready") < line_no(fwd.log(), "archive.db is damaged")
    c = counters(tmp_path)
    assert c["ingested"] == 300 and balanced(c)
    q = queues.open_queues(state / "queues.db")
    try:
        assert queues.counters(q)["outbox_rows"] == 300
    finally:
        q.close()
