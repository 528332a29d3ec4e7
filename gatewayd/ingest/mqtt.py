"""MQTT ingest: a persistent QoS 1 session on a local broker, PUBACK only after the commit.

The bridge owns the session to ThingsBoard; this is gatewayd's second, local MQTT user, kept
apart on purpose (the daemons share no code paths that could stall one another).

Holding the PUBACK, on both paho generations:
- paho 2.x: `Client(manual_ack=True)`; `client.ack(mid, 1)` once the rows are committed.
- paho 1.6.1 has no manual-ack mode. It sends the PUBACK from a private method,
  `_send_puback(mid)`, right after `on_message` returns; we wrap that method on our client
  so the mid is parked and sent after the commit (bookworm's 1.6.1 is frozen, so the private
  name is stable). If the hook cannot be installed, the rows are committed inside
  `on_message` instead, one transaction per message: still durable before the PUBACK, only
  slower, and said once in the log.

A session is `clean_start`/`clean_session` false with a fixed client id, so the broker keeps
the subscriptions and every unacknowledged message while ingest is away (a restart, a
`kill -9`) and delivers them again. A message committed but not yet acknowledged at a crash
is delivered again and so queued twice: duplicates are bounded by the messages in flight
(`receive_maximum` under MQTT 5, the broker's `max_inflight_messages` under 3.1.1).

No paho thread: the service's loop reads the socket (it is one of the loop's fds), so a
stalled loop stalls the watchdog too.
"""

from __future__ import annotations

import logging
import random
import select
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from gatewayd.clock import now_ms
from gatewayd.config import Config
from gatewayd.ingest import formats
from gatewayd.ingest.batch import Batch
from gatewayd.store.ingest import Row

log = logging.getLogger("gatewayd.ingest")

PAHO_VERSION: str = getattr(__import__("paho.mqtt", fromlist=["__version__"]), "__version__", "0")
HAS_MANUAL_ACK = hasattr(paho, "CallbackAPIVersion")  # paho 2.x
CONNACK_TIMEOUT_S = 10.0
MAX_PACKETS_PER_STEP = 5000
MAX_ROWS_PER_BATCH = 20000
BACKOFF_MIN_S = 0.5

Handler = Callable[[bytes, str, int], list[Row]]
# The kinds of topic, in the order a topic is matched against them.
KINDS: tuple[tuple[str, Handler, str], ...] = (
    ("gateway_attribute_topics", formats.gateway_rows, formats.ATTRIBUTES),
    ("attribute_topics", formats.device_rows, formats.ATTRIBUTES),
    ("gateway_topics", formats.gateway_rows, formats.TELEMETRY),
    ("topics", formats.device_rows, formats.TELEMETRY),
)


@dataclass(slots=True)
class Message:
    mid: int
    qos: int
    rows: list[Row]
    session: int


def _rc(value: Any) -> int:
    value = getattr(value, "value", value)
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return -1


def _session_present(flags: Any) -> bool:
    if isinstance(flags, dict):
        return bool(flags.get("session present"))
    return bool(getattr(flags, "session_present", False))


