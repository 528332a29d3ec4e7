"""The database error classification every daemon relies on, against real SQLite errors."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from gatewayd.store.errors import Fault, classify, describe


def _raise(fn) -> BaseException:
    with pytest.raises(BaseException) as info:
        fn()
    return info.value


def test_locked_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE t(a)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    exc = _raise(lambda: other.execute("BEGIN IMMEDIATE"))
    assert classify(exc) is Fault.TRANSIENT
    assert "SQLITE_BUSY" in describe(exc)
    holder.execute("ROLLBACK")


def test_cantopen_is_transient(tmp_path: Path) -> None:
    exc = _raise(lambda: sqlite3.connect(tmp_path / "missing" / "x.db"))
    assert classify(exc) is Fault.TRANSIENT


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_readonly_is_transient(tmp_path: Path) -> None:  # pragma: no cover - root in CI
    path = tmp_path / "x.db"
    sqlite3.connect(path).execute("CREATE TABLE t(a)")
    path.chmod(0o444)
    conn = sqlite3.connect(path)
    assert classify(_raise(lambda: conn.execute("INSERT INTO t VALUES (1)"))) is Fault.TRANSIENT


def test_readonly_uri_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE t(a)")
    c.commit()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    assert classify(_raise(lambda: conn.execute("INSERT INTO t VALUES (1)"))) is Fault.TRANSIENT


def test_not_a_database_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    path.write_bytes(b"this is not sqlite" * 100)
    conn = sqlite3.connect(path)
    exc = _raise(lambda: conn.execute("SELECT * FROM sqlite_master").fetchall())
    assert classify(exc) is Fault.CORRUPT


def test_row_content_errors_are_data() -> None:
    conn = sqlite3.connect(":memory:")
    assert classify(_raise(lambda: conn.execute("SELECT ?", (2**70,)))) is Fault.DATA
    assert classify(_raise(lambda: conn.execute("SELECT ?", ("\udc80",)))) is Fault.DATA
    conn.execute("CREATE TABLE t(a INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    assert classify(_raise(lambda: conn.execute("INSERT INTO t VALUES (1)"))) is Fault.DATA


def test_bad_sql_is_a_bug() -> None:
    conn = sqlite3.connect(":memory:")
    exc = _raise(lambda: conn.execute("SELECT * FROM nope"))
    assert classify(exc) is Fault.BUG
