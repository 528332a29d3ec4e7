"""The ingest daemon's loop: gather from every adapter, one commit, then acknowledge.

Each step lets the adapters do their I/O (read the MQTT socket, take HTTP requests handed
over by the server's threads, look at the spool directory), puts everything they gathered
into one transaction on the controller queue (a group commit: one fsync for all senders),
and only then acknowledges: MQTT PUBACKs, HTTP 200s, spool files removed. A failed commit
acknowledges nothing; the adapters keep or refuse their records and the commit is retried
with a bounded backoff.

Over `ingest.max_queue_rows` rows waiting in the controller queue (the forwarder is behind
or down) ingest stops taking what it can hold back: MQTT messages stay unacknowledged (the
broker stops sending at its in-flight limit), HTTP answers 503, spool files wait.

A failing commit is a fault of the moment like in every daemon (`store.faults`: reported once,
the disk reserve released on a full disk, bounded backoff). `queues.db` serves only to record
errors for `gatewayctl status`; ingest follows it by file identity like the other daemons.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from typing import Any

from gatewayd.config import Config
from gatewayd.ingest.batch import Adapter, Batch
from gatewayd.store import controller as controller_store
from gatewayd.store import ingest as ingest_store
from gatewayd.store import queues
from gatewayd.store.db import Tracked, file_identity, transaction
from gatewayd.store.errors import Fault, describe
from gatewayd.store.faults import FaultState
from gatewayd.store.ingest import Row

log = logging.getLogger("gatewayd.ingest")

RETRY_MIN_S = 0.1
RETRY_MAX_S = 5.0
OVER_CAP_RECHECK_S = 0.2
IDLE_WAIT_S = 30.0


class Ingest:
    name = "ingest"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.max_rows: int = cfg["ingest"]["max_queue_rows"]
        self.stall_s: float = cfg["ingest"]["stall_timeout_s"]
        self.ctrl: sqlite3.Connection | None = None
        self.ctrl_identity: tuple[int, int] | None = None
        self.q = Tracked(cfg.queues_db, lambda path: queues.open_queues(path, check=False))
        self.faults = FaultState(self.name, log, cfg.state_dir, self._queues, RETRY_MIN_S, RETRY_MAX_S)
        self.adapters: list[Adapter] = []
        self.over_cap = False
        self.committed_rows = 0
        self._rate = 0.0
        self._last_commit = float("-inf")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.cfg.ensure_dirs()
        self._queues()
        self._open_controller()
        adapters = self.cfg.ingest_adapters()
        if "mqtt" in adapters:
            from gatewayd.ingest.mqtt import MqttAdapter

            self.adapters.append(MqttAdapter(self.cfg, self.commit_rows))
        if "http" in adapters:
            from gatewayd.ingest.http import HttpAdapter

            self.adapters.append(HttpAdapter(self.cfg, self))
        if "spool" in adapters:
            from gatewayd.ingest.spool import SpoolAdapter

            self.adapters.append(SpoolAdapter(self.cfg, self))
        for a in self.adapters:
            start = getattr(a, "start", None)
            if start is not None:
                start()
        log.info("ingest adapters: %s", ", ".join(a.status() for a in self.adapters))

    def _open_controller(self) -> None:
        """The controller's file is the forwarder's to check and repair; ingest only writes rows."""
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        conn = controller_store.open_controller(self.cfg.controller_db)  # never moves the file
        try:
            ingest_store.ensure_tables(conn)
        except BaseException:
            conn.close()
            raise
        self.ctrl = conn
        self.ctrl_identity = file_identity(self.cfg.controller_db)

    def _queues(self) -> sqlite3.Connection | None:
        """queues.db, where errors are recorded for `gatewayctl status`: (re)opened when needed."""
        if self.q.conn is None:
            try:
                self.q.open()
            except (sqlite3.Error, OSError) as e:
                log.debug("cannot open %s yet: %s", self.cfg.queues_db, e)
        return self.q.conn

    def fds(self) -> list[int]:
        return [self._wake_r, *(fd for a in self.adapters for fd in a.fds())]

    def wake(self) -> None:
        """Called from the HTTP server's threads: a request waits for the next commit."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def stop(self) -> None:
        try:
            self._round(time.monotonic())  # what was gathered still gets committed and acknowledged
        except Exception as e:  # noqa: BLE001 - stopping anyway; nothing was acknowledged
            log.warning("last commit before stopping failed: %s", e)
        for a in self.adapters:
            a.stop()
        if self.ctrl is not None:
            self.ctrl.close()
        self.q.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def status(self) -> str:
        busy = time.monotonic() - self._last_commit < 2.0
        parts = [a.status() for a in self.adapters]
        head = f"ingesting at {self._rate:.0f} records/s" if busy else "idle"
        if self.over_cap:
            head = f"paused: controller queue over {self.max_rows} rows"
        if self.faults.faulted:
            head = f"commit failing: {self.faults.text}"
        return f"{head}; {self.committed_rows} committed since start; " + ", ".join(parts)

    def report_status(self, text: str) -> None:
        self.faults.store_status(text)

    def report_error(self, text: str) -> None:
        self.faults.record(text)

    def health(self) -> dict[str, Any]:
        """For the runtime status file `gatewayctl status` reads even when no database can be written."""
        return {"fault": self.faults.text, "files": {"queues.db": self.q.identity}}

    # -- the loop --------------------------------------------------------------------------
    def step(self) -> tuple[bool, float]:
        now = time.monotonic()
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self.q.follow(self.name)
        self._round(now)
        now = time.monotonic()
        # A fault of the moment (full disk, lock, I/O) keeps the watchdog fed: a restart cures none of them.
        healthy = (not self.faults.faulted or self.faults.kind is Fault.TRANSIENT
                   or now - self.faults.since < self.stall_s)
        if any(a.has_work() for a in self.adapters):
            if self.faults.faulted:
                return healthy, max(0.0, self.faults.retry_at - now)
            return healthy, OVER_CAP_RECHECK_S if self.over_cap else 0.0
        return healthy, min([IDLE_WAIT_S, *(a.wait(now) for a in self.adapters)])

    def _round(self, now: float) -> None:
        for a in self.adapters:
            a.poll(now)
        if self.faults.waiting(now):
            return
        batch = Batch()
        try:
            room = self._room()
            for a in self.adapters:
                a.fill(batch, room)
            if batch:
                self._commit(batch)
        except (sqlite3.Error, OSError) as e:
            self._failed(batch, e)
            return
        for done in batch.on_commit:
            done()

    def _room(self) -> int:
        """Rows that may still be queued before the cap; reopens the database when needed."""
        if self.ctrl is None or file_identity(self.cfg.controller_db) != self.ctrl_identity:
            if self.ctrl is not None:
                log.warning("controller database %s was replaced or removed; reopening", self.cfg.controller_db)
            self._open_controller()
        assert self.ctrl is not None
        depth = ingest_store.depth_estimate(self.ctrl)
        over = depth >= self.max_rows
        if over != self.over_cap:
            if over:
                log.warning("controller queue holds %d rows (cap %d): holding back new records until the "
                            "forwarder catches up", depth, self.max_rows)
            else:
                log.info("controller queue below its cap again; accepting records")
        self.over_cap = over
        return max(0, self.max_rows - depth)

    def _commit(self, batch: Batch) -> None:
        assert self.ctrl is not None
        t0 = time.perf_counter()
        with transaction(self.ctrl):
            if batch.rows:
                ingest_store.insert_messages(self.ctrl, batch.rows)
            if batch.marks:
                ingest_store.set_spool_marks(self.ctrl, batch.marks)
        if batch.rows:
            self.committed_rows += len(batch.rows)
            self._rate = len(batch.rows) / max(time.perf_counter() - t0, 1e-6)
            self._last_commit = time.monotonic()
        self.faults.clear(time.monotonic())

    def commit_rows(self, rows: list[Row]) -> None:
        """A commit of its own, for a sender that must be acknowledged from inside a callback."""
        if self.ctrl is None:
            self._open_controller()
        batch = Batch(rows=rows)
        try:
            self._commit(batch)
        except (sqlite3.Error, OSError) as e:
            self._failed(batch, e)
            raise

    def _failed(self, batch: Batch, exc: BaseException) -> None:
        text = describe(exc)
        self.faults.failed(exc, time.monotonic(),
                           f"cannot commit to the controller queue {self.cfg.controller_db} (nothing acknowledged)")
        for fail in batch.on_fail:
            fail(text)
        # A fresh connection next time: the file may have been replaced, repaired or remounted.
        if self.ctrl is not None:
            try:
                self.ctrl.close()
            except sqlite3.Error:
                pass
            self.ctrl = None