class MqttAdapter:
    name = "mqtt"

    def __init__(self, cfg: Config, commit_now: Callable[[list[Row]], None]):
        c = cfg["ingest.mqtt"]
        self.host: str = c["host"]
        self.port: int = c["port"]
        self.username: str = c["username"]
        self.password: str = c["password"]
        self.client_id: str = c["client_id"]
        self.mqtt5 = c["mqtt_version"] == "5"
        self.keepalive: int = c["keepalive_s"]
        self.receive_maximum: int = c["receive_maximum"]
        self.session_expiry: int = c["session_expiry_s"]
        self.reconnect_max: float = c["reconnect_max_s"]
        self.filters: list[tuple[str, Handler, str]] = [
            (f, handler, type_) for key, handler, type_ in KINDS for f in c[key]]
        self._route_cache: dict[str, tuple[Handler, str] | None] = {}
        self.commit_now = commit_now
        self.client: Any = None
        self.session = 0
        self.connected = False
        self.connack_deadline = 0.0
        self.next_attempt = 0.0
        self.backoff = BACKOFF_MIN_S
        self.ever_connected = False
        self.pending: deque[Message] = deque()
        self.deferred: list[int] = []
        self.defer_acks = True
        self.sync_commit = False
        self.received = 0
        self.received_rows = 0
        self.last_error: str | None = None

    # -- the session -------------------------------------------------------------------------
    def _new_client(self) -> Any:
        kwargs: dict[str, Any] = {"client_id": self.client_id,
                                  "protocol": paho.MQTTv5 if self.mqtt5 else paho.MQTTv311}
        if not self.mqtt5:
            kwargs["clean_session"] = False
        if HAS_MANUAL_ACK:
            kwargs["callback_api_version"] = paho.CallbackAPIVersion.VERSION2
            kwargs["manual_ack"] = True
        client = paho.Client(**kwargs)
        client.suppress_exceptions = False
        if self.username:
            client.username_pw_set(self.username, self.password or None)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        if not HAS_MANUAL_ACK:
            self._hook_v1_puback(client)
        return client

    def _hook_v1_puback(self, client: Any) -> None:
        """paho 1.6.1: park the PUBACK it would send after on_message; sent after the commit."""
        original = getattr(client, "_send_puback", None)
        if original is None or not self.defer_acks:
            if not self.sync_commit:
                log.warning("paho-mqtt %s: cannot hold back PUBACKs; committing each message before paho "
                            "acknowledges it (slower, equally safe)", PAHO_VERSION)
            self.sync_commit = True
            return
        parked = self.deferred

        def send_puback(mid: int) -> Any:
            parked.append(mid)
            return paho.MQTT_ERR_SUCCESS

        client._send_puback = send_puback
        client._gatewayd_send_puback = original

    def _ack(self, mids: list[int]) -> None:
        if HAS_MANUAL_ACK:
            for mid in mids:
                self.client.ack(mid, 1)
        else:
            send = self.client._gatewayd_send_puback
            for mid in mids:
                send(mid)
        self._flush()

    def _flush(self) -> None:
        if self.client is not None and self.client.want_write():
            self._check(self.client.loop_write(), "write")

    def _connect(self, now: float) -> None:
        self.session += 1
        self.client = self._new_client()
        try:
            if self.mqtt5:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry
                props.ReceiveMaximum = self.receive_maximum
                self.client.connect(self.host, self.port, self.keepalive, clean_start=False, properties=props)
            else:
                self.client.connect(self.host, self.port, self.keepalive)
        except (OSError, ValueError) as e:
            self._lost(now, f"cannot connect to {self.host}:{self.port}: {e}")
            return
        self.connack_deadline = now + CONNACK_TIMEOUT_S

    def _lost(self, now: float, why: str) -> None:
        if why != self.last_error:
            log.warning("mqtt: %s; retrying", why)
        self.last_error = why
        if self.client is not None:
            try:
                self.client._reset_sockets()
            except Exception:  # noqa: BLE001 - best effort; the objects close their fds when collected
                pass
        self.client = None
        self.connected = False
        # QoS 1 messages not committed yet come again from the broker (same session); QoS 0 never.
        self.pending = deque(m for m in self.pending if m.qos == 0)
        self.deferred.clear()
        delay = self.backoff * random.uniform(0.5, 1.0)
        self.backoff = min(self.backoff * 2, self.reconnect_max)
        self.next_attempt = now + delay

    def _check(self, rc: Any, what: str) -> bool:
        code = _rc(rc)
        if code != 0 and self.client is not None:
            self._lost(time.monotonic(), f"connection to {self.host}:{self.port} lost ({what}: "
                       f"{paho.error_string(code)})")
            return False
        return True

    # -- callbacks (run inside loop_read) ---------------------------------------------------
    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: Any, *_props: Any) -> None:
        code = _rc(rc)
        if code != 0:
            self._lost(time.monotonic(), f"broker {self.host}:{self.port} refused the connection (code {code})")
            return
        present = _session_present(flags)
        if self.ever_connected and not present:
            log.warning("mqtt: the broker did not keep session %r; messages published while ingest was away "
                        "were not kept for it", self.client_id)
        log.info("mqtt: connected to %s:%d as %r (MQTT %s, session %s)", self.host, self.port, self.client_id,
                 "5" if self.mqtt5 else "3.1.1", "resumed" if present else "new")
        self.connected = True
        self.ever_connected = True
        self.backoff = BACKOFF_MIN_S
        self.last_error = None
        topics = list(dict.fromkeys(f for f, _, _ in self.filters))
        self.client.subscribe([(t, 1) for t in topics])

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, granted: Any, *_props: Any) -> None:
        refused = [g for g in granted if _rc(g) >= 0x80]
        if refused:
            log.error("mqtt: the broker refused %d of the subscriptions (codes %s)", len(refused),
                      [_rc(g) for g in refused])

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        route = self.route(msg.topic)
        if route is None:
            log.warning("mqtt: message on %r matches no configured topic; ignored", msg.topic)
            return
        handler, type_ = route
        payload = bytes(msg.payload)
        try:
            rows = handler(payload, type_, now_ms())
        except (ValueError, RecursionError):  # too deep to re-encode: on as it came, to the dead letters
            rows = [(type_, payload)]
        self.received += 1
        self.received_rows += len(rows)
        if self.sync_commit:
            self.commit_now(rows)  # raises: paho then sends no PUBACK
            return
        self.pending.append(Message(int(msg.mid), int(msg.qos), rows, self.session))

    def route(self, topic: str) -> tuple[Handler, str] | None:
        if topic not in self._route_cache:
            if len(self._route_cache) > 4096:
                self._route_cache.clear()
            self._route_cache[topic] = next(
                ((h, t) for f, h, t in self.filters if paho.topic_matches_sub(f, topic)), None)
        return self._route_cache[topic]

    # -- the adapter interface ---------------------------------------------------------------
    def fds(self) -> list[int]:
        sock = self.client.socket() if self.client is not None else None
        return [sock.fileno()] if sock is not None else []

    def poll(self, now: float) -> None:
        if self.client is None:
            if now >= self.next_attempt:
                self._connect(now)
            return
        if not self.connected and now > self.connack_deadline:
            self._lost(now, f"no CONNACK from {self.host}:{self.port} within {CONNACK_TIMEOUT_S:.0f} s")
            return
        sock = self.client.socket()
        start = self.received_rows
        for _ in range(MAX_PACKETS_PER_STEP):
            if sock is None or not select.select([sock], [], [], 0)[0]:
                break
            try:
                rc = self.client.loop_read()
            except Exception as e:  # noqa: BLE001 - a commit inside on_message failed (1.6.1 fallback)
                self._lost(now, f"message not committed ({e}); dropping the session so the broker sends it again")
                return
            if not self._check(rc, "read"):
                return
            if self.received_rows - start >= MAX_ROWS_PER_BATCH:
                break
        if self.client is not None:
            self._check(self.client.loop_misc(), "keepalive")
            self._flush()

    def fill(self, batch: Batch, room: int) -> None:
        taken: list[Message] = []
        while self.pending and len(batch.rows) < MAX_ROWS_PER_BATCH:
            if self.pending[0].qos > 0 and room - len(batch.rows) <= 0:
                break  # over the cap: unacknowledged, so the broker holds the rest back
            m = self.pending.popleft()
            batch.rows.extend(m.rows)
            taken.append(m)
        if not taken:
            return
        session = self.session

        def committed() -> None:
            if self.client is None or session != self.session:
                return  # that session is gone; the broker delivers its messages again
            mids = [m.mid for m in taken if m.qos > 0]
            if HAS_MANUAL_ACK:
                self._ack(mids)
            else:
                acked = set(mids)
                self._ack([mid for mid in self.deferred if mid in acked])
                self.deferred[:] = [mid for mid in self.deferred if mid not in acked]

        def failed(_why: str) -> None:
            if session == self.session:
                self.pending.extendleft(reversed(taken))

        batch.on_commit.append(committed)
        batch.on_fail.append(failed)

    def wait(self, now: float) -> float:
        if self.client is None:
            return max(0.0, self.next_attempt - now)
        if self.client.want_write():
            return 0.01
        if not self.connected:
            return max(0.0, min(1.0, self.connack_deadline - now))
        return max(0.5, self.keepalive / 2)

    def has_work(self) -> bool:
        return bool(self.pending)

    def status(self) -> str:
        state = "connected" if self.connected else "connecting" if self.client is not None else "retrying"
        return f"mqtt {state} {self.host}:{self.port}"

    def stop(self) -> None:
        if self.client is not None:
            try:
                self.client.disconnect()
                self._flush()
            except Exception:  # noqa: BLE001 - stopping anyway; the broker keeps the session
                pass
            try:
                self.client._reset_sockets()
            except Exception:  # noqa: BLE001 - stopping anyway; the broker keeps the session
                pass
            self.client = None
