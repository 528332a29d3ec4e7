"""`gatewayd ingest` over MQTT against a real local mosquitto, as real processes.

The PUBACK to the broker is held until the commit (paho 2.x manual ack, paho 1.6.1 a parked
private PUBACK), so whatever ingest received but had not committed when it died is delivered
again by the broker; the tests kill it at such moments and count distinct records.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import load
from gatewayd.ingest import mqtt as ingest_mqtt
from gatewayd.ingest.service import Ingest
from tests.helpers.brokers import MqttDevice, start_mosquitto, start_simulator
from tests.helpers.daemons import Daemon
from tests.helpers.ingest import (
    Publisher,
    batch_payload,
    controller_rows,
    ingest_config,
    publish_stream,
    queued_seqs,
    wait_for,
)
from tests.integration.test_bridge_support import captured_seqs, counters

pytestmark = pytest.mark.integration

DEVICE, TOKEN = "ingest-dev", "ingest-token-1"


@pytest.fixture
def local_broker(tmp_path: Path) -> Iterator[Any]:
    b = start_mosquitto(tmp_path, name="local")
    try:
        yield b
    finally:
        b.stop()


def locked(db: Path) -> sqlite3.Connection:
    """Hold the controller queue's write lock, so ingest's commits fail (busy) until released."""
    conn = sqlite3.connect(str(db), timeout=10, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_device_and_gateway_formats(tmp_path: Path, local_broker: Any) -> None:
    cfg = ingest_config(tmp_path / "gw", mqtt_port=local_broker.port)
    ingest = Daemon("ingest", cfg).start()
    try:
        ingest.wait_log("mqtt: connected")
        with MqttDevice("127.0.0.1", local_broker.port) as dev:
            dev.connect()
            assert dev.publish_json("v1/devices/me/telemetry", {"temp": 21.5})
            assert dev.publish_json("v1/devices/me/telemetry", {"ts": 1000, "values": {"a": 1}})
            assert dev.publish_json("v1/devices/me/telemetry", [{"ts": 2000, "values": {"b": 2}}, {"c": 3}, 7])
            assert dev.publish_json("v1/devices/me/attributes", {"fw": "1.2"})
            assert dev.publish_json("v1/gateway/telemetry", {"Pump A": [{"ts": 3000, "values": {"rpm": 900}}],
                                                             "Pump B": {"rpm": 10}})
            assert dev.publish_json("v1/gateway/attributes", {"Pump A": {"model": "X1"}})
            assert dev.publish("v1/devices/me/telemetry", b"\xff not json")
        rows = wait_for(lambda: (r := controller_rows(tmp_path / "gw")) and len(r) >= 10 and r, 10,
                        what="10 rows in the controller queue")
    finally:
        ingest.stop()
    parsed = [(t, json.loads(m) if isinstance(m, str) and m.startswith("{") else m) for t, m in rows]
    assert parsed[0][0] == "telemetry" and parsed[0][1]["values"] == {"temp": 21.5}
    assert abs(parsed[0][1]["ts"] - time.time() * 1000) < 60_000, "no ts: the time of receipt"
    assert parsed[1] == ("telemetry", {"ts": 1000, "values": {"a": 1}})
    assert parsed[2] == ("telemetry", {"ts": 2000, "values": {"b": 2}})
    assert parsed[3][1]["values"] == {"c": 3}
    assert parsed[4] == ("telemetry", "7"), "a bad element goes on as it is (the forwarder dead-letters it)"
    assert parsed[5][0] == "attributes" and parsed[5][1]["values"] == {"fw": "1.2"}
    assert parsed[6] == ("telemetry", {"ts": 3000, "values": {"Pump A.rpm": 900}})
    assert parsed[7][1]["values"] == {"Pump B.rpm": 10}
    assert parsed[8][0] == "attributes" and parsed[8][1]["values"] == {"Pump A.model": "X1"}
    assert parsed[9] == ("telemetry", b"\xff not json")


def test_a_message_received_but_not_committed_survives_kill9(tmp_path: Path, local_broker: Any) -> None:
    """The commit fails (the queue is locked) and ingest dies: the broker still has the message."""
    base = tmp_path / "gw"
    cfg = ingest_config(base, mqtt_port=local_broker.port)
    ingest = Daemon("ingest", cfg).start()
    lock = None
    try:
        ingest.wait_log("mqtt: connected")
        lock = locked(base / "controller" / "communication_queue.db")
        with MqttDevice("127.0.0.1", local_broker.port) as dev:
            dev.connect()
            assert dev.publish("v1/devices/me/telemetry", batch_payload(7, 3))  # the broker's PUBACK
        ingest.wait_log("cannot commit to the controller queue", timeout=20)
        ingest.kill9()
        lock.rollback()
        lock.close()
        lock = None
        assert queued_seqs(base) == []
        ingest.start()
        wait_for(lambda: queued_seqs(base) == [7, 8, 9], 15, what="the redelivered records")
    finally:
        if lock is not None:
            lock.close()
        ingest.stop()


def test_over_the_queue_cap_messages_wait_at_the_broker(tmp_path: Path, local_broker: Any) -> None:
    base = tmp_path / "gw"
    cfg = ingest_config(base, mqtt_port=local_broker.port, ingest={"max_queue_rows": 50})
    ingest = Daemon("ingest", cfg).start()
    forwarder = Daemon("forwarder", cfg)
    pub = None
    try:
        ingest.wait_log("mqtt: connected")
        pub = Publisher("127.0.0.1", local_broker.port)
        publish_stream(pub, 300, 10)
        pub.wait_acked(10)
        wait_for(lambda: len(queued_seqs(base)) >= 50, 10, what="the queue to fill to its cap")
        time.sleep(1.0)
        held = len(queued_seqs(base))
        assert 50 <= held < 300, held
        assert "holding back new records" in ingest.log()
        forwarder.start()
        wait_for(lambda: counters(base)["ingested"] >= 300, 30, what="all records past the cap")
        assert counters(base)["ingested"] == 300 and counters(base)["dead_lettered"] == 0
    finally:
        if pub is not None:
            pub.close()
        forwarder.stop()
        ingest.stop()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_restarts_of_ingest_and_of_the_broker_lose_nothing(tmp_path: Path, version: str) -> None:
    """A graceful broker restart (persistence on) and ingest stops, with messages queued for it.

    A small in-flight window (MQTT 5 receive maximum 10; mosquitto's 20 under 3.1.1) shows the
    PUBACKs do go out after each commit: 600 messages pass through it."""
    work = tmp_path / "broker"
    work.mkdir()
    persist = ["persistence true", f"persistence_location {work}/", "autosave_interval 3600", "user root"]
    broker = start_mosquitto(work, extra_config=persist, name="local")
    port = broker.port
    base = tmp_path / "gw"
    cfg = ingest_config(base, mqtt_port=port, ingest__mqtt={"mqtt_version": version, "receive_maximum": 10})
    ingest = Daemon("ingest", cfg).start()
    pub = None
    try:
        ingest.wait_log("mqtt: connected")
        pub = Publisher("127.0.0.1", port)
        publish_stream(pub, 5000, 50)
        ingest.stop()                          # ingest away: the broker queues for its session
        publish_stream(pub, 5000, 50, first=5000)
        pub.wait_acked(20)
        broker.stop()                          # SIGTERM: mosquitto saves its sessions and queues
        broker = start_mosquitto(work, port=port, extra_config=persist, name="local")
        ingest.start()
        ingest.wait_log("session resumed", timeout=20)
        stream = threading.Thread(target=publish_stream, args=(pub, 20000, 50),
                                  kwargs={"first": 10000, "pause_every": 20, "pause_s": 0.05})
        stream.start()
        time.sleep(0.5)
        broker.stop()                          # and once more while the stream flows
        broker = start_mosquitto(work, port=port, extra_config=persist, name="local")
        stream.join(60)
        pub.wait_acked(30)
        wait_for(lambda: set(queued_seqs(base)) >= set(range(30000)), 60, what="every record in the queue")
        assert "session resumed" in ingest.log() and "lost" in ingest.log()
    finally:
        if pub is not None:
            pub.close()
        ingest.stop()
        broker.stop()


def test_100000_records_survive_repeated_kill9_of_ingest_and_forwarder(tmp_path: Path) -> None:
    total, per_message = 100_000, 100
    local = start_mosquitto(tmp_path, name="local")
    cloud = start_mosquitto(tmp_path, name="cloud")
    sim = None
    daemons: dict[str, Daemon] = {}
    pub = None
    try:
        capture = tmp_path / "capture.jsonl"
        sim = start_simulator(tmp_path, cloud.port, devices={DEVICE: TOKEN}, capture=capture,
                              extra_args=["--rate-limit-messages", "100000:1,6000000:60",
                                          "--rate-limit-telemetry-messages", "100000:1,6000000:60"])
        base = tmp_path / "gw"
        cfg = ingest_config(base, mqtt_port=local.port, tb_port=sim.port, token=TOKEN)
        for name in ("forwarder", "bridge", "ingest"):
            daemons[name] = Daemon(name, cfg).start()
        daemons["ingest"].wait_log("mqtt: connected")
        pub = Publisher("127.0.0.1", local.port)
        stream = threading.Thread(target=publish_stream, args=(pub, total, per_message),
                                  kwargs={"pause_every": 10, "pause_s": 0.1})
        stream.start()
        rng = random.Random(12)
        kills = 0
        while stream.is_alive() or kills < 8:
            time.sleep(rng.uniform(0.3, 1.2))
            victim = daemons["ingest" if kills % 2 == 0 else "forwarder"]
            victim.kill9()
            victim.start()
            kills += 1
            if kills >= 16:
                break
        stream.join(60)
        pub.wait_acked(30)
        wait_for(lambda: len(set(captured_seqs(capture, DEVICE))) >= total, 120, interval=0.5,
                 what=f"{total} distinct records at the simulator")
        wait_for(lambda: counters(base)["queued"] == 0, 30, what="the outbox to drain")
    finally:
        if pub is not None:
            pub.close()
        for d in reversed(list(daemons.values())):
            d.stop()
        if sim is not None:
            sim.stop()
        local.stop()
        cloud.stop()
    seqs = captured_seqs(capture, DEVICE)
    assert set(seqs) == set(range(total))
    c = counters(base)
    assert c["ingested"] == c["delivered"] + c["queued"] + c["dead_lettered"] + c["dropped"]
    assert c["dead_lettered"] == 0 and c["dropped"] == 0
    # duplicates only from messages in flight at a kill (bounded by the window of each kill)
    assert len(seqs) - total <= kills * 1000 * per_message, len(seqs) - total


def test_paho_161_fallback_commits_inside_on_message(tmp_path: Path, local_broker: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the PUBACK cannot be parked (paho 1.6.1 without the private method), each message is
    committed before paho acknowledges it; a failed commit drops the session, nothing is lost."""
    if ingest_mqtt.HAS_MANUAL_ACK:
        pytest.skip("paho 2.x has a manual-ack mode; the fallback exists for paho 1.6.1 only")
    base = tmp_path / "gw"
    svc = Ingest(load(ingest_config(base, mqtt_port=local_broker.port), env={}))
    svc.start()
    adapter = svc.adapters[0]
    assert isinstance(adapter, ingest_mqtt.MqttAdapter)
    adapter.defer_acks = False
    lock = None

    def run_until(pred: Any, what: str, timeout: float = 15) -> None:
        def stepped() -> Any:
            svc.step()
            return pred()
        wait_for(stepped, timeout, interval=0.01, what=what)

    try:
        run_until(lambda: adapter.connected, "the connection")
        assert adapter.sync_commit
        with MqttDevice("127.0.0.1", local_broker.port) as dev:
            dev.connect()
            assert dev.publish("v1/devices/me/telemetry", batch_payload(0, 2))
            run_until(lambda: queued_seqs(base) == [0, 1], "the first message committed")
            lock = locked(base / "controller" / "communication_queue.db")
            assert dev.publish("v1/devices/me/telemetry", batch_payload(2, 2))
            run_until(lambda: not adapter.connected, "the session dropped after the failed commit")
            lock.rollback()
            lock.close()
            lock = None
            run_until(lambda: queued_seqs(base) == [0, 1, 2, 3], "the redelivered message committed")
    finally:
        if lock is not None:
            lock.close()
        svc.stop()
