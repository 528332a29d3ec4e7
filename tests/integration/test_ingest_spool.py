"""`gatewayd ingest` spool directory as a real process: rename-in, in-place writers, bad lines, crashes."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemons import Daemon
from tests.helpers.ingest import controller_rows, ingest_config, queued_seqs, wait_for
from tests.integration.test_bridge_support import counters, dead_letters

pytestmark = pytest.mark.integration


def line(seq: int) -> str:
    return json.dumps({"ts": 1_700_000_000_000 + seq, "values": {"seq": seq}})


def drop(spool: Path, name: str, text: str | bytes) -> None:
    """The writer contract: write under a temporary name, then rename in."""
    tmp = spool / f".{name}.tmp"
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, spool / name)


class Spool:
    def __init__(self, base: Path, **keys: Any):
        self.base = base
        self.dir = base / "spool"
        self.cfg = ingest_config(base, spool=self.dir, ingest__spool=keys)
        self.ingest = Daemon("ingest", self.cfg).start()

    def files(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir())


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "gw")
    try:
        yield s
    finally:
        s.ingest.stop()


def test_renamed_in_files_are_queued_and_removed(spool: Spool) -> None:
    drop(spool.dir, "a.jsonl", "".join(line(i) + "\n" for i in range(3)))
    drop(spool.dir, "b.json", json.dumps([json.loads(line(3)), {"seq": 4}]))
    drop(spool.dir, "c.attributes.jsonl", '{"fw": "1.0"}\n')
    wait_for(lambda: spool.files() == [], 10, what="the files to be taken")
    rows = controller_rows(spool.base)
    assert queued_seqs(spool.base) == [0, 1, 2, 3, 4]
    assert abs(json.loads(rows[4][1])["ts"] - time.time() * 1000) < 60_000, "no ts: the file's mtime"
    assert rows[5][0] == "attributes" and json.loads(rows[5][1])["values"] == {"fw": "1.0"}


def test_temporary_names_are_left_alone(spool: Spool) -> None:
    for name in (".a.jsonl", "a.jsonl.tmp", "a.json~", "notes.txt"):
        (spool.dir / name).write_text(line(1) + "\n")
    drop(spool.dir, "z.jsonl", line(9) + "\n")
    wait_for(lambda: "z.jsonl" not in spool.files(), 10, what="z.jsonl to be taken")
    time.sleep(1.5)
    assert spool.files() == sorted([".a.jsonl", "a.json~", "a.jsonl.tmp", "notes.txt"])
    assert queued_seqs(spool.base) == [9]


def test_a_file_written_in_place_is_not_read_half_written(spool: Spool) -> None:
    """No rename: the writer pauses mid-line for longer than settle_s; ingest waits for its close."""
    path = spool.dir / "inplace.jsonl"
    with open(path, "w") as fh:
        fh.write(line(0) + "\n" + line(1)[:15])
        fh.flush()
        time.sleep(2.5)  # settle_s is 1 s
        assert controller_rows(spool.base) == [], "nothing read while the writer has the file open"
        fh.write(line(1)[15:] + "\n" + line(2) + "\n")
    wait_for(lambda: spool.files() == [], 10, what="the file to be taken after its close")
    assert queued_seqs(spool.base) == [0, 1, 2]
    assert len(controller_rows(spool.base)) == 3


def test_bad_lines_are_dead_lettered_and_the_rest_flows(tmp_path: Path) -> None:
    s = Spool(tmp_path / "gw")
    forwarder = Daemon("forwarder", s.cfg).start()
    try:
        bad = [b"not json", b'{"ts": "late", "values": {"a": 1}}', b"\xff\xfe", b'{"ts": 5, "values": {}}']
        body = b""
        for i in range(10):
            body += line(i).encode() + b"\n"
            if i % 3 == 0:
                body += bad[i // 3] + b"\n"
        drop(s.dir, "mixed.jsonl", body)
        wait_for(lambda: counters(s.base)["ingested"] >= 14, 15, what="14 records through the forwarder")
        c = counters(s.base)
        assert c["dead_lettered"] == 4 and c["queued"] == 10
        reasons = [r for _, r in dead_letters(s.base)]
        assert any("not valid JSON" in r for r in reasons)
        assert any("'ts' must be an integer" in r for r in reasons)
        assert any("UTF-8" in r for r in reasons)
        assert any("'values' is empty" in r for r in reasons)
        assert s.files() == []
    finally:
        forwarder.stop()
        s.ingest.stop()


def test_kill9_mid_file_neither_loses_nor_repeats_a_line(tmp_path: Path) -> None:
    s = Spool(tmp_path / "gw")
    total = 60_000
    try:
        drop(s.dir, "big.jsonl", "".join(line(i) + "\n" for i in range(total)))
        done = 0

        def more_than(before: int) -> int:
            n = len(controller_rows(s.base))
            return n if n > before else 0

        for _ in range(4):  # each kill after at least one more chunk was committed
            done = wait_for(partial(more_than, done), 20, interval=0.005, what="another chunk committed")
            if done >= total:
                break
            s.ingest.kill9()
            s.ingest.start()
        assert s.ingest.log().count("spool: resuming big.jsonl") >= 2
        wait_for(lambda: s.files() == [], 30, what="the file to be finished")
        seqs = queued_seqs(s.base)
        assert seqs == list(range(total)), f"{len(seqs)} rows, {len(set(seqs))} distinct"
        marks = sqlite3.connect(s.base / "controller" / "communication_queue.db").execute(
            "SELECT count(*) FROM gatewayd_ingest_spool").fetchone()[0]
        assert marks == 0
    finally:
        s.ingest.stop()


def test_files_present_at_start_are_taken_and_oversized_json_rejected(tmp_path: Path) -> None:
    spool_dir = tmp_path / "gw" / "spool"
    spool_dir.mkdir(parents=True)
    (spool_dir / "early.jsonl").write_text(line(1) + "\n")
    (spool_dir / "huge.json").write_text(json.dumps([json.loads(line(i)) for i in range(100)]))
    s = Spool(tmp_path / "gw", max_file_bytes=1024)
    try:
        wait_for(lambda: s.files() == ["huge.json.rejected"], 10, what="early.jsonl taken, huge.json rejected")
        assert queued_seqs(s.base) == [1]
        assert "huge.json refused" in s.ingest.log()
    finally:
        s.ingest.stop()
