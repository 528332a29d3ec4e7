"""The bridge as a real process against mosquitto + the ThingsBoard simulator: publishing and inbound."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import start_mosquitto, start_simulator
from tests.integration.test_bridge_support import (
    DEVICE,
    TOKEN,
    bridge_config,
    captured_seqs,
    check_complete_and_ordered,
    counters,
    dead_letters,
    fill,
    inbound,
    outbox_empty,
    start_bridge,
    state,
    wait_for,
)
from tests.tbsim import SimulatorError

pytestmark = pytest.mark.integration


@pytest.fixture
def tb(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    extra = getattr(request, "param", ())
    broker = start_mosquitto(tmp_path)
    sim = None
    try:
        sim = start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN}, capture=tmp_path / "capture.jsonl",
                              extra_args=list(extra))
        yield sim
    finally:
        if sim is not None:
            sim.stop()
        broker.stop()


def test_20000_records_arrive_complete_and_in_order(tmp_path: Path, tb: Any) -> None:
    base = tmp_path / "gw"
    cfg = bridge_config(base, tb.port, shared_keys=["interval"], client_keys=["mode"])
    fill(base, range(20000))
    tb.client.set_shared_attributes(DEVICE, {"sw_title": "ctl", "sw_version": "1.2", "interval": 5, "other": 1})
    bridge = start_bridge(cfg)
    try:
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain")
        wait_for(lambda: len(captured_seqs(tb.capture_path)) >= 20000, 30, what="all records captured")
        dups = check_complete_and_ordered(captured_seqs(tb.capture_path), 20000)
        assert dups == 0
        c = counters(base)
        assert c["delivered"] == 20000 and c["queued"] == 0 and c["outbox_rows"] == 0
        assert c["ingested"] == c["delivered"] + c["queued"] + c["dead_lettered"] + c["dropped"]
        # bridge.mqtt is rewritten at most once a second
        st = wait_for(lambda: (state(base, "bridge.mqtt") or {}).get("last_puback_ms") and state(base, "bridge.mqtt"),
                      5, what="last_puback_ms in the state")
        assert st["connected"] is True and st["since_ms"]
        # batched: far fewer publishes than records
        assert tb.client.stats(DEVICE)["telemetry_publishes"] < 1000
        # the attribute request after connect asked for the keys the daemons need
        responses = [json.loads(p) for t, p in inbound(base) if t.startswith("v1/devices/me/attributes/response/")]
        assert responses, inbound(base)
        shared = responses[0].get("shared", {})
        assert shared.get("sw_version") == "1.2" and shared.get("interval") == 5 and "other" not in shared
        # getSessionLimits was asked and is not in the inbound queue
        assert any(r["method"] == "getSessionLimits" for r in tb.client.client_rpc_requests(DEVICE))
        assert not [t for t, _ in inbound(base) if t.startswith("v1/devices/me/rpc/response/")]
    finally:
        bridge.stop()


@pytest.mark.parametrize("tb", [("--max-packet-bytes", "4096")], indirect=True)
def test_oversized_record_is_dead_lettered_and_never_blocks(tmp_path: Path, tb: Any) -> None:
    base = tmp_path / "gw"
    cfg = bridge_config(base, tb.port)  # configured 65536; the server says 4096
    bridge = start_bridge(cfg)
    try:
        bridge.wait_log("session limits from", 15)
        fill(base, range(0, 300))
        fill(base, [300], pad=8000)
        fill(base, range(301, 600))
        wait_for(lambda: outbox_empty(base), 30, what="the outbox to drain")
        wait_for(lambda: len(captured_seqs(tb.capture_path)) >= 599, 15, what="records captured")
        seqs = captured_seqs(tb.capture_path)
        assert 300 not in seqs and sorted(set(seqs)) == [s for s in range(600) if s != 300]
        dl = dead_letters(base)
        assert len(dl) == 1 and '"seq":300' in dl[0][0] and "4096" in dl[0][1]
        c = counters(base)
        assert c["dead_lettered"] == 1 and c["delivered"] == 599
        stats = tb.client.stats(DEVICE)
        assert stats.get("oversize_closes", 0) == 0 and stats.get("connects", 1) == 1
    finally:
        bridge.stop()


def test_inbound_rpc_and_attribute_updates_land_in_the_inbound_table(tmp_path: Path, tb: Any) -> None:
    base = tmp_path / "gw"
    bridge = start_bridge(bridge_config(base, tb.port))
    try:
        tb.client.wait_connected(DEVICE, timeout=15)
        bridge.wait_log("connected to", 15)
        time.sleep(0.5)
        try:
            tb.client.rpc(DEVICE, "ping", {"x": 1}, timeout=1.0)
        except SimulatorError:  # nobody answers: the bridge executes nothing itself
            pass
        tb.client.set_shared_attributes(DEVICE, {"FILES": {"a": {"path": "/x"}}})
        wait_for(lambda: any(t.startswith("v1/devices/me/rpc/request/") for t, _ in inbound(base)), 10,
                 what="the RPC in the inbound table")
        wait_for(lambda: any(t == "v1/devices/me/attributes" for t, _ in inbound(base)), 10,
                 what="the attribute update in the inbound table")
        rpc = [json.loads(p) for t, p in inbound(base) if t.startswith("v1/devices/me/rpc/request/")]
        assert rpc[0]["method"] == "ping" and rpc[0]["params"] == {"x": 1}
        upd = [json.loads(p) for t, p in inbound(base) if t == "v1/devices/me/attributes"]
        assert upd[0] == {"FILES": {"a": {"path": "/x"}}}
    finally:
        bridge.stop()


def test_attributes_requested_again_after_every_reconnect(tmp_path: Path, tb: Any) -> None:
    base = tmp_path / "gw"
    bridge = start_bridge(bridge_config(base, tb.port, reconnect_max_s=0.5))
    try:
        tb.client.wait_connected(DEVICE, timeout=15)
        wait_for(lambda: tb.client.stats(DEVICE).get("attribute_requests", 0) >= 1, 10, what="first request")

        def responses() -> int:
            return len([t for t, _ in inbound(base) if t.startswith("v1/devices/me/attributes/response/")])

        def requests() -> int:
            return int(tb.client.stats(DEVICE).get("attribute_requests", 0))

        def at_least(count: Callable[[], int], n: int) -> bool:
            return count() >= n

        wait_for(lambda: responses() >= 1, 10, what="the first attribute response")
        for n in range(2, 5):
            tb.client.disconnect(DEVICE)
            wait_for(partial(at_least, requests, n), 15, what=f"attribute request #{n}")
            wait_for(partial(at_least, responses, n), 10, what=f"attribute response #{n} in the inbound table")
        # and the RPC subscription is renewed too: an RPC after the last reconnect arrives
        tb.client.wait_connected(DEVICE, timeout=15)
        time.sleep(0.3)
        try:
            tb.client.rpc(DEVICE, "status", {}, timeout=1.0)
        except SimulatorError:  # nobody answers: the bridge executes nothing itself
            pass
        wait_for(lambda: any(t.startswith("v1/devices/me/rpc/request/") for t, _ in inbound(base)), 10,
                 what="the RPC after reconnects")
    finally:
        bridge.stop()


def test_mqtt5_mode(tmp_path: Path, tb: Any) -> None:
    base = tmp_path / "gw"
    fill(base, range(5000))
    bridge = start_bridge(bridge_config(base, tb.port, mqtt_version="5"))
    try:
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain")
        wait_for(lambda: len(captured_seqs(tb.capture_path)) >= 5000, 15, what="all records captured")
        assert check_complete_and_ordered(captured_seqs(tb.capture_path), 5000) == 0
        assert "MQTT 5" in bridge.log()
        try:
            tb.client.rpc(DEVICE, "ping", {}, timeout=1.0)
        except SimulatorError:  # nobody answers: the bridge executes nothing itself
            pass
        wait_for(lambda: any(t.startswith("v1/devices/me/rpc/request/") for t, _ in inbound(base)), 10,
                 what="the RPC in the inbound table")
    finally:
        bridge.stop()
