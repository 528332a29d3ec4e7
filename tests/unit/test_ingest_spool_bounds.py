"""The spool adapter's work per loop round is bounded whatever a file holds, and a file name
that is not UTF-8 can be marked: real files, a real controller database, the real adapter.

Before: the rest of a line over 1 MiB was skipped inside one round (a 4 GB line without a
newline blocked ingest's loop for 9 s here, minutes on an SD card: its watchdog starved and the
restart began again at the same offset), and a Latin-1 file name failed every commit."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import load
from gatewayd.ingest.batch import Batch
from gatewayd.ingest.spool import CHUNK_BYTES, MAX_LINE_BYTES, SpoolAdapter
from gatewayd.store import ingest as ingest_store
from gatewayd.store.controller import open_controller
from gatewayd.store.db import transaction
from tests.helpers.daemons import write_config


class Service:
    """What the adapter needs of the ingest service: the controller connection and a reporter."""

    def __init__(self, ctrl: sqlite3.Connection):
        self.ctrl = ctrl
        self.errors: list[str] = []

    def report_error(self, text: str) -> None:
        self.errors.append(text)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Any, Path, sqlite3.Connection]]:
    spool = tmp_path / "spool"
    cfg = load(write_config(tmp_path, {"ingest.spool": {"directory": str(spool), "settle_s": 0}}), env={})
    ctrl = open_controller(cfg.controller_db)
    ingest_store.ensure_tables(ctrl)
    try:
        yield cfg, spool, ctrl
    finally:
        ctrl.close()


def adapter(cfg: Any, ctrl: sqlite3.Connection) -> SpoolAdapter:
    a = SpoolAdapter(cfg, Service(ctrl))  # type: ignore[arg-type]
    a.start()
    return a


def round_(a: SpoolAdapter, ctrl: sqlite3.Connection) -> tuple[Batch, int]:
    """One loop round as the service runs it: fill, commit, acknowledge. Returns the batch and
    how many bytes of the file that round read (from the offset committed before it)."""
    a.poll(time.monotonic() + 60)
    before = max((offset for _, offset, _ in ingest_store.spool_marks(ctrl).values()), default=0)
    batch = Batch()
    a.fill(batch, 1_000_000)
    read = (batch.marks[-1][2] if batch.marks else before) - before
    with transaction(ctrl):
        ingest_store.insert_messages(ctrl, batch.rows)
        ingest_store.set_spool_marks(ctrl, batch.marks)
    for done in batch.on_commit:
        done()
    return batch, read


def write_with_long_line(path: Path, long: int) -> None:
    """A first line, a line of `long` NUL bytes (a hole: no disk used), a last line."""
    with open(path, "wb") as f:
        f.write(b'{"seq": 0}\n')
        f.truncate(f.tell() + long)
        f.seek(0, os.SEEK_END)
        f.write(b'\n{"seq": 1}\n')


def test_a_long_line_is_skipped_a_bounded_slice_per_round(env: tuple[Any, Path, sqlite3.Connection]) -> None:
    cfg, spool, ctrl = env
    a = adapter(cfg, ctrl)
    write_with_long_line(spool / "big.jsonl", 64 * MAX_LINE_BYTES)
    rows: list[Any] = []
    rounds = 0
    restarted = False
    while (spool / "big.jsonl").exists():
        batch, read = round_(a, ctrl)
        assert read <= CHUNK_BYTES + 2 * MAX_LINE_BYTES, f"{read} bytes read in one round"
        rows.extend(batch.rows)
        rounds += 1
        if rounds == 5 and not restarted:   # a restart in the middle of the long line
            a.stop()
            a = adapter(cfg, ctrl)
            restarted = True
        assert rounds < 100
    assert restarted and rounds > 10
    assert len(rows) == 3 and rows[1][1] == b"\0" * (MAX_LINE_BYTES + 1)  # queued cut short, once
    assert [json.loads(r[1])["values"]["seq"] for r in (rows[0], rows[2])] == [0, 1]
    a.stop()


def test_a_file_name_that_is_not_utf8_is_marked_and_taken(env: tuple[Any, Path, sqlite3.Connection]) -> None:
    cfg, spool, ctrl = env
    a = adapter(cfg, ctrl)
    name = os.fsdecode(b"caf\xe9.jsonl")    # Latin-1, as os.scandir gives it: a lone surrogate
    (spool / name).write_bytes(b'{"seq": 7}\n')
    batch, _ = round_(a, ctrl)
    assert [json.loads(r[1])["values"]["seq"] for r in batch.rows] == [7]
    assert not (spool / name).exists()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spool / name)
    assert ingest_store.spool_marks(ctrl) == {}
    with transaction(ctrl):   # a mark left by a crash before the removal comes back as the same name
        ingest_store.set_spool_marks(ctrl, [(name, "1:2", 11, True)])
    assert ingest_store.spool_marks(ctrl) == {name: ("1:2", 11, True)}
    ingest_store.delete_spool_marks(ctrl, [name])
    assert ingest_store.spool_marks(ctrl) == {}
    a.stop()
