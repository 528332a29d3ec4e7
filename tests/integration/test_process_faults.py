"""Process faults against a whole gateway (mosquitto, the ThingsBoard simulator, the daemons as
real processes): `kill -9` of any daemon at random moments while a controller writes and
persistent RPCs arrive. Afterwards every record was delivered, the local stages hold each
record exactly once (outbox, archive, ledger), every RPC was answered, and `gatewayctl status`
is healthy again: before, a daemon restarted after SIGKILL kept the dead pid in its heartbeat
file and status (without systemd) reported it inactive for ever, `/health` 503."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemons import wait_for
from tests.helpers.datapath import balanced, controller_db, controller_depth, counters
from tests.helpers.gateway import DEVICE, gateway, wait_healthy

pytestmark = pytest.mark.integration

CONTROLLER = """
import json, sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
c.execute("PRAGMA journal_mode=WAL")
c.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
for i in range(int(sys.argv[2])):
    c.execute("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
              (json.dumps({"ts": 1700000000000 + i, "values": {"seq": i}}),))
    time.sleep(0.004)
"""


def test_kill9_of_any_daemon_while_data_and_rpcs_flow(tmp_path: Path) -> None:
    n = 800
    rng = random.Random(int(os.environ.get("GATEWAYD_TEST_SEED", "20261130")))
    with gateway(tmp_path, {"forwarder": {"batch_size": 50}}) as gw:
        ctrl = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(controller_db(gw.base)), str(n)])
        replies: list[Any] = []
        stop = threading.Event()

        def rpcs() -> None:
            i = 0
            while not stop.is_set():
                try:
                    replies.append(gw.sim.client.rpc(DEVICE, "ping", {"n": i}, timeout=20, persistent=True))
                except Exception as e:  # noqa: BLE001 - recorded, asserted below
                    replies.append({"exception": str(e)})
                i += 1

        caller = threading.Thread(target=rpcs, daemon=True)
        caller.start()
        try:
            for _ in range(6):
                time.sleep(rng.uniform(0.2, 0.8))
                daemon = gw.daemons[rng.choice(["bridge", "forwarder", "supervisor"])]
                daemon.kill9()
                daemon.start(wait_ready=False)
            assert ctrl.wait(120) == 0
        finally:
            stop.set()
            if ctrl.poll() is None:
                ctrl.kill()
                ctrl.wait()
        caller.join(60)
        wait_for(lambda: controller_depth(gw.base) == 0, 60, what="the controller queue drained")
        wait_for(lambda: {v["seq"] for v in gw.delivered() if "seq" in v} == set(range(n)), 90, 0.5,
                 what="every record delivered")
        status = wait_healthy(gw, 30)
        assert all(state == "active" for name, state in status["units"].items() if name != "ingest"), status
        code, _, _ = gw.get("/health")
        assert code == 200
        c = counters(gw.base)
        assert c["ingested"] == c["delivered"] == c["archived"] == n and balanced(c), c
        with contextlib.closing(sqlite3.connect(gw.base / "state" / "archive.db")) as a:
            archived = [json.loads(m)["values"]["seq"] for (m,) in a.execute("SELECT message FROM archive ORDER BY id")]
        assert archived == list(range(n))
        assert replies and all("error" not in r and "exception" not in r for r in replies[:-1]), replies
