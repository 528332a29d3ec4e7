"""TLS for real: a CA made here, mosquitto with TLS listeners on loopback, the bridge and
`gatewayctl check` against them.

- the right CA: the bridge connects and delivers (access token over TLS, and X.509 client
  certificate authentication with `require_certificate` + `use_identity_as_username`);
- a wrong CA, a wrong host name, an expired server certificate, no client certificate where
  one is required: refused with the reason in `gatewayctl status`, nothing delivered, and a
  TCP relay in front of the listener shows every connection opening with a TLS handshake
  record, never an MQTT CONNECT in plain text;
- `gatewayctl check` reports days to expiry of the server and the client certificate.

Run on both paho generations (`/usr/bin/python3`: 1.6.1, `.venv-pypi/bin/python`: 2.x).
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from gatewayd import topics
from gatewayd.store import queues
from tests.helpers.brokers import LOOPBACK, MOSQUITTO_BIN, MqttDevice, free_port, start_mosquitto
from tests.helpers.daemons import ROOT, Daemon, wait_for, write_config
from tests.helpers.tls import Issued, issue, make_ca

pytestmark = pytest.mark.integration

TLS_RECORD_HANDSHAKE = 0x16
MQTT_CONNECT = 0x10
CLIENT_CN = "gw-x509-device"
SERVER_DAYS, CLIENT_DAYS = 200, 20
TELEMETRY = topics.TOPIC_TELEMETRY


class Relay:
    """A TCP relay on loopback that records the first byte each client sends."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.first_bytes: list[int] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._pump, args=(client,), daemon=True)
            self.threads.append(t)
            t.start()

    def _pump(self, client: socket.socket) -> None:
        first = True
        try:
            upstream = socket.create_connection((LOOPBACK, self.upstream), timeout=5)
        except OSError:
            client.close()
            return
        with client, upstream:
            while not self.stopping.is_set():
                readable, _, _ = select.select([client, upstream], [], [], 0.2)
                for s in readable:
                    try:
                        data = s.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if s is client and first:
                        self.first_bytes.append(data[0])
                        first = False
                    try:
                        (upstream if s is client else client).sendall(data)
                    except OSError:
                        return

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for t in self.threads:
            t.join(5)


@dataclass
class Pki:
    ca: Issued
    other_ca: Issued
    client: Issued
    expired_client: Issued
    servers: dict[str, Issued]


@dataclass
class Broker:
    plain_port: int
    ports: dict[str, int]   # listener name -> port
    log: Any                # MosquittoProcess, for its log


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d / "ca", "gatewayd test CA")
    other = make_ca(d / "other", "some other CA")
    servers = {
        "good": issue(ca, d, "server", "broker", hosts=(LOOPBACK, "localhost"), days=SERVER_DAYS),
        "wronghost": issue(ca, d, "wronghost", "broker", hosts=("wrong.example",)),
        "expired": issue(ca, d, "expired", "broker", hosts=(LOOPBACK,), days=-3),
    }
    client = issue(ca, d, "client", CLIENT_CN, client=True, days=CLIENT_DAYS)
    expired_client = issue(ca, d, "client-expired", CLIENT_CN, client=True, days=-1)
    return Pki(ca, other, client, expired_client, servers)


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not os.path.exists(MOSQUITTO_BIN):
        pytest.skip("mosquitto is not installed")
    work = tmp_path_factory.mktemp("mosquitto")
    ports = {name: free_port() for name in ("good", "wronghost", "expired", "x509")}
    # As root, mosquitto switches to its own user before reading certificates in our 0700 tmp.
    lines: list[str] = ["user root"] if os.geteuid() == 0 else []
    for name, port in ports.items():
        server = pki.servers["good" if name == "x509" else name]
        lines += [f"listener {port} {LOOPBACK}", f"cafile {pki.ca.cert}", f"certfile {server.cert}",
                  f"keyfile {server.key}", "tls_version tlsv1.2"]
        if name == "x509":
            lines += ["require_certificate true", "use_identity_as_username true"]
    b = start_mosquitto(work, extra_config=lines + ["log_type information"])
    try:
        for port in ports.values():
            wait_for(partial(_port_open, port), 10, what=f"TLS listener {port}")
        yield Broker(b.port, ports, b)
    finally:
        b.stop()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def observer(broker: Broker) -> Iterator[MqttDevice]:
    """A subscriber on the broker's plain listener: sees whatever the bridge delivers."""
    dev = MqttDevice(LOOPBACK, broker.plain_port)
    assert dev.connect() == 0
    dev.subscribe(TELEMETRY)
    try:
        yield dev
    finally:
        dev.close()


