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
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from typing import Protocol

from gatewayd.config import Config
from gatewayd.ingest.batch import Batch
from gatewayd.store import controller as controller_store
from gatewayd.store import ingest as ingest_store
from gatewayd.store import queues
from gatewayd.store.db import file_identity, transaction
from gatewayd.store.errors import describe
from gatewayd.store.ingest import Row

log = logging.getLogger("gatewayd.ingest")

RETRY_MIN_S = 0.1
RETRY_MAX_S = 5.0
OVER_CAP_RECHECK_S = 0.2
IDLE_WAIT_S = 30.0


class Adapter(Protocol):
    name: str

    def fds(self) -> list[int]: ...

    def poll(self, now: float) -> None:
        """Do I/O; gather records, commit nothing."""

    def fill(self, batch: Batch, room: int) -> None:
        """Add gathered records (up to about `room` rows that can be held back) to the batch."""

    def wait(self, now: float) -> float:
        """Seconds until the adapter needs the loop again."""

    def has_work(self) -> bool: ...

    def status(self) -> str: ...

    def stop(self) -> None: ...


class Ingest:
    name = "ingest"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.max_rows: int = cfg["ingest"]["max_queue_rows"]
        self.stall_s: float = cfg["ingest"]["stall_timeout_s"]
        self.ctrl: sqlite3.Connection | None = None
        self.ctrl_identity: tuple[int, int] | None = None
        self.queues: sqlite3.Connection | None = None
        self.adapters: list[Adapter] = []
        self.over_cap = False
        self.committed_rows = 0
        self.failing_since: float | None = None
        self.retry_at = 0.0
        self.retry_delay = RETRY_MIN_S
        self.last_error: str | None = None
        self._rate = 0.0
        self._last_commit = float("-inf")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.cfg.ensure_dirs()
        try:
            self.queues = queues.open_queues(self.cfg.queues_db, check=False)
        except sqlite3.Error as e:
            log.warning("cannot open %s (%s); errors are reported in the journal only", self.cfg.queues_db, e)
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
        for conn in (self.ctrl, self.queues):
            if conn is not None:
                conn.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def status(self) -> str:
        busy = time.monotonic() - self._last_commit < 2.0
        parts = [a.status() for a in self.adapters]
        head = f"ingesting at {self._rate:.0f} records/s" if busy else "idle"
        if self.over_cap:
            head = f"paused: controller queue over {self.max_rows} rows"
        if self.failing_since is not None and self.last_error:
            head = f"commit failing: {self.last_error}"
        return f"{head}; {self.committed_rows} committed since start; " + ", ".join(parts)

    def report_status(self, text: str) -> None:
        if self.queues is not None:
            queues.record_status(self.queues, self.name, text)

    def report_error(self, text: str) -> None:
        if self.queues is not None:
            try:
                queues.record_error(self.queues, self.name, text)
            except sqlite3.Error as e:
                log.warning("cannot record the error in %s: %s", self.cfg.queues_db, e)

    # -- the loop --------------------------------------------------------------------------
    def step(self) -> tuple[bool, float]:
        now = time.monotonic()
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._round(now)
        now = time.monotonic()
        healthy = self.failing_since is None or now - self.failing_since < self.stall_s
        if any(a.has_work() for a in self.adapters):
            if self.failing_since is not None:
                return healthy, max(0.0, self.retry_at - now)
            return healthy, OVER_CAP_RECHECK_S if self.over_cap else 0.0
        return healthy, min([IDLE_WAIT_S, *(a.wait(now) for a in self.adapters)])

    def _round(self, now: float) -> None:
        for a in self.adapters:
            a.poll(now)
        if now < self.retry_at:
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
        if self.failing_since is not None:
            log.info("commits to the controller queue work again")
        self.failing_since = None
        self.retry_delay = RETRY_MIN_S
        self.last_error = None

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
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        if text != self.last_error:
            log.error("cannot commit %d records to %s: %s; nothing acknowledged, retrying",
                      len(batch.rows), self.cfg.controller_db, text)
            self.report_error(f"controller queue: {text}")
        self.last_error = text
        for fail in batch.on_fail:
            fail(text)
        # A fresh connection next time: the file may have been replaced, repaired or remounted.
        if self.ctrl is not None:
            try:
                self.ctrl.close()
            except sqlite3.Error:
                pass
            self.ctrl = None
        self.retry_at = now + self.retry_delay
        self.retry_delay = min(self.retry_delay * 2, RETRY_MAX_S)
