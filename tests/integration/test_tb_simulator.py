"""The ThingsBoard simulator (tests/tbsim, run as `python3 -m tbsim`) against a real mosquitto, with plain
paho clients playing the device (MQTT 3.1.1 and MQTT 5)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import (
    MosquittoProcess,
    MqttDevice,
    SimulatorError,
    SimulatorProcess,
    start_mosquitto,
    start_simulator,
    wait_until,
)

pytestmark = pytest.mark.integration

TOKENS = {
    "dev-telemetry": "tok-telemetry",
    "dev-attrs": "tok-attrs",
    "dev-attrreq": "tok-attrreq",
    "dev-rpc": "tok-rpc",
    "dev-limits": "tok-limits",
    "dev-evict": "tok-evict",
    "dev-puback": "tok-puback",
    "dev-oversize": "tok-oversize",
    "dev-ota": "tok-ota",
    "dev-ota-bad": "tok-ota-bad",
    "dev-mqtt5": "tok-mqtt5",
    "dev-subs": "tok-subs",
    "dev-drop": "tok-drop",
    "dev-rate": "tok-rate",
    "dev-bulk": "tok-bulk",
    "existing-device": "tok-existing",
}
PROVISION_KEY = "pkey"
PROVISION_SECRET = "psecret"
NOT_AUTHORIZED = {4, 5, 0x86, 0x87}  # 3.1.1 codes; paho 2 reports them as MQTT 5 reason codes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tbsim")


@pytest.fixture(scope="module")
def broker(workdir: Path) -> Iterator[MosquittoProcess]:
    b = start_mosquitto(workdir)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def sim_process(workdir: Path, broker: MosquittoProcess) -> Iterator[SimulatorProcess]:
    s = start_simulator(workdir, broker.port, devices=TOKENS, provision_key=PROVISION_KEY,
                        provision_secret=PROVISION_SECRET, capture=True,
                        extra_args=["--provision-fail-existing"])
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def sim(sim_process: SimulatorProcess) -> Iterator[SimulatorProcess]:
    """The module's simulator; faults are reset after every test."""
    yield sim_process
    sim_process.client.set_faults(no_puback=False, max_packet_bytes=65536, refuse=False, rate_limit=0)


def device(sim: SimulatorProcess, token: str | None, mqtt5: bool = False, **kw: Any) -> MqttDevice:
    return MqttDevice(sim.host, sim.port, username=token, mqtt5=mqtt5, **kw)


def connected(sim: SimulatorProcess, name: str, mqtt5: bool = False) -> MqttDevice:
    d = device(sim, TOKENS[name], mqtt5)
    assert d.connect() == 0
    return d


# --------------------------------------------------------------------------------------


def test_telemetry_object_and_array_are_captured(sim: SimulatorProcess) -> None:
    name = "dev-telemetry"
    watcher = MqttDevice(sim.host, sim.broker_port)  # straight on the broker
    assert watcher.connect() == 0
    watcher.subscribe(f"tb/{name}/captured/telemetry")
    with connected(sim, name) as d:
        single = {"ts": 1000, "values": {"t": 1.5}}
        batch = [{"ts": 2000 + i, "values": {"t": i}} for i in range(5)]
        plain = {"humidity": 40}
        assert d.publish_json("v1/devices/me/telemetry", single)
        assert d.publish_json("v1/devices/me/telemetry", batch)
        assert d.publish_json("v1/devices/me/telemetry", plain)
        records = sim.client.wait_for_telemetry(name, 7)
    assert [r["ts"] for r in records[:6]] == [1000, 2000, 2001, 2002, 2003, 2004]
    assert records[0]["values"] == {"t": 1.5}
    assert records[6]["values"] == {"humidity": 40}
    # one captured message per publish, payload unchanged
    got = [watcher.expect(timeout=5).json() for _ in range(3)]
    watcher.close()
    assert got == [single, batch, plain]
    stats = sim.client.stats(name)
    assert stats["telemetry_publishes"] == 3 and stats["telemetry_records"] == 7
    assert sim.capture_path is not None
    lines = [json.loads(line) for line in sim.capture_path.read_text().splitlines()]
    mine = [x for x in lines if x.get("device") == name]
    assert [x["ts"] for x in mine][:6] == [1000, 2000, 2001, 2002, 2003, 2004]
    assert set(mine[0]) == {"device", "ts", "values", "received_ms"}


