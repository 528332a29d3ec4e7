"""The forwarder as a real process against real SQLite files written by a real controller process."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.daemons import ROOT, Daemon, wait_for, write_config
from tests.helpers.datapath import balanced, controller_db, controller_depth, counters, outbox_payloads, ro

pytestmark = pytest.mark.integration

# A controller written for the seed gateway: its own schema, plain sqlite3, autocommit-ish inserts,
# health_check upserts. Arguments: db path, number of rows, rows per transaction, pause between them.
SEED_CONTROLLER = r"""
import json, sqlite3, sys, time
db, total, per_tx, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
conn = sqlite3.connect(db, timeout=10)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
conn.execute("CREATE TABLE IF NOT EXISTS health_check (id INTEGER PRIMARY KEY, timestamp_ms INTEGER)")
conn.commit()
i = 0
t0 = int(time.time() * 1000)
while i < total:
    for _ in range(min(per_tx, total - i)):
        conn.execute("INSERT INTO messages (type, message) VALUES (?, ?)",
                     ("telemetry", json.dumps({"ts": t0 + i, "values": {"seq": i}})))
        i += 1
    conn.execute("INSERT OR REPLACE INTO health_check (id, timestamp_ms) VALUES (1, ?)", (int(time.time() * 1000),))
    conn.commit()
    if pause:
        time.sleep(pause)
print("controller done", flush=True)
"""

# Measures how long a controller waits for SQLite's write lock while the forwarder is busy.
LOCK_PROBE = r"""
import json, sqlite3, sys, time
db, n = sys.argv[1], int(sys.argv[2])
conn = sqlite3.connect(db, timeout=10, isolation_level=None)
waits = []
for i in range(n):
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    waits.append(time.perf_counter() - t0)
    conn.execute("INSERT INTO messages (type, message) VALUES ('telemetry', ?)",
                 (json.dumps({"ts": i, "values": {"probe": i}}),))
    conn.execute("COMMIT")
    time.sleep(0.01)