def gw_config(base: Path, port: int, ca: Issued, **tb: Any) -> Path:
    keys: dict[str, Any] = {"host": LOOPBACK, "port": port, "tls": True, "ca_cert": str(ca.cert),
                            "device_name": "tls-dev", "reconnect_max_s": 0.5}
    keys.update(tb)
    return write_config(base, {"thingsboard": keys})


def queue_record(base: Path, tag: str) -> None:
    q = queues.open_queues(base / "state" / "queues.db")
    try:
        queues.enqueue(q, queues.KIND_TELEMETRY, TELEMETRY, json.dumps({"ts": 1_700_000_000_000,
                                                                         "values": {"tag": tag}}),
                       queues.PRIO_TELEMETRY)
    finally:
        q.close()


def mqtt_state(base: Path) -> dict[str, Any]:
    q = queues.open_queues(base / "state" / "queues.db")
    try:
        return queues.get_state(q, "bridge.mqtt") or {}
    finally:
        q.close()


def outbox_rows(base: Path) -> int:
    q = queues.open_queues(base / "state" / "queues.db")
    try:
        return queues.counters(q).get("outbox_rows", 0)
    finally:
        q.close()


def delivered(observer: MqttDevice, tag: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        msg = observer.expect(TELEMETRY, timeout=max(0.1, deadline - time.monotonic()))
        body = msg.json()
        for rec in body if isinstance(body, list) else [body]:
            if rec.get("values", {}).get("tag") == tag:
                return rec


def ctl_check(cfg: Path) -> tuple[int, dict[str, dict[str, str]]]:
    r = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), "check", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    return r.returncode, {x["name"]: x for x in json.loads(r.stdout)}


def days_in(detail: str) -> int:
    m = re.search(r"\((\d+) days\)", detail)
    assert m, detail
    return int(m.group(1))


# -- delivery with the right CA ------------------------------------------------------------

def test_right_ca_connects_and_delivers_over_tls(tmp_path: Path, pki: Pki, broker: Broker,
                                                 observer: MqttDevice) -> None:
    relay = Relay(broker.ports["good"])
    base = tmp_path / "gw"
    cfg = gw_config(base, relay.port, pki.ca, access_token="tls-token")
    queue_record(base, "over-tls")
    bridge = Daemon("bridge", cfg).start()
    try:
        assert delivered(observer, "over-tls")["values"] == {"tag": "over-tls"}
        wait_for(lambda: outbox_rows(base) == 0, 20, what="the PUBACK to empty the outbox")
        assert mqtt_state(base)["connected"] is True
        assert relay.first_bytes and set(relay.first_bytes) == {TLS_RECORD_HANDSHAKE}
        assert "u'tls-token'" in broker.log.log_text()
    finally:
        bridge.stop()
        relay.close()


def test_x509_client_certificate_authentication(tmp_path: Path, pki: Pki, broker: Broker,
                                                observer: MqttDevice) -> None:
    base = tmp_path / "gw"
    cfg = gw_config(base, broker.ports["x509"], pki.ca, client_cert=str(pki.client.cert),
                    client_key=str(pki.client.key))
    queue_record(base, "by-certificate")
    bridge = Daemon("bridge", cfg).start()
    try:
        delivered(observer, "by-certificate")
        wait_for(lambda: outbox_rows(base) == 0, 20, what="the PUBACK to empty the outbox")
        # the broker took the certificate's CN as the user name
        wait_for(lambda: f"u'{CLIENT_CN}'" in broker.log.log_text(), 10, what="the identity in the broker log")
        assert "as device 'tls-dev' (certificate," in bridge.log()
    finally:
        bridge.stop()
    assert pki.client.key_pem_body() not in bridge.log()


# -- refusals: never plain text ------------------------------------------------------------

