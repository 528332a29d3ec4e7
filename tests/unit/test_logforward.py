"""Own log lines to ThingsBoard: deduplication, the shared rate limit, low priority outside the
ledger, masking, and failures of the store (a real full database) that neither recurse nor spin."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd import log as gwlog
from gatewayd import redact, topics
from gatewayd.log import JsonFormatter, journald_stderr
from gatewayd.logforward import (
    MAX_MESSAGE_BYTES,
    NO_FORWARD,
    PENDING_MAX,
    Deduper,
    ForwardHandler,
    Line,
    LogForwarder,
    QueuesStore,
)
from gatewayd.store import logs, queues
from gatewayd.store.db import file_identity

WARN = logging.WARNING


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class WallStore:
    """`store.logs.queue_log_lines` on a real queues.db, with a wall clock the test moves."""

    def __init__(self, conn: sqlite3.Connection, max_per_min: int, clock: Clock):
        self.conn, self.max_per_min, self.clock = conn, max_per_min, clock
        self.calls = 0

    def __call__(self, lines: list[tuple[int, dict[str, Any]]]) -> int:
        self.calls += 1
        return logs.queue_log_lines(self.conn, lines, self.max_per_min, now=int(self.clock() * 1000))


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = queues.open_queues(tmp_path / "queues.db")
    try:
        yield c
    finally:
        c.close()


def log_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT priority, kind, topic, payload, counted FROM outbox WHERE priority = ? ORDER BY id",
                        (queues.PRIO_LOG,)).fetchall()
    out = []
    for prio, kind, topic, payload, counted in rows:
        assert (prio, kind, topic, counted) == (queues.PRIO_LOG, queues.KIND_TELEMETRY, topics.TOPIC_TELEMETRY, 0)
        doc = json.loads(payload)
        out.append({"ts": doc["ts"], **doc["values"]})
    return out


def line(text: str, level: int = WARN, logger: str = "gatewayd.forwarder", ms: int = 1_700_000_000_000) -> Line:
    return Line(ms, level, logger, text)


class Collect(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_similar_lines_are_sent_once_then_summarised(conn: sqlite3.Connection) -> None:
    clock = Clock()
    fwd = LogForwarder("forwarder", WallStore(conn, 100, clock), 100, 5.0, clock=clock)
    for i in range(300):
        fwd.offer(line(f"controller row {i} dead-lettered: not JSON"))
    fwd.offer(line("something else entirely"))
    fwd.work()
    rows = log_rows(conn)
    assert [r["gw_log_message"] for r in rows] == ["controller row 0 dead-lettered: not JSON",
                                                   "something else entirely"]
    assert {(r["gw_log_level"], r["gw_log_daemon"]) for r in rows} == {("warning", "forwarder")}
    assert fwd.dedup.next_due() == clock.t + 5.0
    clock.t += 5.0
    fwd.work()
    summary = log_rows(conn)[-1]["gw_log_message"]
    assert summary == "controller row 299 dead-lettered: not JSON (repeated 299 times in 5 s)"
    # the flood goes on: one more summary per window, nothing in between
    for i in range(300, 310):
        fwd.offer(line(f"controller row {i} dead-lettered: not JSON"))
    fwd.work()
    assert len(log_rows(conn)) == 3
    clock.t += 5.0
    fwd.work()
    assert log_rows(conn)[-1]["gw_log_message"].endswith("(repeated 10 times in 5 s)")
    # quiet for a window: the run is forgotten, the next one is sent at once
    clock.t += 5.0
    fwd.work()
    assert fwd.dedup.runs == {}
    fwd.offer(line("controller row 999 dead-lettered: not JSON"))
    fwd.work()
    assert log_rows(conn)[-1]["gw_log_message"] == "controller row 999 dead-lettered: not JSON"


def test_levels_and_loggers_are_not_merged() -> None:
    d = Deduper(10.0)
    assert d.offer(line("x 1"), 0) is not None
    assert d.offer(line("x 1", level=logging.ERROR), 0) is not None
    assert d.offer(line("x 1", logger="gatewayd.bridge"), 0) is not None
    assert d.offer(line("x 2"), 0) is None
    assert d.next_due() == 10.0


def test_rate_limit_holds_for_all_daemons_together_and_is_reported(conn: sqlite3.Connection) -> None:
    clock = Clock()
    limit = 5
    a = LogForwarder("bridge", WallStore(conn, limit, clock), limit, 30.0, clock=clock)
    b = LogForwarder("supervisor", WallStore(conn, limit, clock), limit, 30.0, clock=clock)
    for i in range(4):
        a.offer(line(f"bridge problem {chr(97 + i)}", logger="gatewayd.bridge"))
    a.work()
    for i in range(20):
        b.offer(line(f"supervisor problem {chr(97 + i)}", logger="gatewayd.supervisor"))
    b.work()
    rows = log_rows(conn)
    assert len(rows) == limit
    assert [r["gw_log_daemon"] for r in rows] == ["bridge"] * 4 + ["supervisor"]
    assert b.suppressed == 19 and a.suppressed == 0
    # timestamps are distinct and increasing, though every line was stamped in the same ms
    assert [r["ts"] for r in rows] == sorted({r["ts"] for r in rows})
    # within the minute nothing more goes, whatever is offered
    clock.t += 30
    b.offer(line("supervisor problem z", logger="gatewayd.supervisor"))
    b.work()
    assert len(log_rows(conn)) == limit and b.suppressed == 20
    # a minute later the report goes first
    clock.t += 31
    b.work()
    rows = log_rows(conn)
    assert rows[-1]["gw_log_message"].startswith("20 log line(s) of the supervisor not sent to ThingsBoard")
    assert b.suppressed == 0
    # no 60-second window ever held more than the limit
    st_ = queues.get_state(conn, logs.STATE_KEY)
    assert len(st_["sent_ms"]) <= limit


def test_log_rows_are_low_priority_and_outside_the_ledger(conn: sqlite3.Connection) -> None:
    with queues.transaction(conn):
        queues.append(conn, [(queues.PRIO_TELEMETRY, queues.KIND_TELEMETRY, topics.TOPIC_TELEMETRY,
                              '{"ts":1,"values":{"t":1}}', 1, 1)])
    before = queues.counters(conn)
    assert logs.queue_log_lines(conn, [(2, {"gw_log_message": "m"})], 10) == 1
    after = queues.counters(conn)
    assert after["queued"] == before["queued"] == 1 and after["ingested"] == before["ingested"]
    assert after["outbox_rows"] == 2
    # the controller record already queued leaves first
    assert [r.counted for r in queues.peek(conn, 10)] == [1, 0]
    # over the caps, log rows are dropped like the oldest telemetry, and not counted as dropped
    logs.queue_log_lines(conn, [(3, {"gw_log_message": "n"})], 10)
    assert queues.enforce_caps(conn, 1, 10**9) == 2
    c = queues.counters(conn)
    assert c["outbox_rows"] == 1 and c["dropped"] == 1 and c["queued"] == 0


def test_secrets_are_masked_and_long_lines_cut(conn: sqlite3.Connection) -> None:
    redact.reset()
    try:
        clock = Clock()
        fwd = LogForwarder("bridge", WallStore(conn, 10, clock), 10, 30.0, clock=clock)
        fwd.offer(line("login with token-abcdef-123456 failed"))
        redact.register(["token-abcdef-123456"])  # registered after the record was made: masked anyway
        fwd.offer(line("y" * 10_000))
        fwd.work()
        rows = log_rows(conn)
        assert rows[0]["gw_log_message"] == f"login with {redact.MASK} failed"
        assert len(json.dumps(rows[1]["gw_log_message"])) <= MAX_MESSAGE_BYTES
        assert rows[1]["gw_log_message"].endswith("…") and len(rows[1]["gw_log_message"]) > MAX_MESSAGE_BYTES // 8
    finally:
        redact.reset()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.one_of(st.text(max_size=400), st.integers(0xD800, 0xDFFF).map(chr)), max_size=20).map(
    "".join), level=st.sampled_from(
    [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL, 5, 60]))
def test_any_text_becomes_valid_telemetry(conn: sqlite3.Connection, text: str, level: int) -> None:
    conn.execute("DELETE FROM outbox")
    queues.set_state(conn, logs.STATE_KEY, {})
    clock = Clock()
    fwd = LogForwarder("supervisor", WallStore(conn, 10, clock), 10, 30.0, clock=clock)
    fwd.offer(Line(1, level, "gatewayd.x", text))
    fwd.work()
    (payload,) = conn.execute("SELECT payload FROM outbox").fetchone()
    assert payload.isascii()
    values = json.loads(payload)["values"]
    message = values["gw_log_message"]
    message.encode("utf-8")  # no surrogate left: ThingsBoard can store it
    assert len(json.dumps(message)) <= MAX_MESSAGE_BYTES
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        expected = redact.redact(text)
        if message != expected:
            assert message.endswith("…") and expected.startswith(message[:-1])
            assert len(json.dumps(expected)) > MAX_MESSAGE_BYTES
    assert values["gw_log_level"] in ("debug", "info", "warning", "error", "critical")


def full(conn: sqlite3.Connection) -> None:
    """Let the file grow no further, and fill what room is left: the next insert fails with SQLITE_FULL."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    for size in (3000, 300, 30, 1):
        for _ in range(10_000):
            try:
                queues.enqueue(conn, queues.KIND_RAW, "t", "x" * size, 0)
            except sqlite3.OperationalError as e:
                assert "full" in str(e)
                break


