"""What a controller may do to its own database beyond writing rows, tried against a real
forwarder: migrations while a delete is pending, and its table recreated at that moment.

Each case ends with every committed record in the outbox exactly once, in order, and the
ledger adding up."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.daemons import Daemon, wait_for, write_config
from tests.helpers.datapath import balanced, controller_db, controller_depth, counters, outbox_seqs, writer

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
