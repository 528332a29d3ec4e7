"""The one place that knows paho-mqtt 1.6.1 (Debian bookworm) from 2.x (PyPI, newer Debian).

`Connection` wraps a paho client and calls back with plain values:

- `on_connect(code, text)`: code 0 is success; otherwise the CONNACK code as an int. Under
  MQTT 3.1.1 paho 1.6.1 gives the raw CONNACK code (1..5) while 2.x converts it to the MQTT 5
  reason code (0x80..); `is_auth_failure()` understands both.
- `on_disconnect(code, text)`
- `on_publish(mid, reason)`: `reason` is the MQTT 5 PUBACK reason code (>= 0x80 is a failure),
  or 0 when there is none (MQTT 3.1.1 PUBACKs carry none).
  paho 1.6.1 parses the MQTT 5 PUBACK reason code but never hands it to `on_publish`; we
  read it from the packet paho is handling (one wrapped private method, `_handle_pubackcomp`,
  frozen in bookworm's 1.6.1). If that hook cannot be installed, reason codes are reported
  as 0 (success), exactly as under MQTT 3.1.1, and a warning is logged once.
- `on_message(topic, payload, qos)`: both versions call it *before* they send the PUBACK of a
  QoS 1 message, and an exception raised in it propagates out of the loop call before the
  PUBACK is written (`suppress_exceptions` stays False). The bridge relies on that: a message
  is stored durably before it is acknowledged.

No paho background thread is ever started: the bridge drives `loop()` from its own main loop,
so a stalled loop stalls the systemd watchdog too. paho never opens the transport either: DNS,
TCP and TLS are done without blocking by `connector.py`, and `connect()` takes the open socket.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("gatewayd.bridge")

PAHO_VERSION: str = getattr(__import__("paho.mqtt", fromlist=["__version__"]), "__version__", "0")
PAHO_MAJOR = int(PAHO_VERSION.split(".")[0] or 0)
HAS_CALLBACK_API = hasattr(mqtt, "CallbackAPIVersion")

MQTT_ERR_SUCCESS = 0
# CONNACK codes meaning "your credentials are refused": 3.1.1 (4, 5) and MQTT 5 (0x86, 0x87, 0x8C).
AUTH_FAILURE_CODES = frozenset({4, 5, 0x86, 0x87, 0x8C})

CONNACK_TEXT_311 = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


def is_auth_failure(code: int) -> bool:
    return code in AUTH_FAILURE_CODES


def code_of(rc: Any) -> int:
    """An int from whatever paho passed: int, ReasonCode(s), MQTTErrorCode, or None."""
    if rc is None:
        return 0
    value = getattr(rc, "value", rc)
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def connack_text(rc: Any, code: int) -> str:
    if hasattr(rc, "getName"):
        try:
            return str(rc.getName())
        except Exception:  # noqa: BLE001 - paho's reason-code API differs by version; the text is cosmetic
            pass
    return CONNACK_TEXT_311.get(code, f"connection refused (code {code})")


def error_text(code: int) -> str:
    return str(mqtt.error_string(code))  # "Unknown error." for a code it does not know


OnConnect = Callable[[int, str], None]
OnDisconnect = Callable[[int, str], None]
OnPublish = Callable[[int, int], None]
OnMessage = Callable[[str, bytes, int], None]


def _noop(*_args: Any) -> None:
    return None


class Connection:
    """One MQTT session (a fresh paho client per connection attempt)."""

    def __init__(self, client_id: str, mqtt5: bool, *, username: str | None = None,
                 password: str | None = None, inflight: int = 20) -> None:
        self.mqtt5 = mqtt5
        protocol = mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        if not mqtt5:
            kwargs["clean_session"] = True
        if HAS_CALLBACK_API:
            kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION2
        self.client: Any = mqtt.Client(**kwargs)
        self.client.suppress_exceptions = False
        if username is not None:
            self.client.username_pw_set(username, password)
        # We keep our own window; paho must never hold messages back on its own.
        self.client.max_inflight_messages_set(max(inflight, 1) + 16)
        self.client.max_queued_messages_set(0)
        self.on_connect: OnConnect = _noop
        self.on_disconnect: OnDisconnect = _noop
        self.on_publish: OnPublish = _noop
        self.on_message: OnMessage = _noop
        self._puback_codes: dict[int, int] = {}
        self.reason_codes_available = True
        self._install_callbacks()

    # -- callbacks -------------------------------------------------------------------------
    def _install_callbacks(self) -> None:
        c = self.client
        if HAS_CALLBACK_API:
            c.on_connect = self._v2_connect
            c.on_disconnect = self._v2_disconnect
            c.on_publish = self._v2_publish
        else:
            c.on_connect = self._v1_connect
            c.on_disconnect = self._v1_disconnect
            c.on_publish = self._v1_publish
            if self.mqtt5:
                self._hook_v1_puback()
        c.on_message = self._message

    # paho 2.x, CallbackAPIVersion.VERSION2 (same shape for MQTT 3.1.1 and 5)
    def _v2_connect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any = None) -> None:
        code = code_of(rc)
        self.on_connect(code, "success" if code == 0 else connack_text(rc, code))

    def _v2_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any = None, _props: Any = None) -> None:
        code = code_of(rc)
        self.on_disconnect(code, str(rc) if rc is not None else "disconnected")

    def _v2_publish(self, _c: Any, _u: Any, mid: int, rc: Any = None, _props: Any = None) -> None:
        self.on_publish(mid, code_of(rc) if self.mqtt5 else 0)

    # paho 1.6.1: the signature depends on the protocol
    def _v1_connect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any = None) -> None:
        code = code_of(rc)
        self.on_connect(code, "success" if code == 0 else connack_text(rc, code))

    def _v1_disconnect(self, _c: Any, _u: Any, rc: Any = None, _props: Any = None) -> None:
        code = code_of(rc)
        text = str(rc) if hasattr(rc, "getName") else error_text(code)
        self.on_disconnect(code, text)

    def _v1_publish(self, _c: Any, _u: Any, mid: int) -> None:
        self.on_publish(mid, self._puback_codes.pop(mid, 0))

    def _hook_v1_puback(self) -> None:
        """paho 1.6.1 drops MQTT 5 PUBACK reason codes: read them from the packet being handled."""
        c = self.client
        original = getattr(c, "_handle_pubackcomp", None)
        if original is None or not hasattr(c, "_in_packet"):
            self.reason_codes_available = False
            log.warning("paho-mqtt %s: cannot read MQTT 5 PUBACK reason codes; treating PUBACKs as success",
                        PAHO_VERSION)
            return
        codes = self._puback_codes

        def handle(cmd: str) -> Any:
            try:
                pkt = c._in_packet
                if cmd == "PUBACK" and pkt["remaining_length"] > 2:
                    mid = struct.unpack("!H", pkt["packet"][:2])[0]
                    codes[mid] = pkt["packet"][2]
            except Exception:  # noqa: BLE001 - never break the session over a diagnostic
                pass
            return original(cmd)

        c._handle_pubackcomp = handle

    def _message(self, _c: Any, _u: Any, msg: Any) -> None:
        # Exceptions propagate: paho then does not send the PUBACK.
        self.on_message(msg.topic, bytes(msg.payload), int(msg.qos))

    # -- operations ------------------------------------------------------------------------
    def connect(self, host: str, port: int, keepalive: int, sock: socket.socket) -> None:
        """Send CONNECT on a transport already open (TCP, or TLS after its handshake: `connector.py`).

        Both paho generations create their socket in `_create_socket_connection()` and only wrap
        it in TLS when `tls_set*()` was called, which we never do: handing our socket in there is
        all paho needs, and it never blocks on the network."""
        self.client._create_socket_connection = lambda: sock
        if self.mqtt5:
            self.client.connect(host, port, keepalive, clean_start=True)
        else:
            self.client.connect(host, port, keepalive)

    def subscribe(self, topics: list[str], qos: int = 1) -> int:
        if self.mqtt5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            result = self.client.subscribe([(t, SubscribeOptions(qos=qos)) for t in topics])
        else:
            result = self.client.subscribe([(t, qos) for t in topics])
        return code_of(result[0])

    def publish(self, topic: str, payload: str | bytes, qos: int = 1) -> tuple[int, int]:
        """(rc, mid); rc != 0 means the client is not connected."""
        info = self.client.publish(topic, payload, qos=qos)
        return code_of(info.rc), int(info.mid)

    def loop(self, timeout: float) -> int:
        """Wait up to `timeout` for the socket, read, write, keepalive; rc != 0: connection lost."""
        return code_of(self.client.loop(timeout))

    def want_write(self) -> bool:
        return bool(self.client.want_write())

    def socket(self) -> Any:
        return self.client.socket()

    def disconnect(self) -> None:
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - closing anyway; whatever paho raises changes nothing
            pass

    def close(self) -> None:
        """Drop the socket (and paho's wake-up socket pair) without a DISCONNECT packet."""
        try:
            self.client._reset_sockets()
        except Exception:  # noqa: BLE001 - best effort; the objects close their fds when collected
            sock = self.client.socket()
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
