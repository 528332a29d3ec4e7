"""A server whose packet limit is lower than configured and that does not say so (ThingsBoard < 3.8,
MQTT 3.1.1: it closes the session without PUBACK): the bridge learns the limit from the closed
sessions instead of resending the same batch forever, dead-letters a record that can never fit,
remembers the limit across restarts, and does not shrink it for an ordinary server restart."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from gatewayd import topics
from gatewayd.bridge.publisher import MIN_PACKET
from gatewayd.packet import packet_size
from gatewayd.store import queues
from tests.helpers.brokers import free_port, start_simulator
from tests.integration.test_bridge_support import (
    DEVICE,
    TOKEN,
    TOPIC,
    bridge_config,
    captured_seqs,
    check_complete_and_ordered,
    counters,
    dead_letters,
    fill,
    outbox_empty,
    record,
    start_bridge,
    state,
    wait_for,
)

pytestmark = pytest.mark.integration

SERVER_LIMIT = 8000   # the simulator closes the session on a PUBLISH whose topic + payload exceeds this
CONFIGURED = 65536    # what the bridge is told


def debug_log(cfg: Path) -> None:
    """Debug logging in the [logging] table the helpers already write."""
    text = cfg.read_text()
    assert text.count("[logging]\n") == 1, text
    cfg.write_text(text.replace("[logging]\n", '[logging]\nlevel = "debug"\n'))


def _sim(tmp_path: Path, broker: Any, limit: int | None = SERVER_LIMIT, port: int = 0, control_port: int = 0,
         announce: bool = False) -> Any:
    args = [] if announce else ["--no-session-limits"]
    if limit is not None:
        args += ["--max-packet-bytes", str(limit)]
    return start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN}, port=port, control_port=control_port,
                           capture=tmp_path / "capture.jsonl", extra_args=args)


def _learned(base: Path) -> Any:
    return state(base, "bridge.packet_limit")


def _stats(sim: Any) -> dict[str, Any]:
    return dict(sim.client.stats(DEVICE))


def _stat_above(sim: Any, name: str, n: int) -> bool:
    return int(_stats(sim).get(name, 0)) > n


def _captured_at_least(sim: Any, n: int) -> bool:
    return len(set(captured_seqs(sim.capture_path))) >= n


@pytest.mark.parametrize("mqtt_version", ["3.1.1", "5"])
def test_small_records_arrive_with_a_handful_of_connections_and_the_limit_is_remembered(
        tmp_path: Path, broker: Any, mqtt_version: str) -> None:
    sim = _sim(tmp_path, broker)
    base = tmp_path / "gw"
    cfg = bridge_config(base, sim.port, max_packet_bytes=CONFIGURED, reconnect_max_s=0.5, mqtt_version=mqtt_version)
    total = 5000
    fill(base, range(total))
    bridge = start_bridge(cfg)
    try:
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain")
        wait_for(lambda: len(set(captured_seqs(sim.capture_path))) >= total, 20, what="all records captured")
        dups = check_complete_and_ordered(captured_seqs(sim.capture_path), total)
        assert dups == 0  # a closed session delivered nothing of its batch
        stats = _stats(sim)
        # 65536 -> 32768 -> 16384 -> 8192 -> 4096: two closes to be sure, then one per halving
        assert 1 <= stats.get("oversize_closes", 0) <= 6, stats
        assert stats["connects"] <= 7, stats
        # the largest acknowledged packet is kept with the limit (written within a second)
        learned = wait_for(lambda: (_learned(base) or {}).get("acked") and _learned(base), 5, what="acked saved")
        assert learned and learned["server"] == f"127.0.0.1:{sim.port}" and learned["configured"] == CONFIGURED
        assert MIN_PACKET <= learned["limit"] <= SERVER_LIMIT and learned["ceiling"] is None
        assert learned["acked"] <= learned["limit"]
        c = counters(base)
        assert c["delivered"] == total and c["dead_lettered"] == 0 and c["queued"] == 0
        log = bridge.log()
        assert "its maximum packet appears to be below" in log and "does not answer getSessionLimits" in log
        assert state(base, "bridge.mqtt")["max_packet_bytes"] == learned["limit"]

        # a restart uses the remembered limit: not one more close
        bridge.stop()
        closes, connects = stats.get("oversize_closes", 0), stats["connects"]
        fill(base, range(total, 2 * total))
        bridge = start_bridge(cfg)
        bridge.wait_log("using the packet limit learned from", 15)
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain again")
        wait_for(lambda: len(set(captured_seqs(sim.capture_path))) >= 2 * total, 20, what="all records captured")
        check_complete_and_ordered(captured_seqs(sim.capture_path), 2 * total)
        stats = _stats(sim)
        assert stats.get("oversize_closes", 0) == closes and stats["connects"] == connects + 1, stats
        assert _learned(base)["limit"] == learned["limit"]
    finally:
        bridge.stop()
        sim.stop()


def test_a_record_larger_than_the_server_accepts_is_dead_lettered_and_records_after_it_arrive(
        tmp_path: Path, broker: Any) -> None:
    sim = _sim(tmp_path, broker)
    base = tmp_path / "gw"
    fill(base, range(0, 300))
    fill(base, [300], pad=20000)
    fill(base, range(301, 600))
    bridge = start_bridge(bridge_config(base, sim.port, max_packet_bytes=CONFIGURED, reconnect_max_s=0.5))
    try:
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain")
        wait_for(lambda: len(set(captured_seqs(sim.capture_path))) >= 599, 20, what="records captured")
        seqs = captured_seqs(sim.capture_path)
        assert 300 not in seqs
        check_complete_and_ordered([s if s < 300 else s - 1 for s in seqs], 599)
        dl = dead_letters(base)
        assert len(dl) == 1 and '"seq":300' in dl[0][0], dl
        assert "closed the connection without PUBACK on every attempt" in dl[0][1], dl
        assert "its packet limit appears to be below" in dl[0][1]
        size = packet_size(len(TOPIC), len(record(300, pad=20000)))
        assert f"{size}-byte" in dl[0][1]
        c = counters(base)
        assert c["dead_lettered"] == 1 and c["delivered"] == 599 and c["queued"] == 0
        assert c["ingested"] == c["delivered"] + c["queued"] + c["dead_lettered"] + c["dropped"]
        stats = _stats(sim)
        assert stats["connects"] <= 10, stats
        learned = _learned(base)
        assert learned["ceiling"] == size - 1 and learned["limit"] <= SERVER_LIMIT

        # the next record at least that large is dead-lettered without another try (no disconnect)
        connects = stats["connects"]
        fill(base, [600], pad=30000)
        fill(base, range(601, 700))
        wait_for(lambda: outbox_empty(base), 30, what="the outbox to drain again")
        wait_for(lambda: len(set(captured_seqs(sim.capture_path))) >= 698, 20, what="records captured")
        dl = dead_letters(base)
        assert len(dl) == 2 and '"seq":600' in dl[1][0] and f"below {size} bytes" in dl[1][1], dl
        assert _stats(sim)["connects"] == connects
    finally:
        bridge.stop()
        sim.stop()


@pytest.mark.parametrize("limit", [SERVER_LIMIT, None], ids=["learned-limit", "no-limit"])
def test_server_restarts_mid_stream_do_not_lower_the_limit(tmp_path: Path, broker: Any, limit: int | None) -> None:
    """ThingsBoard goes away three times while publishes are in flight (its PUBACKs withheld just
    before, so the window is surely full): the bridge reconnects and goes on at the same limit."""
    port, control = free_port(), free_port()
    sim = _sim(tmp_path, broker, limit, port, control)
    base = tmp_path / "gw"
    cfg = bridge_config(base, port, max_packet_bytes=CONFIGURED, reconnect_max_s=0.5)
    debug_log(cfg)
    fill(base, range(2000))
    bridge = start_bridge(cfg)
    seq = 2000
    try:
        wait_for(lambda: outbox_empty(base), 60, what="the first records to drain")
        before = _learned(base)
        if limit is None:
            assert before is None or before["limit"] is None
        else:
            assert before and before["limit"] <= limit
        log = bridge.log()
        shrinks, losses = log.count("appears to be below"), log.count("session lost with")
        for _ in range(3):
            fill(base, range(seq, seq + 5000))
            seq += 5000
            wait_for(partial(_captured_at_least, sim, seq), 30, what="records flowing")
            sim.client.set_faults(no_puback=True)
            fill(base, range(seq, seq + 5000))
            seq += 5000
            wait_for(partial(_stat_above, sim, "pubacks_swallowed", 2), 10, what="publishes in flight")
            sim.stop()  # ThingsBoard goes away with publishes in flight
            wait_for(lambda: state(base, "bridge.mqtt")["connected"] is False, 10, what="the bridge to notice")
            time.sleep(0.5)
            sim = _sim(tmp_path, broker, limit, port, control)
        fill(base, range(seq, seq + 5000))
        total = seq + 5000
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain")
        wait_for(lambda: len(set(captured_seqs(sim.capture_path))) >= total, 20, what="all records captured")
        check_complete_and_ordered(captured_seqs(sim.capture_path), total)
        c = counters(base)
        assert c["delivered"] == total and c["dead_lettered"] == 0
        log = bridge.log()
        assert log.count("session lost with") >= losses + 3  # each restart lost publishes in flight
        assert log.count("appears to be below") == shrinks
        after = _learned(base)
        if limit is None:
            assert after is None or after["limit"] is None
        else:
            assert after["limit"] == before["limit"] and after["ceiling"] is None
        assert state(base, "bridge.mqtt")["max_packet_bytes"] == ((before or {}).get("limit") or CONFIGURED)
    finally:
        bridge.stop()
        sim.stop()


def test_an_announced_limit_replaces_the_learned_one(tmp_path: Path, broker: Any) -> None:
    """The server is upgraded to a version that answers getSessionLimits: its answer wins."""
    port, control = free_port(), free_port()
    sim = _sim(tmp_path, broker, SERVER_LIMIT, port, control)
    base = tmp_path / "gw"
    bridge = start_bridge(bridge_config(base, port, max_packet_bytes=CONFIGURED, reconnect_max_s=0.5))
    try:
        fill(base, range(3000))
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain")
        assert _learned(base)["limit"] < SERVER_LIMIT
        sim.stop()
        sim = _sim(tmp_path, broker, SERVER_LIMIT, port, control, announce=True)
        bridge.wait_log("session limits from", 20)
        wait_for(lambda: _learned(base)["limit"] is None and _learned(base)["ceiling"] is None, 10,
                 what="the learned limit to be forgotten")
        assert "forgetting the packet limit learned from closed sessions" in bridge.log()
        fill(base, range(3000, 6000))
        wait_for(lambda: outbox_empty(base), 60, what="the outbox to drain again")
        wait_for(lambda: len(set(captured_seqs(sim.capture_path))) >= 6000, 20, what="all records captured")
        check_complete_and_ordered(captured_seqs(sim.capture_path), 6000)
        assert _stats(sim).get("oversize_closes", 0) == 0
        assert state(base, "bridge.session_limits")["limits"]["maxPayloadSize"] == SERVER_LIMIT
        wait_for(lambda: state(base, "bridge.mqtt")["max_packet_bytes"] == SERVER_LIMIT, 5, what="the state")
    finally:
        bridge.stop()
        sim.stop()


def test_sessions_lost_with_a_2kb_attribute_and_rpc_reply_in_flight_blame_nobody(tmp_path: Path,
                                                                                  broker: Any) -> None:
    """Two sessions end (the server restarts, say) while a ~2 KB RPC reply and a ~2 KB attribute are in
    flight, larger than anything acknowledged so far: their size alone proves nothing. The limit is
    not lowered, nothing is dead-lettered, and both arrive once the server behaves."""
    sim = _sim(tmp_path, broker, limit=None)  # no limit below the configured one, none announced
    base = tmp_path / "gw"
    cfg = bridge_config(base, sim.port, max_packet_bytes=CONFIGURED, reconnect_max_s=0.5)
    debug_log(cfg)
    bridge = start_bridge(cfg)
    try:
        sim.client.wait_connected(DEVICE, timeout=15)
        sim.client.set_faults(no_puback=True)
        reply = '{"result":"' + "r" * 2100 + '"}'
        attrs = '{"report":"' + "a" * 2000 + '"}'
        q = queues.open_queues(base / "state" / "queues.db")
        try:
            queues.enqueue(q, queues.KIND_RPC_REPLY, topics.rpc_response("17"), reply, queues.PRIO_RPC_REPLY)
            queues.enqueue(q, queues.KIND_ATTRIBUTES, topics.TOPIC_ATTRIBUTES, attrs, queues.PRIO_ATTRIBUTES)
        finally:
            q.close()
        fill(base, range(3))
        swallowed = 0
        for n in (1, 2):
            wait_for(partial(_stat_above, sim, "pubacks_swallowed", swallowed), 10, what="publishes in flight")
            swallowed, connects = _stats(sim).get("pubacks_swallowed", 0), _stats(sim)["connects"]
            if n == 2:
                # Behave again before the last drop: the next session's first publish follows its CONNECT
                # within milliseconds, and a PUBACK swallowed then is owed until the stall detector acts.
                sim.client.set_faults(no_puback=False)
            sim.client.drop()  # the session ends with them unacknowledged
            wait_for(partial(_stat_above, sim, "connects", connects), 10, what=f"reconnect #{n}")
        wait_for(lambda: outbox_empty(base), 30, what="the outbox to drain")
        assert dead_letters(base) == []
        c = counters(base)
        assert c["delivered"] == 3 and c["dead_lettered"] == 0
        assert _stats(sim)["rpc_responses"] >= 1
        wait_for(lambda: sim.client.attributes(DEVICE)["client"].get("report") == "a" * 2000, 10,
                 what="the attribute at the server")
        learned = _learned(base)
        assert learned is None or (learned["limit"] is None and learned["ceiling"] is None), learned
        assert state(base, "bridge.mqtt")["max_packet_bytes"] == CONFIGURED
        log = bridge.log()
        assert log.count("sending one publish at a time until the next PUBACK") >= 1
        assert "appears to be below" not in log and "dead-lettered" not in log
    finally:
        bridge.stop()
        sim.stop()
