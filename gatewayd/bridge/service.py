"""The bridge: the one MQTT session to ThingsBoard, driven from the Runner's loop.

This module is the connection and provisioning state machine. One `step()` = one `loop()` call
on the paho client (no paho thread), then the work its callbacks announced: CONNACKs,
provisioning answers, timeouts, and the sender's (`sender.py`: outbox → PUBLISH, PUBACK →
delete) and the server limits' (`limits.py`: getSessionLimits, the learned packet limit, rate
limits). A stuck loop therefore stops the watchdog pings, and so does a broker that takes
publishes but never acknowledges them (`stall_timeout_s`).

Every way a session ends — stop, lost connection, refused CONNACK, provisioning done or failed,
a store failure — goes through `_teardown`, which closes the client, lets the packet limit judge
what was in flight, forgets the session and says when to try again.

Inbound: every message is written to the inbound table inside `on_message`, which paho runs
before it sends the PUBACK; if the write fails the exception leaves the loop before the PUBACK
is written and the session is dropped.
"""

from __future__ import annotations

import hashlib
import logging
import select
import sqlite3
import time
from typing import Any

from gatewayd import redact, topics
from gatewayd.bridge import provisioning
from gatewayd.bridge.connector import ConnectError, Connector, Resolver, tls_context
from gatewayd.bridge.limits import ServerLimits
from gatewayd.bridge.mqtt_compat import PAHO_VERSION, Connection, is_auth_failure
from gatewayd.bridge.provisioning import Backoff, Credentials, ProvisioningError
from gatewayd.bridge.publisher import DEAD_LETTER, ISOLATE, PROBE, Publish
from gatewayd.bridge.sender import POLL_S, WAIT_S, Sender
from gatewayd.bridge.storefault import StoreFault
from gatewayd.clock import now_ms
from gatewayd.config import Config
from gatewayd.inotify import DirectoryWatch
from gatewayd.log import Throttle
from gatewayd.store import queues

log = logging.getLogger("gatewayd.bridge")

ALWAYS_SHARED = ["sw_title", "sw_version", "FILES"]
ALWAYS_CLIENT = ["FILE_HASHES"]

IDLE, CONNECTING, ONLINE = "idle", "connecting", "online"
PROV_CONNECTING, PROV_WAIT = "prov-connecting", "prov-wait"

RECONNECT_INITIAL_S = 0.5  # the first retry after a transport failure comes within this
IDLE_STEP_S = 1.0        # longest sleep while waiting to reconnect (status and watchdog keep going)
CONNACK_TIMEOUT_S = 30.0
NO_CREDENTIALS_RECHECK_S = 60.0
STATE_EVERY_S = 1.0
RESOLVE_POLL_S = 0.05    # how often the loop looks whether the DNS lookup has finished