def test_client_attributes_are_stored_and_not_echoed(sim: SimulatorProcess) -> None:
    name = "dev-attrs"
    with connected(sim, name) as d:
        assert d.subscribe("v1/devices/me/attributes") == [1]
        assert d.publish_json("v1/devices/me/attributes", {"fw": "1.0", "n": 3})
        sim.client.wait_stat(name, "attribute_publishes", 1)
        assert sim.client.attributes(name)["client"] == {"fw": "1.0", "n": 3}
        echoed = d.no_message(1.0)
        assert echoed is None, f"the simulator echoed {echoed}"
        # shared attribute updates do arrive, as {"k": v} and {"deleted": [...]}
        sim.client.set_shared_attributes(name, {"mode": "fast"})
        msg = d.expect(timeout=5)
        assert msg.topic == "v1/devices/me/attributes" and msg.json() == {"mode": "fast"}
        sim.client.delete_shared_attributes(name, ["mode"])
        assert d.expect(timeout=5).json() == {"deleted": ["mode"]}


def test_attribute_request_response(sim: SimulatorProcess) -> None:
    name = "dev-attrreq"
    sim.client.set_shared_attributes(name, {"sw_title": "ctl", "sw_version": "1.2", "other": 1})
    with connected(sim, name) as d:
        assert d.publish_json("v1/devices/me/attributes", {"c1": "x"})
        sim.client.wait_stat(name, "attribute_publishes", 1)
        d.subscribe("v1/devices/me/attributes/response/+")
        before = sim.client.stats(name)["attribute_requests"]
        d.publish_json("v1/devices/me/attributes/request/7",
                       {"sharedKeys": "sw_title,sw_version,FILES", "clientKeys": "c1,missing"})
        msg = d.expect(timeout=5)
        assert msg.topic == "v1/devices/me/attributes/response/7"
        assert msg.json() == {"client": {"c1": "x"}, "shared": {"sw_title": "ctl", "sw_version": "1.2"}}
        # no snapshot on subscribe, empty sections are left out (as ThingsBoard does)
        d.publish_json("v1/devices/me/attributes/request/8", {"sharedKeys": "nothing"})
        assert d.expect(timeout=5).json() == {}
        assert sim.client.stats(name)["attribute_requests"] == before + 2


def test_server_rpc_round_trip(sim: SimulatorProcess) -> None:
    name = "dev-rpc"
    with connected(sim, name) as d:
        d.subscribe("v1/devices/me/rpc/request/+")

        def answer() -> None:
            msg = d.expect(timeout=10)
            rpc_id = msg.topic.rsplit("/", 1)[1]
            req = msg.json()
            d.publish_json(f"v1/devices/me/rpc/response/{rpc_id}",
                           {"pong": req["params"]["x"], "m": req["method"]})

        t = threading.Thread(target=answer)
        t.start()
        reply = sim.client.rpc(name, "ping", {"x": 42}, timeout=10)
        t.join(10)
        assert reply == {"pong": 42, "m": "ping"}
        # unanswered RPC times out with HTTP 504
        with pytest.raises(SimulatorError) as err:
            sim.client.rpc(name, "silence", {}, timeout=0.5)
        assert err.value.status == 504


def test_persistent_rpc_reaches_a_device_that_was_offline_or_dropped_it(sim: SimulatorProcess) -> None:
    """ThingsBoard's persistent RPC: sent again while unanswered, once the device is (back) online."""
    name = "dev-rpc"
    result: list[Any] = []
    caller = threading.Thread(target=lambda: result.append(
        sim.client.rpc(name, "later", {"n": 1}, timeout=30, persistent=True)))
    caller.start()                                      # the device is offline
    try:
        time.sleep(1.0)
        with connected(sim, name) as d:
            d.subscribe("v1/devices/me/rpc/request/+")
            first = d.expect(timeout=10)                # dropped, as a device whose store is full would
            again = d.expect(timeout=10)
            assert again.topic == first.topic and again.json() == {"method": "later", "params": {"n": 1}}
            d.publish_json(first.topic.replace("request", "response"), {"done": True})
            caller.join(10)
    finally:
        caller.join(30)
    assert result == [{"done": True}]


def test_get_session_limits(sim: SimulatorProcess) -> None:
    name = "dev-limits"
    with connected(sim, name) as d:
        d.subscribe("v1/devices/me/rpc/response/+")
        d.publish_json("v1/devices/me/rpc/request/1", {"method": "getSessionLimits", "params": {}})
        msg = d.expect(timeout=5)
        assert msg.topic == "v1/devices/me/rpc/response/1"
        limits = msg.json()
        assert limits["maxPayloadSize"] == 65536
        assert limits["maxInflightMessages"] == 100
        assert set(limits["rateLimits"]) == {"messages", "telemetryMessages", "telemetryDataPoints"}
        sim.client.set_faults(max_packet_bytes=32768)
        d.publish_json("v1/devices/me/rpc/request/2", {"method": "getSessionLimits", "params": {}})
        assert d.expect(timeout=5).json()["maxPayloadSize"] == 32768
    assert sim.client.client_rpc_requests(name)[0]["method"] == "getSessionLimits"


