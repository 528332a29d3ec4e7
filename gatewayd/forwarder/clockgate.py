"""Where the forwarder's clock history (`clocktrack.ClockTrack`) meets the records and the
databases: whether controller records wait for the clock, which timestamps of a batch are
corrected or flagged, and the archive's copies to correct (docs/DESIGN.md, "Clock")."""

from __future__ import annotations

import json
import logging
import operator
import sqlite3
import time
from collections.abc import Callable

from gatewayd.clock import PLAUSIBLE_SINCE_MS, Reading, system_clock
from gatewayd.forwarder.clocktrack import CLOCK_OK, ClockTrack
from gatewayd.forwarder.files import ARCHIVE, QUEUES, on
from gatewayd.records import Record
from gatewayd.store import archive as archive_store
from gatewayd.store import queues

log = logging.getLogger("gatewayd.forwarder")

CLOCK_STATE = "forwarder.clock"  # ClockTrack.state(): boots, clock segments, what is left to correct

# A row that passed: (controller id, the record, the controller's type as text). A plain tuple:
# the forwarder makes hundreds of thousands a second.
Good = tuple[int, Record, str]
_RECORD = operator.itemgetter(1)
_TS = operator.attrgetter("ts")


def shifted(rec: Record, delta: int) -> Record:
    """A copy of a record with its timestamp moved by `delta` ms (the payload's `ts` too)."""
    ts = rec.ts + delta
    payload = rec.payload
    if rec.kind == queues.KIND_TELEMETRY:
        obj = json.loads(payload)
        obj["ts"] = ts
        payload = json.dumps(obj, separators=(",", ":"))
    return Record(rec.kind, rec.priority, rec.topic, payload, ts, rec.archive)


class ClockGate:
    def __init__(self, mode: str, wait_max_s: float) -> None:
        self.clock = system_clock()
        self.mode = mode                 # [forwarder] wait_for_clock
        self.wait_ms = int(wait_max_s * 1000)
        self.track: ClockTrack | None = None
        self.reading: Reading | None = None
        self.waiting = False
        self.codes: dict[int, int] = {}  # controller id -> archive.clock, for this batch's flagged rows
        self.corrected = 0               # timestamps corrected since start

    @property
    def untrusted(self) -> bool:
        """The last reading was not trusted: what is read now counts as `clock.unsynced`."""
        return self.reading is not None and not self.reading.trusted

    def _track(self, q: sqlite3.Connection) -> ClockTrack:
        if self.track is None:
            with on(QUEUES):
                self.track = ClockTrack(queues.get_state(q, CLOCK_STATE))
        return self.track

    def _save(self, q: sqlite3.Connection) -> None:
        assert self.track is not None
        with on(QUEUES):
            queues.save_state(q, CLOCK_STATE, self.track.state(self.waiting))

    def check(self, q: sqlite3.Connection, seq: int | None, epoch: str, mark: int,
              archive_seq: Callable[[], int]) -> tuple[bool, bool]:
        """Read the clock, note a step, a new boot or synchronisation. (wait, changed): controller
        records must wait for the clock (`[forwarder] wait_for_clock`); something changed that the
        archive's copies may have to follow. `seq`: the controller's id sequence (None: not read)."""
        track = self._track(q)
        reading = self.reading = self.clock.read()
        events = track.observe(reading, epoch, mark, archive_seq, seq)
        for event in events:
            log.log(logging.WARNING if "stepped" in event else logging.INFO, "clock: %s", event)
        changed = observed = bool(events)
        wait, started = track.waiting(self.mode, self.wait_ms)
        if wait and seq is not None:  # rows held back now may be read in a later boot: they are this boot's
            changed = track.note_seen(seq) or changed
        flipped = wait != self.waiting
        self.waiting = wait
        if changed or started or flipped:
            self._save(q)
        if started and wait:
            log.warning("%s; controller records wait in the controller queue for up to %.0f s",
                        self.text(), self.wait_ms / 1000)
        if flipped and not wait:
            if track.wait_left_ms(self.wait_ms) > 0:
                log.info("the clock is set (%s): controller records flow again", reading.sync.describe())
            else:
                log.warning("waited %.0f s for the clock, which is still %s: controller records flow with "
                            "the timestamps they have (counted as clock.unsynced)", self.wait_ms / 1000,
                            reading.sync.describe())
        return wait, observed

    def text(self) -> str:
        r = self.reading
        if r is None or self.track is None:
            return "waiting for the system clock"
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r.wall_ms / 1000))
        return (f"waiting for the system clock (reads {when}, {r.sync.describe()}; "
                f"{self.track.wait_left_ms(self.wait_ms) / 1000:.0f} s left)")

    def fix(self, good: list[Good]) -> None:
        """Correct the records of a batch stamped by a clock since found wrong (by the measured step),
        flag those that cannot be (`codes`, for the archive)."""
        self.codes = {}
        fixer = self.track.fixer if self.track is not None else None
        # Without a fixer (every clock segment vouched for) the archive flags a stamp before 2025 itself.
        if not good or fixer is None or not (fixer.active or min(map(_TS, map(_RECORD, good))) < PLAUSIBLE_SINCE_MS):
            return
        for i, (rid, rec, name) in enumerate(good):
            ts = rec.ts
            if ts >= PLAUSIBLE_SINCE_MS and not fixer.lo <= ts <= fixer.hi:
                continue
            delta, code = fixer.classify(rid, ts)
            if code == CLOCK_OK:
                if ts < PLAUSIBLE_SINCE_MS:
                    self.codes[rid] = CLOCK_OK  # pending: corrected once the clock is vouched for
                continue
            self.codes[rid] = code
            if delta:
                good[i] = (rid, shifted(rec, delta), name)
                self.corrected += 1

    def archive_work(self, q: sqlite3.Connection, archive: sqlite3.Connection, archive_seq: int,
                     deadline: float) -> bool:
        """Correct (or flag) the archive's copies of records stamped by a clock found wrong; True once
        nothing is left to do."""
        track = self.track
        if track is None:
            return True
        for job in track.archive_jobs(archive_seq):
            done, total = job.a_lo, 0
            while done < job.a_hi:
                if time.monotonic() >= deadline:
                    track.archive_progress(job, done, False)
                    self._save(q)
                    return False
                with on(ARCHIVE):
                    n, done = archive_store.fix_clock(archive, done, job.a_hi, job.lo, job.hi, job.delta)
                total += n
            track.archive_progress(job, done, True)
            self._save(q)
            if total and job.delta is not None:
                log.info("archive: corrected the timestamps of %d records by %+.3f s (measured clock step)",
                         total, job.delta / 1000)
            elif total:
                log.warning("archive: %d records were stamped by a clock that was never set or synchronised "
                            "before its boot ended; kept and flagged (clock = 2), never removed for their age",
                            total)
        return True