print(json.dumps({"max_wait_ms": max(waits) * 1000, "n": len(waits)}))
"""


def run_controller(base: Path, total: int, per_tx: int = 100, pause: float = 0.0) -> subprocess.Popen[str]:
    controller_db(base).parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", SEED_CONTROLLER, str(controller_db(base)), str(total),
                             str(per_tx), str(pause)], stdout=subprocess.PIPE, text=True)


def test_seed_controller_works_unchanged(tmp_path: Path, daemons: list[Daemon]) -> None:
    # The controller creates its tables first, as the seed gateway's controllers do.
    ctrl = run_controller(tmp_path, 500, per_tx=50, pause=0.01)
    assert ctrl.wait(60) == 0
    fwd = Daemon("forwarder", write_config(tmp_path))
    daemons.append(fwd)
    fwd.start()
    wait_for(lambda: controller_depth(tmp_path) == 0, 30, what="controller queue drained")
    assert [p["values"]["seq"] for p in outbox_payloads(tmp_path)] == list(range(500))
    with ro(controller_db(tmp_path)) as c:
        assert c.execute("SELECT timestamp_ms FROM health_check WHERE id = 1").fetchone()[0] > 0
    # ... and keeps working for a controller started after the forwarder created the file.
    ctrl = run_controller(tmp_path, 300, per_tx=1, pause=0.001)
    assert ctrl.wait(60) == 0
    wait_for(lambda: len(outbox_payloads(tmp_path)) == 800, 30, what="second stream")
    totals = counters(tmp_path)
    assert totals["ingested"] == totals["archived"] == totals["queued"] == 800 and balanced(totals)


def test_kill9_twenty_times_exactly_once_in_order(tmp_path: Path, daemons: list[Daemon]) -> None:
    total = 100_000
    cfg = write_config(tmp_path, {"forwarder": {"batch_size": 2000}})
    fwd = Daemon("forwarder", cfg)
    daemons.append(fwd)
    fwd.start()
    ctrl = run_controller(tmp_path, total, per_tx=100, pause=0.008)
    rng = random.Random(int(os.environ.get("GATEWAYD_TEST_SEED", "20261123")))
    kills = 0
    try:
        while kills < 20:
            time.sleep(rng.uniform(0.05, 0.5))
            fwd.kill9()
            kills += 1
            fwd.start(wait_ready=False)
        assert ctrl.wait(120) == 0
    finally:
        if ctrl.poll() is None:
            ctrl.kill()
            ctrl.wait()
    wait_for(lambda: controller_depth(tmp_path) == 0, 60, what="controller queue drained after the kills")
    fwd.stop()

    seqs = [p["values"]["seq"] for p in outbox_payloads(tmp_path)]
    assert len(seqs) == total, f"{len(seqs)} rows in the outbox, {len(set(seqs))} distinct"
    assert seqs == list(range(total))
    with ro(tmp_path / "state" / "archive.db") as a:
        archived = [json.loads(m)["values"]["seq"] for (m,) in a.execute("SELECT message FROM archive ORDER BY id")]
    assert archived == list(range(total))
    c = counters(tmp_path)
    assert c["ingested"] == c["queued"] == c["archived"] == total
    assert c["outbox_rows"] == total and balanced(c)


def test_controller_never_waits_long_for_the_lock(tmp_path: Path, daemons: list[Daemon]) -> None:
    ctrl = run_controller(tmp_path, 200_000, per_tx=20_000)
    assert ctrl.wait(120) == 0
    fwd = Daemon("forwarder", write_config(tmp_path))
    daemons.append(fwd)
    fwd.start()
    probe = subprocess.run([sys.executable, "-c", LOCK_PROBE, str(controller_db(tmp_path)), "300"],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert counters(tmp_path)["ingested"] > 0
    assert result["max_wait_ms"] < 100, result
    wait_for(lambda: controller_depth(tmp_path) == 0, 60, what="drained")
    assert counters(tmp_path)["ingested"] == 200_300


BAD_ROWS = [
    ("telemetry", "{not json", "not valid JSON"),
    ("telemetry", "[1,2,3]", "not a JSON object"),
    ("telemetry", '{"values": {"a": 1}}', "'ts' is missing"),
    ("telemetry", '{"ts": "yesterday", "values": {"a": 1}}', "'ts' must be an integer"),
    ("telemetry", '{"ts": 1}', "'values' is missing"),
    ("telemetry", '{"ts": 1, "values": "x"}', "'values' must be a JSON object"),
    ("telemetry", '{"ts": 1, "values": {}}', "'values' is empty"),
    ("telemetry", None, "message is missing"),
    ("telemetry", json.dumps({"ts": 1, "values": {"big": "x" * 70_000}}), "more than the maximum"),
]


def test_bad_rows_dead_lettered_and_rest_flows(tmp_path: Path, daemons: list[Daemon]) -> None:
    fwd = Daemon("forwarder", write_config(tmp_path))
    daemons.append(fwd)
    fwd.start()
    conn = sqlite3.connect(controller_db(tmp_path), timeout=10)
    for seq, (type_, message, _) in enumerate(BAD_ROWS):
        conn.execute("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
                     (json.dumps({"ts": seq, "values": {"seq": seq}}),))
        conn.execute("INSERT INTO messages(type, message) VALUES (?, ?)", (type_, message))
    conn.execute("INSERT INTO messages(type, message) VALUES ('attributes', ?)",
                 (json.dumps({"ts": 5, "values": {"firmware": "1.0"}}),))
    conn.execute("INSERT INTO messages(type, message) VALUES ('controller_log', ?)",
                 (json.dumps({"ts": 6, "values": {"log": "hello"}}),))
    conn.commit()
    conn.close()
    wait_for(lambda: controller_depth(tmp_path) == 0, 30, what="drained")
    with ro(tmp_path / "state" / "queues.db") as q:
        dead = q.execute("SELECT type, message, reason FROM dead_letters ORDER BY id").fetchall()
        kinds = q.execute("SELECT kind, payload FROM outbox ORDER BY priority DESC, id").fetchall()
    assert len(dead) == len(BAD_ROWS)
    for (_, message, reason), (_, want_message, want_reason) in zip(dead, BAD_ROWS, strict=True):
        assert want_reason in reason
        assert message == want_message
    assert kinds[0] == ("attributes", '{"firmware":"1.0"}')
    telemetry = [json.loads(p)["values"] for k, p in kinds if k == "telemetry"]
    assert telemetry == [{"seq": i} for i in range(len(BAD_ROWS))] + [{"log": "hello"}]
    with ro(tmp_path / "state" / "archive.db") as a:
        assert a.execute("SELECT count(*) FROM archive").fetchone()[0] == len(BAD_ROWS) + 1  # logs not archived
    c = counters(tmp_path)
    assert c["dead_lettered"] == len(BAD_ROWS) and balanced(c)
    assert "dead-lettered: 'ts' is missing" in fwd.log()


def test_corrupt_databases_moved_aside_and_reported(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A damaged file of gatewayd's is moved aside; the controller's is reported, never renamed."""
    cfg = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "controller").mkdir()
    (tmp_path / "state" / "queues.db").write_bytes(b"garbage" * 1000)
    junk = b"\x00junk" * 1000
    controller_db(tmp_path).write_bytes(junk)
    fwd = Daemon("forwarder", cfg)
    daemons.append(fwd)
    fwd.start()
    fwd.wait_log("it belongs to the controller")
    assert "queues.db is damaged" in fwd.log() and "moved aside" in fwd.log()
    aside = sorted(p.name for p in tmp_path.rglob("*.corrupt-*"))
    assert len(aside) == 1 and aside[0].startswith("queues.db.corrupt-")
    assert controller_db(tmp_path).read_bytes() == junk
    st = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), "status", "--json"],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)
    status = json.loads(st.stdout)
    assert len(status["corrupt_files"]) == 1
    assert "belongs to the controller" in status["faults"]["forwarder"]
    assert status["controller"]["database_error"]
    assert any("damaged database" in r for r in status["degraded_reasons"])
    assert st.returncode == 1
    assert fwd.log().count("it belongs to the controller") == 1  # reported once, not once per retry
    # The controller replaces its file: the forwarder follows without a restart.
    controller_db(tmp_path).unlink()
    ctrl = run_controller(tmp_path, 10, per_tx=10)
    assert ctrl.wait(30) == 0
    wait_for(lambda: counters(tmp_path)["ingested"] == 10, 30, what="rows of the new file")
    wait_for(lambda: controller_depth(tmp_path) == 0, 30, what="drained")
    fwd.wait_log("recovered")


