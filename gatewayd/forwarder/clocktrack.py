"""What the forwarder knows of the wall clock's history, and what it means for the records.

The wall clock minus the time since boot (`offset`) is constant while nobody touches the
clock; a jump of more than STEP_MS is a step. Each boot is a list of segments, one per
offset; a segment is *good* once a trusted reading (synchronised) was seen in it. A record
stamped during a segment that was not good, once a good one followed in the same boot, is
corrected by the measured step (good offset minus its offset). A record stamped in a boot
that ended before any good segment cannot be corrected: it is kept and flagged.

Which segment stamped a record is judged by its controller id (ids never go back within a
controller file: the rows of a boot begin after the highest id seen before it) and by its
`ts` (each segment stamped `ts` in [its first moment, its last] + its offset). Pure logic and
JSON state, so it is unit tested without a clock; see docs/DESIGN.md ("Clock").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gatewayd.clock import PLAUSIBLE_SINCE_MS, Reading

STEP_MS = 1000        # a slew moves the offset by at most 0.5 s between two readings 5 s apart
SLACK_MS = 2000       # around a segment's stamp range: readings are up to a loop iteration apart
MAX_BOOTS = 3
MAX_SEGMENTS = 32
INF = 2**63 - 1

# archive.clock: how far a record's ts can be trusted
CLOCK_OK, CLOCK_CORRECTED, CLOCK_UNSYNCED = 0, 1, 2


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


@dataclass
class Segment:
    b0: int                     # boot ms of the reading before it began (its earliest start)
    first: int                  # boot ms of its first reading
    b1: int                     # boot ms of its latest reading
    u: int                      # offset (wall - boot) in ms, as of the latest reading
    good: bool = False
    a0: int = 0                 # archive sequence when it began: its records are archived above
    min_id: int = 0             # controller rows below it were written before it could begin
    delta: int | None = None    # the correction, once a good segment followed
    lost: bool = False          # its boot ended before any good segment: uncorrectable
    archived: bool = False      # the archive's copies are corrected (delta) or flagged (lost)
    done_id: int = 0            # archive work done up to this id


@dataclass
class Boot:
    boot_id: str
    epoch: str                  # the controller file's epoch its ids refer to
    first_id: int               # controller rows with id >= first_id may be this boot's
    seen_id: int = 0            # the highest controller id known to exist during it
    a_end: int | None = None    # archive sequence when it ended (None: the current boot)
    wait_from: int | None = None  # boot ms when the forwarder first waited for the clock
    segments: list[Segment] = field(default_factory=list)


def _well_formed(boot: Boot) -> bool:
    def ints(*values: Any) -> bool:
        return all(type(v) is int for v in values)

    return (isinstance(boot.boot_id, str) and isinstance(boot.epoch, str) and bool(boot.segments)
            and ints(boot.first_id, boot.seen_id)
            and all(v is None or type(v) is int for v in (boot.a_end, boot.wait_from))
            and all(ints(s.b0, s.first, s.b1, s.u, s.a0, s.min_id, s.done_id)
                    and (s.delta is None or type(s.delta) is int)
                    and all(type(f) is bool for f in (s.good, s.lost, s.archived)) for s in boot.segments))


@dataclass(frozen=True)
class Rule:
    """Read-time rule: rows with first_id <= id <= last_id and lo <= ts <= hi."""

    first_id: int
    last_id: int
    lo: int
    hi: int
    delta: int | None           # correction, or None
    code: int                   # archive.clock for such rows (CLOCK_OK: pending, nothing to do now)


class Fixer:
    """Classifies rows read now. `envelope` bounds the ts of rows any correcting or flagging
    rule can touch; outside it (and above the plausibility floor) a row needs no look."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        acting = [r for r in rules if r.code != CLOCK_OK]
        self.active = bool(acting)
        self.lo = min((r.lo for r in acting), default=INF)
        self.hi = max((r.hi for r in acting), default=-INF)

    def classify(self, row_id: int, ts: int) -> tuple[int, int]:
        """(delta, archive clock code) of one row."""
        for r in reversed(self.rules):
            if r.first_id <= row_id <= r.last_id and r.lo <= ts <= r.hi:
                return r.delta or 0, r.code
        return 0, CLOCK_UNSYNCED if ts < PLAUSIBLE_SINCE_MS else CLOCK_OK


@dataclass(frozen=True)
class ArchiveJob:
    """Correct (delta) or flag (delta None) archive rows a_lo < id <= a_hi with lo <= ts <= hi."""

    boot: int
    segment: int
    a_lo: int
    a_hi: int
    lo: int
    hi: int
    delta: int | None


