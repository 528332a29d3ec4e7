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
import hashlib
import json
import logging
import operator
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

from gatewayd import privacy
from gatewayd.clock import PLAUSIBLE_SINCE_MS, Reading, system_clock
from gatewayd.config import Config
from gatewayd.forwarder.clocktrack import CLOCK_CORRECTED, CLOCK_OK, CLOCK_UNSYNCED, ClockTrack, Fixer
from gatewayd.inotify import DirectoryWatch
from gatewayd.records import DROPPED, MAX_TYPE_BYTES, Record, parse, plain_prefix, type_name
from gatewayd.store import archive as archive_store
from gatewayd.store import controller as controller_store
from gatewayd.store import queues
from gatewayd.store.check import BackgroundCheck, UncleanMarker
from gatewayd.store.controller import Oversized
from gatewayd.store.db import Tracked, data_version, get_mark, schema_version, set_mark, transaction
from gatewayd.store.errors import Fault, classify, describe
from gatewayd.store.faults import FaultState, code_name, keep_connection
from gatewayd.store.queues import DeadLetter, NewRow
from gatewayd.store.space import Headroom

log = logging.getLogger("gatewayd.forwarder")

MARK = "controller"
BATCH_STATE = "forwarder.batch"  # {"epoch", "schema", "delete": [[first, last], ...], "last"} of the last batch
CLOCK_STATE = "forwarder.clock"  # ClockTrack.state(): boots, clock segments, what is left to correct
CLOCK_WAIT_RECHECK_S = 1.0
HOUSEKEEPING_EVERY_S = 60.0
WORK_BUDGET_S = 0.5              # longest cap / retention pass per loop iteration
IDLE_WAIT_S = 5.0                # with inotify: the longest sleep between looks when nothing is written
LOW_SPACE_RETRY_S = 2.0
BATCH_MAX_BYTES = 16 << 20       # a batch stops after about this many message bytes
RAW_KEEP_BYTES = 1 << 20         # what a dead letter keeps of an oversized value
MESSAGE_MIN_LIMIT = 1 << 20
YOUNG_GENERATION = 20_000        # objects allocated between two collections of the youngest generation

QUEUES, ARCHIVE, CONTROLLER = "queues.db", "archive.db", "controller database"
_RECORD = operator.itemgetter(1)
_ARCHIVE = operator.attrgetter("archive")
_TS = operator.attrgetter("ts")


class StoreFault(Exception):
    """A database call failed; `where` names the file, `exc` is SQLite's (or the OS's) error."""

    def __init__(self, where: str, exc: BaseException):
        super().__init__(f"{where}: {describe(exc)}")
        self.where = where
        self.exc = exc


class Paused(Exception):
    """Bulk records must wait (disk space); not an error of any database."""


@contextlib.contextmanager
def on(where: str) -> Iterator[None]:
    """Tag database and OS errors with the file they concern; anything else is a bug and passes."""
    try:
        yield
    except (sqlite3.Error, OSError) as e:
        raise StoreFault(where, e) from e


# A row that passed: (controller id, the record, the controller's type as text). A plain tuple:
# the forwarder makes hundreds of thousands a second.
Good = tuple[int, Record, str]


def id_ranges(ids: Sequence[int]) -> list[list[int]]:
    """Ascending ids as inclusive [first, last] ranges of consecutive values."""
    if not ids:
        return []
    if ids[-1] - ids[0] + 1 == len(ids):
        return [[ids[0], ids[-1]]]
    out = [[ids[0], ids[0]]]
    for i in ids[1:]:
        if i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _display(value: object) -> tuple[str | None, bytes | None]:
    """(text for the dead letter's `message`, exact bytes when the text cannot hold them)."""
    if isinstance(value, bytes):
        try:
            return value.decode(), None
        except UnicodeDecodeError:
            return value.decode("utf-8", "backslashreplace"), value
    if value is None:
        return None, None
    return repr(value), None


def fingerprint(row: controller_store.Row) -> str:
    """What identifies a controller row moved: its id and values as read. The same id with the
    same values after a schema change is the same table (a controller's migration), not a new one."""
    return hashlib.blake2b(repr(row).encode("ascii", "backslashreplace"), digest_size=12).hexdigest()


