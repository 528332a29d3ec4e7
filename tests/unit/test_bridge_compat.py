"""The paho-mqtt 1.6.1 / 2.x compatibility layer, against a tiny scripted MQTT server on loopback.

Checks what the bridge relies on, with whichever paho this interpreter has: normalised
callbacks, CONNACK refusals classified, MQTT 5 PUBACK reason codes reaching on_publish (also
on 1.6.1, through the hook), and on_message running *before* the PUBACK of a QoS 1 message
is sent, with an exception in it preventing the PUBACK altogether.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import pytest

from gatewayd.bridge import mqtt_compat
from gatewayd.bridge.mqtt_compat import Connection, is_auth_failure
from gatewayd.packet import packet_size, utf8_len


def _read_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _read_packet(s: socket.socket) -> tuple[int, bytes, int]:
    """(first byte, body, bytes of the fixed header)."""
    first = _read_exact(s, 1)[0]
    mult, length, header = 1, 0, 1
    while True:
        b = _read_exact(s, 1)[0]
        header += 1
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return first, _read_exact(s, length), header


def _varlen(n: int) -> bytes:
    out = b""
    while True:
        b = n % 128
        n //= 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


class FakeBroker:
    """Accepts one client; answers CONNACK with `connack_rc`; PUBACKs publishes with `puback_rc`."""

    def __init__(self, connack_rc: int = 0, puback_rc: int = 0):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.port = self.srv.getsockname()[1]
        self.connack_rc = connack_rc
        self.puback_rc = puback_rc
        self.v5 = False
        self.client: socket.socket | None = None
        self.pubacks: list[int] = []
        self.published: list[tuple[str, bytes]] = []
        self.sizes: list[tuple[int, int]] = []  # (fixed header, rest) of each PUBLISH as it came
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.srv.accept()
        self.client = conn
        try:
            _, body, _ = _read_packet(conn)  # CONNECT
            self.v5 = body[6] == 5
            conn.sendall(b"\x20\x03\x00" + bytes([self.connack_rc]) + b"\x00" if self.v5
                         else b"\x20\x02\x00" + bytes([self.connack_rc]))
            while True:
                first, body, header = _read_packet(conn)
                kind = first >> 4
                if kind == 3:  # PUBLISH (QoS 1)
                    tlen = struct.unpack("!H", body[:2])[0]
                    topic = body[2:2 + tlen].decode()
                    pid = struct.unpack("!H", body[2 + tlen:4 + tlen])[0]
                    rest = body[4 + tlen:]
                    if self.v5:
                        rest = rest[1 + rest[0]:]
                    self.published.append((topic, rest))
                    self.sizes.append((header, len(body)))
                    if self.v5:
                        conn.sendall(b"\x40\x04" + struct.pack("!H", pid) + bytes([self.puback_rc, 0]))
                    else:
                        conn.sendall(b"\x40\x02" + struct.pack("!H", pid))
                elif kind == 4:  # PUBACK from the client
                    with self.lock:
                        self.pubacks.append(struct.unpack("!H", body[:2])[0])
                elif kind == 8:  # SUBSCRIBE -> SUBACK granting QoS 1
                    pid = body[:2]
                    conn.sendall(b"\x90" + (b"\x04" + pid + b"\x00\x01" if self.v5 else b"\x03" + pid + b"\x01"))
                elif kind == 12:  # PINGREQ
                    conn.sendall(b"\xd0\x00")
                elif kind == 14:
                    return
        except (EOFError, OSError):
            return

    def send_publish(self, topic: str, payload: bytes, pid: int) -> None:
        assert self.client is not None
        t = topic.encode()
        body = struct.pack("!H", len(t)) + t + struct.pack("!H", pid) + (b"\x00" if self.v5 else b"") + payload
        self.client.sendall(b"\x32" + _varlen(len(body)) + body)

    def close(self) -> None:
        for s in (self.client, self.srv):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


def _pump(conn: Connection, until: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        rc = conn.loop(0.02)
        assert rc == 0, rc


@pytest.mark.parametrize("mqtt5", [False, True], ids=["mqtt311", "mqtt5"])
def test_publish_ack_and_inbound_before_puback(mqtt5: bool) -> None:
    broker = FakeBroker(puback_rc=0x97 if mqtt5 else 0)
    conn = Connection("gatewayd-test", mqtt5, username="tok")
    events: dict[str, Any] = {"connack": None, "acks": [], "msgs": []}
    conn.on_connect = lambda code, text: events.__setitem__("connack", (code, text))
    conn.on_publish = lambda mid, rc: events["acks"].append((mid, rc))

    def on_message(topic: str, payload: bytes, qos: int) -> None:
        with broker.lock:
            acked_already = list(broker.pubacks)
        events["msgs"].append((topic, payload, qos, acked_already))
        if payload == b"boom":
            raise RuntimeError("store failed")

    conn.on_message = on_message
    try:
        conn.connect("127.0.0.1", broker.port, 30, socket.create_connection(("127.0.0.1", broker.port), 5))
        _pump(conn, lambda: events["connack"] is not None)
        assert events["connack"][0] == 0
        assert conn.subscribe(["a/+", "b"]) == 0
        rc, mid = conn.publish("v1/devices/me/telemetry", '{"ts":1,"values":{"a":1}}')
        assert rc == 0
        _pump(conn, lambda: events["acks"])
        # MQTT 5: the PUBACK reason code (0x97 quota exceeded) reaches on_publish, on both paho versions
        assert events["acks"] == [(mid, 0x97 if mqtt5 else 0)]
        assert broker.published[-1] == ("v1/devices/me/telemetry", b'{"ts":1,"values":{"a":1}}')

        broker.send_publish("a/1", b"hello", 42)
        _pump(conn, lambda: events["msgs"])
        topic, payload, qos, acked_before = events["msgs"][0]
        assert (topic, payload, qos) == ("a/1", b"hello", 1)
        assert 42 not in acked_before  # on_message ran before the PUBACK was sent
        deadline = time.monotonic() + 3
        while 42 not in broker.pubacks and time.monotonic() < deadline:
            conn.loop(0.02)
        assert 42 in broker.pubacks

        broker.send_publish("a/2", b"boom", 43)
        with pytest.raises(RuntimeError):
            for _ in range(100):
                conn.loop(0.02)
        time.sleep(0.3)
        assert 43 not in broker.pubacks  # a failed store is never acknowledged
    finally:
        conn.close()
        broker.close()


@pytest.mark.parametrize("mqtt5", [False, True], ids=["mqtt311", "mqtt5"])
def test_packet_size_bounds_what_paho_sends(mqtt5: bool) -> None:
    """`packet.packet_size` is the worst case of the PUBLISH paho writes, exact when the remaining
    length takes 4 bytes under MQTT 5; under 3.1.1 (no property length) one byte less at most."""
    broker = FakeBroker()
    conn = Connection("gatewayd-test", mqtt5, username="tok")
    connack: list[int] = []
    acks: list[int] = []
    conn.on_connect = lambda code, text: connack.append(code)
    conn.on_publish = lambda mid, rc: acks.append(mid)
    topic = "v1/devices/me/telemetry/ü"
    # payload sizes around each step of the remaining length's encoding (1, 2, 3, 4 bytes)
    cases = [0, 1, 90, 127, 16_383 - 40, 16_383, 2_097_151 - 40, 2_097_151]
    try:
        conn.connect("127.0.0.1", broker.port, 30, socket.create_connection(("127.0.0.1", broker.port), 5))
        _pump(conn, lambda: connack)
        for i, n in enumerate(cases, 1):
            payload = "é" * (n // 2) + "x" * (n % 2)
            rc, _ = conn.publish(topic, payload)
            assert rc == 0
            _pump(conn, lambda i=i: len(acks) == len(broker.sizes) == i, 20.0)
            header, rest = broker.sizes[-1]
            bound = packet_size(utf8_len(topic), utf8_len(payload))
            slack = (4 - (header - 1)) + (0 if mqtt5 else 1)  # remaining length shorter than 4; no properties
            assert header + rest <= bound and bound - (header + rest) == slack, (n, header, rest, bound)
    finally:
        conn.close()
        broker.close()


@pytest.mark.parametrize("mqtt5", [False, True], ids=["mqtt311", "mqtt5"])
def test_refused_credentials_are_classified(mqtt5: bool) -> None:
    broker = FakeBroker(connack_rc=0x86 if mqtt5 else 4)
    conn = Connection("gatewayd-test", mqtt5, username="bad")
    got: list[tuple[int, str]] = []
    conn.on_connect = lambda code, text: got.append((code, text))
    try:
        conn.connect("127.0.0.1", broker.port, 30, socket.create_connection(("127.0.0.1", broker.port), 5))
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            conn.loop(0.02)
        assert got, "no CONNACK"
        code, text = got[0]
        assert code != 0 and is_auth_failure(code)
        assert "password" in text.lower() or "user" in text.lower()
    finally:
        conn.close()
        broker.close()


def test_connack_codes() -> None:
    for code in (4, 5, 0x86, 0x87):
        assert is_auth_failure(code)
    for code in (0, 1, 2, 3, 0x80, 0x88):
        assert not is_auth_failure(code)
    assert mqtt_compat.code_of(None) == 0
    assert mqtt_compat.code_of(5) == 5


def test_no_paho_thread_is_started() -> None:
    before = threading.active_count()
    conn = Connection("x", False)
    assert threading.active_count() == before
    conn.close()