def test_full_disk_holds_lines_backs_off_and_never_logs_into_itself(tmp_path: Path) -> None:
    store = QueuesStore(tmp_path / "queues.db", 100)
    store.conn = queues.open_queues(tmp_path / "queues.db")
    store.identity = file_identity(tmp_path / "queues.db")
    calls: list[float] = []

    def counting(lines: list[tuple[int, dict[str, Any]]]) -> int:
        calls.append(time.monotonic())
        return store(lines)

    full(store.conn)
    fwd = LogForwarder("forwarder", counting, 100, 30.0, close_store=store.close)
    handler = ForwardHandler(fwd, WARN)
    root = logging.getLogger()
    root.addHandler(handler)
    spy = Collect(WARN)
    seen = spy.records
    logging.getLogger("gatewayd.logforward").addHandler(spy)
    fwd.start()
    try:
        for i in range(5):
            logging.getLogger("gatewayd.forwarder").warning("disk trouble %s", "abcde"[i])
        deadline = time.monotonic() + 10
        while fwd.failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fwd.failure is not None and "full" in fwd.failure and "transient" in fwd.failure
        time.sleep(1.5)
        # one report to the journal, flagged so that it is never forwarded; no new line from it
        reports = [r for r in seen if "cannot queue log lines" in r.getMessage()]
        assert len(reports) == 1 and getattr(reports[0], NO_FORWARD)
        assert len(fwd.held) == 5 and fwd.suppressed == 0
        assert 2 <= len(calls) <= 3  # first attempt, then backoff 1 s, 2 s: no spinning
        # room again: everything held arrives, in order
        store.conn.execute("PRAGMA max_page_count = 1073741823")
        fwd.retry_at = 0.0
        fwd._wake.set()
        deadline = time.monotonic() + 10
        while fwd.held and time.monotonic() < deadline:
            time.sleep(0.02)
        conn = queues.open_queues(tmp_path / "queues.db")
        try:
            assert [r["gw_log_message"] for r in log_rows(conn)] == [f"disk trouble {c}" for c in "abcde"]
        finally:
            conn.close()
    finally:
        root.removeHandler(handler)
        logging.getLogger("gatewayd.logforward").removeHandler(spy)
        fwd.close()


