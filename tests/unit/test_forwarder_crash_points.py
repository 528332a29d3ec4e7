"""A crash between any two of the forwarder's three commits is replayed without loss or duplicates."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gatewayd.config import load
from gatewayd.forwarder.service import Forwarder
from gatewayd.store import queues
from tests.helpers.daemons import write_config


class Crash(Exception):
    pass


def make(tmp_path: Path) -> Forwarder:
    cfg = load(write_config(tmp_path, {"forwarder": {"batch_size": 10}}), env={})
    f = Forwarder(cfg)
    f.start()
    return f


def insert(f: Forwarder, start: int, n: int) -> None:
    assert f.ctrl is not None
    f.ctrl.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
                       [(json.dumps({"ts": 10**12 * 2 + i, "values": {"seq": i}}),) for i in range(start, start + n)])


def seqs(path: Path, table: str, column: str) -> list[int]:
    with sqlite3.connect(path) as c:
        return [json.loads(m)["values"]["seq"] for (m,) in c.execute(f"SELECT {column} FROM {table} ORDER BY id")]


@pytest.mark.parametrize("crash_at", ["before_outbox", "before_controller_delete"])
def test_replay_after_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str) -> None:
    f = make(tmp_path)
    insert(f, 0, 25)
    assert f.move_batch() == 10
    if crash_at == "before_outbox":
        monkeypatch.setattr(queues, "append", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    else:
        monkeypatch.setattr(Forwarder, "_delete_moved", lambda self, upto: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        f.move_batch()
    monkeypatch.undo()
    f.stop()  # the process "dies"; a new one starts from what is on disk
    g = make(tmp_path)
    while g.move_batch():
        pass
    state = tmp_path / "state"
    assert seqs(state / "queues.db", "outbox", "payload") == list(range(25))
    assert seqs(state / "archive.db", "archive", "message") == list(range(25))
    assert g.queues is not None
    c = queues.counters(g.queues)
    assert c["ingested"] == c["queued"] == c["archived"] == 25
    g.stop()
