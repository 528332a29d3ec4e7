"""The bridge: the one MQTT session to ThingsBoard (SPEC §2.4), driven from the Runner's loop.

One `step()` = one `loop()` call on the paho client (no paho thread), then the work its
callbacks announced: delete acknowledged rows, fill the in-flight window, handle CONNACKs,
provisioning answers, session limits and timeouts. A stuck loop therefore stops the
watchdog pings, and so does a broker that takes publishes but never acknowledges them
(`stall_timeout_s`).

Publishing: rows leave the outbox highest priority first, then oldest; consecutive telemetry
rows travel as one JSON array as large as the packet limit allows; QoS 1; a row is deleted
only after its PUBACK (MQTT 5: reason code < 0x80). After a reconnect, everything not yet
acknowledged is sent again from the head of the outbox, so duplicates are limited to what
was in flight.

Packet limit: the announced (getSessionLimits) or configured maximum, lowered by what closed
sessions teach (`PacketLimit` in publisher.py). A server that does not announce its limit and
closes the session on a too-large PUBLISH (ThingsBoard < 3.8, MQTT 3.1.1: no reason code) would
otherwise get the same batch again after every reconnect: sessions lost in a row with a packet
larger than any acknowledged one in flight halve the limit, and a record that still gets the
session closed when sent alone is dead-lettered. The learned limit is kept in the state table
(`bridge.packet_limit`, per host:port and configured maximum) until the server announces one.

Inbound: every message is written to the inbound table inside `on_message`, which paho runs
before it sends the PUBACK; if the write fails the exception leaves the loop before the PUBACK
is written and the session is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import select
import sqlite3
import ssl
import time
from typing import Any

from gatewayd import redact
from gatewayd.bridge import provisioning
from gatewayd.bridge.mqtt_compat import PAHO_VERSION, Connection, is_auth_failure
from gatewayd.bridge.provisioning import Backoff, Credentials, ProvisioningError
from gatewayd.bridge.publisher import (
    DEAD_LETTER,
    ISOLATE,
    SHRINK,
    LossVerdict,
    Oversized,
    PacketLimit,
    Publish,
    RateLimiter,
    Row,
    Window,
    plan,
    stalled,
)
from gatewayd.config import Config
from gatewayd.inotify import DirectoryWatch
from gatewayd.store import queues
from gatewayd.store.db import data_version, now_ms, transaction

log = logging.getLogger("gatewayd.bridge")

TOPIC_RPC_REQUEST = "v1/devices/me/rpc/request/"
TOPIC_RPC_RESPONSE = "v1/devices/me/rpc/response/"
TOPIC_ATTR_REQUEST = "v1/devices/me/attributes/request/"
SUBSCRIPTIONS = [
    "v1/devices/me/rpc/request/+",
    "v1/devices/me/attributes",
    "v1/devices/me/attributes/response/+",
    "v2/sw/response/+/chunk/+",
    "v2/fw/error",
    # answers to client-side RPCs (getSessionLimits here; others go to the inbound queue)
    "v1/devices/me/rpc/response/+",
]
ALWAYS_SHARED = ["sw_title", "sw_version", "FILES"]
ALWAYS_CLIENT = ["FILE_HASHES"]

IDLE, CONNECTING, ONLINE = "idle", "connecting", "online"
PROV_CONNECTING, PROV_WAIT = "prov-connecting", "prov-wait"

POLL_S = 0.025           # how often an idle, connected bridge looks for new outbox rows without inotify
IDLE_WAIT_S = 1.0        # longest wait when inotify wakes us for new rows (state_dir changes)
WAIT_S = 0.25            # loop timeout while waiting for acks / CONNACK
IDLE_STEP_S = 1.0        # longest sleep while waiting to reconnect (status and watchdog keep going)
CONNACK_TIMEOUT_S = 30.0
LIMITS_TIMEOUT_S = 10.0
FETCH_ROWS = 8192
NO_CREDENTIALS_RECHECK_S = 60.0
STATE_EVERY_S = 1.0
PACKET_LIMIT_KEY = "bridge.packet_limit"  # the limit learned from lost sessions, per server
# MQTT 5 PUBACK reason codes that will never succeed for this payload
RC_PACKET_TOO_LARGE = 0x95
PERMANENT_FAILURES = {0x90: "topic name invalid", 0x99: "payload format invalid", 0x95: "packet too large"}


def _positive_int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


class Bridge:
    name = "bridge"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        tb = cfg["thingsboard"]
        self.host: str = tb["host"]
        self.port: int = tb["port"]
        self.server = f"{self.host}:{self.port}"
        self.mqtt5: bool = tb["mqtt_version"] == "5"
        self._version = "5" if self.mqtt5 else "3.1.1"
        self.keepalive: int = tb["keepalive_s"]
        self.cfg_max_packet: int = tb["max_packet_bytes"]
        self.cfg_inflight: int = tb["max_inflight"]
        self.cfg_rate: float = tb["rate_limit_per_s"]
        self.stall_timeout: float = tb["stall_timeout_s"]
        self.auth_backoff_s: float = tb["auth_backoff_s"]
        self.device_name = cfg.device_name()
        self.reconnect = Backoff(0.5, tb["reconnect_max_s"])
        self.prov_backoff = Backoff(provisioning.BACKOFF_INITIAL_S, provisioning.BACKOFF_MAX_S)
        self.retry_backoff = Backoff(1.0, 60.0)

        self.db: sqlite3.Connection | None = None
        self.watch: DirectoryWatch | None = None
        self.conn: Connection | None = None
        self.phase = IDLE
        self.creds: Credentials | None = None
        self.retry_at = 0.0
        self.deadline = 0.0
        self.waiting_for = ""   # why we are not connected (for STATUS=)
        self.connack: tuple[int, str] | None = None
        self.lost_reason = ""
        self.prov_answer: bytes | None = None
        self._prov_request = ""

        # session limits (learned from the server, remembered across connections)
        self.server_max_packet: int | None = None
        self.server_inflight: int | None = None
        self.server_rates: dict[str, Any] | None = None
        self.limits_req: str | None = None
        self.limits_deadline = 0.0
        self.limits_answer: bytes | None = None
        self.limit_override: int | None = None
        self.packet = PacketLimit()               # learned from sessions the server closed
        self.packet_announced: int | None = None  # the server's announced maximum when it was learned
        self.limiter = RateLimiter.build(self.cfg_rate)
        self.req_seq = int(time.time()) % 100000 * 100

        # publishing
        self.window = Window(self.cfg_inflight)
        self.acks: list[tuple[int, int]] = []
        self.buf: list[Row] = []
        self.buf_i = 0
        self.buf_class: int | None = None     # urgent priority of the buffer, None = bulk rows
        self.cursor: dict[int | None, int] = {}  # class -> last id sent in this session
        self.maybe_more = True
        self.seen_version = -1
        self.paused_until = 0.0
        self.needs_reset = False
        self.isolate_upto: dict[int, int] = {}
        self.rate_wait_until = 0.0

        # bookkeeping
        self.connected_since_ms: int | None = None
        self.last_ack_ms: int | None = None
        self.last_ack = 0.0
        self.last_error: str | None = None
        self.stall_logged = False
        self.delivered_records = 0
        self.outbox_rows = 0
        self.state_dirty = True
        self.state_written = 0.0
        self.status_refreshed = 0.0
        self._last_log: dict[str, float] = {}

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.cfg.ensure_dirs()
        self.db = queues.open_queues(self.cfg.queues_db)
        try:
            # every commit to queues.db appends to queues.db-wal in the state directory
            self.watch = DirectoryWatch(self.cfg.state_dir)
        except OSError as e:
            log.warning("inotify unavailable (%s); polling the outbox every %.0f ms", e, POLL_S * 1000)
            self.watch = None
        saved = queues.get_state(self.db, "bridge.session_limits")
        if isinstance(saved, dict) and saved.get("server") == self.server:
            self._apply_limits(saved.get("limits") or {}, persist=False)
        self._load_packet_limit()
        log.info("bridge for device '%s' to %s (MQTT %s, TLS %s, paho-mqtt %s)", self.device_name,
                 self.server, self._version, "on" if self.cfg["thingsboard"]["tls"] else "off", PAHO_VERSION)
        self._write_state(force=True)

    def stop(self) -> None:
        if self.conn is not None:
            if self.phase == ONLINE:
                self.conn.disconnect()
            self.conn.close()
            self.conn = None
        self.phase = IDLE
        if self.db is not None:
            try:
                self._flush_acks()
                self.connected_since_ms = None
                self._write_state(force=True)
            except sqlite3.Error:
                pass
            self.db.close()
            self.db = None
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    def report_error(self, text: str) -> None:
        self._set_error(text)

    def status(self) -> str:
        now = time.monotonic()
        if self.phase == ONLINE:
            owed = stalled(self.window, self.last_ack, now, self.stall_timeout)
            if owed:
                return f"stalled: no PUBACK for {owed:.0f} s (outbox {self.outbox_rows})"
            if now - self.status_refreshed >= 1.0 and self.db is not None:
                self.status_refreshed = now
                self.outbox_rows = queues.counters(self.db).get("outbox_rows", 0)
            return (f"connected to {self.server} (MQTT {self._version}): outbox {self.outbox_rows}, "
                    f"{self.window.records} in flight, {self.delivered_records} delivered")
        if self.phase in (PROV_CONNECTING, PROV_WAIT):
            return f"provisioning device '{self.device_name}' at {self.server}"
        if self.phase == CONNECTING:
            return f"connecting to {self.server}"
        left = max(0.0, self.retry_at - now)
        return f"{self.waiting_for or 'disconnected'}; retrying in {left:.0f} s"

    # -- the loop --------------------------------------------------------------------------
    def step(self) -> tuple[bool, float]:
        now = time.monotonic()
        if self.conn is None:
            if now < self.retry_at:
                self._write_state()
                return True, min(self.retry_at - now, IDLE_STEP_S)
            self._open(now)
            return True, 0.0

        conn = self.conn
        try:
            rc = self._wait_and_loop(conn, self._loop_timeout(now))
        except sqlite3.Error as e:
            # put_inbound failed inside on_message: paho has not sent the PUBACK; drop the session
            self._drop(f"cannot store an inbound message, not acknowledged: {e}", now)
            return False, 1.0
        except (OSError, ValueError) as e:
            rc = -1
            self.lost_reason = self.lost_reason or f"{type(e).__name__}: {e}"
        now = time.monotonic()
        self._handle_acks(now)
        if self.connack is not None:
            self._handle_connack(now)
            if self.conn is None:
                return True, 0.0
        if self.prov_answer is not None:
            self._handle_prov_answer(now)
            return True, 0.0
        if rc != 0:
            self._lost(self.lost_reason or f"connection lost ({rc})", now)
            return True, 0.0
        if self.phase in (CONNECTING, PROV_CONNECTING) and now > self.deadline:
            self._lost(f"no CONNACK from {self.server} within {CONNACK_TIMEOUT_S:.0f} s", now)
            return True, 0.0
        if self.phase == PROV_WAIT and now > self.deadline:
            self._provisioning_failed(f"no answer to the provisioning request within "
                                      f"{provisioning.RESPONSE_TIMEOUT_S:.0f} s", now)
            return True, 0.0
        if self.phase == ONLINE:
            self._online(now)
            owed = stalled(self.window, self.last_ack, now, self.stall_timeout)
            if owed:
                if not self.stall_logged:
                    self.stall_logged = True
                    log.error("stalled: connected to %s but no PUBACK for %.0f s with %d publishes in "
                              "flight; no longer feeding the watchdog", self.server, owed, len(self.window))
                    self._set_error(f"stalled: no PUBACK for {owed:.0f} s")
                self._write_state()
                return False, 0.0
        self._write_state()
        return True, 0.0

    def _loop_timeout(self, now: float) -> float:
        if self.phase != ONLINE:
            return WAIT_S
        if self.window.full:
            return WAIT_S
        if now < self.paused_until:
            return min(WAIT_S, self.paused_until - now)
        if now < self.rate_wait_until:
            return min(POLL_S, self.rate_wait_until - now)
        if self.buf_i < len(self.buf) or self.maybe_more:
            return 0.0
        return IDLE_WAIT_S if self.watch is not None else POLL_S

    def _wait_and_loop(self, conn: Connection, timeout: float) -> int:
        """Wait for the MQTT socket or a commit to queues.db (inotify), then run paho's loop once."""
        sock = conn.socket()
        if timeout <= 0 or self.watch is None or sock is None or (hasattr(sock, "pending") and sock.pending()):
            rc = conn.loop(min(timeout, POLL_S) if self.watch is None and self.phase == ONLINE else timeout)
            if self.watch is not None:
                self.watch.drain()
            return rc
        wlist = [sock] if conn.want_write() else []
        try:
            readable, _, _ = select.select([sock, self.watch.fd], wlist, [], timeout)
        except (OSError, ValueError):
            readable = []
        if self.watch.fd in readable:
            self.watch.drain()
        return conn.loop(0.0)

    # -- connecting ------------------------------------------------------------------------
    def _credentials(self) -> Credentials | None:
        token = self.cfg["thingsboard"]["access_token"]
        if token:
            return Credentials(token, source="config")
        try:
            return provisioning.load(self.cfg.credentials_file)
        except (ValueError, OSError) as e:
            self._log_limited("badcreds", logging.ERROR, "saved credentials unusable: %s", e)
            return None

    def _new_connection(self, client_id: str, username: str, password: str | None) -> Connection:
        conn = Connection(client_id, self.mqtt5, username=username or None, password=password,
                          inflight=max(self.cfg_inflight, self.server_inflight or 0))
        tb = self.cfg["thingsboard"]
        if tb["tls"]:
            conn.tls(tb["ca_cert"], tb["client_cert"], tb["client_key"])
        conn.on_connect = self._on_connect
        conn.on_disconnect = self._on_disconnect
        conn.on_publish = self._on_publish
        conn.on_message = self._on_message
        return conn

    def _open(self, now: float) -> None:
        self.connack = None
        self.lost_reason = ""
        self.prov_answer = None
        creds = self._credentials()
        tb = self.cfg["thingsboard"]
        if creds is None and not tb["client_cert"]:
            if tb["provision_device_key"]:
                self._start_provisioning(now)
                return
            self.phase = IDLE
            self.waiting_for = ("no credentials: no access token configured, none saved in "
                                f"{self.cfg.credentials_file}, and no provisioning key")
            self._log_limited("nocreds", logging.ERROR, "%s", self.waiting_for)
            self._set_error(self.waiting_for)
            self.retry_at = now + NO_CREDENTIALS_RECHECK_S
            return
        if creds is None:  # X.509 device: the certificate is the credential, no token
            creds = Credentials("", source="certificate")
        self.creds = creds
        client_id = creds.client_id or "gatewayd-" + hashlib.sha1(
            f"{self.device_name}@{self.server}".encode()).hexdigest()[:12]
        try:
            self.conn = self._new_connection(client_id, creds.username, creds.password)
            self.phase = CONNECTING
            self.deadline = now + CONNACK_TIMEOUT_S
            self.conn.connect(self.host, self.port, self.keepalive)
        except ssl.SSLError as e:
            self._transport_failed(f"TLS failure with {self.server}: {e}", now)
        except (OSError, ValueError) as e:
            why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
            self._transport_failed(f"cannot connect to {self.server}: {why}", now)

    def _start_provisioning(self, now: float) -> None:
        tb = self.cfg["thingsboard"]
        log.info("no access token and no saved credentials: provisioning device '%s' at %s",
                 self.device_name, self.server)
        try:
            self.conn = self._new_connection(provisioning.client_id_for_provisioning(),
                                             provisioning.PROVISION_USERNAME, None)
            self.phase = PROV_CONNECTING
            self.deadline = now + CONNACK_TIMEOUT_S
            self.conn.connect(self.host, self.port, self.keepalive)
        except ssl.SSLError as e:
            self._transport_failed(f"TLS failure with {self.server}: {e}", now)
        except OSError as e:
            self._transport_failed(f"cannot connect to {self.server} to provision: {e.strerror or e}", now)
        self._prov_request = provisioning.request_payload(self.device_name, tb["provision_device_key"],
                                                          tb["provision_device_secret"])

    def _handle_connack(self, now: float) -> None:
        assert self.connack is not None and self.conn is not None
        code, text = self.connack
        self.connack = None
        if self.phase == PROV_CONNECTING:
            if code != 0:
                self._provisioning_failed(f"the server refused the provisioning connection: {text}", now)
                return
            self.conn.subscribe([provisioning.RESPONSE_TOPIC])
            self.conn.publish(provisioning.REQUEST_TOPIC, self._prov_request)
            self.phase = PROV_WAIT
            self.deadline = now + provisioning.RESPONSE_TIMEOUT_S
            return
        if code != 0:
            if is_auth_failure(code):
                what = self.creds.describe() if self.creds else "credentials"
                reason = f"{self.server} refused {what}: {text}"
                self._drop(reason, now, level=logging.ERROR)
                self.retry_at = now + self.auth_backoff_s
                self.waiting_for = reason
                log.error("%s; check thingsboard.access_token or %s; retrying in %.0f s", reason,
                          self.cfg.credentials_file, self.auth_backoff_s)
            else:
                self._lost(f"{self.server} refused the connection: {text}", now)
            return
        self._online_start(now)

    def _online_start(self, now: float) -> None:
        assert self.conn is not None
        self.phase = ONLINE
        self.reconnect.reset()
        self.connected_since_ms = now_ms()
        self.last_ack = now
        self.stall_logged = False
        self.waiting_for = ""
        self._reset_sending()
        self.window = Window(self._inflight_size())
        log.info("connected to %s as device '%s' (%s, MQTT %s)", self.server, self.device_name,
                 self.creds.describe() if self.creds else "?", "5" if self.mqtt5 else "3.1.1")
        if self.last_error:
            self.last_error = None
        self.state_dirty = True
        self.conn.subscribe(SUBSCRIPTIONS)
        self._request_attributes()
        self._request_limits(now)
        self._write_state(force=True)

    def _request_attributes(self) -> None:
        assert self.conn is not None
        tb = self.cfg["thingsboard"]
        shared = list(dict.fromkeys(ALWAYS_SHARED + list(tb["shared_keys"])))
        client = list(dict.fromkeys(ALWAYS_CLIENT + list(tb["client_keys"])))
        self.req_seq += 1
        payload = json.dumps({"sharedKeys": ",".join(shared), "clientKeys": ",".join(client)},
                             separators=(",", ":"))
        self.conn.publish(f"{TOPIC_ATTR_REQUEST}{self.req_seq}", payload)

    def _request_limits(self, now: float) -> None:
        assert self.conn is not None
        self.req_seq += 1
        self.limits_req = str(self.req_seq)
        self.limits_answer = None
        self.limits_deadline = now + LIMITS_TIMEOUT_S
        self.conn.publish(f"{TOPIC_RPC_REQUEST}{self.limits_req}",
                          '{"method":"getSessionLimits","params":{}}')

    # -- callbacks (run inside conn.loop()) -----------------------------------------------
    def _on_connect(self, code: int, text: str) -> None:
        self.connack = (code, text)

    def _on_disconnect(self, code: int, text: str) -> None:
        if code != 0 and not self.lost_reason:
            self.lost_reason = f"connection lost: {text}"

    def _on_publish(self, mid: int, reason: int) -> None:
        self.acks.append((mid, reason))

    def _on_message(self, topic: str, payload: bytes, qos: int) -> None:
        if self.phase == PROV_WAIT or self.phase == PROV_CONNECTING:
            if topic == provisioning.RESPONSE_TOPIC:
                self.prov_answer = payload
            return
        if self.limits_req is not None and topic == TOPIC_RPC_RESPONSE + self.limits_req:
            self.limits_answer = payload
            return
        assert self.db is not None
        # Durable before acknowledged: paho sends the PUBACK only after this returns.
        queues.put_inbound(self.db, topic, payload)

    # -- online work -----------------------------------------------------------------------
    def _online(self, now: float) -> None:
        if self.limits_answer is not None:
            self._take_limits(self.limits_answer)
            self.limits_answer = None
            self.limits_req = None
        elif self.limits_req is not None and now > self.limits_deadline:
            self._log_limited("nolimits", logging.INFO,
                              "no answer to getSessionLimits within %.0f s; using max packet %d bytes, "
                              "in-flight window %d", LIMITS_TIMEOUT_S, self._max_packet(), self.window.size)
            self.limits_req = None
        if self.needs_reset:
            if len(self.window) or now < self.paused_until:
                return
            self.needs_reset = False
            self._reset_sending()
        self._fill_window(now)

    def _fill_window(self, now: float) -> None:
        assert self.conn is not None and self.db is not None
        if now < self.rate_wait_until or now < self.paused_until:
            return
        limit = self._max_packet()
        max_points = self.limiter.max_points
        while not self.window.full:
            pub = self._next_publish(limit, max_points)
            if pub is None:
                return
            if self.limiter.active:
                wait = self.limiter.wait_for(pub, now)
                if wait > 0:
                    self.rate_wait_until = now + wait
                    return
                self.limiter.take(pub, now)
            rc, mid = self.conn.publish(pub.topic, pub.payload)
            if rc != 0:
                self.lost_reason = self.lost_reason or f"publish failed ({rc})"
                return
            self.window.add(mid, pub, now)
            self.buf_i += pub.count
            self.cursor[self.buf_class] = pub.last_id

    def _next_publish(self, limit: int, max_points: int) -> Publish | None:
        assert self.db is not None
        while True:
            if self.buf_i < len(self.buf):
                version = data_version(self.db)
                if version != self.seen_version:
                    self.seen_version = version
                    self.maybe_more = True
                    if self._unsent_above(self.buf_class):
                        self.buf, self.buf_i = [], 0
            if self.buf_i >= len(self.buf) and not self._refill():
                return None
            head = self.buf[self.buf_i]
            single = head[0] <= self.isolate_upto.get(head[1], 0)
            p = plan(self.buf, self.buf_i, limit, self.mqtt5, 1 if single else 0, max_points, self._alone_max())
            if isinstance(p, Oversized):
                self._dead_letter(p.row, self._oversized_reason(p))
                self.buf_i += 1
                self.cursor[self.buf_class] = p.row[0]
                continue
            return p

    def _refill(self) -> bool:
        assert self.db is not None
        self.buf, self.buf_i = [], 0
        version = data_version(self.db)
        if not self.maybe_more and version == self.seen_version:
            return False
        self.seen_version = version
        # urgent priorities (> 0) from the highest down, then the bulk rows (<= 0) in id order
        prio: int | None = None
        while True:
            prio = queues.next_urgent_priority(self.db, prio)
            rows = queues.peek_after(self.db, prio, self.cursor.get(prio, 0), FETCH_ROWS)
            if rows:
                self.buf, self.buf_class = rows, prio
                self.maybe_more = True
                return True
            if prio is None:
                self.maybe_more = False
                return False

    def _unsent_above(self, cls: int | None) -> bool:
        """Are there urgent rows, more urgent than class `cls`, not sent yet in this session?"""
        assert self.db is not None
        p: int | None = None
        while True:
            p = queues.next_urgent_priority(self.db, p)
            if p is None or (cls is not None and p <= cls):
                return False
            if queues.max_urgent_id(self.db, p) > self.cursor.get(p, 0):
                return True

    def _reset_sending(self) -> None:
        """Forget what was sent in this session: the next publish starts at the outbox head."""
        self.buf, self.buf_i = [], 0
        self.cursor.clear()
        self.maybe_more = True
        self.rate_wait_until = 0.0

    def _dead_letter(self, row: Row, reason: str) -> None:
        assert self.db is not None
        rid, prio, kind, topic, payload = row
        log.error("outbox row %d (%s to %s, %d bytes) dead-lettered: %s", rid, kind, topic, len(payload),
                  reason)
        queues.dead_letter_outbox(self.db, queues.OutboxRow(rid, prio, kind, topic, payload, 0), reason,
                                  "bridge")

    # -- acknowledgements ------------------------------------------------------------------
    def _handle_acks(self, now: float) -> None:
        if not self.acks:
            return
        self.last_ack = now
        self.last_ack_ms = now_ms()
        self.stall_logged = False
        self._flush_acks()

    def _flush_acks(self) -> None:
        if not self.acks:
            return
        assert self.db is not None
        ranges: list[tuple[int, int, int]] = []
        delivered = 0
        failed: list[tuple[Publish, int]] = []
        learned = 0
        for mid, reason in self.acks:
            pub = self.window.ack(mid)
            if pub is None:
                continue  # our own attribute / session-limit requests
            if reason >= 0x80:
                failed.append((pub, reason))
                continue
            ranges.append((pub.priority, pub.first_id, pub.last_id))
            delivered += pub.count
            if self.packet.acked(pub.size):
                learned = max(learned, pub.size)
        self.acks.clear()
        if ranges:
            try:
                queues.mark_delivered_ranges(self.db, ranges)
            except sqlite3.Error:
                self.needs_reset = True  # the rows stay queued: send them again from the head
                raise
            self.delivered_records += delivered
            self.retry_backoff.reset()
            self.state_dirty = True
        if learned:
            log.info("%s acknowledged a %d-byte publish: publishing up to %d bytes per packet, a single record "
                     "up to %d bytes", self.server, learned, self._max_packet(), self._alone_max())
            try:
                self._save_packet_limit()
            except sqlite3.Error as e:  # kept in memory; saved with the next change
                log.warning("cannot save the learned packet limit: %s", e)
        for pub, reason in failed:
            self._publish_refused(pub, reason)

    def _publish_refused(self, pub: Publish, reason: int) -> None:
        """MQTT 5 PUBACK >= 0x80: the rows stay; resend from the head after a pause."""
        now = time.monotonic()
        name = PERMANENT_FAILURES.get(reason, f"reason code 0x{reason:02X}")
        if reason in PERMANENT_FAILURES and pub.count == 1:
            row = (pub.first_id, pub.priority, "telemetry" if pub.telemetry else "?", pub.topic, pub.payload)
            kind = self._row_kind(pub.first_id)
            if kind is not None:
                row = (pub.first_id, pub.priority, kind, pub.topic, pub.payload)
            self._dead_letter(row, f"the server refused this record: {name} (PUBACK 0x{reason:02X})")
        elif reason == RC_PACKET_TOO_LARGE:
            self.limit_override = max(1024, pub.size // 2)
            log.warning("the server refused a %d-byte publish as too large; using at most %d bytes per "
                        "packet", pub.size, self.limit_override)
        elif reason in PERMANENT_FAILURES:
            self.isolate_upto[pub.priority] = max(self.isolate_upto.get(pub.priority, 0), pub.last_id)
            log.warning("the server refused a batch of %d records (%s); resending them one by one",
                        pub.count, name)
        delay = self.retry_backoff.next() if reason not in PERMANENT_FAILURES else 0.0
        self._log_limited(f"refused{reason}", logging.WARNING,
                          "the server did not accept a publish of %d records (%s); it stays queued, "
                          "resending in %.1f s", pub.count, name, delay)
        self._set_error(f"publish refused by the server: {name}")
        self.paused_until = max(self.paused_until, now + delay)
        self.needs_reset = True

    def _row_kind(self, rid: int) -> str | None:
        assert self.db is not None
        row = self.db.execute("SELECT kind FROM outbox WHERE id = ?", (rid,)).fetchone()
        return str(row[0]) if row else None

    # -- session limits ----------------------------------------------------------------------
    def _take_limits(self, payload: bytes) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            log.warning("getSessionLimits answer is not JSON: %r", payload[:200])
            return
        if not isinstance(data, dict) or "error" in data:
            log.info("the server does not support getSessionLimits (%r); using the configured limits",
                     payload[:200])
            return
        self._apply_limits(data, persist=True)

    def _apply_limits(self, data: dict[str, Any], persist: bool) -> None:
        mps, mim, rates = data.get("maxPayloadSize"), data.get("maxInflightMessages"), data.get("rateLimits")
        self.server_max_packet = _positive_int(mps)
        if persist and self.packet.active and self.server_max_packet != self.packet_announced:
            # the server says what it accepts: that beats what we guessed from closed sessions
            log.info("%s announced its session limits: forgetting the packet limit learned from closed "
                     "sessions (%s bytes)", self.server, self.packet.learned)
            self.packet.forget()
            self._save_packet_limit()
        self.server_inflight = _positive_int(mim)
        self.server_rates = rates if isinstance(rates, dict) else None
        self.limiter = RateLimiter.build(self.cfg_rate, self.server_rates)
        self.window.size = self._inflight_size()
        if persist:
            log.info("session limits from %s: max payload %s bytes, max in flight %s, rate limits %s",
                     self.server, mps, mim, json.dumps(rates))
            assert self.db is not None
            with transaction(self.db):
                queues.set_state(self.db, "bridge.session_limits", {"server": self.server, "limits": {
                    "maxPayloadSize": self.server_max_packet, "maxInflightMessages": self.server_inflight,
                    "rateLimits": self.server_rates}})

    def _hard_max_packet(self) -> int:
        """The announced (or configured) maximum, and what MQTT 5 "packet too large" taught us."""
        limit = self.server_max_packet or self.cfg_max_packet
        if self.limit_override:
            limit = min(limit, self.limit_override)
        return limit

    def _max_packet(self) -> int:
        """Largest packet to build from several records."""
        return self.packet.limit(self._hard_max_packet())

    def _alone_max(self) -> int:
        """Largest packet to try for a single record on its own."""
        return self.packet.alone_limit(self._hard_max_packet())

    def _oversized_reason(self, p: Oversized) -> str:
        if self.packet.ceiling is None or p.limit >= self._hard_max_packet():
            return p.reason
        return (f"record needs a {p.size}-byte MQTT packet; {self.server} closed the connection on every "
                f"attempt to publish a {self.packet.ceiling + 1}-byte record (its limit appears to be below "
                f"{self.packet.ceiling + 1} bytes)")

    # -- the packet limit learned from closed sessions ---------------------------------------
    def _load_packet_limit(self) -> None:
        assert self.db is not None
        saved = queues.get_state(self.db, PACKET_LIMIT_KEY)
        if not isinstance(saved, dict) or saved.get("server") != self.server:
            return
        if saved.get("configured") != self.cfg_max_packet:
            log.info("thingsboard.max_packet_bytes changed: forgetting the packet limit learned from %s",
                     self.server)
            return
        self.packet.restore(_positive_int(saved.get("limit")), _positive_int(saved.get("ceiling")))
        self.packet_announced = _positive_int(saved.get("announced"))
        if self.packet.active:
            log.info("using the packet limit learned from %s: %s bytes per packet, a single record up to %s bytes",
                     self.server, self._max_packet(), self._alone_max())

    def _save_packet_limit(self) -> None:
        assert self.db is not None
        value: dict[str, Any] | None = None
        if self.packet.active:
            self.packet_announced = self.server_max_packet
            value = {"server": self.server, "configured": self.cfg_max_packet,
                     "announced": self.server_max_packet, "limit": self.packet.learned,
                     "ceiling": self.packet.ceiling, "acked": self.packet.acked_max, "ms": now_ms()}
        with transaction(self.db):
            queues.set_state(self.db, PACKET_LIMIT_KEY, value)
        self.state_dirty = True

    def _judge_loss(self, reason: str, now: float) -> None:
        """The server ended the session with publishes unacknowledged: was one of them too large?"""
        inflight = [item.pub for item in self.window.items.values()]
        limit = self._max_packet()
        v = self.packet.lost(inflight, limit, now)
        log.debug("session lost with %d publishes unacknowledged (largest %d bytes, %d records; largest "
                  "acknowledged %d bytes; %d lost in a row): %s", len(inflight), v.size, v.pub.count,
                  self.packet.acked_max, v.losses, v.action)
        if v.distrusted:
            log.warning("no PUBACK from %s across %d lost sessions: packets of %d bytes it accepted before "
                        "may no longer be accepted; learning its packet limit again", self.server,
                        v.losses, v.distrusted)
        if v.action == SHRINK:
            said = (f", although it announced {self.server_max_packet} bytes" if self.server_max_packet
                    else " (it does not answer getSessionLimits)")
            log.warning("%s closed the session %d times in a row with a %d-byte publish in flight and no "
                        "PUBACK (last: %s); the largest publish it acknowledged is %d bytes, so its maximum "
                        "packet appears to be below %d bytes%s: publishing at most %d bytes per packet from "
                        "now on", self.server, v.losses, v.size, reason, self.packet.acked_max, limit, said,
                        v.limit)
            self._save_packet_limit()
        elif v.action == ISOLATE:
            pub = v.pub
            self.isolate_upto[pub.priority] = max(self.isolate_upto.get(pub.priority, 0), pub.last_id)
            log.warning("%s closed the session %d times in a row with a %d-byte publish of %d records in "
                        "flight and no PUBACK, and the packet limit is at its floor (%d bytes): sending "
                        "those records one by one", self.server, v.losses, v.size, pub.count, limit)
        elif v.action == DEAD_LETTER:
            self._dead_letter_lost(v)
            self._save_packet_limit()

    def _dead_letter_lost(self, v: LossVerdict) -> None:
        pub = v.pub
        kind = self._row_kind(pub.first_id)
        if kind is None:
            return  # already gone
        self._dead_letter((pub.first_id, pub.priority, kind, pub.topic, pub.payload),
                          f"{self.server} closed the connection without PUBACK on every attempt to publish "
                          f"this record alone ({v.size}-byte MQTT packet); its packet limit appears to be "
                          f"below {v.size} bytes")

    def _inflight_size(self) -> int:
        return min(self.cfg_inflight, self.server_inflight) if self.server_inflight else self.cfg_inflight

    # -- provisioning ------------------------------------------------------------------------
    def _handle_prov_answer(self, now: float) -> None:
        answer, self.prov_answer = self.prov_answer, None
        assert answer is not None
        try:
            creds = provisioning.parse_response(answer)
        except ProvisioningError as e:
            self._provisioning_failed(str(e), now)
            return
        redact.register([creds.username, creds.password, creds.client_id])
        provisioning.save(self.cfg.credentials_file, creds, self.device_name)
        log.info("device '%s' provisioned; credentials saved to %s", self.device_name,
                 self.cfg.credentials_file)
        self.prov_backoff.reset()
        self._close()
        self.phase = IDLE
        self.retry_at = now
        self.waiting_for = ""
        self.last_error = None
        self.state_dirty = True

    def _provisioning_failed(self, reason: str, now: float) -> None:
        delay = self.prov_backoff.next()
        self._close()
        self.phase = IDLE
        self.retry_at = now + delay
        self.waiting_for = f"provisioning failed: {reason}"
        log.error("provisioning of device '%s' at %s failed: %s; retrying in %.0f s", self.device_name,
                  self.server, reason, delay)
        self._set_error(f"provisioning failed: {reason}")

    # -- failures ------------------------------------------------------------------------------
    def _close(self) -> None:
        if self.conn is not None:
            if self.phase in (ONLINE, PROV_WAIT):
                self.conn.disconnect()
            self.conn.close()
            self.conn = None

    def _forget_session(self) -> None:
        self.window.clear()
        self.acks.clear()
        self._reset_sending()
        self.needs_reset = False
        self.paused_until = 0.0
        self.limits_req = None
        self.limits_answer = None
        if self.connected_since_ms is not None:
            self.connected_since_ms = None
            self.state_dirty = True

    def _drop(self, reason: str, now: float, level: int | None = logging.WARNING) -> None:
        """Close the session after a failure (no DISCONNECT packet) and forget in-flight state."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        was = self.phase
        self.phase = IDLE
        self._forget_session()
        self._set_error(reason)
        self._write_state(force=True)
        if was == ONLINE and level is not None:
            log.log(level, "%s", reason)

    def _lost(self, reason: str, now: float) -> None:
        if self.phase == PROV_WAIT:
            # connected and asked, then closed without an answer: not a tight loop
            self._drop(reason, now, None)
            self._provisioning_failed(reason, now)
            return
        if self.phase == ONLINE and len(self.window):
            try:
                self._judge_loss(reason, now)
            except sqlite3.Error as e:  # the verdict is kept in memory; it is saved with the next one
                log.warning("cannot save the learned packet limit: %s", e)
        self._drop(reason, now, None)
        self._transport_failed(reason, now)

    def _transport_failed(self, reason: str, now: float) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.phase = IDLE
        self._forget_session()
        delay = self.reconnect.next()
        self.retry_at = now + delay
        self.waiting_for = f"disconnected: {reason}"
        self._log_limited("transport:" + reason, logging.WARNING, "%s; reconnecting in %.1f s", reason, delay)
        self._set_error(reason)
        self._write_state(force=True)

    # -- state for gatewayctl --------------------------------------------------------------------
    def _set_error(self, text: str) -> None:
        if text != self.last_error:
            self.last_error = text
            self.state_dirty = True
            if self.db is not None:
                queues.record_error(self.db, "bridge", text)

    def _write_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.db is None or not (force or (self.state_dirty and now - self.state_written >= STATE_EVERY_S)):
            return
        connected = self.phase == ONLINE
        value = {"connected": connected, "since_ms": self.connected_since_ms if connected else None,
                 "last_puback_ms": self.last_ack_ms, "last_error": self.last_error, "server": self.server,
                 "device_name": self.device_name, "mqtt_version": "5" if self.mqtt5 else "3.1.1",
                 "max_packet_bytes": self._max_packet()}
        with transaction(self.db):
            queues.set_state(self.db, "bridge.mqtt", value)
        self.state_dirty = False
        self.state_written = now

    def _log_limited(self, key: str, level: int, msg: str, *args: Any) -> None:
        """Log a repeating condition at most once a minute."""
        now = time.monotonic()
        if now - self._last_log.get(key, float("-inf")) >= 60.0:
            self._last_log[key] = now
            log.log(level, msg, *args)
        else:
            log.debug(msg, *args)