def _shifted(rec: Record, delta: int) -> Record:
    """A copy of a record with its timestamp moved by `delta` ms (the payload's `ts` too)."""
    ts = rec.ts + delta
    payload = rec.payload
    if rec.kind == queues.KIND_TELEMETRY:
        obj = json.loads(payload)
        obj["ts"] = ts
        payload = json.dumps(obj, separators=(",", ":"))
    return Record(rec.kind, rec.priority, rec.topic, payload, ts, rec.archive)


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
        self.clock = system_clock()
        self.clock_mode: str = fwd["wait_for_clock"]
        self.clock_wait_ms = int(fwd["wait_for_clock_max_s"] * 1000)
        self.track: ClockTrack | None = None
        self.reading: Reading | None = None
        self.clock_waiting = False
        self._clock_codes: dict[int, int] = {}  # controller id -> archive.clock, for this batch's flagged rows
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
        self.corrected_total = 0
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
        if self.clock_waiting:
            return self._clock_wait_text()
        busy = time.monotonic() - self._last_move < 2.0
        privacy_note = f", {self.privacy_total} dropped by the privacy policy" if self.privacy_total else ""
        clock_note = f", {self.corrected_total} timestamps corrected" if self.corrected_total else ""
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
    def _track(self) -> ClockTrack:
        if self.track is None:
            assert self.q.conn is not None
            with on(QUEUES):
                self.track = ClockTrack(queues.get_state(self.q.conn, CLOCK_STATE))
        return self.track

    def _save_track(self) -> None:
        assert self.q.conn is not None and self.track is not None
        with on(QUEUES):
            queues.save_state(self.q.conn, CLOCK_STATE, self.track.state(self.clock_waiting))

    def _archive_seq(self) -> int:
        if self.archive is None:
            return 0
        with on(ARCHIVE):
            return archive_store.sequence(self.archive)

    def _clock_wait(self) -> bool:
        """Read the clock, note a step, a new boot or synchronisation; True while controller records
        must wait for it (`[forwarder] wait_for_clock`)."""
        track = self._track()
        seq: int | None = None
        if self.c.conn is not None and not self.draining:
            with on(CONTROLLER):
                seq = controller_store.sequence(self.c.conn) or 0
        reading = self.reading = self.clock.read()
        events = track.observe(reading, self.epoch, self.mark, self._archive_seq, seq)
        for event in events:
            log.log(logging.WARNING if "stepped" in event else logging.INFO, "clock: %s", event)
        changed = bool(events)
        if changed:
            self.more_housekeeping = True  # the archive's copies are corrected before anything else
        wait, started = track.waiting(self.clock_mode, self.clock_wait_ms)
        if wait and seq is not None:  # rows held back now may be read in a later boot: they are this boot's
            changed = track.note_seen(seq) or changed
        flipped = wait != self.clock_waiting
        self.clock_waiting = wait
        if changed or started or flipped:
            self._save_track()
        if started and wait:
            log.warning("%s; controller records wait in the controller queue for up to %.0f s",
                        self._clock_wait_text(), self.clock_wait_ms / 1000)
        if flipped and not wait:
            if track.wait_left_ms(self.clock_wait_ms) > 0:
                log.info("the clock is set (%s): controller records flow again", reading.sync.describe())
            else:
                log.warning("waited %.0f s for the clock, which is still %s: controller records flow with "
                            "the timestamps they have (counted as clock.unsynced)", self.clock_wait_ms / 1000,
                            reading.sync.describe())
        return wait

    def _clock_wait_text(self) -> str:
        r = self.reading
        if r is None or self.track is None:
            return "waiting for the system clock"
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r.wall_ms / 1000))
        return (f"waiting for the system clock (reads {when}, {r.sync.describe()}; "
                f"{self.track.wait_left_ms(self.clock_wait_ms) / 1000:.0f} s left)")

    def _fix_clock(self, good: list[Good], fixer: Fixer) -> None:
        """Correct the records stamped by a clock since found wrong (by the measured step), flag
        those that cannot be (`_clock_codes`, for the archive)."""
        for i, (rid, rec, name) in enumerate(good):
            ts = rec.ts
            if ts >= PLAUSIBLE_SINCE_MS and not fixer.lo <= ts <= fixer.hi:
                continue
            delta, code = fixer.classify(rid, ts)
            if code == CLOCK_OK:
                if ts < PLAUSIBLE_SINCE_MS:
                    self._clock_codes[rid] = CLOCK_OK  # pending: corrected once the clock is vouched for
                continue
            self._clock_codes[rid] = code
            if delta:
                good[i] = (rid, _shifted(rec, delta), name)
                self.corrected_total += 1

    def _archive_clock_work(self, deadline: float) -> bool:
        """Correct (or flag) the archive's copies of records stamped by a clock found wrong; True once
        nothing is left to do."""
        track = self.track
        archive = self.archive
        if track is None or archive is None:
            return True
        for job in track.archive_jobs(self._archive_seq()):
            done, total = job.a_lo, 0
            while done < job.a_hi:
                if time.monotonic() >= deadline:
                    track.archive_progress(job, done, False)
                    self._save_track()
                    return False
                with on(ARCHIVE):
                    n, done = archive_store.fix_clock(archive, done, job.a_hi, job.lo, job.hi, job.delta)
                total += n
            track.archive_progress(job, done, True)
            self._save_track()
            if total and job.delta is not None:
                log.info("archive: corrected the timestamps of %d records by %+.3f s (measured clock step)",
                         total, job.delta / 1000)
            elif total:
                log.warning("archive: %d records were stamped by a clock that was never set or synchronised "
                            "before its boot ended; kept and flagged (clock = 2), never removed for their age",
                            total)
        return True

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
        """Decide where reading resumes: same table, a new file, or a table recreated in the same file.

        A table dropped and recreated reuses ids from 1, which a mark would silently skip (and a
        delete of 'moved' ids would remove unread). It shows as an AUTOINCREMENT sequence below the
        mark, or as a schema change with rows at or below the mark: a new epoch, read from the
        start. When unsure, reading again (duplicates) is preferred to skipping (loss).
        """
        ctrl, q = self.c.conn, self.q.conn
        assert ctrl is not None and q is not None
        with on(CONTROLLER):
            rebuilt = controller_store.ensure_autoincrement(ctrl)
            epoch = controller_store.epoch(ctrl)
            schema = schema_version(ctrl)
            seq = controller_store.sequence(ctrl)
        with on(QUEUES):
            q_epoch, mark = get_mark(q, MARK)
            saved = queues.get_state(q, BATCH_STATE) or {}
        pending: list[list[int]] = []
        if q_epoch != epoch:
            if q_epoch:
                log.warning("controller database %s is a new file (epoch %s, was %s); reading it from the start",
                            self.cfg.controller_db, epoch, q_epoch)
            mark = 0
        else:
            same = saved.get("epoch") == epoch
            recreated = ""
            if mark > 0 and (seq is None or seq < mark or rebuilt):
                recreated = f"its id sequence is at {seq or 0}, below the {mark} already moved"
            elif same and saved.get("schema") not in (None, schema):
                with on(CONTROLLER):
                    if controller_store.has_rows_upto(ctrl, mark):
                        if seq is not None and saved.get("last") and self._last_row_print(ctrl, mark) == saved["last"]:
                            # The rows moved are still there, unchanged: a migration (an index, a
                            # column, a trigger) while their delete was pending. Delete them now.
                            pending = saved.get("delete") or []
                        else:
                            recreated = f"its schema changed and it holds rows with ids up to {mark} again"
            elif same:
                pending = saved.get("delete") or []
                with on(CONTROLLER):
                    at_mark = self._last_row_print(ctrl, mark) if saved.get("last") and mark > 0 else None
                if at_mark is not None and at_mark != saved["last"]:
                    # The ids were reused (`DELETE FROM sqlite_sequence`, the usual way to empty a
                    # table and restart its ids): the recorded ranges now name rows never moved.
                    recreated = f"its ids were reused: the row at {mark} is not the one moved"
            if not recreated and pending:
                with on(CONTROLLER):
                    controller_store.delete_ranges(ctrl, [(int(a), int(b)) for a, b in pending], schema)
                pending = []
            if not recreated and mark > 0:
                with on(CONTROLLER):
                    if controller_store.has_rows_upto(ctrl, mark):
                        recreated = f"it holds rows with ids up to {mark} that were never moved"
            if recreated:
                log.warning("controller table 'messages' in %s was recreated (%s): a new epoch, read from "
                            "the start", self.cfg.controller_db, recreated)
                with on(CONTROLLER):
                    epoch = controller_store.new_epoch(ctrl)
                mark = 0
        with on(QUEUES), transaction(q):
            set_mark(q, MARK, epoch, mark)
            queues.set_state(q, BATCH_STATE, {"epoch": epoch, "schema": schema, "delete": []})
        self.epoch, self.mark, self.schema, self.pending = epoch, mark, schema, []
        self.archive_mark = 0
        if self.archive is not None:
            with on(ARCHIVE):
                a_epoch, a_mark = get_mark(self.archive, MARK)
            self.archive_mark = a_mark if a_epoch == epoch else 0
        self.seen_version = -1
        self.reconcile = False

    def _last_row_print(self, ctrl: sqlite3.Connection, mark: int) -> str | None:
        _, rows = controller_store.read_batch(ctrl, mark - 1, 1, self.max_message, BATCH_MAX_BYTES)
        return fingerprint(rows[0]) if rows and rows[0][0] == mark else None

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
            name = names.get(type_)  # type: ignore[arg-type]
            if name is None or type(message) is not bytes:
                item = self._examine(ctrl, row)
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
                good.append((rid, rec, name))  # type: ignore[arg-type]
            elif rec is DROPPED:
                dropped.append(rid)
            else:
                bad.append(self._dead(row, rec))  # type: ignore[arg-type]
                log.warning("controller row %d dead-lettered: %s", rid, rec)
        untrusted = self.reading is not None and not self.reading.trusted
        fixer = self.track.fixer if self.track is not None else None
        self._clock_codes = {}
        # Without a fixer (every clock segment vouched for) the archive flags a stamp before 2025 itself.
        if good and fixer is not None and (fixer.active or min(map(_TS, map(_RECORD, good))) < PLAUSIBLE_SINCE_MS):
            self._fix_clock(good, fixer)

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

    def _examine(self, ctrl: sqlite3.Connection, row: controller_store.Row) -> Good | DeadLetter | None:
        """The careful path for one row: a value that is not text, too long, or a type not seen before.
        None: the privacy policy drops it."""
        rid, type_, message = row
        type_len = type_.length if isinstance(type_, Oversized) else len(type_) if isinstance(type_, bytes) else 0
        if type_len > MAX_TYPE_BYTES:
            if isinstance(type_, bytes):
                head: bytes | None = type_[:MAX_TYPE_BYTES]
            else:
                with on(CONTROLLER):
                    head = controller_store.read_prefix(ctrl, rid, "type", MAX_TYPE_BYTES)
            text = _display(head)[0]
            return self._dead(row, f"type is {type_len} bytes long, more than {MAX_TYPE_BYTES}",
                              f"{text}…" if text is not None else None, ctrl)
        if isinstance(message, Oversized):
            return self._dead(row, f"message is {message.length} bytes, more than the {self.max_message} a "
                              f"record may have (the first {min(message.length, RAW_KEEP_BYTES)} bytes are kept)",
                              None, ctrl)
        name = type_name(type_)
        if len(self._type_names) >= 1000:
            self._type_names.clear()
        self._type_names[type_] = name  # type: ignore[index]
        try:
            rec = parse(name, message, self.max_packet, self.policy)
        except Exception as e:  # noqa: BLE001 - one row's problem, never the queue's
            rec = f"cannot be processed ({type(e).__name__}: {e})"
        if isinstance(rec, str):
            return self._dead(row, rec)
        if not isinstance(rec, Record):
            return None
        return rid, rec, name

    @staticmethod
    def _dead(row: controller_store.Row, reason: str, type_text: str | None = None,
              ctrl: sqlite3.Connection | None = None) -> DeadLetter:
        """The dead letter of a row: its reason, readable text, and the exact bytes when text cannot
        hold them (the first RAW_KEEP_BYTES of a value too long to read whole)."""
        rid, type_, message = row
        if type_text is None:
            type_text = _display(type_)[0]
        if isinstance(message, Oversized):
            assert ctrl is not None
            with on(CONTROLLER):
                head = controller_store.read_prefix(ctrl, rid, "message", RAW_KEEP_BYTES)
            return DeadLetter(rid, type_text, None, reason, head, message.length)
        text, raw = _display(message)
        return DeadLetter(rid, type_text, text, reason, raw, len(raw) if raw is not None else None)

    def _commit_archive(self, good: list[Good], bad: list[DeadLetter], last: int) -> None:
        archive = self.archive
        assert archive is not None
        mark = self.archive_mark
        rows = [(rec.ts, name or rec.kind, rec.payload) for src_id, rec, name in good
                if rec.archive and src_id > mark]
        try:
            with transaction(archive):
                codes = self._clock_codes
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
                    if src_id in self._clock_codes:
                        archive_store.insert_flagged(archive, [(*row, self._clock_codes[src_id])])
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
            if untrusted or self._clock_codes:
                flags = [self._clock_codes.get(g[0], CLOCK_OK) for g in new_good]
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
        fixed = self._archive_clock_work(t0 + WORK_BUDGET_S)
        # Age is judged only by a clock that is trusted now (a clock stepped ahead, or never set,
        # must not make records look old) and once the archive's timestamps are corrected. The
        # size cap does not depend on the clock.
        reading = self.reading
        by_age = fixed and reading is not None and reading.trusted
        with on(ARCHIVE):
            removed = archive_store.enforce_limits(self.archive, self.cfg["archive"]["max_bytes"],
                                                   self.cfg["archive"]["retention_days"], budget_s=WORK_BUDGET_S,
                                                   now_ms=reading.wall_ms if reading is not None else None,
                                                   by_age=by_age)
        self.more_housekeeping = not fixed or (bool(removed) and time.monotonic() - t0 >= WORK_BUDGET_S)
        if removed:
            log.info("archive: removed %d records past retention or over the size cap", removed)

