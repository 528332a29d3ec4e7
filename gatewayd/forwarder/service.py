"""Moves controller rows to the archive and the outbox in batches, exactly once across crashes.

The three commits of a batch and why a replay is harmless are described in docs/DESIGN.md
("Exactly-once between stages"). Wake-ups are cheap: between batches the loop only asks
SQLite whether another connection committed (`PRAGMA data_version`).

Nothing a controller stores can stop the loop: every value is read as bytes and judged here
(`records.parse`), and a row that fails anywhere — parsing, archiving, storing — goes to the
dead letters alone. A database fault is classified (`store/errors.py`): corruption of a file
gatewayd owns moves it aside; anything else (locked, full, read-only, I/O) is reported once
and retried with a bounded backoff while the daemon stays up and nothing is lost.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import operator
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from gatewayd import privacy
from gatewayd.config import Config
from gatewayd.forwarder.clockgate import ClockGate, Good
from gatewayd.forwarder.clocktrack import CLOCK_CORRECTED, CLOCK_OK, CLOCK_UNSYNCED
from gatewayd.forwarder.files import ARCHIVE, CONTROLLER, QUEUES, Paused, StoreFault, on
from gatewayd.forwarder.resume import BATCH_STATE, MARK, fingerprint, resume_point
from gatewayd.forwarder.rows import dead_letter, examine, id_ranges
from gatewayd.inotify import DirectoryWatch
from gatewayd.records import Record, parse, plain_prefix
from gatewayd.store import archive as archive_store
from gatewayd.store import controller as controller_store
from gatewayd.store import queues
from gatewayd.store.check import BackgroundCheck, UncleanMarker
from gatewayd.store.db import Tracked, data_version, get_mark, set_mark, transaction
from gatewayd.store.errors import Fault, classify, describe
from gatewayd.store.faults import FaultState, code_name, keep_connection
from gatewayd.store.queues import DeadLetter, NewRow
from gatewayd.store.space import Headroom

log = logging.getLogger("gatewayd.forwarder")

CLOCK_WAIT_RECHECK_S = 1.0
HOUSEKEEPING_EVERY_S = 60.0
WORK_BUDGET_S = 0.5              # longest cap / retention pass per loop iteration
IDLE_WAIT_S = 5.0                # with inotify: the longest sleep between looks when nothing is written
LOW_SPACE_RETRY_S = 2.0
BATCH_MAX_BYTES = 16 << 20       # a batch stops after about this many message bytes
MESSAGE_MIN_LIMIT = 1 << 20
YOUNG_GENERATION = 20_000        # objects allocated between two collections of the youngest generation

_RECORD = operator.itemgetter(1)
_ARCHIVE = operator.attrgetter("archive")


class Forwarder:
    name = "forwarder"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        fwd = cfg["forwarder"]
        self.batch_size: int = fwd["batch_size"]
        self.poll_s: float = fwd["poll_interval_ms"] / 1000.0
        self.max_packet: int = cfg["thingsboard"]["max_packet_bytes"]
        self.max_message = max(MESSAGE_MIN_LIMIT, 8 * self.max_packet)
        self.archive_enabled: bool = cfg["archive"]["enabled"]
        self.policy = privacy.compile_policy(cfg["privacy"])
        self.clock = ClockGate(fwd["wait_for_clock"], fwd["wait_for_clock_max_s"])
        self.q = Tracked(cfg.queues_db, queues.open_queues)
        self.a = Tracked(cfg.archive_db, archive_store.open_archive)
        self.c = Tracked(cfg.controller_db, controller_store.open_controller)
        self.headroom = Headroom(cfg.state_dir, fwd["min_free_bytes"], fwd["reserve_bytes"])
        self.marker = UncleanMarker(cfg.state_dir, self.name)
        self.unclean = False
        self.check: BackgroundCheck | None = None
        self.check_done = False
        self.epoch = ""
        self.mark = 0
        self.archive_mark = 0
        self.schema = -1
        self.batch_print = ""  # fingerprint() of the last row of the batch being stored
        self.pending: list[list[int]] = []   # controller id ranges moved but not yet deleted there
        self.draining = False                # the controller file was replaced: empty the old one first
        self.reconcile = False
        self.seen_version = -1
        self.moved_total = 0
        self.dead_total = 0
        self.privacy_total = 0
        self.last_housekeeping = float("-inf")
        self.more_housekeeping = False
        self.caps_pending = False
        self._rate = 0.0
        self._last_move = float("-inf")
        self.watch: DirectoryWatch | None = None
        self.woken = False
        self._type_names: dict[controller_store.Value, str] = {}
        self.faults = FaultState(self.name, log, cfg.state_dir, self._reports_db)

    # -- compatibility views -----------------------------------------------------------------
    @property
    def queues(self) -> sqlite3.Connection | None:
        return self.q.conn

    @property
    def archive(self) -> sqlite3.Connection | None:
        return self.a.conn if self.archive_enabled else None

    @property
    def ctrl(self) -> sqlite3.Connection | None:
        return self.c.conn

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Open gatewayd's own files only: the controller's file is opened by the loop, so a
        controller holding its database cannot keep the forwarder from starting."""
        # A batch allocates a few objects per record, nearly all freed with the batch: Python's
        # young generation of 700 makes the collector walk a batch in flight again and again.
        gc.set_threshold(YOUNG_GENERATION, *gc.get_threshold()[1:])
        self.cfg.ensure_dirs()
        self.headroom.low()  # a nearly full disk releases the reserve before anything is opened
        self.unclean = self.marker.arm() or self.unclean
        self.q.open()  # a failure here is the Runner's to classify and wait out
        if self.archive_enabled:
            self.a.open()
        if self.watch is None:
            try:
                self.watch = DirectoryWatch(self.cfg.controller_data_dir)
            except OSError as e:
                log.warning("inotify unavailable (%s); polling the controller database every %.0f ms",
                            e, self.poll_s * 1000)
        with contextlib.suppress(StoreFault):
            self._open_controller()

    def fds(self) -> list[int]:
        return [self.watch.fd] if self.watch is not None else []

    def stop(self) -> None:
        if self.check is not None:
            self.check.stop()
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        for t in (self.c, self.a, self.q):
            t.close()
        if not self.unclean or self.check_done:
            self.marker.disarm()

    def status(self) -> str:
        if self.faults.faulted:
            return self.faults.status(time.monotonic())
        if self.clock.waiting:
            return self.clock.text()
        busy = time.monotonic() - self._last_move < 2.0
        privacy_note = f", {self.privacy_total} dropped by the privacy policy" if self.privacy_total else ""
        clock_note = f", {self.clock.corrected} timestamps corrected" if self.clock.corrected else ""
        return (f"{'forwarding at ' + format(self._rate, '.0f') + ' records/s' if busy else 'idle'}; "
                f"{self.moved_total} moved, {self.dead_total} dead-lettered{privacy_note}{clock_note} since start")

    def health(self) -> dict[str, Any]:
        """For the runtime status file `gatewayctl status` reads even when no database can be written."""
        return {"fault": self.faults.text, "files": {QUEUES: self.q.identity}}

    def report_error(self, text: str) -> None:
        self.faults.record(text)

    def report_status(self, text: str) -> None:
        self.faults.store_status(text)

    def _reports_db(self) -> sqlite3.Connection | None:
        """queues.db for errors and status lines, unless it is the file failing (a write might wait
        on its lock each time)."""
        key = self.faults.key
        return None if isinstance(key, tuple) and key[0] == QUEUES else self.q.conn

    # -- faults --------------------------------------------------------------------------
    def _on_fault(self, f: StoreFault, now: float) -> tuple[bool, float]:
        kind = classify(f.exc)
        if kind is Fault.CORRUPT and f.where in (QUEUES, ARCHIVE):
            try:
                self._move_aside(self.q if f.where == QUEUES else self.a, describe(f.exc))
                return True, 0.0
            except StoreFault as g:  # cannot even rename it (read-only, I/O): wait like any fault
                f = g
                kind = classify(f.exc)
        if kind is Fault.CORRUPT:
            self.c.close()
            self.faults.report((f.where, code_name(f.exc)), (
                f"controller database {self.cfg.controller_db} is damaged ({describe(f.exc)}); it belongs to the "
                "controller, so gatewayd leaves it where it is: repair or replace it"), now, logging.CRITICAL)
            return True, self.faults.retry_later(now)
        if not keep_connection(f.exc):
            if f.where == CONTROLLER and not self.draining:
                self.c.close()
            elif f.where in (QUEUES, ARCHIVE):
                (self.q if f.where == QUEUES else self.a).close()
        return True, self.faults.failed(f.exc, now, f.where)

    def _move_aside(self, tracked: Tracked, reason: str) -> None:
        """A damaged file of ours: keep it for forensics, start a new one (the other daemons follow
        the file identity)."""
        with on(QUEUES if tracked is self.q else ARCHIVE):
            tracked.move_aside(reason)
        self.reconcile = True

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> tuple[bool, float]:
        self.woken = self.watch.drain() if self.watch is not None else False
        now = time.monotonic()
        if self.faults.waiting(now):
            return True, self.faults.retry_at - now
        try:
            result = self._work(now)
        except StoreFault as f:
            return self._on_fault(f, now)
        except Paused as p:
            self.faults.report(("space", "low"), str(p), now)
            self.faults.retry_at = now + LOW_SPACE_RETRY_S
            return True, LOW_SPACE_RETRY_S
        self.faults.clear(now)
        return result

    def _work(self, now: float) -> tuple[bool, float]:
        self._ensure_open()
        self._integrity()
        waiting = self._clock_wait()
        if self.pending and not self.draining:
            self._delete_moved(self.pending)
        if now - self.last_housekeeping >= HOUSEKEEPING_EVERY_S or self.more_housekeeping:
            self.last_housekeeping = now
            self._housekeeping()
        if self.caps_pending:
            self._enforce_outbox_caps()
        if waiting:
            return True, CLOCK_WAIT_RECHECK_S
        idle_wait = IDLE_WAIT_S if self.watch is not None else self.poll_s
        ctrl = self.c.conn
        assert ctrl is not None
        with on(CONTROLLER):
            version = data_version(ctrl)
        if version == self.seen_version and not self.draining:
            # The event is the WAL write; the commit shows in data_version only a moment later.
            return True, self.poll_s if self.woken else idle_wait
        if self.mark > 0 and not self.pending and not self.draining:
            with on(CONTROLLER):
                stranded = controller_store.has_rows_upto(ctrl, self.mark)
            if stranded:   # everything up to the mark was moved and deleted: these ids were reused
                self._reconcile()
        if self.headroom.low():
            raise Paused(f"only {self.headroom.free()} bytes free under {self.cfg.state_dir} (keeping "
                         f"{self.headroom.min_free} for the ledger and replies): controller records wait in "
                         "the controller queue until space returns")
        t0 = time.perf_counter()
        moved = self.move_batch()
        if moved < self.batch_size:
            self.seen_version = version
        if moved:
            self._rate = moved / max(time.perf_counter() - t0, 1e-6)
            self._last_move = time.monotonic()
            return True, 0.0
        if self.draining:
            self._switch_controller()
            return True, 0.0
        return True, idle_wait

    def _ensure_open(self) -> None:
        """(Re)open whatever is closed or was replaced under us; one stat per file."""
        for tracked, where in ((self.q, QUEUES), (self.a, ARCHIVE)):
            if tracked is self.a and not self.archive_enabled:
                continue
            tracked.follow(self.name)
            if tracked.conn is None:
                with on(where):
                    tracked.open()
                self.reconcile = True
        if self.c.conn is not None and not self.draining and self.c.replaced():
            log.warning("controller database %s was replaced or removed; moving what the old file still "
                        "holds before switching to the new one", self.cfg.controller_db)
            self.draining = True
            self.pending = []
        if self.c.conn is None:
            self._open_controller()
        elif self.reconcile and not self.draining:
            self._reconcile()

    def _integrity(self) -> None:
        """After an unclean shutdown, check our files in the background (never before READY)."""
        if self.unclean and not self.check_done and self.check is None:
            self.check = BackgroundCheck([self.cfg.queues_db, self.cfg.archive_db]).start()
        if self.check is None:
            return
        for r in self.check.results():
            if r.problem is None:
                log.info("integrity check of %s: ok (%.1f s in %d slices)", r.path, r.seconds, r.slices)
                continue
            tracked = self.q if r.path == self.cfg.queues_db else self.a
            self._move_aside(tracked, r.problem)
            self._ensure_open()
        if self.check.done():
            self.check = None
            self.check_done = True

    # -- the clock -----------------------------------------------------------------------
    def _archive_seq(self) -> int:
        if self.archive is None:
            return 0
        with on(ARCHIVE):
            return archive_store.sequence(self.archive)

    def _clock_wait(self) -> bool:
        """True while controller records must wait for the clock (`[forwarder] wait_for_clock`)."""
        assert self.q.conn is not None
        seq: int | None = None
        if self.c.conn is not None and not self.draining:
            with on(CONTROLLER):
                seq = controller_store.sequence(self.c.conn) or 0
        wait, observed = self.clock.check(self.q.conn, seq, self.epoch, self.mark, self._archive_seq)
        if observed:
            self.more_housekeeping = True  # the archive's copies are corrected before anything else
        return wait

    # -- controller database -------------------------------------------------------------
    def _open_controller(self) -> None:
        self.reconcile = True
        with on(CONTROLLER):
            self.c.open()
        self.draining = False
        self._reconcile()

    def _switch_controller(self) -> None:
        log.info("the replaced controller database is drained; switching to %s", self.cfg.controller_db)
        self.c.close()
        self.draining = False
        self._open_controller()

    def _reconcile(self) -> None:
        """Decide where reading resumes (`resume.resume_point`), here and in the archive."""
        ctrl, q = self.c.conn, self.q.conn
        assert ctrl is not None and q is not None
        self.epoch, self.mark, self.schema = resume_point(ctrl, q, self.cfg.controller_db, self.max_message)
        self.pending = []
        self.archive_mark = 0
        if self.archive is not None:
            with on(ARCHIVE):
                a_epoch, a_mark = get_mark(self.archive, MARK)
            self.archive_mark = a_mark if a_epoch == self.epoch else 0
        self.seen_version = -1
        self.reconcile = False

    def _delete_moved(self, ranges: Sequence[Sequence[int]]) -> None:
        """Step 3: delete exactly the controller rows moved (unless the table changed meanwhile)."""
        ctrl = self.c.conn
        assert ctrl is not None
        with on(CONTROLLER):
            deleted = controller_store.delete_ranges(ctrl, [(int(a), int(b)) for a, b in ranges], self.schema)
        self.pending = []
        if not deleted:
            log.warning("the controller's schema changed after rows were read; checking its table before "
                        "deleting anything")
            self._reconcile()

    # -- one batch -----------------------------------------------------------------------
    def move_batch(self) -> int:
        """Move up to batch_size rows; returns how many controller rows were consumed."""
        ctrl = self.c.conn
        assert ctrl is not None and self.q.conn is not None
        with on(CONTROLLER):
            schema, rows = controller_store.read_batch(ctrl, self.mark, self.batch_size, self.max_message,
                                                       BATCH_MAX_BYTES)
        if schema != self.schema and not self.draining:
            self._reconcile()
            with on(CONTROLLER):
                schema, rows = controller_store.read_batch(ctrl, self.mark, self.batch_size, self.max_message,
                                                           BATCH_MAX_BYTES)
        if not rows:
            return 0
        last = rows[-1][0]
        bad: list[DeadLetter] = []
        dropped: list[int] = []
        names = self._type_names
        max_packet = self.max_packet
        policy = self.policy
        good, plain = plain_prefix(rows, names, max_packet) if policy is None else ([], 0)
        for row in rows[plain:] if plain else rows:
            rid, type_, message = row
            name = names.get(type_)
            if name is None or type(message) is not bytes:
                item = examine(ctrl, row, names, self.max_message, max_packet, policy)
                if isinstance(item, DeadLetter):
                    bad.append(item)
                    log.warning("controller row %d dead-lettered: %s", rid, item.reason)
                elif item is None:
                    dropped.append(rid)
                else:
                    good.append(item)
                continue
            try:
                rec = parse(name, message, max_packet, policy)
            except Exception as e:  # noqa: BLE001 - one row's problem, never the queue's
                rec = f"cannot be processed ({type(e).__name__}: {e})"
            if type(rec) is Record:
                good.append((rid, rec, name))
            elif isinstance(rec, str):
                bad.append(dead_letter(row, rec))
                log.warning("controller row %d dead-lettered: %s", rid, rec)
            else:
                dropped.append(rid)
        untrusted = self.clock.untrusted
        self.clock.fix(good)

        # 1. archive (idempotent through its own mark)
        if self.archive is not None:
            with on(ARCHIVE):
                self._commit_archive(good, bad, last)
            self.archive_mark = last

        # 2. outbox, dead letters, ledger, mark and the ids to delete, in one transaction
        first = rows[0][0]
        ranges = [[first, last]] if last - first + 1 == len(rows) else id_ranges([r[0] for r in rows])
        self.batch_print = fingerprint(rows[-1])
        with on(QUEUES):
            self._commit_queues(good, bad, dropped, untrusted, last, schema, [] if self.draining else ranges)
        self.mark = last
        self.schema = schema

        # 3. the controller's copy (a replaced file is only read: it is no longer the controller's)
        if not self.draining:
            self.pending = ranges
            self._delete_moved(ranges)
        self.moved_total += len(rows)
        self._enforce_outbox_caps()
        return len(rows)

    def _commit_archive(self, good: list[Good], bad: list[DeadLetter], last: int) -> None:
        archive = self.archive
        assert archive is not None
        mark = self.archive_mark
        rows = [(rec.ts, name or rec.kind, rec.payload) for src_id, rec, name in good
                if rec.archive and src_id > mark]
        try:
            with transaction(archive):
                codes = self.clock.codes
                if codes:
                    archive_store.insert_flagged(archive, [(rec.ts, name or rec.kind, rec.payload,
                                                            codes.get(src_id, CLOCK_OK))
                                                           for src_id, rec, name in good
                                                           if rec.archive and src_id > mark])
                else:
                    archive_store.insert(archive, rows)
                set_mark(archive, MARK, self.epoch, last)
            return
        except Exception as e:
            if classify(e) is not Fault.DATA:
                raise
            log.warning("archiving the rows up to %d failed on their data (%s); archiving them one by one",
                        last, describe(e))
        refused: set[int] = set()
        todo = [g for g in good if g[1].archive and g[0] > mark]
        with transaction(archive):
            for (src_id, rec, name), row in zip(todo, rows, strict=True):
                try:
                    if src_id in self.clock.codes:
                        archive_store.insert_flagged(archive, [(*row, self.clock.codes[src_id])])
                    else:
                        archive_store.insert(archive, [row])
                except Exception as e:
                    if classify(e) is not Fault.DATA:
                        raise
                    refused.add(src_id)
                    bad.append(DeadLetter(src_id, name, rec.payload,
                                                 f"cannot be archived: {describe(e)}"))
            set_mark(archive, MARK, self.epoch, last)
        good[:] = [g for g in good if g[0] not in refused]

    def _commit_queues(self, good: list[Good], bad: list[DeadLetter], dropped: list[int], untrusted: bool,
                       last: int, schema: int, ranges: list[list[int]]) -> None:
        try:
            self._store(good, bad, dropped, untrusted, last, schema, ranges, careful=False)
        except Exception as e:
            if classify(e) is not Fault.DATA:
                raise
            log.warning("storing the rows up to %d failed on their data (%s); storing them one by one",
                        last, describe(e))
            self._store(good, bad, dropped, untrusted, last, schema, ranges, careful=True)

    def _store(self, good: list[Good], bad: list[DeadLetter], dropped: list[int], untrusted: bool, last: int,
               schema: int, ranges: list[list[int]], careful: bool) -> None:
        """Step 2 in one transaction. `dropped`: ids the privacy policy dropped; `untrusted`: the
        batch was read while the clock was not trusted (counted as `clock.unsynced`)."""
        q = self.q.conn
        assert q is not None
        with transaction(q):
            epoch, mark = get_mark(q, MARK)
            if epoch == self.epoch and mark >= last:
                log.warning("rows up to %d were already moved (another forwarder?)", mark)
                return
            skip = mark if epoch == self.epoch else 0
            new_good = [g for g in good if g[0] > skip] if skip else good
            new_bad = [b for b in bad if (b.src_id or 0) > skip]
            new_dropped = sum(1 for i in dropped if i > skip)
            if careful:
                stored = []
                for g in new_good:
                    if self._try_data(lambda g=g: queues.append(q, self._new_rows([g]))):
                        stored.append(g)
                    else:
                        new_bad.append(DeadLetter(g[0], g[2], None, "cannot be stored in the outbox",
                                                  g[1].payload.encode("utf-8", "surrogatepass")))
                new_good = stored
                for b in new_bad:
                    if not self._try_data(lambda b=b: queues.add_controller_dead_letters(q, "forwarder", [b])):
                        queues.add_controller_dead_letters(q, "forwarder", [DeadLetter(
                            b.src_id, None, None, b.reason.encode("ascii", "backslashreplace").decode(),
                            b.raw, b.raw_size)])
            else:
                queues.append(q, self._new_rows(new_good))
                if new_bad:
                    queues.add_controller_dead_letters(q, "forwarder", new_bad)
            counts = {
                "ingested": len(new_good) + len(new_bad) + new_dropped,
                "dead_lettered": len(new_bad),
                "dropped": new_dropped,
                queues.DROPPED_PREFIX + "privacy": new_dropped,
                "archived": sum(map(_ARCHIVE, map(_RECORD, new_good))) if self.archive is not None else 0,
            }
            if untrusted or self.clock.codes:
                flags = [self.clock.codes.get(g[0], CLOCK_OK) for g in new_good]
                counts["clock.corrected"] = flags.count(CLOCK_CORRECTED)
                counts["clock.unsynced"] = (len(new_good) - counts["clock.corrected"] if untrusted
                                            else flags.count(CLOCK_UNSYNCED))
            queues.bump(q, counts)
            set_mark(q, MARK, self.epoch, last)
            queues.set_state(q, BATCH_STATE, {"epoch": self.epoch, "schema": schema, "delete": ranges,
                                              "last": self.batch_print})
        self.dead_total += len(new_bad)
        self.privacy_total += new_dropped

    @staticmethod
    def _new_rows(good: list[Good]) -> list[NewRow]:
        return [(r.priority, r.kind, r.topic, r.payload, r.ts, 1) for _, r, _ in good]

    @staticmethod
    def _try_data(fn: Any) -> bool:
        """Run one statement; False when it failed on its data (the statement alone is undone)."""
        try:
            fn()
        except Exception as e:
            if classify(e) is not Fault.DATA:
                raise
            log.warning("a row failed on its data: %s", describe(e))
            return False
        return True

    # -- housekeeping --------------------------------------------------------------------
    def _enforce_outbox_caps(self) -> None:
        q = self.q.conn
        assert q is not None
        max_rows, max_bytes = self.cfg["outbox"]["max_rows"], self.cfg["outbox"]["max_bytes"]
        with on(QUEUES):
            if not queues.over_caps(q, max_rows, max_bytes):
                self.caps_pending = False
                return
            dropped = queues.enforce_caps(q, max_rows, max_bytes, budget_s=WORK_BUDGET_S)
            self.caps_pending = queues.over_caps(q, max_rows, max_bytes)
        if dropped:
            log.warning("outbox over its cap (%d rows / %d bytes allowed): dropped the %d oldest telemetry "
                        "records (counted as dropped)", max_rows, max_bytes, dropped)

    def _housekeeping(self) -> None:
        self.more_housekeeping = False
        if self.archive is None:
            return
        t0 = time.monotonic()
        assert self.q.conn is not None
        fixed = self.clock.archive_work(self.q.conn, self.archive, self._archive_seq(), t0 + WORK_BUDGET_S)
        # Age is judged only by a clock that is trusted now (a clock stepped ahead, or never set,
        # must not make records look old) and once the archive's timestamps are corrected. The
        # size cap does not depend on the clock.
        reading = self.clock.reading
        by_age = fixed and reading is not None and reading.trusted
        with on(ARCHIVE):
            removed = archive_store.enforce_limits(self.archive, self.cfg["archive"]["max_bytes"],
                                                   self.cfg["archive"]["retention_days"], budget_s=WORK_BUDGET_S,
                                                   now_ms=reading.wall_ms if reading is not None else None,
                                                   by_age=by_age)
        self.more_housekeeping = not fixed or (bool(removed) and time.monotonic() - t0 >= WORK_BUDGET_S)
        if removed:
            log.info("archive: removed %d records past retention or over the size cap", removed)