REFUSALS = {
    # name: (listener, use the other CA, client certificate, what the reason says)
    "wrong CA": ("good", True, None, "certificate verify failed"),
    "wrong host name": ("wronghost", False, None, "mismatch"),
    "expired server certificate": ("expired", False, None, "certificate has expired"),
    "no client certificate": ("x509", False, None, ""),
    "expired client certificate": ("x509", False, "expired", ""),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_and_never_plain_text(case: str, tmp_path: Path, pki: Pki, broker: Broker,
                                      observer: MqttDevice) -> None:
    listener, other_ca, client, reason = REFUSALS[case]
    relay = Relay(broker.ports[listener])
    base = tmp_path / "gw"
    extra: dict[str, Any] = {"access_token": "tls-token"}
    if client == "expired":
        extra = {"client_cert": str(pki.expired_client.cert), "client_key": str(pki.expired_client.key)}
    cfg = gw_config(base, relay.port, pki.other_ca if other_ca else pki.ca, **extra)
    queue_record(base, f"refused-{case}")
    bridge = Daemon("bridge", cfg).start()
    try:
        wait_for(lambda: len(relay.first_bytes) >= 3, 30, what="three connection attempts")
        st = mqtt_state(base)
        assert st.get("connected") is not True
        assert observer.no_message(1.0) is None
        assert outbox_rows(base) == 1
        assert set(relay.first_bytes) == {TLS_RECORD_HANDSHAKE}, relay.first_bytes
        assert MQTT_CONNECT not in relay.first_bytes
        assert reason in (st.get("last_error") or ""), st
        status = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), "status", "--json"],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert status.returncode in (1, 2)
        if status.returncode == 1:
            assert reason in (json.loads(status.stdout)["mqtt"]["last_error"] or "")
    finally:
        bridge.stop()
        relay.close()


# -- gatewayctl check ------------------------------------------------------------------------

def test_check_reports_days_to_expiry_of_server_and_client_certificates(tmp_path: Path, pki: Pki,
                                                                         broker: Broker) -> None:
    cfg = gw_config(tmp_path / "gw", broker.ports["x509"], pki.ca, client_cert=str(pki.client.cert),
                    client_key=str(pki.client.key))
    rc, results = ctl_check(cfg)
    server, client = results["tls certificate"], results["tls client certificate"]
    assert server["outcome"] == "ok", server
    assert abs(days_in(server["detail"]) - SERVER_DAYS) <= 1
    assert client["outcome"] == "warning", client   # under 30 days left
    assert abs(days_in(client["detail"]) - CLIENT_DAYS) <= 1
    assert pki.client.key_pem_body() not in json.dumps(results)


@pytest.mark.parametrize(("listener", "other_ca", "expect"), [
    ("good", True, "certificate verify failed"),
    ("wronghost", False, "mismatch"),
    ("expired", False, "expired"),
])
def test_check_fails_on_a_bad_server_certificate(tmp_path: Path, pki: Pki, broker: Broker, listener: str,
                                                 other_ca: bool, expect: str) -> None:
    cfg = gw_config(tmp_path / "gw", broker.ports[listener], pki.other_ca if other_ca else pki.ca,
                    access_token="tls-token")
    rc, results = ctl_check(cfg)
    assert rc == 1
    server = results["tls certificate"]
    assert server["outcome"] == "failed" and expect in server["detail"], server
    if listener == "expired":
        assert "days ago" in server["detail"], server
    else:
        assert "days)" in server["detail"], server  # the expiry of what the server presented


@pytest.mark.parametrize(("cert", "key", "expect"), [
    ("expired_client", "expired_client", "days ago"),  # expired
    ("client", "expired_client", ""),                  # a key that is not the certificate's
])
def test_check_fails_on_a_bad_client_certificate(tmp_path: Path, pki: Pki, broker: Broker, cert: str, key: str,
                                                 expect: str) -> None:
    cert_file, key_file = getattr(pki, cert).cert, getattr(pki, key).key
    cfg = gw_config(tmp_path / "gw", broker.ports["good"], pki.ca, client_cert=str(cert_file),
                    client_key=str(key_file))
    rc, results = ctl_check(cfg)
    assert rc == 1
    client = results["tls client certificate"]
    assert client["outcome"] == "failed" and expect in client["detail"], client
    assert getattr(pki, key).key_pem_body() not in json.dumps(results)