def test_old_thingsboard_does_not_answer_session_limits(workdir: Path, broker: MosquittoProcess) -> None:
    s = start_simulator(workdir, broker.port, devices={"old": "tok-old"}, extra_args=["--no-session-limits"])
    try:
        with MqttDevice(s.host, s.port, username="tok-old") as d:
            assert d.connect() == 0
            d.subscribe("v1/devices/me/rpc/response/+")
            d.publish_json("v1/devices/me/rpc/request/1", {"method": "getSessionLimits", "params": {}})
            assert d.no_message(1.0) is None
    finally:
        s.stop()


def provision(sim: SimulatorProcess, request: dict[str, Any]) -> dict[str, Any]:
    with device(sim, "provision") as p:
        assert p.connect() == 0
        p.subscribe("/provision/response")
        p.publish_json("/provision/request", request)
        msg = p.expect(timeout=5)
        assert msg.topic == "/provision/response"
        return msg.json()


def test_provisioning(sim: SimulatorProcess) -> None:
    ok = provision(sim, {"deviceName": "fresh-gw", "provisionDeviceKey": PROVISION_KEY,
                         "provisionDeviceSecret": PROVISION_SECRET})
    assert ok["status"] == "SUCCESS" and ok["credentialsType"] == "ACCESS_TOKEN"
    token = ok["credentialsValue"]
    assert token and token not in TOKENS.values()
    assert sim.client.token("fresh-gw") == token
    # the new token works
    with device(sim, token) as d:
        assert d.connect() == 0
        assert d.publish_json("v1/devices/me/telemetry", {"ts": 1, "values": {"a": 1}})
        sim.client.wait_for_telemetry("fresh-gw", 1)

    bad = provision(sim, {"deviceName": "other", "provisionDeviceKey": PROVISION_KEY,
                          "provisionDeviceSecret": "wrong"})
    assert bad["status"] == "NOT_FOUND" and bad["errorMsg"]
    exists = provision(sim, {"deviceName": "existing-device", "provisionDeviceKey": PROVISION_KEY,
                             "provisionDeviceSecret": PROVISION_SECRET})
    assert exists["status"] == "FAILURE" and exists["errorMsg"]
    g = sim.client.stats()["global"]
    assert g["provision_success"] >= 1 and g["provision_not_found"] >= 1 and g["provision_failure"] >= 1


def test_bad_token_is_refused(sim: SimulatorProcess) -> None:
    for mqtt5 in (False, True):
        with device(sim, "no-such-token", mqtt5) as d:
            assert d.connect() in NOT_AUTHORIZED
            wait_until(d.disconnected.is_set, 5, what="connection closed")
    with device(sim, None) as d:
        assert d.connect() in NOT_AUTHORIZED
    assert sim.client.stats()["global"]["refused_connects"] >= 3


def test_second_session_evicts_first(sim: SimulatorProcess) -> None:
    name = "dev-evict"
    first = connected(sim, name)
    second = connected(sim, name)
    try:
        assert first.disconnected.wait(5), "the first session was not closed"
        assert not second.disconnected.is_set()
        assert second.publish_json("v1/devices/me/telemetry", {"ts": 5, "values": {"v": 1}})
        sim.client.wait_for_telemetry(name, 1)
        stats = sim.client.stats(name)
        assert stats["evictions"] == 1 and stats["connected"]
    finally:
        first.close()
        second.close()


def test_no_puback_fault(sim: SimulatorProcess) -> None:
    name = "dev-puback"
    with connected(sim, name) as d:
        sim.client.set_faults(no_puback=True)
        assert not d.publish_json("v1/devices/me/telemetry", {"ts": 1, "values": {"a": 1}}, timeout=1.5)
        # the server did get it; only the acknowledgement is lost
        sim.client.wait_for_telemetry(name, 1)
        assert sim.client.stats(name)["pubacks_swallowed"] >= 1
        sim.client.set_faults(no_puback=False)
        assert d.publish_json("v1/devices/me/telemetry", {"ts": 2, "values": {"a": 2}}, timeout=5)