class Bridge:
    name = "bridge"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        tb = cfg["thingsboard"]
        self.host: str = tb["host"]
        self.port: int = tb["port"]
        self.server = f"{self.host}:{self.port}"
        self.mqtt5: bool = tb["mqtt_version"] == "5"
        self.keepalive: int = tb["keepalive_s"]
        self.connect_timeout: float = tb["connect_timeout_s"]
        self.stall_timeout: float = tb["stall_timeout_s"]
        self.auth_backoff_s: float = tb["auth_backoff_s"]
        self.device_name = cfg.device_name()
        self.reconnect = Backoff(RECONNECT_INITIAL_S, tb["reconnect_max_s"], full_jitter=True)
        self.prov_backoff = Backoff(provisioning.BACKOFF_INITIAL_S, provisioning.BACKOFF_MAX_S)
        self.limits = ServerLimits(self.server, tb["max_packet_bytes"], tb["max_inflight"], tb["rate_limit_per_s"])
        self.throttle = Throttle(log)

        self.db: sqlite3.Connection | None = None
        self.sender: Sender | None = None
        self.watch: DirectoryWatch | None = None
        self.conn: Connection | None = None
        self.connector: Connector | None = None
        self.resolver = Resolver()
        self.phase = IDLE
        self.creds: Credentials | None = None
        self.retry_at = 0.0
        self.deadline = 0.0
        self.waiting_for = ""   # why we are not connected (for STATUS=)
        self.connack: tuple[int, str] | None = None
        self.lost_reason = ""
        self.prov_answer: bytes | None = None
        self.prov_request = ""
        self.req_seq = int(time.time()) % 100000 * 100

        self.connected_since_ms: int | None = None
        self.last_error: str | None = None
        self.stall_logged = False
        self.state_dirty = True
        self.state_written = 0.0
        self.store = StoreFault(cfg.queues_db, cfg.state_dir)
        self.sender_file: tuple[int, int] | None = None  # the queues.db the sender works on
        self.inbound_failed = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        log.info("bridge for device '%s' to %s (MQTT %s, TLS %s, paho-mqtt %s)", self.device_name,
                 self.server, "5" if self.mqtt5 else "3.1.1", "on" if self.cfg["thingsboard"]["tls"] else "off",
                 PAHO_VERSION)
        try:
            self.cfg.ensure_dirs()
            # every commit to queues.db appends to queues.db-wal in the state directory
            self.watch = DirectoryWatch(self.cfg.state_dir)
        except OSError as e:
            log.warning("inotify unavailable (%s); polling the outbox every %.0f ms", e, POLL_S * 1000)
            self.watch = None
        self._use_store(time.monotonic(), check=True)

    def _use_store(self, now: float, check: bool = False) -> bool:
        """(Re)open queues.db and write the connection state, the proof that it takes writes.

        True when it did; otherwise the fault is reported and the next try scheduled."""
        if self.store.waiting(now):
            return False
        try:
            self.db = None
            self.db = self.store.open(check)
            if self.sender_file != self.store.tracked.identity:
                # Another file (replaced, or a damaged one moved aside): the sender's cursors, caps and
                # refusal counts name rows of the old one.
                self.sender = None
            if self.sender is None:
                self.limits.restore(self.db)
                self.sender = Sender(self.db, self.limits, self._set_error)
                self.sender.resize()
                self.sender_file = self.store.tracked.identity
            self.sender.db = self.db
            self._write_state(force=True)
        except (sqlite3.Error, OSError) as e:
            self.store.failed(e, now, "state database unavailable")
            self._set_error(str(self.store.text))
            return False
        self.store.clear(now)
        return True

    def _replaced(self, now: float) -> None:
        """queues.db is another file now (moved aside, restored): the rows in flight name ids of the old
        file, so the session ends without deleting anything, and the new file is used from its head."""
        self.db = None
        self._teardown(None, 0.0)
        self.store.retry_at = 0.0
        self._use_store(now)

    def _store_failed(self, e: sqlite3.Error, now: float) -> None:
        """A database call failed mid-session: close the session and retry the store (storefault.py)."""
        what = ("cannot store an inbound message (not acknowledged)" if self.inbound_failed
                else "state database unavailable")
        self.inbound_failed = False
        self.store.failed(e, now, what)
        self._teardown(None, 0.0)
        self._set_error(str(self.store.text))

    def stop(self) -> None:
        self._teardown(None, 0.0, graceful=True)
        self.store.tracked.close()
        self.db = None
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    def health(self) -> dict[str, Any]:
        """The fault the bridge waits out and the queues.db it has open, for the runtime status file
        (outside the database, which may take no writes)."""
        return {"fault": self.store.text,
                "files": {"queues.db": self.store.tracked.identity}}

    def report_error(self, text: str) -> None:
        self._set_error(text)

    def report_status(self, text: str) -> None:
        self.store.store_status(text)

    def status(self) -> str:
        now = time.monotonic()
        if self.store.faulted:
            return self.store.status(now)
        if self.phase == ONLINE and self.sender is not None:
            owed = self.sender.owed
            rows = self.sender.outbox_rows
            if owed:
                return f"stalled: no PUBACK for {owed:.0f} s (outbox {rows})"
            return (f"connected to {self.server} (MQTT {'5' if self.mqtt5 else '3.1.1'}): outbox "
                    f"{rows}, {self.sender.window.records} in flight, {self.sender.delivered} delivered")
        if self.phase in (PROV_CONNECTING, PROV_WAIT):
            return f"provisioning device '{self.device_name}' at {self.server}"
        if self.phase == CONNECTING:
            return f"connecting to {self.server} ({self.connector.phase if self.connector else 'MQTT CONNECT'})"
        left = max(0.0, self.retry_at - now)
        return f"{self.waiting_for or 'disconnected'}; retrying in {left:.0f} s"

    # -- the loop --------------------------------------------------------------------------
    def step(self) -> tuple[bool, float]:
        now = time.monotonic()
        if self.store.tracked.follow(self.name):
            self._replaced(now)
        if self.store.faulted and not self._use_store(now):
            return True, min(max(0.0, self.store.retry_at - now), IDLE_STEP_S)
        try:
            return self._step(now)
        except sqlite3.Error as e:
            self._store_failed(e, time.monotonic())
            return True, 0.0

    def _step(self, now: float) -> tuple[bool, float]:
        if self.conn is None:
            if now < self.retry_at:
                self._write_state()
                return True, min(self.retry_at - now, IDLE_STEP_S)
            self._open(now)
            return True, 0.0
        if self.connector is not None:
            return self._step_connecting(now)

        conn = self.conn
        assert self.sender is not None
        try:
            rc = self._wait_and_loop(conn, self._loop_timeout(now))
        except (OSError, ValueError) as e:
            rc = -1
            self.lost_reason = self.lost_reason or f"{type(e).__name__}: {e}"
        now = time.monotonic()
        if self.sender.acks:
            self.stall_logged = False
            self.sender.handle_acks(now)
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
            return self._online(now), 0.0
        self._write_state()
        return True, 0.0

    def _online(self, now: float) -> bool:
        assert self.sender is not None and self.db is not None
        if self.limits.poll(now, self.db):
            self.sender.resize()
        self.sender.fill(now)
        if self.sender.failure:
            self.lost_reason = self.lost_reason or self.sender.failure
        if self.sender.changed:
            self.sender.changed = False
            self.state_dirty = True
        owed = self.sender.stalled(now, self.stall_timeout)
        if owed and not self.stall_logged:
            self.stall_logged = True
            log.error("stalled: connected to %s but no PUBACK for %.0f s with %d records queued and %d publishes "
                      "in flight; no longer feeding the watchdog", self.server, owed, self.sender.outbox_rows,
                      len(self.sender.window))
            self._set_error(f"stalled: no PUBACK for {owed:.0f} s")
        self._write_state()
        return not owed

    def _loop_timeout(self, now: float) -> float:
        if self.phase != ONLINE or self.sender is None:
            return WAIT_S
        return self.sender.wait_timeout(now, self.watch is not None)

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
            self.throttle.log("badcreds", logging.ERROR, "saved credentials unusable: %s", e)
            return None

    def _new_connection(self, client_id: str, username: str, password: str | None) -> Connection:
        conn = Connection(client_id, self.mqtt5, username=username or None, password=password,
                          inflight=self.limits.client_inflight())
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
            self.waiting_for = ("no credentials: no access token configured, none saved in "
                                f"{self.cfg.credentials_file}, and no provisioning key")
            self.throttle.log("nocreds", logging.ERROR, "%s", self.waiting_for)
            self._set_error(self.waiting_for)
            self.retry_at = now + NO_CREDENTIALS_RECHECK_S
            return
        if creds is None:  # X.509 device: the certificate is the credential, no token
            creds = Credentials("", source="certificate")
        self.creds = creds
        client_id = creds.client_id or "gatewayd-" + hashlib.sha1(
            f"{self.device_name}@{self.server}".encode()).hexdigest()[:12]
        self._connect(self._new_connection(client_id, creds.username, creds.password), CONNECTING, now)

    def _start_provisioning(self, now: float) -> None:
        tb = self.cfg["thingsboard"]
        log.info("no access token and no saved credentials: provisioning device '%s' at %s",
                 self.device_name, self.server)
        self.prov_request = provisioning.request_payload(self.device_name, tb["provision_device_key"],
                                                         tb["provision_device_secret"])
        conn = self._new_connection(provisioning.client_id_for_provisioning(), topics.PROVISION_USERNAME,
                                    None)
        self._connect(conn, PROV_CONNECTING, now)

    def _connect(self, conn: Connection, phase: str, now: float) -> None:
        """Start opening the transport; `_step_connecting` finishes it without blocking the loop."""
        self.conn = conn
        self.phase = phase
        tb = self.cfg["thingsboard"]
        try:
            ctx = tls_context(tb["ca_cert"], tb["client_cert"], tb["client_key"]) if tb["tls"] else None
            self.connector = Connector(self.host, self.port, ctx, self.connect_timeout, self.resolver, now)
        except (OSError, ValueError) as e:  # unreadable CA or client certificate; a socket we cannot open
            self._transport_failed(f"cannot connect to {self.server}: {e}", now)

    def _step_connecting(self, now: float) -> tuple[bool, float]:
        """Wait a little for the transport, advance it, and send CONNECT once it is open."""
        assert self.connector is not None and self.conn is not None
        rlist, wlist = self.connector.wait_fds()
        if rlist or wlist:
            try:
                select.select(rlist, wlist, [], max(0.0, min(WAIT_S, self.connector.deadline - now)))
            except (OSError, ValueError):
                pass
            now = time.monotonic()
        try:
            sock = self.connector.poll(now)
        except ConnectError as e:
            self._transport_failed(str(e), now)
            return True, 0.0
        if sock is None:
            # nothing to wait on while the DNS lookup runs in its thread: look again soon
            return True, 0.0 if rlist or wlist else RESOLVE_POLL_S
        self.connector = None
        self.deadline = now + CONNACK_TIMEOUT_S
        try:
            self.conn.connect(self.host, self.port, self.keepalive, sock)
        except (OSError, ValueError) as e:
            sock.close()
            self._transport_failed(f"cannot connect to {self.server}: {e}", now)
        return True, 0.0

    def _handle_connack(self, now: float) -> None:
        assert self.connack is not None and self.conn is not None
        code, text = self.connack
        self.connack = None
        if self.phase == PROV_CONNECTING:
            if code != 0:
                self._provisioning_failed(f"the server refused the provisioning connection: {text}", now)
                return
            self.conn.subscribe([topics.TOPIC_PROVISION_RESPONSE])
            self.conn.publish(topics.TOPIC_PROVISION_REQUEST, self.prov_request)
            self.phase = PROV_WAIT
            self.deadline = now + provisioning.RESPONSE_TIMEOUT_S
            return
        if code == 0:
            self._online_start(now)
        elif is_auth_failure(code):
            what = self.creds.describe() if self.creds else "credentials"
            reason = f"{self.server} refused {what}: {text}"
            self._teardown(reason, self.auth_backoff_s, waiting_for=reason, level=logging.ERROR)
            log.error("%s; check thingsboard.access_token or %s; retrying in %.0f s", reason,
                      self.cfg.credentials_file, self.auth_backoff_s)
        else:
            self._lost(f"{self.server} refused the connection: {text}", now)

    def _online_start(self, now: float) -> None:
        assert self.conn is not None and self.sender is not None
        self.phase = ONLINE
        self.reconnect.reset()
        self.connected_since_ms = now_ms()
        self.stall_logged = False
        self.waiting_for = ""
        self.limits.reprobe()
        self.sender.begin(self.conn.publish, now)
        log.info("connected to %s as device '%s' (%s, MQTT %s)", self.server, self.device_name,
                 self.creds.describe() if self.creds else "?", "5" if self.mqtt5 else "3.1.1")
        self.last_error = None
        self.state_dirty = True
        self.conn.subscribe(list(topics.SUBSCRIPTIONS))
        self._request_attributes()
        self.req_seq += 1
        self.conn.publish(*self.limits.request(self.req_seq, now))
        self._write_state(force=True)

    def _request_attributes(self) -> None:
        assert self.conn is not None
        tb = self.cfg["thingsboard"]
        shared = list(dict.fromkeys(ALWAYS_SHARED + list(tb["shared_keys"])))
        client = list(dict.fromkeys(ALWAYS_CLIENT + list(tb["client_keys"])))
        self.req_seq += 1
        request = topics.attributes_request(self.req_seq, shared, client)
        if request is not None:
            self.conn.publish(*request)

    # -- callbacks (run inside conn.loop()) -----------------------------------------------
    def _on_connect(self, code: int, text: str) -> None:
        self.connack = (code, text)

    def _on_disconnect(self, code: int, text: str) -> None:
        if code != 0 and not self.lost_reason:
            self.lost_reason = f"connection lost: {text}"

    def _on_publish(self, mid: int, reason: int) -> None:
        if self.sender is not None:
            self.sender.on_puback(mid, reason)

    def _on_message(self, topic: str, payload: bytes, qos: int) -> None:
        if self.phase == PROV_WAIT or self.phase == PROV_CONNECTING:
            if topic == topics.TOPIC_PROVISION_RESPONSE:
                self.prov_answer = payload
            return
        if self.limits.is_answer(topic):
            self.limits.answer = payload
            return
        assert self.db is not None
        # Durable before acknowledged: paho sends the PUBACK only after this returns; an exception
        # leaves paho's loop before the PUBACK is written, and the session is closed (`_store_failed`).
        try:
            queues.put_inbound(self.db, topic, payload)
        except sqlite3.Error:
            self.inbound_failed = True
            raise

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
        self._teardown(None, 0.0, graceful=True)
        self.last_error = None
        self.state_dirty = True

    def _provisioning_failed(self, reason: str, now: float) -> None:
        delay = self.prov_backoff.next()
        log.error("provisioning of device '%s' at %s failed: %s; retrying in %.0f s", self.device_name,
                  self.server, reason, delay)
        self._teardown(f"provisioning failed: {reason}", delay, waiting_for=f"provisioning failed: {reason}",
                       graceful=True)

    # -- failures ------------------------------------------------------------------------------
    def _lost(self, reason: str, now: float) -> None:
        if self.phase == PROV_WAIT:
            # connected and asked, then closed without an answer: not a tight loop
            self._provisioning_failed(reason, now)
        else:
            self._transport_failed(reason, now)

    def _transport_failed(self, reason: str, now: float) -> None:
        delay = self.reconnect.next()
        self.throttle.log("transport:" + reason, logging.WARNING, "%s; reconnecting in %.1f s", reason, delay)
        self._teardown(reason, delay, waiting_for=f"disconnected: {reason}", judge=True)

    def _teardown(self, reason: str | None, retry_in: float, *, waiting_for: str = "", graceful: bool = False,
                  judge: bool = False, level: int | None = None) -> None:
        """End the session, however it ends: close the client, let the packet limit judge what was in
        flight (`judge`), forget the session, and try again in `retry_in` seconds.

        `graceful` sends DISCONNECT first; `level` logs `reason` when the session was online.
        """
        was, conn, now = self.phase, self.conn, time.monotonic()
        self.conn = None
        self.phase = IDLE
        if self.connector is not None:
            self.connector.close()
            self.connector = None
        if conn is not None:
            if graceful and was in (ONLINE, PROV_WAIT):
                conn.disconnect()
            conn.close()
        # a failed database is not asked again (each try may wait on a lock); a replaced one is another file
        usable = not self.store.faulted and self.db is not None
        if self.sender is not None:
            lost = self.sender.end(flush=usable)
            if judge and was == ONLINE and lost and usable:
                self._judge(lost, reason or "", now)
        self.limits.forget_request()
        if self.connected_since_ms is not None:
            self.connected_since_ms = None
            self.state_dirty = True
        self.retry_at = now + retry_in
        self.waiting_for = waiting_for
        if level is not None and was == ONLINE and reason:
            log.log(level, "%s", reason)
        if reason:
            self._set_error(reason)
        if usable:
            try:
                self._write_state(force=True)
            except sqlite3.Error as e:
                log.warning("cannot record the connection state: %s", e)

    def _judge(self, lost: list[Publish], reason: str, now: float) -> None:
        assert self.db is not None and self.sender is not None
        v = self.limits.judge_loss(lost, reason, now, self.db)
        try:
            if v.action == PROBE:
                self.sender.probe = True
            elif v.action == ISOLATE:
                self.sender.isolate(v.pub)
            elif v.action == DEAD_LETTER:
                self.sender.dead_letter_lost(v)
        except sqlite3.Error as e:
            log.warning("cannot dead-letter the record the server refuses: %s", e)

    # -- state for gatewayctl --------------------------------------------------------------------
    def _set_error(self, text: str) -> None:
        if text != self.last_error:
            self.last_error = text
            self.state_dirty = True
            self.store.record(text)

    def _write_state(self, force: bool = False) -> None:
        now = time.monotonic()
        dirty = self.state_dirty or self.limits.packet.dirty
        if self.db is None or not (force or (dirty and now - self.state_written >= STATE_EVERY_S)):
            return
        connected = self.phase == ONLINE
        value = {"connected": connected, "since_ms": self.connected_since_ms if connected else None,
                 "last_puback_ms": self.sender.last_ack_ms if self.sender else None,
                 "last_error": self.last_error, "server": self.server,
                 "device_name": self.device_name, "mqtt_version": "5" if self.mqtt5 else "3.1.1",
                 "max_packet_bytes": self.limits.max_packet()}
        queues.save_state(self.db, "bridge.mqtt", value)
        self.limits.save_if_changed(self.db)
        self.state_dirty = False
        self.state_written = now
