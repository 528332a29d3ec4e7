"""The bridge's loop never waits on the network: a TLS listener that accepts and never answers the
handshake, and a DNS server that does not answer, leave the loop iterating and the watchdog fed
(real sd_notify datagrams), on paho 1.6.1 and 2.x; once a real server answers, data flows within
seconds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers.brokers import REPO_ROOT, MqttDevice, free_port, start_mosquitto
from tests.helpers.netfaults import SlowDNS, StalledListener, make_tls_files, private_resolv_conf
from tests.integration.test_bridge_support import (
    NotifySocket,
    bridge_config,
    counters,
    fill,
    outbox_empty,
    start_bridge,
    wait_for,
)

pytestmark = pytest.mark.integration

PYTHONS = {"paho-1.6.1": "/usr/bin/python3", "paho-2": str(REPO_ROOT / ".venv-pypi" / "bin" / "python")}
DNS_IP = "127.0.83.53"
NAME = "tb.gatewayd.test"
CONNECT_TIMEOUT_S = 2


@pytest.fixture(params=sorted(PYTHONS))
def python(request: pytest.FixtureRequest) -> str:
    path = PYTHONS[request.param]
    want = "1." if request.param == "paho-1.6.1" else "2."
    try:
        version = subprocess.run([path, "-c", "import paho.mqtt; print(paho.mqtt.__version__)"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        version = ""
    if not version.startswith(want):
        pytest.skip(f"{path} has no paho-mqtt {want}x")
    return path


def watch_the_loop(notify: NotifySocket, seconds: float) -> tuple[list[float], list[str]]:
    """WATCHDOG=1 times and STATUS= texts over `seconds`; every gap must stay below WATCHDOG_USEC (2 s)."""
    got = notify.drain(seconds)
    pings = [t for t, m in got if m == "WATCHDOG=1"]
    statuses = [m[len("STATUS="):] for _, m in got if m.startswith("STATUS=")]
    assert len(pings) >= seconds - 2, got
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 1.9, gaps
    return pings, statuses


def test_a_tls_handshake_that_never_answers_does_not_stop_the_loop(tmp_path: Path, python: str) -> None:
    tls = make_tls_files(tmp_path / "tls")
    stalled = StalledListener()
    port = stalled.port
    base = tmp_path / "gw"
    fill(base, range(500))
    cfg = bridge_config(base, port, tls=True, ca_cert=str(tls["ca"]), connect_timeout_s=CONNECT_TIMEOUT_S,
                        reconnect_max_s=1.0, keepalive_s=60)
    notify = NotifySocket(tmp_path / "notify.sock")
    bridge = start_bridge(cfg, env=notify.env(2_000_000), python=python)
    broker = None
    try:
        _, statuses = watch_the_loop(notify, 8.0)
        assert any("TLS handshake" in s for s in statuses), statuses
        assert len(stalled.accepted) >= 2  # it gave up and tried again
        text = f"TLS handshake with 127.0.0.1:{port} did not finish within {CONNECT_TIMEOUT_S} s"
        assert text in bridge.log()
        assert counters(base)["outbox_rows"] == 500
        # a real TLS server on that address: data flows within seconds
        stalled.close()
        plain = free_port()
        broker = start_mosquitto(tmp_path, port=port, extra_config=["user root",  # it reads the key in tmp_path
            f"certfile {tls['cert']}", f"keyfile {tls['key']}", f"listener {plain} 127.0.0.1"])
        wait_for(lambda: outbox_empty(base), 15, what="the outbox to drain over TLS")
        c = counters(base)
        assert c["delivered"] == 500 and c["queued"] == 0
        with MqttDevice("127.0.0.1", plain) as dev:  # it is the same broker: its plain listener answers too
            assert dev.connect() == 0
        watch_the_loop(notify, 3.0)
        assert bridge.proc is not None and bridge.proc.poll() is None
    finally:
        bridge.stop()
        stalled.close()
        if broker is not None:
            broker.stop()
        notify.close()


def test_a_dns_lookup_that_does_not_answer_does_not_stop_the_loop(tmp_path: Path, python: str) -> None:
    broker = start_mosquitto(tmp_path)
    dns = SlowDNS(DNS_IP, {NAME: "127.0.0.1"})
    base = tmp_path / "gw"
    fill(base, range(500))
    cfg = bridge_config(base, broker.port, host=NAME, connect_timeout_s=CONNECT_TIMEOUT_S, reconnect_max_s=1.0)
    notify = NotifySocket(tmp_path / "notify.sock")
    prefix = private_resolv_conf(dns.resolv_conf(tmp_path / "resolv.conf"))
    bridge = start_bridge(cfg, env=notify.env(2_000_000), python=python, prefix=prefix)
    try:
        _, statuses = watch_the_loop(notify, 7.0)
        assert dns.queries >= 1
        assert f"DNS lookup of {NAME} did not finish within {CONNECT_TIMEOUT_S} s" in bridge.log()
        assert any("resolving" in s or "DNS lookup" in s for s in statuses), statuses
        assert counters(base)["outbox_rows"] == 500
        dns.answering.set()
        wait_for(lambda: outbox_empty(base), 20, what="the outbox to drain once the name resolves")
        assert counters(base)["delivered"] == 500
        assert bridge.proc is not None and bridge.proc.poll() is None
    finally:
        bridge.stop()
        dns.close()
        broker.stop()
        notify.close()

