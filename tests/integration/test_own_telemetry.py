"""gatewayd's own telemetry at the ThingsBoard simulator: forwarded log lines of every daemon
(deduplicated, rate-limited, low priority) and the ledger and queue figures, which add up.

Real mosquitto, the simulator in front of it, and the bridge, forwarder and supervisor as
processes (on whichever paho generation runs the tests).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import load
from gatewayd.store import controller as controller_store
from tests.helpers.brokers import MOSQUITTO_BIN, thingsboard
from tests.helpers.daemons import Daemon, wait_for, write_config
from tests.helpers.docker_env import BridgeSide

pytestmark = pytest.mark.integration

DEVICE = "own-telemetry"
TOKEN = "own-telemetry-token"
DAEMONS = ("forwarder", "bridge", "supervisor")


class World:
    def __init__(self, sim: Any, base: Path, daemons: dict[str, Daemon]):
        self.sim = sim
        self.base = base
        self.daemons = daemons
        self.cfg = load(base / "gatewayd.toml", env={})

    def records(self) -> list[dict[str, Any]]:
        return [r["values"] | {"ts": r["ts"]} for r in self.sim.client.telemetry(DEVICE)]

    def log_lines(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "gw_log_message" in r]

    def ledgers(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "gw_ingested" in r]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    if not os.path.exists(MOSQUITTO_BIN):
        pytest.skip("mosquitto is not installed")
    started: list[Daemon] = []

    def make(logging: dict[str, Any], **sections: dict[str, Any]) -> World:
        base = tmp_path / "gw"
        cfg = write_config(base, {
            "thingsboard": {"host": "127.0.0.1", "port": sim.port, "access_token": TOKEN, "device_name": DEVICE,
                            "reconnect_max_s": 1.0},
            "supervisor": {"telemetry_interval_s": 1, "udev": False},
            "logging": {"forward_level": "warning", **logging},
            **sections,
        })
        daemons = {}
        for name in DAEMONS:
            daemons[name] = Daemon(name, cfg).start()
            started.append(daemons[name])
        sim.client.wait_connected(DEVICE, timeout=20)
        return World(sim, base, daemons)

    with thingsboard(tmp_path, devices={DEVICE: TOKEN}) as (_broker, sim):
        try:
            yield make
        finally:
            for d in started:
                d.stop()


def test_a_warning_of_every_daemon_arrives_as_telemetry(world: Callable[..., World]) -> None:
    # An unknown section: each daemon warns about it once, at start-up. Logs in JSON on stderr.
    w = world({"forward_max_per_min": 20, "format": "json"}, from_the_future={"x": 1})
    lines = wait_for(lambda: (x if len(x := [r for r in w.log_lines() if "from_the_future" in r["gw_log_message"]])
                              >= 3 else None), 30, what="three forwarded warnings")
    assert sorted(r["gw_log_daemon"] for r in lines) == sorted(DAEMONS)
    for r in lines:
        assert r["gw_log_level"] == "warning"
        assert r["gw_log_message"] == "config: [from_the_future]: unknown section, ignored"
    assert len({r["ts"] for r in lines}) == 3  # one timestamp each: none overwrites another in ThingsBoard
    # what is forwarded stays out of the controller ledger
    ledger = wait_for(lambda: w.ledgers(), 20, what="ledger telemetry")[-1]
    assert ledger["gw_ingested"] == 0 and ledger["gw_queued"] == 0 and ledger["gw_delivered"] == 0
    # stderr is not journald's here: every line is a bare JSON object
    for name, d in w.daemons.items():
        docs = [json.loads(line) for line in d.log().splitlines()]
        assert {x["daemon"] for x in docs} == {name}
        warning = [x for x in docs if "from_the_future" in x["message"]]
        assert len(warning) == 1 and (warning[0]["level"], warning[0]["priority"]) == ("warning", 4)


def test_a_flood_stays_within_the_rate_limit_with_a_repeated_summary(world: Callable[..., World]) -> None:
    limit = 6
    w = world({"forward_max_per_min": limit, "forward_repeat_window_s": 5})
    bridge_side = BridgeSide(w.cfg.state_dir)
    try:
        # 200 similar warnings (the supervisor dead-letters each message on an unknown topic) ...
        for _ in range(200):
            bridge_side.inbound("gatewayd-test/unknown", b"{}")
        summary = wait_for(lambda: [r for r in w.log_lines() if "repeated" in r["gw_log_message"]], 30,
                           what="the 'repeated N times' summary")
        assert len(summary) == 1 and summary[0]["gw_log_daemon"] == "supervisor"
        assert summary[0]["gw_log_message"].endswith("on gatewayd-test/unknown dead-lettered: no handler for this "
                                                     "topic (repeated 199 times in 5 s)")
        first = [r for r in w.log_lines() if "gatewayd-test/unknown" in r["gw_log_message"]]
        assert len(first) == 2  # the first one, then the summary
        # ... then 40 different ones: no more than the limit in the minute
        for i in range(40):
            bridge_side.inbound("gatewayd-test/other-" + "".join(chr(97 + int(c)) for c in f"{i:02d}"), b"{}")
        wait_for(lambda: w.daemons["supervisor"].log().count("gatewayd-test/other-") >= 40, 30,
                 what="the supervisor to log all 40")
        wait_for(lambda: len(w.log_lines()) >= limit, 20, what="the lines within the limit")
        time.sleep(3)  # time for any excess to arrive, if the limit leaked
        lines = w.log_lines()
        assert len(lines) == limit
        span_ms = max(r["ts"] for r in lines) - min(r["ts"] for r in lines)
        assert span_ms < 60_000
        # the journal has every line
        assert w.daemons["supervisor"].log().count("dead-lettered: no handler for this topic") == 240
    finally:
        bridge_side.close()


def test_ledger_and_queue_figures_arrive_and_add_up(world: Callable[..., World]) -> None:
    w = world({})
    conn = controller_store.open_controller(w.cfg.controller_db)
    try:
        now = int(time.time() * 1000)
        for i in range(20):
            controller_store.enqueue(conn, "telemetry", json.dumps({"ts": now + i, "values": {"seq": i}}))
        for bad in ("not json", '{"ts": 1}', '{"values": {"a": 1}}'):
            controller_store.enqueue(conn, "telemetry", bad)
    finally:
        conn.close()

    def settled() -> dict[str, Any] | None:
        done = [r for r in w.ledgers() if r["gw_delivered"] == 20]
        return done[-1] if done else None

    last = wait_for(settled, 40, what="ledger telemetry with all 20 records delivered")
    assert last["gw_ingested"] == 23 and last["gw_dead_lettered"] == 3
    assert last["gw_queued"] == 0 and last["gw_dropped"] == 0
    assert last["gw_queue_controller"] == 0 and last["gw_queue_dead_letters"] == 3
    assert last["gw_queue_inbound"] == 0 and last["gw_oldest_queued_age_s"] >= 0
    for r in w.ledgers():
        assert r["gw_ingested"] == r["gw_delivered"] + r["gw_queued"] + r["gw_dead_lettered"] + r["gw_dropped"], r
    assert sorted(r["seq"] for r in w.records() if "seq" in r) == list(range(20))