class ClockTrack:
    def __init__(self, state: Any = None):
        self.boots: list[Boot] = []
        try:
            for b in (state or {}).get("boots", []):
                segs = [Segment(**s) for s in b.pop("segments", [])]
                self.boots.append(Boot(**b, segments=segs))
            if not all(_well_formed(b) for b in self.boots):
                raise TypeError("not the shape this version writes")
        except (TypeError, AttributeError):
            self.boots = []  # a state written by another version: start over, nothing is corrected
        self.last: Reading | None = None
        self.last_seq: int | None = None  # the controller's sequence at the last reading
        self.fixer: Fixer | None = None
        self._rebuild()

    def state(self, waiting: bool = False) -> dict[str, Any]:
        """What is saved (state `forwarder.clock`); `waiting`: controller records wait for the clock."""
        return {"boots": [asdict(b) for b in self.boots], "waiting": waiting}

    @property
    def boot(self) -> Boot | None:
        return self.boots[-1] if self.boots else None

    @property
    def segment(self) -> Segment | None:
        return self.boots[-1].segments[-1] if self.boots and self.boots[-1].segments else None

    # -- readings --------------------------------------------------------------------------
    def observe(self, r: Reading, epoch: str, mark: int, archive_seq: Callable[[], int],
                seq: int | None = None) -> list[str]:
        """Take one reading (`seq`: the controller's id sequence now); what changed, in words for
        the journal (empty: nothing worth saving)."""
        self.last = r
        boot = self.boot
        events: list[str] = []
        if boot is None or boot.boot_id != r.boot_id:
            self._new_boot(r, epoch, mark, archive_seq())
            events.append(f"boot {r.boot_id}: the clock reads {_utc(r.wall_ms)}, {r.sync.describe()}")
            boot = self.boots[-1]
        else:
            if boot.epoch != epoch:  # another controller file: its ids say nothing of earlier boots
                boot.epoch, boot.first_id, boot.seen_id = epoch, 0, 0
                for s in boot.segments:
                    s.min_id = 0
                self.last_seq = None
                events.append(f"controller epoch {epoch}")
            seg = boot.segments[-1]
            if abs(r.offset_ms - seg.u) > STEP_MS:
                before = self.last_seq if self.last_seq is not None else max(boot.seen_id, boot.first_id - 1)
                self._add_segment(boot, Segment(seg.b1, r.boot_ms, r.boot_ms, r.offset_ms, a0=archive_seq(),
                                                min_id=max(before + 1, boot.first_id)))
                events.append(f"the clock was stepped by {(r.offset_ms - seg.u) / 1000:+.3f} s to "
                              f"{_utc(r.wall_ms)} ({r.sync.describe()})")
            else:
                seg.b1, seg.u = r.boot_ms, r.offset_ms
        if r.trusted and not boot.segments[-1].good:
            fixed = self._good(boot)
            events.append(f"the clock is {r.sync.describe()}" + (
                "; records stamped before are corrected by " + ", ".join(f"{d / 1000:+.3f} s" for d in fixed)
                if fixed else ""))
        if seq is not None:
            self.last_seq = seq
        if events:
            self._rebuild()
        return events

    def note_seen(self, seen_id: int) -> bool:
        """The controller's highest id while records wait: rows up to it are this boot's or older."""
        boot = self.boot
        if boot is None or seen_id <= boot.seen_id:
            return False
        boot.seen_id = seen_id
        return True

    def _new_boot(self, r: Reading, epoch: str, mark: int, archive_seq: int) -> None:
        first_id = mark + 1
        prev = self.boot
        if prev is not None:
            prev.a_end = archive_seq
            if prev.epoch == epoch:
                first_id = max(first_id, prev.seen_id + 1)
            for seg in prev.segments:  # no good segment followed these (it would have set a delta)
                if not seg.good and seg.delta is None:
                    seg.lost = True
        boot = Boot(r.boot_id, epoch, first_id, seen_id=mark)
        self.boots.append(boot)
        self._add_segment(boot, Segment(0, r.boot_ms, r.boot_ms, r.offset_ms, a0=archive_seq, min_id=first_id))
        self.last_seq = None
        while len(self.boots) > MAX_BOOTS:
            self.boots.pop(0)

    @staticmethod
    def _add_segment(boot: Boot, seg: Segment) -> None:
        boot.segments.append(seg)
        while len(boot.segments) > MAX_SEGMENTS:
            # forget the oldest segment with nothing left to do (else the oldest at all)
            idle = [i for i, s in enumerate(boot.segments[:-1]) if s.good or s.archived]
            boot.segments.pop(idle[0] if idle else 0)

    @staticmethod
    def _good(boot: Boot) -> list[int]:
        """The current segment is vouched for: every earlier one still open gets its correction
        (returned)."""
        seg = boot.segments[-1]
        seg.good = True
        fixed = []
        for earlier in boot.segments[:-1]:
            if not earlier.good and earlier.delta is None:
                delta = seg.u - earlier.u
                if abs(delta) <= STEP_MS:
                    earlier.good = earlier.archived = True
                else:
                    earlier.delta = delta
                    fixed.append(delta)
        return fixed

    # -- waiting ---------------------------------------------------------------------------
    def waiting(self, mode: str, max_ms: int) -> tuple[bool, bool]:
        """(wait, changed): should controller records wait for the clock now? "set": while it
        reads a time before the plausibility floor; "sync": while the current segment is not
        vouched for; either at most `max_ms` per boot, counted from the boot's first wait."""
        r, boot = self.last, self.boot
        if r is None or boot is None or mode == "no":
            return False, False
        need = not r.plausible if mode == "set" else not boot.segments[-1].good
        if not need:
            return False, False
        changed = boot.wait_from is None
        if changed:
            boot.wait_from = r.boot_ms
        assert boot.wait_from is not None
        return r.boot_ms - boot.wait_from < max_ms, changed

    def wait_left_ms(self, max_ms: int) -> int:
        boot, r = self.boot, self.last
        if boot is None or r is None or boot.wait_from is None:
            return max_ms
        return max(0, boot.wait_from + max_ms - r.boot_ms)

    # -- records ---------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """One rule per segment, oldest first; a row belongs to the newest whose ids and stamps fit
        (a good or pending segment's rule does nothing, but shadows older ones)."""
        rules: list[Rule] = []
        needed = False
        current = self.boot
        for i, boot in enumerate(self.boots):
            if current is not None and boot.epoch != current.epoch:
                continue
            later = [b.first_id for b in self.boots[i + 1:] if current is None or b.epoch == current.epoch]
            last_id = (min(later) - 1) if later else INF
            for j, seg in enumerate(boot.segments):
                nxt = boot.segments[j + 1].first if j + 1 < len(boot.segments) else None
                lo = seg.b0 + seg.u - SLACK_MS
                hi = (nxt + seg.u + SLACK_MS) if nxt is not None else INF
                first_id = max(boot.first_id, seg.min_id)
                needed = needed or not seg.good
                if seg.delta is not None:
                    rules.append(Rule(first_id, last_id, lo, hi, seg.delta, CLOCK_CORRECTED))
                elif seg.lost:
                    rules.append(Rule(first_id, last_id, lo, hi, None, CLOCK_UNSYNCED))
                else:
                    rules.append(Rule(first_id, last_id, lo, hi, None, CLOCK_OK))  # good, or pending
        self.fixer = Fixer(rules) if needed else None  # all vouched for: nothing to correct or flag

    # -- the archive's copies ----------------------------------------------------------------
    def archive_jobs(self, archive_seq: int) -> list[ArchiveJob]:
        jobs = []
        for i, boot in enumerate(self.boots):
            for j, seg in enumerate(boot.segments):
                if seg.archived or not (seg.delta is not None or seg.lost):
                    continue
                nxt = boot.segments[j + 1].first if j + 1 < len(boot.segments) else None
                hi = (nxt + seg.u + SLACK_MS) if nxt is not None else INF
                a_hi = boot.a_end if boot.a_end is not None else archive_seq
                a_lo = min(max(seg.a0, seg.done_id), a_hi)  # a replaced archive file starts its ids anew
                jobs.append(ArchiveJob(i, j, a_lo, a_hi, seg.b0 + seg.u - SLACK_MS, hi, seg.delta))
        return jobs

    def archive_progress(self, job: ArchiveJob, done_id: int, finished: bool) -> None:
        seg = self.boots[job.boot].segments[job.segment]
        seg.done_id = done_id
        seg.archived = finished

    def summary(self) -> dict[str, Any]:
        """For `gatewayctl status`: the current boot's segments and what is left to do."""
        boot = self.boot
        if boot is None:
            return {}
        return {"boot_id": boot.boot_id, "steps": len(boot.segments) - 1,
                "vouched": bool(boot.segments and boot.segments[-1].good),
                "waited_since_boot_ms": boot.wait_from,
                "corrections_ms": [s.delta for s in boot.segments if s.delta is not None],
                "uncorrectable_segments": sum(s.lost for b in self.boots for s in b.segments)}