def test_outbox_cap_drops_oldest_telemetry_only(tmp_path: Path, daemons: list[Daemon]) -> None:
    fwd = Daemon("forwarder", write_config(tmp_path, {"outbox": {"max_rows": 1000}}))
    daemons.append(fwd)
    fwd.start()
    conn = sqlite3.connect(controller_db(tmp_path), timeout=10)
    conn.executemany("INSERT INTO messages(type, message) VALUES (?, ?)",
                     [("attributes" if i % 300 == 0 else "telemetry", json.dumps({"ts": i, "values": {"seq": i}}))
                      for i in range(3000)])
    conn.commit()
    conn.close()
    wait_for(lambda: controller_depth(tmp_path) == 0, 30, what="drained")
    c = counters(tmp_path)
    assert c["outbox_rows"] == 1000 and c["dropped"] == 2000 and balanced(c)
    payloads = outbox_payloads(tmp_path)
    attrs = [p for p in payloads if "ts" not in p]
    assert len(attrs) == 10  # all attributes kept
    seqs = [p["values"]["seq"] for p in payloads if "ts" in p]
    assert seqs == sorted(seqs) and seqs[-1] == 2999  # the newest telemetry kept
    assert "dropped the" in fwd.log()


def test_replaced_controller_database_is_read_from_the_start(tmp_path: Path, daemons: list[Daemon]) -> None:
    fwd = Daemon("forwarder", write_config(tmp_path))
    daemons.append(fwd)
    fwd.start()
    assert run_controller(tmp_path, 50, per_tx=50).wait(30) == 0
    wait_for(lambda: counters(tmp_path)["ingested"] == 50, 30, what="first file")
    for suffix in ("", "-wal", "-shm"):
        Path(str(controller_db(tmp_path)) + suffix).unlink(missing_ok=True)
    assert run_controller(tmp_path, 20, per_tx=20).wait(30) == 0  # ids restart at 1 in the new file
    wait_for(lambda: counters(tmp_path)["ingested"] == 70, 30, what="second file")
    seqs = [p["values"]["seq"] for p in outbox_payloads(tmp_path)]
    assert seqs == list(range(50)) + list(range(20))
    assert "new file" in fwd.log() or "replaced or removed" in fwd.log()


def test_sigterm_stops_cleanly_and_status(tmp_path: Path, daemons: list[Daemon]) -> None:
    cfg = write_config(tmp_path)
    missing = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), "status", "--json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert missing.returncode == 2 and "cannot read" in json.loads(missing.stdout)["error"]
    fwd = Daemon("forwarder", cfg)
    daemons.append(fwd)
    fwd.start()
    sent = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), "send", '{"temp": 21}'],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: counters(tmp_path)["queued"] == 1, 30, what="sent record queued")
    st = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), "status", "--json"],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)
    status = json.loads(st.stdout)
    assert status["units"]["forwarder"] == "active"
    assert status["units"]["bridge"] == "inactive"
    assert status["queues"]["outbox"] == 1 and status["queues"]["controller"] == 0
    assert status["ledger"] == {"ingested": 1, "delivered": 0, "queued": 1, "dead_lettered": 0, "dropped": 0,
                                "archived": 1, "balanced": True, "dropped_by_reason": {}}
    assert status["mqtt"]["connected"] is False
    assert st.returncode == 1  # degraded: bridge and supervisor not running, MQTT disconnected
    assert fwd.stop() == 0
    assert "forwarder stopped" in fwd.log()
    assert not (tmp_path / "run" / "forwarder.heartbeat").exists()