def test_records_of_the_writer_thread_and_flagged_ones_stay_local() -> None:
    fwd = LogForwarder("bridge", lambda lines: len(lines), 10, 30.0)
    h = ForwardHandler(fwd, WARN)
    rec = logging.LogRecord("gatewayd.bridge", WARN, __file__, 1, "m", None, None)
    h.emit(rec)
    assert len(fwd._pending) == 1
    flagged = logging.LogRecord("gatewayd.bridge", WARN, __file__, 1, "m", None, None)
    setattr(flagged, NO_FORWARD, True)
    h.emit(flagged)
    fwd.thread_id = rec.thread  # as if the record came from the writer thread
    h.emit(rec)
    assert len(fwd._pending) == 1


def test_exception_summary_is_appended() -> None:
    fwd = LogForwarder("supervisor", lambda lines: len(lines), 10, 30.0)
    h = ForwardHandler(fwd, WARN)
    try:
        raise ValueError("bad value")
    except ValueError:
        rec = logging.LogRecord("gatewayd.supervisor", logging.ERROR, __file__, 1, "it failed", None,
                                sys.exc_info())
    h.emit(rec)
    assert fwd._pending[0].text == "it failed [ValueError: bad value]"


# -- the stderr formats ------------------------------------------------------------------

def test_json_lines_parse_and_keep_the_prefix_only_for_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    redact.reset()
    redact.register(["hunter2-secret"])
    try:
        try:
            raise RuntimeError("with hunter2-secret inside")
        except RuntimeError:
            rec = logging.LogRecord("gatewayd.bridge", logging.ERROR, __file__, 1, "token %s", ("hunter2-secret",),
                                    sys.exc_info())
        plain = JsonFormatter("bridge", prefix=False).format(rec)
        doc = json.loads(plain)
        assert doc["level"] == "error" and doc["priority"] == 3 and doc["daemon"] == "bridge"
        assert doc["logger"] == "gatewayd.bridge" and doc["time"].endswith("Z")
        assert "hunter2-secret" not in plain and doc["message"] == f"token {redact.MASK}"
        assert "RuntimeError" in doc["exception"] and "\n" not in plain
        prefixed = JsonFormatter("bridge", prefix=True).format(rec)
        assert prefixed.startswith("<3>{") and json.loads(prefixed[3:]) == doc
    finally:
        redact.reset()
    st_ = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st_.st_dev}:{st_.st_ino}")
    assert journald_stderr()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st_.st_dev}:{st_.st_ino + 1}")
    assert not journald_stderr()
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not journald_stderr()


