"""The supervisor's main loop: commands from ThingsBoard, controller supervision, telemetry.

One iteration (never blocking on Docker, git, builds or commands — those run in the
controller thread or in background jobs):
1. take new rows from the inbound table: RPC requests, shared-attribute updates and
   attribute responses, OTA chunks; answer or hand over each durably (rpc.py, store/rpc.py);
2. finish RPCs whose background work is done, or answer "running" at the RPC deadline;
3. drive the software update (updates.py) and the remote files (files.py);
4. poll udev for hot-plugged devices;
5. every `telemetry_interval_s`, queue device telemetry (with the ledger and queue figures);
   keep "supervisor.controller" in the state table fresh for `gatewayctl status`.

A failing `queues.db` (full disk, lock, read-only, I/O) is waited out like in every daemon
(`store.faults`): the loop goes on feeding the watchdog, the fault is reported once and retried
with a bounded backoff, and nothing is lost meanwhile — an RPC reply waits in `rpc.py`, what the
components queue for ThingsBoard or the state table waits here in order (`_write`), and inbound
rows stay where they are until they can be answered. A `queues.db` replaced under the supervisor
is followed by its file identity.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd import __version__, topics
from gatewayd.clock import now_ms
from gatewayd.config import Config
from gatewayd.packet import PUBLISH_OVERHEAD
from gatewayd.store import controller as controller_store
from gatewayd.store import figures, queues
from gatewayd.store import rpc as ledger
from gatewayd.store.db import Tracked, transaction
from gatewayd.store.errors import Fault, classify, describe
from gatewayd.store.faults import FaultState, keep_connection
from gatewayd.supervisor import commands
from gatewayd.supervisor.controller import ControllerManager
from gatewayd.supervisor.files import CONTENT_PREFIX, FILES_KEY, HASHES_KEY, FileManager
from gatewayd.supervisor.jobs import Jobs, Serial
from gatewayd.supervisor.rpc import RpcLifecycle, json_text
from gatewayd.supervisor.system import DeviceReporter, Devices, system_metrics
from gatewayd.supervisor.updates import SW_KEYS, Phase, UpdateManager

log = logging.getLogger("gatewayd.supervisor")

INBOUND_BATCH = 100
STATE_EVERY_S = 0.5
STATE_REFRESH_S = 30.0
FILES_STATE = "supervisor.files"
CONTROLLER_STATE = "supervisor.controller"
QUEUES = "queues.db"
BACKLOG_MAX = 10_000     # writes kept while queues.db fails; beyond it the oldest are dropped (logged)

Write = Callable[[sqlite3.Connection], object]


@dataclass
class Counters:
    attributes: int = 0
    chunks: int = 0
    dead_letters: int = 0


class Supervisor:
    """The daemon's service: wiring, inbound routing, controller state and telemetry.

    Every component is built here (or handed in: `controller`, `devices`), so nothing is
    swapped after construction; `start()` only opens the database and loads saved state.
    """

    name = "supervisor"

    def __init__(self, cfg: Config, *, controller: ControllerManager | None = None,
                 devices: Devices | None = None):
        self.cfg = cfg
        self.q = Tracked(cfg.queues_db, queues.open_queues)
        self.faults = FaultState(self.name, log, cfg.state_dir, lambda: None if self.faults.faulted else self.q.conn)
        self.q_file: tuple[int, int] | None = None  # the queues.db the RPC ids known here belong to
        self.backlog: deque[Write] = deque()
        self.backlog_dropped = 0
        self._write_error: sqlite3.Error | None = None
        self.jobs = Jobs()
        self.counters = Counters()
        self.started_mono = time.monotonic()
        self.max_packet: int = cfg["thingsboard"]["max_packet_bytes"]
        self.telemetry_every: float = cfg["supervisor"]["telemetry_interval_s"]
        self.files_every: float = cfg["files"]["check_interval_s"]
        self.next_telemetry = 0.0
        self.next_files = 0.0
        self.next_state = 0.0
        self._last_state_doc: dict[str, Any] | None = None
        self._state_refresh_at = 0.0
        self._attr_request_seq = now_ms() % 1_000_000_000

        if controller is None and cfg["controller"]["enabled"]:
            controller = ControllerManager(cfg)
        self.controller = controller
        self.updates = UpdateManager(cfg, controller, self.jobs, self.get_state, self.set_state,
                                     self.publish_telemetry, self.enqueue_raw)
        max_value = self.max_packet - PUBLISH_OVERHEAD - len(topics.TOPIC_ATTRIBUTES) - 64
        self.files = FileManager(cfg.allowed_roots(), max_value, self.publish_attributes,
                                 self.request_attributes, self.restart_controller,
                                 lambda st: self.set_state(FILES_STATE, st),
                                 max_file_bytes=cfg["files"]["max_file_bytes"],
                                 variables={"CONTROLLER_DATA_DIR": str(cfg.controller_data_dir),
                                            **cfg["files"]["path_variables"]},
                                 runner=Serial("files"))
        self.devices = devices if devices is not None else Devices(cfg["supervisor"]["udev"])
        self.device_reporter = DeviceReporter(self.devices, cfg["controller"]["restart_on_device"], self.max_packet,
                                              self.publish_attributes,
                                              self.restart_controller if controller is not None else None)
        ctx = commands.Context(
            cfg=cfg, jobs=self.jobs, controller=controller, uptime_s=self.uptime_s,
            status_report=self.status_report, sw_report=self.updates.report, init_files=self.files.init_files,
            devices=lambda: {"devices": self.devices.devices, "monitoring": self.devices.enabled},
            reply_budget=self.reply_budget())
        self.rpc = RpcLifecycle(cfg, ctx, self._db, self.jobs, self.publish_telemetry, self.report_error)

    # -- helpers used by components ----------------------------------------------------
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_mono

    def reply_budget(self) -> int:
        return self.max_packet - PUBLISH_OVERHEAD - len(topics.TOPIC_RPC_RESPONSE) - 24

    @property
    def conn(self) -> sqlite3.Connection | None:
        return self.q.conn

    def _db(self) -> sqlite3.Connection:
        if self.q.conn is None:
            raise sqlite3.OperationalError(f"{self.cfg.queues_db} is not open")
        return self.q.conn

    def get_state(self, key: str) -> Any:
        return queues.get_state(self._db(), key)

    def set_state(self, key: str, value: Any) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                queues.set_state(conn, key, value)
        self._write(write)

    def publish_telemetry(self, values: dict[str, Any], priority: int = queues.PRIO_ATTRIBUTES) -> None:
        ts = now_ms()
        payload = json_text({"ts": ts, "values": values})
        self._write(lambda c: queues.enqueue(c, queues.KIND_TELEMETRY, topics.TOPIC_TELEMETRY, payload, priority,
                                             ts=ts))

    def publish_attributes(self, values: dict[str, Any]) -> None:
        payload = json_text(values)
        self._write(lambda c: queues.enqueue(c, queues.KIND_ATTRIBUTES, topics.TOPIC_ATTRIBUTES, payload,
                                             queues.PRIO_ATTRIBUTES))

    def enqueue_raw(self, topic: str, payload: str) -> None:
        self._write(lambda c: queues.enqueue(c, queues.KIND_RAW, topic, payload, queues.PRIO_ATTRIBUTES))

    # -- writes that wait out a failing queues.db -------------------------------------------
    def _write(self, op: Write) -> None:
        """A write the components must not lose (outbox, state table): done now, or — while queues.db
        fails — kept, in order, and done once it takes writes again (`_flush_backlog`)."""
        if not self.backlog and self._write_error is None and self.q.conn is not None:
            try:
                self._apply(op, self.q.conn)
                return
            except sqlite3.Error as e:
                self._write_error = e  # the step ends in the fault handling
        if len(self.backlog) >= BACKLOG_MAX:
            self.backlog.popleft()
            self.backlog_dropped += 1
            if self.backlog_dropped == 1:
                log.error("queues.db has been failing for a while: more than %d messages and state updates wait "
                          "for it; dropping the oldest", BACKLOG_MAX)
        self.backlog.append(op)

    @staticmethod
    def _apply(op: Write, conn: sqlite3.Connection) -> None:
        try:
            op(conn)
        except sqlite3.Error as e:
            if classify(e) is not Fault.DATA:
                raise
            log.error("a write to queues.db failed on its data and is dropped: %s", describe(e))

    def _flush_backlog(self, conn: sqlite3.Connection) -> None:
        while self.backlog:
            self._apply(self.backlog[0], conn)
            self.backlog.popleft()
        if self.backlog_dropped:
            log.warning("queues.db takes writes again; %d older messages and state updates were dropped",
                        self.backlog_dropped)
            self.backlog_dropped = 0

    def request_attributes(self, shared: list[str], client: list[str] | None = None) -> None:
        """Ask ThingsBoard for attribute values; the answer comes back through the inbound table."""
        self._attr_request_seq += 1
        request = topics.attributes_request(self._attr_request_seq, shared, client)
        if request is not None:
            self.enqueue_raw(*request)

    def restart_controller(self, reason: str) -> None:
        if self.controller is not None:
            self.controller.restart(reason)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Open queues.db and read the saved state before anything starts (a transient failure here is
        the Runner's to wait out); what start-up writes waits in the backlog if it must."""
        self.cfg.ensure_dirs()
        self.q.open()
        self.q_file = self.q.identity
        if self.rpc.load_unsent(self._replies_path(), self.q.identity):
            log.info("%d RPC replies kept by the last run are stored first", len(self.rpc.unsent))
        if self.controller is not None:
            ctl_state = self.get_state(CONTROLLER_STATE) or {}
            self.controller.restarts = int(ctl_state.get("restarts") or 0)
            for problem in self.controller.spec_problems:
                log.error("config: %s", problem)
                self.report_error(problem)
            self.controller.start_thread()
        else:
            log.info("controller disabled: no Docker; commands, files and telemetry only")
        self.updates.start()
        self.files.load(self.get_state(FILES_STATE))
        self.device_reporter.start()
        self.publish_attributes({"gatewayd_version": __version__})
        # What the bridge asks for after a reconnect may have been consumed by an earlier run.
        self.request_attributes(list(SW_KEYS) + [FILES_KEY], [HASHES_KEY])
        self._write_controller_state(force=True)

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop_thread()
        self.updates.stop()
        self.files.stop()
        running = self.jobs.running()
        if running:
            log.info("leaving %d background job(s) unfinished: %s", len(running),
                     ", ".join(j.name for j in running))
        try:
            if self.q.conn is not None:
                self._flush_backlog(self.q.conn)
                self.rpc.flush()
        except sqlite3.Error as e:
            log.error("stopping while queues.db fails (%s): %d messages and state updates not stored are "
                      "dropped", describe(e), len(self.backlog))
        try:
            if self.rpc.save_unsent(self._replies_path(), self.q.identity):
                log.warning("%d RPC replies not stored yet are kept in %s for the next start", len(self.rpc.unsent),
                            self._replies_path())
        except OSError as e:
            log.error("cannot keep %d RPC replies in %s (%s): their requests will be answered as interrupted",
                      len(self.rpc.unsent), self._replies_path(), e)
        self.q.close()

    def _replies_path(self) -> Path:
        return self.cfg.runtime_dir / f"{self.name}.replies.json"

    def status(self) -> str:
        if self.faults.faulted:
            return self.faults.status(time.monotonic())
        if self.controller is None:
            ctl = "controller disabled"
        else:
            s = self.controller.snapshot()
            ctl = f"controller {s['state']}, {s['restarts']} restarts"
        jobs = len(self.jobs.running())
        return f"{ctl}; {self.rpc.counters.rpcs} RPCs answered" + (f"; {jobs} job(s) running" if jobs else "")

    def report_status(self, text: str) -> None:
        self.faults.store_status(text)

    def report_error(self, text: str) -> None:
        self.faults.record(text)

    def health(self) -> dict[str, Any]:
        """For the runtime status file `gatewayctl status` reads even when no database can be written."""
        return {"fault": self.faults.text, "files": {QUEUES: self.q.identity}}

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> tuple[bool, float]:
        now = time.monotonic()
        self.q.follow(self.name)
        if self.faults.waiting(now):
            return True, self.faults.retry_at - now
        self._write_error = None
        try:
            try:
                conn = self.q.conn or self._reopen()
            except OSError as e:  # creating the file (full disk, read-only directory)
                return self._on_fault(e, now)
            self._flush_backlog(conn)
            self.rpc.flush()
            result = self._work(now)
            if self._write_error is not None:
                raise self._write_error
        except sqlite3.Error as e:
            return self._on_fault(e, now)
        self.faults.clear(now)
        return result

    def _reopen(self) -> sqlite3.Connection:
        conn = self.q.open()
        if self.q.identity != self.q_file:
            # another file (replaced, or a damaged one moved aside): the ids known here are the old one's
            self.rpc.detach()
            self.q_file = self.q.identity
        return conn

    def _on_fault(self, exc: BaseException, now: float) -> tuple[bool, float]:
        """queues.db failed: nothing is lost (see the module docstring); report once, retry later. The
        loop stays healthy: a restart cures none of this."""
        self._write_error = None
        delay = self.faults.failed(exc, now, QUEUES, owned=self.q)
        if not keep_connection(exc):
            self.q.close()
        return True, delay

    def _work(self, now: float) -> tuple[bool, float]:
        busy = self._process_inbound()
        self.rpc.tick()
        self.updates.step()
        self.files.step()
        if now >= self.next_files:
            self.next_files = now + self.files_every
            self.files.check_changes()
        self.device_reporter.poll(now)
        self._drain_controller_events()
        if now >= self.next_state:
            self._write_controller_state()
        if now >= self.next_telemetry:
            self.next_telemetry = now + self.telemetry_every
            self._telemetry()
        self.rpc.purge()
        return True, 0.0 if busy else (0.05 if self.updates.phase == Phase.OTA else 0.2)

    # -- inbound -------------------------------------------------------------------------
    def _process_inbound(self) -> bool:
        conn = self._db()
        skip = self.rpc.busy_inbound_ids()
        rows = ledger.fetch_inbound(conn, INBOUND_BATCH + len(skip))
        handled = 0
        for rid, topic, payload, _received in rows:
            if rid in skip:
                continue
            handled += 1
            try:
                self._handle(rid, topic, payload)
            except sqlite3.Error:
                raise
            except Exception as e:
                log.exception("inbound message %d on %s could not be handled", rid, topic)
                self._handler_failed(rid, topic, payload, f"{type(e).__name__}: {e}")
        return handled >= INBOUND_BATCH

    def _handler_failed(self, rid: int, topic: str, payload: bytes, error: str) -> None:
        """An RPC still gets its error reply; anything else (or a reply that fails too) is dead-lettered."""
        rpc_id = topics.rpc_request_id(topic)
        if rpc_id is not None:
            try:
                self.rpc.fail(rid, rpc_id, payload, error)
                return
            except sqlite3.Error:
                raise
            except Exception as e:  # noqa: BLE001 - the dead letter below keeps the message
                error = f"{error}; the error reply failed too: {type(e).__name__}: {e}"
        self._dead_letter(rid, topic, payload, f"handler failed: {error}")

    def _dead_letter(self, rid: int, topic: str, payload: bytes, reason: str) -> None:
        log.warning("inbound message %d on %s dead-lettered: %s", rid, topic, reason)
        self.counters.dead_letters += 1
        ledger.dead_letter_inbound(self._db(), rid, topic, payload, reason)

    def _handle(self, rid: int, topic: str, payload: bytes) -> None:
        rpc_id = topics.rpc_request_id(topic)
        if rpc_id is not None:
            self.rpc.handle(rid, rpc_id, payload)
            return
        chunk = topics.sw_chunk(topic)
        if chunk is not None:
            self.counters.chunks += 1
            self.updates.on_chunk(*chunk, payload)
            ledger.delete_inbound(self._db(), rid)
            return
        if topic == topics.TOPIC_ATTRIBUTES or topics.is_attributes_response(topic):
            self._handle_attributes(rid, topic, payload, response=topic != topics.TOPIC_ATTRIBUTES)
            return
        if topics.is_ota_error(topic):
            text = payload.decode("utf-8", "replace")[:500]
            log.warning("OTA error from ThingsBoard on %s: %s", topic, text)
            self.updates.on_ota_error(text)
            ledger.delete_inbound(self._db(), rid)
            return
        if topics.is_rpc_response(topic):
            ledger.delete_inbound(self._db(), rid)  # answers to the bridge's own requests
            return
        self._dead_letter(rid, topic, payload, "no handler for this topic")

    def _handle_attributes(self, rid: int, topic: str, payload: bytes, response: bool) -> None:
        try:
            obj = json.loads(payload)
        except RecursionError:
            self._dead_letter(rid, topic, payload, "attributes message is nested too deeply to be read")
            return
        except ValueError as e:
            self._dead_letter(rid, topic, payload, f"attributes message is not valid JSON: {e}")
            return
        if not isinstance(obj, dict):
            self._dead_letter(rid, topic, payload, "attributes message is not a JSON object")
            return
        self.counters.attributes += 1
        deleted: list[str] = []
        client: dict[str, Any] = {}
        shared: dict[str, Any]
        if response:
            if "shared" in obj or "client" in obj:
                shared = obj["shared"] if isinstance(obj.get("shared"), dict) else {}
                client = obj["client"] if isinstance(obj.get("client"), dict) else {}
            else:
                shared = obj
        else:
            shared = {k: v for k, v in obj.items() if k != "deleted"}
            if isinstance(obj.get("deleted"), list):
                deleted = [k for k in obj["deleted"] if isinstance(k, str)]
        if FILES_KEY in shared:
            self.files.on_files(shared[FILES_KEY])
        if FILES_KEY in deleted:
            self.files.on_files_deleted()
        for key, value in shared.items():
            if key.startswith(CONTENT_PREFIX):
                self.files.on_content(key[len(CONTENT_PREFIX):], value, pushed=not response)
        if HASHES_KEY in client:
            self.files.on_server_hashes(client[HASHES_KEY])
        self.updates.on_deleted(deleted)
        self.updates.on_attributes(shared)
        ledger.delete_inbound(self._db(), rid)

    # -- controller state, telemetry ----------------------------------------------------
    def _drain_controller_events(self) -> None:
        if self.controller is None:
            return
        while True:
            try:
                kind, text = self.controller.events.get_nowait()
            except queue.Empty:
                break
            if kind in ("crash_loop", "error"):
                self.report_error(text)
            if kind == "crash_loop":
                self.publish_telemetry({"controller_crash_loop": text})
        if self.updates.last_error:
            self.report_error(f"controller image: {self.updates.last_error}")
            self.updates.last_error = None

    def _write_controller_state(self, force: bool = False) -> None:
        self.next_state = time.monotonic() + STATE_EVERY_S
        if self.controller is None:
            doc: dict[str, Any] = {"enabled": False, "state": "disabled", "since": None, "restarts": 0}
        else:
            s = self.controller.snapshot()
            doc = {"enabled": True, "state": s["state"], "since": s["since"], "restarts": s["restarts"],
                   "image": s["image"], "version": s["version"], "health": s["health"],
                   "last_failure": s["last_failure"], "failures_in_row": s["failures_in_row"],
                   "next_start_ms": s["next_start_ms"], "container": s["container"],
                   "started_ms": s["started_ms"], "docker_error": s["docker_error"]}
        sw = self.updates.report()
        doc["sw_state"] = sw.get("sw_state")
        doc["sw_phase"] = sw.get("phase")
        doc["current_sw_version"] = (sw.get("current") or {}).get("version")
        comparable = {k: v for k, v in doc.items() if k != "next_start_ms"}
        now = time.monotonic()
        if force or comparable != self._last_state_doc or now >= self._state_refresh_at:
            self._last_state_doc = comparable
            self._state_refresh_at = now + STATE_REFRESH_S
            self.set_state(CONTROLLER_STATE, doc)

    def _telemetry(self) -> None:
        values: dict[str, Any] = {}
        now = now_ms()
        if self.controller is not None:
            s = self.controller.snapshot()
            if s["started_ms"]:
                values["ms_since_controller_startup"] = now - int(s["started_ms"])
            hc = s["health_check_ms"]
            if hc:
                values["ms_since_last_controller_health_check"] = now - int(hc)
            values["controller_state"] = s["state"]
            values["controller_restarts"] = s["restarts"]
            values["controller_failures_in_row"] = s["failures_in_row"]
            if s["health"]:
                values["controller_health"] = s["health"]
        else:
            values["controller_state"] = "disabled"
        values.update(system_metrics(self.cfg.state_dir))
        values["supervisor_uptime_s"] = int(self.uptime_s())
        # The ledger and queues as `gatewayctl status` shows them, so a loss is visible from afar.
        values.update(figures.read(self._db()).telemetry(controller_store.read_depth(self.cfg.controller_db), now))
        self.publish_telemetry(values, priority=queues.PRIO_TELEMETRY)

    def status_report(self) -> dict[str, Any]:
        c = queues.counters(self._db())
        return {
            "gatewayd": __version__,
            "uptime_s": round(self.uptime_s(), 1),
            "controller": self.controller.snapshot() if self.controller is not None else {"enabled": False},
            "software": self.updates.report(),
            "queues": {"outbox": c.get("outbox_rows", 0), "inbound": queues.depth(self._db(), "inbound"),
                       "dead_letters": queues.depth(self._db(), "dead_letters")},
            "jobs": [j.summary() for j in self.jobs.running()],
            "files": {k: {"hash": v.get("hash"), "write_version": v.get("write_version")}
                      for k, v in self.files.hashes_value().items()},
            "file_errors": dict(self.files.errors),
            "devices": len(self.devices.devices),
            "rpc": {"answered": self.rpc.counters.rpcs, "errors": self.rpc.counters.rpc_errors,
                    "duplicates": self.rpc.counters.duplicates},
        }

