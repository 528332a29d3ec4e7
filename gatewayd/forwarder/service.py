"""Moves controller rows to the archive and the outbox in batches, exactly once across crashes.

The three commits of a batch and why a replay is harmless are described in docs/DESIGN.md
("Exactly-once between stages"). Wake-ups are cheap: between batches the loop only asks
SQLite whether another connection committed (`PRAGMA data_version`).
"""

from __future__ import annotations

import logging
import sqlite3
import time

from gatewayd.config import Config
from gatewayd.inotify import DirectoryWatch
from gatewayd.records import parse
from gatewayd.store import archive as archive_store
from gatewayd.store import controller as controller_store
from gatewayd.store import queues
from gatewayd.store.db import data_version, file_identity, get_mark, set_mark, transaction

log = logging.getLogger("gatewayd.forwarder")

MARK = "controller"
HOUSEKEEPING_EVERY_S = 60.0
IDLE_WAIT_S = 5.0  # with inotify: the longest sleep between looks when nothing is written


class Forwarder:
    name = "forwarder"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.batch_size: int = cfg["forwarder"]["batch_size"]
        self.poll_s: float = cfg["forwarder"]["poll_interval_ms"] / 1000.0
        self.max_packet: int = cfg["thingsboard"]["max_packet_bytes"]
        self.archive_enabled: bool = cfg["archive"]["enabled"]
        self.queues: sqlite3.Connection | None = None
        self.archive: sqlite3.Connection | None = None
        self.ctrl: sqlite3.Connection | None = None
        self.ctrl_identity: tuple[int, int] | None = None
        self.epoch = ""
        self.mark = 0
        self.archive_mark = 0
        self.seen_version = -1
        self.moved_total = 0
        self.dead_total = 0
        self.last_housekeeping = float("-inf")
        self._rate = 0.0
        self._last_move = float("-inf")
        self.watch: DirectoryWatch | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.cfg.ensure_dirs()
        self.queues = queues.open_queues(self.cfg.queues_db)
        if self.archive_enabled:
            self.archive = archive_store.open_archive(self.cfg.archive_db)
        self._open_controller()
        try:
            self.watch = DirectoryWatch(self.cfg.controller_data_dir)
        except OSError as e:
            log.warning("inotify unavailable (%s); polling the controller database every %.0f ms",
                        e, self.poll_s * 1000)

    def fds(self) -> list[int]:
        return [self.watch.fd] if self.watch is not None else []

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.close()
        for conn in (self.ctrl, self.archive, self.queues):
            if conn is not None:
                conn.close()

    def status(self) -> str:
        busy = time.monotonic() - self._last_move < 2.0
        return (f"{'forwarding at ' + format(self._rate, '.0f') + ' records/s' if busy else 'idle'}; "
                f"{self.moved_total} moved, {self.dead_total} dead-lettered since start")

    def report_error(self, text: str) -> None:
        if self.queues is not None:
            queues.record_error(self.queues, self.name, text)

    # -- controller database -------------------------------------------------------------
    def _open_controller(self) -> None:
        assert self.queues is not None
        if self.ctrl is not None:
            self.ctrl.close()
        path = self.cfg.controller_db
        self.ctrl = controller_store.open_controller(path)
        self.ctrl_identity = file_identity(path)
        self.epoch = controller_store.epoch(self.ctrl)
        epoch, mark = get_mark(self.queues, MARK)
        if epoch != self.epoch:
            if epoch:
                log.warning("controller database %s is a new file (epoch %s, was %s); reading it from the start",
                            path, self.epoch, epoch)
            with transaction(self.queues):
                set_mark(self.queues, MARK, self.epoch, 0)
            mark = 0
        self.mark = mark
        self.archive_mark = 0
        if self.archive is not None:
            a_epoch, a_mark = get_mark(self.archive, MARK)
            self.archive_mark = a_mark if a_epoch == self.epoch else 0
        controller_store.protect_ids(self.ctrl, self.mark)
        if self.mark:
            self._delete_moved(self.mark)
        self.seen_version = -1

    def _delete_moved(self, upto: int) -> None:
        assert self.ctrl is not None
        with transaction(self.ctrl):
            self.ctrl.execute("DELETE FROM messages WHERE id <= ?", (upto,))

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> tuple[bool, float]:
        assert self.ctrl is not None
        if file_identity(self.cfg.controller_db) != self.ctrl_identity:
            log.warning("controller database %s was replaced or removed; reopening", self.cfg.controller_db)
            self._open_controller()
        now = time.monotonic()
        if now - self.last_housekeeping >= HOUSEKEEPING_EVERY_S:
            self.last_housekeeping = now
            self._housekeeping()
        woken = self.watch.drain() if self.watch is not None else False
        idle_wait = IDLE_WAIT_S if self.watch is not None else self.poll_s
        version = data_version(self.ctrl)
        if version == self.seen_version:
            # The event is the WAL write; the commit shows in data_version only a moment later.
            return True, self.poll_s if woken else idle_wait
        t0 = time.perf_counter()
        moved = self.move_batch()
        if moved < self.batch_size:
            self.seen_version = version
        if moved:
            self._rate = moved / max(time.perf_counter() - t0, 1e-6)
            self._last_move = time.monotonic()
            return True, 0.0
        return True, idle_wait

    def move_batch(self) -> int:
        """Move up to batch_size rows; returns how many controller rows were consumed."""
        assert self.ctrl is not None and self.queues is not None
        rows = self.ctrl.execute("SELECT id, type, message FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                                 (self.mark, self.batch_size)).fetchall()
        if not rows:
            return 0
        last = rows[-1][0]
        good: list[tuple[int, queues.NewRow, bool]] = []
        bad: list[tuple[int | None, str | None, str | None, str]] = []
        archive_rows: list[tuple[int, str, str]] = []
        for src_id, type_, message in rows:
            rec = parse(type_, message, self.max_packet)
            if isinstance(rec, str):
                text = message if isinstance(message, str) or message is None else repr(message)
                bad.append((src_id, type_ if isinstance(type_, str) else repr(type_), text, rec))
                log.warning("controller row %d dead-lettered: %s", src_id, rec)
                continue
            good.append((src_id, (rec.priority, rec.kind, rec.topic, rec.payload, rec.ts, 1), rec.archive))
            if rec.archive and self.archive is not None and src_id > self.archive_mark:
                archive_rows.append((rec.ts, str(type_ or rec.kind), rec.payload))

        # 1. archive (idempotent through its own mark)
        if self.archive is not None:
            with transaction(self.archive):
                if archive_rows:
                    self.archive.executemany("INSERT INTO archive(ts, type, message) VALUES (?,?,?)", archive_rows)
                set_mark(self.archive, MARK, self.epoch, last)
            self.archive_mark = last

        # 2. outbox, dead letters, ledger and mark in one transaction
        with transaction(self.queues):
            epoch, mark = get_mark(self.queues, MARK)
            if epoch == self.epoch and mark >= last:
                log.warning("rows up to %d were already moved (another forwarder?)", mark)
            else:
                skip = mark if epoch == self.epoch else 0
                new_good = [g for g in good if g[0] > skip]
                new_bad = [b for b in bad if (b[0] or 0) > skip]
                queues.append(self.queues, [g[1] for g in new_good])
                if new_bad:
                    queues.add_dead_letters(self.queues, "forwarder", new_bad)
                queues.bump(self.queues, {
                    "ingested": len(new_good) + len(new_bad),
                    "dead_lettered": len(new_bad),
                    "archived": sum(1 for g in new_good if g[2]) if self.archive is not None else 0,
                })
                set_mark(self.queues, MARK, self.epoch, last)
                self.dead_total += len(new_bad)
        self.mark = last

        # 3. the controller's copy
        self._delete_moved(last)
        self.moved_total += len(rows)
        self._enforce_outbox_caps()
        return len(rows)

    def _enforce_outbox_caps(self) -> None:
        assert self.queues is not None
        c = queues.counters(self.queues)
        max_rows, max_bytes = self.cfg["outbox"]["max_rows"], self.cfg["outbox"]["max_bytes"]
        if c["outbox_rows"] > max_rows or c["outbox_bytes"] > max_bytes:
            dropped = queues.enforce_caps(self.queues, max_rows, max_bytes)
            if dropped:
                log.warning("outbox over its cap (%d rows / %d bytes allowed): dropped the %d oldest telemetry "
                            "records (counted as dropped)", max_rows, max_bytes, dropped)

    def _housekeeping(self) -> None:
        if self.archive is None:
            return
        removed = archive_store.enforce_limits(self.archive, self.cfg["archive"]["max_bytes"],
                                               self.cfg["archive"]["retention_days"])
        if removed:
            log.info("archive: removed %d records past retention or over the size cap", removed)
