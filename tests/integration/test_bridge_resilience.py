"""The bridge survives broker outages and kill -9 without losing a record, and stops feeding the
watchdog when the server takes publishes but never acknowledges them."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayd import topics
from gatewayd.packet import packet_size
from gatewayd.store import queues
from tests.helpers.brokers import free_port, start_simulator
from tests.integration.test_bridge_support import (
    DEVICE,
    TOKEN,
    TOPIC,
    Feeder,
    NotifySocket,
    bridge_config,
    captured_seqs,
    check_complete_and_ordered,
    counters,
    fill,
    outbox_empty,
    record,
    start_bridge,
    state,
    wait_for,
)

pytestmark = pytest.mark.integration


def _sim(tmp_path: Path, broker: Any, port: int = 0, control_port: int = 0) -> Any:
    return start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN}, port=port, control_port=control_port,
                           capture=tmp_path / "capture.jsonl")


def test_server_stopped_and_restarted_mid_stream_loses_nothing(tmp_path: Path, broker: Any) -> None:
    port, control = free_port(), free_port()
    sim = _sim(tmp_path, broker, port, control)
    base = tmp_path / "gw"
    total = 20000
    bridge = start_bridge(bridge_config(base, port, reconnect_max_s=0.5))
    feeder = Feeder(base, total, chunk=250, pause=0.02)
    try:
        sim.client.wait_connected(DEVICE, timeout=15)
        feeder.start()
        wait_for(lambda: len(captured_seqs(sim.capture_path)) > 2000, 20, what="records flowing")
        sim.stop()  # ThingsBoard goes away mid-stream
        wait_for(lambda: state(base, "bridge.mqtt")["connected"] is False, 10, what="the bridge to notice")
        time.sleep(3)
        sim = _sim(tmp_path, broker, port, control)
        assert feeder.done.wait(60)
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain")
        wait_for(lambda: len(set(captured_seqs(sim.capture_path))) >= total, 20, what="all records captured")
        dups = check_complete_and_ordered(captured_seqs(sim.capture_path), total)
        c = counters(base)
        assert c["delivered"] == total and c["queued"] == 0 and c["dead_lettered"] == 0
        assert dups <= 20 * 1500  # at most what was in flight when the server vanished
        assert state(base, "bridge.mqtt")["connected"] is True
        assert "reconnecting in" in bridge.log()
    finally:
        bridge.stop()
        sim.stop()


def test_ten_kill9_mid_stream_lose_nothing_and_bound_duplicates(tmp_path: Path, broker: Any) -> None:
    sim = _sim(tmp_path, broker)
    base = tmp_path / "gw"
    total = 30000
    inflight, max_packet = 4, 4096
    cfg = bridge_config(base, sim.port, reconnect_max_s=0.5, max_inflight=inflight, max_packet_bytes=max_packet)
    sim.client.set_faults(max_packet_bytes=max_packet)
    bridge = start_bridge(cfg)
    feeder = Feeder(base, total, chunk=300, pause=0.03)
    rng = random.Random(7)
    try:
        feeder.start()
        for _ in range(10):
            time.sleep(rng.uniform(0.2, 0.6))
            bridge.kill9()
            bridge = start_bridge(cfg)
        assert feeder.done.wait(60)
        wait_for(lambda: outbox_empty(base), 90, what="the outbox to drain")
        wait_for(lambda: len(set(captured_seqs(sim.capture_path))) >= total, 20, what="all records captured")
        dups = check_complete_and_ordered(captured_seqs(sim.capture_path), total)
        per_packet = max_packet // (packet_size(len(TOPIC), len(record(0))) - packet_size(len(TOPIC), 0) + 1)
        bound = 10 * inflight * per_packet
        assert dups <= bound, f"{dups} duplicates, bound {bound}"
        c = counters(base)
        assert c["delivered"] == total and c["queued"] == 0
    finally:
        bridge.stop()
        sim.stop()


def test_no_puback_stops_the_watchdog(tmp_path: Path, broker: Any) -> None:
    sim = _sim(tmp_path, broker)
    base = tmp_path / "gw"
    notify = NotifySocket(tmp_path / "notify.sock")
    bridge = start_bridge(bridge_config(base, sim.port, stall_timeout_s=3), env=notify.env(2_000_000))
    try:
        sim.client.wait_connected(DEVICE, timeout=15)
        got = notify.drain(2.5)
        assert any(m == "WATCHDOG=1" for _, m in got), got
        sim.client.set_faults(no_puback=True)
        fill(base, range(100))
        # while waiting (< stall timeout) it still pings; then it stops
        wait_for(lambda: any("stalled: no PUBACK" in m for _, m in notify.drain(0.5)), 15,
                 what="STATUS= stalled")
        quiet = notify.drain(4.0)
        assert not [m for _, m in quiet if m == "WATCHDOG=1"], quiet
        assert "stalled" in bridge.log()
        st = state(base, "bridge.last_error")
        assert st and "no PUBACK" in st["message"]
        assert counters(base)["outbox_rows"] == 100  # nothing deleted without its PUBACK
    finally:
        bridge.stop()
        notify.close()
        sim.stop()


def test_rows_waiting_with_nothing_in_flight_and_no_puback_stop_the_watchdog(tmp_path: Path, broker: Any) -> None:
    """The configured rate allows one publish per 100 s: one attribute row goes and is acknowledged,
    the others wait with nothing in flight; no PUBACK for the stall timeout ends the pings all the same."""
    sim = _sim(tmp_path, broker)
    base = tmp_path / "gw"
    notify = NotifySocket(tmp_path / "notify.sock")
    bridge = start_bridge(bridge_config(base, sim.port, stall_timeout_s=3, rate_limit_per_s=0.01),
                          env=notify.env(2_000_000))
    try:
        sim.client.wait_connected(DEVICE, timeout=15)
        q = queues.open_queues(base / "state" / "queues.db")
        try:
            for i in range(5):
                queues.enqueue(q, queues.KIND_ATTRIBUTES, topics.TOPIC_ATTRIBUTES, f'{{"a{i}":{i}}}',
                               queues.PRIO_ATTRIBUTES)
        finally:
            q.close()
        wait_for(lambda: counters(base)["outbox_rows"] == 4, 10, what="the first row delivered")
        assert any(m == "WATCHDOG=1" for _, m in notify.drain(1.5))  # waiting less than the timeout is fine
        wait_for(lambda: any("stalled: no PUBACK" in m for _, m in notify.drain(0.5)), 15, what="STATUS= stalled")
        quiet = notify.drain(4.0)
        assert not [m for _, m in quiet if m == "WATCHDOG=1"], quiet
        assert "4 records queued and 0 publishes in flight" in bridge.log()
        assert counters(base)["outbox_rows"] == 4
    finally:
        bridge.stop()
        notify.close()
        sim.stop()


def test_waiting_for_a_dead_server_is_not_a_stall(tmp_path: Path) -> None:
    base = tmp_path / "gw"
    notify = NotifySocket(tmp_path / "notify.sock")
    fill(base, range(10))
    bridge = start_bridge(bridge_config(base, free_port(), stall_timeout_s=1, reconnect_max_s=0.5),
                          env=notify.env(1_000_000))
    try:
        got = notify.drain(4.0)
        pings = [t for t, m in got if m == "WATCHDOG=1"]
        assert len(pings) >= 5, got  # every 0.5 s while reconnecting
        assert any("retrying in" in m for _, m in got if m.startswith("STATUS="))
        assert state(base, "bridge.mqtt")["connected"] is False
        assert "Connection refused" in (state(base, "bridge.mqtt")["last_error"] or "")
    finally:
        bridge.stop()
        notify.close()


def test_tls_failure_is_an_error_never_a_plaintext_fallback(tmp_path: Path, broker: Any) -> None:
    sim = _sim(tmp_path, broker)
    base = tmp_path / "gw"
    fill(base, range(10))
    bridge = start_bridge(bridge_config(base, sim.port, tls=True, reconnect_max_s=0.5))
    try:
        bridge.wait_log("TLS failure", 15)
        time.sleep(1.5)
        assert not sim.client.stats(DEVICE).get("telemetry_records")  # nothing went out in plain text
        assert counters(base)["outbox_rows"] == 10
        st = state(base, "bridge.mqtt")
        assert st["connected"] is False and "TLS" in (st["last_error"] or "")
    finally:
        bridge.stop()
        sim.stop()
