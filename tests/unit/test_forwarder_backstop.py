"""The forwarder's last lines of defence, with real SQLite files: a batch that fails on one row's
data is stored row by row, and a controller table recreated under the forwarder is a new epoch."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gatewayd import records
from gatewayd.config import load
from gatewayd.forwarder import service
from gatewayd.forwarder.rows import id_ranges
from gatewayd.forwarder.service import Forwarder
from gatewayd.store import archive as archive_store
from gatewayd.store import queues
from gatewayd.store.db import transaction
from tests.helpers.daemons import write_config


def make(tmp_path: Path, **forwarder: Any) -> Forwarder:
    cfg = load(write_config(tmp_path, {"forwarder": forwarder} if forwarder else None), env={})
    f = Forwarder(cfg)
    f.start()
    f.step()
    return f


def insert(f: Forwarder, seqs: range) -> None:
    assert f.ctrl is not None
    f.ctrl.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
                       [(json.dumps({"ts": 1000 + i, "values": {"seq": i}}),) for i in seqs])


def outbox(f: Forwarder) -> list[int]:
    assert f.queues is not None
    return [json.loads(r.payload)["values"]["seq"] for r in queues.peek(f.queues, 10_000)]


def balanced(f: Forwarder) -> bool:
    assert f.queues is not None
    c = queues.counters(f.queues)
    return c["ingested"] == c["delivered"] + c["queued"] + c["dead_lettered"] + c["dropped"]


@pytest.mark.parametrize("archive", [True, False])
def test_a_row_sqlite_refuses_is_dead_lettered_and_the_batch_stored_row_by_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, archive: bool) -> None:
    cfg = load(write_config(tmp_path, {"archive": {"enabled": archive}}), env={})
    f = Forwarder(cfg)
    f.start()
    insert(f, range(10))
    real = records.parse

    def parse_with_a_poisoned_row(type_: Any, message: Any, max_packet: int, policy: Any = None) -> Any:
        rec = real(type_, message, max_packet)
        if isinstance(rec, records.Record) and '"seq": 4}' in rec.payload:
            rec.ts = 2**70          # passed validation, yet SQLite cannot store it
        return rec

    monkeypatch.setattr(service, "parse", parse_with_a_poisoned_row)
    assert f.move_batch() == 10
    assert outbox(f) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert f.queues is not None
    dead = f.queues.execute("SELECT src_id, reason FROM dead_letters").fetchall()
    assert [d[0] for d in dead] == [5]
    assert dead[0][1].startswith("cannot be archived" if archive else "cannot be stored in the outbox")
    assert "row by row" in caplog.text or "one by one" in caplog.text
    assert balanced(f)
    insert(f, range(10, 15))     # and the queue behind it flows
    monkeypatch.undo()
    assert f.move_batch() == 5 and outbox(f)[-5:] == list(range(10, 15))
    f.stop()


def test_a_table_recreated_between_batches_is_read_from_its_start(tmp_path: Path) -> None:
    f = make(tmp_path, batch_size=10)
    insert(f, range(30))
    while f.move_batch():
        pass
    assert f.ctrl is not None
    f.ctrl.execute("DROP TABLE messages")
    f.ctrl.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
    insert(f, range(30, 70))     # ids 1..40: more rows than the mark (30)
    while f.move_batch():
        pass
    assert outbox(f) == list(range(70))
    assert f.ctrl.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    f.stop()


def test_schema_change_between_read_and_delete_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = make(tmp_path)
    insert(f, range(5))
    other = sqlite3.connect(tmp_path / "controller" / "communication_queue.db", isolation_level=None)
    real = f._delete_moved

    def recreate_then_delete(ranges: Any) -> None:
        # The controller drops and recreates its table right after the rows were read and queued.
        other.execute("DROP TABLE messages")
        other.execute("CREATE TABLE messages(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
        other.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
                          [(json.dumps({"ts": 1, "values": {"seq": i}}),) for i in range(5, 12)])
        monkeypatch.setattr(f, "_delete_moved", real)
        real(ranges)

    monkeypatch.setattr(f, "_delete_moved", recreate_then_delete)
    f.move_batch()
    while f.move_batch():
        pass
    assert outbox(f) == list(range(12))   # the new ids 1..5 were not deleted as "already moved"
    other.close()
    f.stop()


def test_id_ranges() -> None:
    assert id_ranges([]) == []
    assert id_ranges([3, 4, 5]) == [[3, 5]]
    assert id_ranges([1, 2, 4, 7, 8]) == [[1, 2], [4, 4], [7, 8]]


def test_a_file_of_ours_found_damaged_while_running_is_moved_aside(tmp_path: Path) -> None:
    f = make(tmp_path)
    assert f.archive is not None
    with transaction(f.archive):
        archive_store.insert(f.archive, [(i, "telemetry", "x" * 500) for i in range(3000)])
    f.archive.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = f.archive.execute("PRAGMA page_size").fetchone()[0]
    f.a.close()
    path = tmp_path / "state" / "archive.db"
    data = bytearray(path.read_bytes())
    data[page * 3:page * 6] = b"\x5a" * (page * 3)   # leaf pages the retention pass reads
    path.write_bytes(bytes(data))
    f.a.open()                                        # page 1 is intact: it opens
    f.last_housekeeping = float("-inf")
    controller = sqlite3.connect(tmp_path / "controller" / "communication_queue.db", isolation_level=None)
    controller.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
                           [(json.dumps({"ts": 1000 + i, "values": {"seq": i}}),) for i in range(10)])
    for _ in range(10):
        f.step()
    assert len(list((tmp_path / "state").glob("archive.db.corrupt-*"))) == 1
    assert outbox(f) == list(range(10))
    assert f.archive.execute("SELECT count(*) FROM archive").fetchone()[0] == 10   # a new archive
    assert balanced(f)
    controller.close()
    f.stop()