def test_setup_json_format(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        logger = gwlog.setup("gatewayd.forwarder", "info", "json")
        logger.warning("a %s", "warning")
        err = capsys.readouterr().err.strip().splitlines()
        assert json.loads(err[-1])["message"] == "a warning"
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def test_any_failure_of_the_store_backs_off_up_to_a_minute() -> None:
    clock = Clock()
    calls: list[float] = []

    def broken(lines: list[tuple[int, dict[str, Any]]]) -> int:
        calls.append(clock.t)
        raise RuntimeError("database schema version 9 is newer than this gatewayd (4)")

    fwd = LogForwarder("bridge", broken, 10, 30.0, clock=clock)
    fwd.offer(line("a"))
    start = clock.t
    for _ in range(2000):  # 200 s in steps of 0.1 s, as often as the thread could wake
        fwd.work()
        timeout = fwd._timeout()
        assert timeout is not None and timeout >= 0.05
        clock.t += 0.1
    gaps = [round(b - a) for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps == [1, 2, 4, 8, 16, 32, 60, 60][:len(gaps)] and len(calls) <= 9, (start, calls)
    assert fwd.failure is not None and "newer than this gatewayd" in fwd.failure and "(bug)" in fwd.failure
    assert [x.text for x in fwd.held] == ["a"]


def letters(n: int) -> str:
    return "".join(chr(97 + int(d)) for d in f"{n:05d}")


def test_a_burst_beyond_the_queue_is_counted_and_reported(conn: sqlite3.Connection) -> None:
    clock = Clock()
    fwd = LogForwarder("forwarder", WallStore(conn, 5000, clock), 5000, 30.0, clock=clock)
    for i in range(PENDING_MAX + 7):
        fwd.offer(line(f"distinct {letters(i)}"))
    fwd.work()
    rows = log_rows(conn)
    assert rows[0]["gw_log_message"].startswith("7 log line(s) of the forwarder not sent to ThingsBoard")
    assert [r["gw_log_message"] for r in rows[1:]] == [f"distinct {letters(i)}" for i in range(PENDING_MAX)]
    assert fwd.suppressed == 0


def test_a_queues_db_moved_aside_is_left_for_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "queues.db"
    store = QueuesStore(path, 100)
    try:
        assert store([(1, {"gw_log_message": "one"})]) == 1
        old = tmp_path / "queues.db.corrupt-x"
        for ext in ("", "-wal", "-shm"):
            if Path(str(path) + ext).exists():
                os.replace(str(path) + ext, str(old) + ext)
        assert store([(2, {"gw_log_message": "two"})]) == 1
        for p, expected in ((path, ["two"]), (old, ["one"])):
            conn = queues.open_queues(p, check=False)
            try:
                assert [r["gw_log_message"] for r in log_rows(conn)] == expected
            finally:
                conn.close()
    finally:
        store.close()
