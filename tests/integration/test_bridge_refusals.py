"""MQTT 5 refusals (PUBACK reason code >= 0x80) from the ThingsBoard simulator: the batch holding the
refused record is split until that record travels alone, which is dead-lettered with the server's
reason code; everything else is delivered and the ledger adds up. A server that refuses everything
dead-letters nothing: the outbox stays, and the watchdog stops being fed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import start_simulator
from tests.integration.test_bridge_support import (
    DEVICE,
    TOKEN,
    NotifySocket,
    bridge_config,
    captured_seqs,
    counters,
    dead_letters,
    fill,
    outbox_empty,
    start_bridge,
    wait_for,
)

pytestmark = pytest.mark.integration

TOTAL = 3000
BAD = 1234


def _sim(tmp_path: Path, broker: Any) -> Any:
    return start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN}, capture=tmp_path / "capture.jsonl")


@pytest.mark.parametrize("code", [0x80, 0x83, 0x97], ids=["0x80", "0x83", "0x97"])
def test_the_refused_record_is_isolated_and_dead_lettered_with_its_code(tmp_path: Path, broker: Any,
                                                                        code: int) -> None:
    sim = _sim(tmp_path, broker)
    sim.client.set_faults(refuse_payloads=[{"match": f'"seq":{BAD}}}', "code": code}])
    base = tmp_path / "gw"
    fill(base, range(TOTAL))
    bridge = start_bridge(bridge_config(base, sim.port, mqtt_version="5", max_packet_bytes=16384))
    try:
        wait_for(lambda: outbox_empty(base), 90, what="the outbox to drain")
        wait_for(lambda: len(set(captured_seqs(sim.capture_path))) >= TOTAL - 1, 20, what="the records captured")
        assert set(captured_seqs(sim.capture_path)) == set(range(TOTAL)) - {BAD}
        dl = dead_letters(base)
        assert len(dl) == 1 and f'"seq":{BAD}}}' in dl[0][0], dl
        assert f"0x{code:02X}" in dl[0][1] and "refused this record 3 times" in dl[0][1], dl
        c = counters(base)
        assert c["delivered"] == TOTAL - 1 and c["dead_lettered"] == 1 and c["queued"] == 0
        assert c["ingested"] == c["delivered"] + c["queued"] + c["dead_lettered"] + c["dropped"]
        log = bridge.log()
        assert "to find the one it refuses" in log
        assert sim.client.stats(DEVICE)["publishes_refused"] >= 3
        # the session was never dropped for it
        assert sim.client.stats(DEVICE)["connects"] == 1
    finally:
        bridge.stop()
        sim.stop()


def test_a_server_refusing_everything_dead_letters_nothing_and_stops_the_watchdog(tmp_path: Path,
                                                                                  broker: Any) -> None:
    sim = _sim(tmp_path, broker)
    sim.client.set_faults(refuse_payloads=[{"match": "", "code": 0x97}])
    base = tmp_path / "gw"
    notify = NotifySocket(tmp_path / "notify.sock")
    bridge = start_bridge(bridge_config(base, sim.port, mqtt_version="5", stall_timeout_s=4),
                          env=notify.env(2_000_000))
    try:
        sim.client.wait_connected(DEVICE, timeout=15)
        fill(base, range(200))
        wait_for(lambda: any("stalled: no PUBACK" in m for _, m in notify.drain(0.5)), 20, what="STATUS= stalled")
        quiet = notify.drain(4.0)
        assert not [m for _, m in quiet if m == "WATCHDOG=1"], quiet
        assert sim.client.stats(DEVICE)["publishes_refused"] >= 3
        assert dead_letters(base) == []
        c = counters(base)
        assert c["outbox_rows"] == 200 and c["queued"] == 200 and c["delivered"] == 0
        assert "quota exceeded (PUBACK reason code 0x97)" in bridge.log()
    finally:
        bridge.stop()
        notify.close()
        sim.stop()