def test_oversized_publish_closes_connection(sim: SimulatorProcess) -> None:
    name = "dev-oversize"
    topic = "v1/devices/me/telemetry"
    with connected(sim, name) as d:
        fits = json.dumps({"ts": 1, "values": {"x": "a" * (65536 - len(topic) - 30)}})
        fits += " " * (65536 - len(topic) - len(fits))
        assert len(topic) + len(fits) == 65536
        assert d.publish(topic, fits, timeout=5)
        too_big = fits + " "
        assert not d.publish(topic, too_big, timeout=2)
        assert d.disconnected.wait(5)
    # a smaller limit set at runtime
    sim.client.set_faults(max_packet_bytes=1000)
    with connected(sim, name) as d:
        assert not d.publish(topic, json.dumps({"ts": 1, "values": {"x": "b" * 1000}}), timeout=2)
        assert d.disconnected.wait(5)
    assert sim.client.stats(name)["oversize_closes"] == 2
    assert sim.client.stats(name)["telemetry_records"] == 1


def download(d: MqttDevice, size: int, chunk_size: int, request_id: str = "1") -> bytes:
    data = b""
    for n in range(size // chunk_size + 2):
        d.publish(f"v2/sw/request/{request_id}/chunk/{n}", str(chunk_size))
        msg = d.expect(timeout=5)
        assert msg.topic == f"v2/sw/response/{request_id}/chunk/{n}"
        if not msg.payload:
            break
        data += msg.payload
    return data


def test_ota_chunk_download_and_checksum(sim: SimulatorProcess) -> None:
    name = "dev-ota"
    package = os.urandom(50_000)
    with connected(sim, name) as d:
        d.subscribe("v1/devices/me/attributes")
        d.subscribe("v2/sw/response/+/chunk/+")
        d.subscribe("v2/fw/error")
        attrs = sim.client.set_package(name, "controller", "2.0.0", data=package)
        update = d.expect("v1/devices/me/attributes", timeout=5).json()
        assert update == attrs
        assert update["sw_title"] == "controller" and update["sw_version"] == "2.0.0"
        assert update["sw_checksum"] == hashlib.sha256(package).hexdigest()
        assert update["sw_checksum_algorithm"] == "SHA256" and update["sw_size"] == len(package)
        got = download(d, len(package), 16384, "r1")
        assert got == package
        assert sim.client.stats(name)["chunk_requests"] == len(package) // 16384 + 2
        # a corrupt package: served bytes differ from the checksum
        sim.client.set_package(name, "controller", "2.0.1", data=package, corrupt=True)
        update = d.expect("v1/devices/me/attributes", timeout=5).json()
        bad = download(d, len(package), 16384, "r2")
        assert len(bad) == len(package)
        assert hashlib.sha256(bad).hexdigest() != update["sw_checksum"]


def test_ota_without_package_sends_error(sim: SimulatorProcess) -> None:
    with connected(sim, "dev-ota-bad") as d:
        d.subscribe("v2/sw/response/+/chunk/+")
        d.subscribe("v2/fw/error")
        d.publish("v2/sw/request/x/chunk/0", "1024")
        msg = d.expect(timeout=5)
        assert msg.topic == "v2/fw/error" and msg.payload == b"NOT_FOUND"
        assert d.disconnected.wait(5)


def test_mqtt5_telemetry_subscribe_and_rpc(sim: SimulatorProcess) -> None:
    name = "dev-mqtt5"
    with connected(sim, name, mqtt5=True) as d:
        codes = d.subscribe("v1/devices/me/attributes", qos=1)
        assert codes == [1]
        assert d.subscribe("not/a/thingsboard/topic")[0] >= 0x80
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("k", "v")
        props.ContentType = "application/json"
        info = d.client.publish("v1/devices/me/telemetry", json.dumps([{"ts": 9, "values": {"a": 9}},
                                                                     {"ts": 10, "values": {"a": 10}}]),
                                qos=1, properties=props)
        assert d.wait_acked(info.mid, 5)
        records = sim.client.wait_for_telemetry(name, 2)
        assert [r["ts"] for r in records] == [9, 10]
        assert d.publish_json("v1/devices/me/attributes", {"c": 1})
        assert d.no_message(0.7) is None  # no echo under MQTT 5 either
        sim.client.set_shared_attributes(name, {"s": 2})
        assert d.expect(timeout=5).json() == {"s": 2}


def test_unsupported_topics(sim: SimulatorProcess) -> None:
    name = "dev-subs"
    with connected(sim, name) as d:
        assert d.subscribe("v1/devices/me/#") == [0x80]
        assert d.subscribe("v1/devices/me/rpc/request/+") == [1]
        # an unknown publish topic is acknowledged but not processed
        assert d.publish("v1/devices/me/nonsense", "{}", timeout=5)
        assert sim.client.stats(name)["unknown_topic_publishes"] == 1


def test_drop_and_refuse_faults(sim: SimulatorProcess) -> None:
    name = "dev-drop"
    with connected(sim, name) as d:
        result = sim.client.set_faults(drop=True)
        assert result["dropped"] >= 1
        assert d.disconnected.wait(5)
    sim.client.set_faults(refuse=True)
    with pytest.raises(OSError):
        socket.create_connection((sim.host, sim.port), timeout=2).close()
    sim.client.set_faults(refuse=False)
    with connected(sim, name) as d:
        assert d.publish_json("v1/devices/me/telemetry", {"ts": 1, "values": {"back": True}})


def test_rate_limit_fault(sim: SimulatorProcess) -> None:
    name = "dev-rate"
    sim.client.set_faults(rate_limit=5)
    with connected(sim, name) as d:
        for i in range(10):
            d.publish_json("v1/devices/me/telemetry", {"ts": i, "values": {"i": i}}, timeout=None)
        assert d.disconnected.wait(5)
    assert sim.client.stats(name)["rate_limit_closes"] == 1


def test_bulk_throughput(sim: SimulatorProcess) -> None:
    """~64 KB JSON-array publishes through the proxy; the simulator must keep up."""
    name = "dev-bulk"
    record = {"ts": 1700000000000, "values": {"temperature": 21.5, "humidity": 40, "status": "ok"}}
    per_publish = 64000 // (len(json.dumps(record)) + 2)
    payload = json.dumps([record] * per_publish)
    assert len(payload) < 65000
    publishes = 200
    with device(sim, TOKENS[name], max_inflight=100) as d:
        assert d.connect() == 0
        start = time.monotonic()
        mids = [d.client.publish("v1/devices/me/telemetry", payload, qos=1).mid for _ in range(publishes)]
        assert d.wait_acked(mids[-1], 60)
        sim.client.wait_stat(name, "telemetry_records", per_publish * publishes, timeout=60)
        elapsed = time.monotonic() - start
    rate = per_publish * publishes / elapsed
    print(f"\nbulk: {per_publish * publishes} records in {elapsed:.2f} s = {rate:,.0f} records/s")
    assert rate > 20_000


def test_sigterm_stops_within_two_seconds(workdir: Path, broker: MosquittoProcess) -> None:
    s = start_simulator(workdir, broker.port, devices={"x": "tok-x"})
    try:
        d = MqttDevice(s.host, s.port, username="tok-x")
        assert d.connect() == 0
        start = time.monotonic()
        os.kill(s.pid, signal.SIGTERM)
        assert s.proc.wait(5) == 0
        assert time.monotonic() - start < 2.0
        d.close()
    finally:
        s.stop()


def test_state_file_keeps_provisioned_devices(workdir: Path, broker: MosquittoProcess) -> None:
    state = workdir / "sim-state.json"
    args = ["--state", str(state)]
    s = start_simulator(workdir, broker.port, provision_key="k", provision_secret="s", extra_args=args)
    try:
        reply = provision(s, {"deviceName": "persisted", "provisionDeviceKey": "k",
                              "provisionDeviceSecret": "s"})
        assert reply["status"] == "SUCCESS"
    finally:
        s.stop()
    s = start_simulator(workdir, broker.port, extra_args=args)
    try:
        assert s.client.token("persisted") == reply["credentialsValue"]
    finally:
        s.stop()


def test_broker_restart_is_survived(tmp_path: Path) -> None:
    """A broker outage looks like a ThingsBoard outage; afterwards everything works again."""
    broker = start_mosquitto(tmp_path)
    s = start_simulator(tmp_path, broker.port, devices={"r": "tok-r"})
    try:
        with MqttDevice(s.host, s.port, username="tok-r") as d:
            assert d.connect() == 0
            broker.stop()
            assert d.disconnected.wait(5)
        with MqttDevice(s.host, s.port, username="tok-r") as d:
            assert d.connect() in {3, 0x88}  # server unavailable
        broker = start_mosquitto(tmp_path, port=broker.port)
        wait_until(lambda: s.client.health()["broker_connected"], 10, what="simulator back on the broker")
        with MqttDevice(s.host, s.port, username="tok-r") as d:
            assert d.connect() == 0
            assert d.publish_json("v1/devices/me/telemetry", {"ts": 1, "values": {"after": 1}})
            s.client.wait_for_telemetry("r", 1)
    finally:
        s.stop()
        broker.stop()
