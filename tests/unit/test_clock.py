"""The clock: the kernel's sync state, the injectable test source, the forwarder's model of clock
steps (which records are corrected by how much, which are flagged), and the archive's side
(corrections, flags, retention that never trusts a stepped clock)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.clock import MAXERROR_SYNCED_US, PLAUSIBLE_SINCE_MS, FileClock, Reading, Sync, SystemClock, system_clock
from gatewayd.forwarder.clocktrack import (
    CLOCK_CORRECTED,
    CLOCK_OK,
    CLOCK_UNSYNCED,
    INF,
    MAX_SEGMENTS,
    STEP_MS,
    ClockTrack,
)
from gatewayd.store import archive as archive_store

SYNCED = Sync(True, True, "test")
UNSYNCED = Sync(True, False, "test")
REAL_2026 = 1_767_225_600_000  # 2026-01-01, what NTP says


def reading(boot_ms: int, offset_ms: int, sync: Sync = UNSYNCED, boot_id: str = "boot-a") -> Reading:
    return Reading(boot_id, boot_ms, boot_ms + offset_ms, sync)


def observe(track: ClockTrack, r: Reading, seen: int = 0) -> list[str]:
    events = track.observe(r, "epoch", 0, lambda: 0, seen)
    track.note_seen(seen)
    return events


# -- sources ----------------------------------------------------------------------------------

def test_the_kernel_is_asked_like_timedatectl_does() -> None:
    r = SystemClock().read()
    assert r.sync.source == "adjtimex" and r.sync.known  # read-only adjtimex needs no privilege
    assert r.sync.maxerror_us is not None and r.sync.maxerror_us >= 0
    assert r.sync.synced == (r.sync.maxerror_us < MAXERROR_SYNCED_US)
    assert r.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert abs(r.wall_ms - time.time() * 1000) < 5000 and r.boot_ms > 0
    later = SystemClock().read()
    assert later.boot_ms >= r.boot_ms and abs(later.offset_ms - r.offset_ms) < 1000


def test_the_test_source_follows_its_file(tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    path.write_text(json.dumps({"offset_ms": -int(time.time() * 1000) + 3_600_000, "synced": False}))
    clock = system_clock({"GATEWAYD_TEST_CLOCK": str(path)})
    assert isinstance(clock, FileClock)
    r = clock.read()
    assert 3_500_000 < r.wall_ms < 3_700_000 and not r.plausible and not r.trusted
    assert r.sync == Sync(True, False, "test")
    path.write_text(json.dumps({"offset_ms": 0, "synced": True, "boot_id": "other", "boot_offset_ms": -1000}))
    r2 = clock.read()
    assert r2.trusted and r2.boot_id == "other" and abs(r2.wall_ms - time.time() * 1000) < 5000
    path.write_text(json.dumps({"synced": None}))
    assert clock.read().sync.known is False and clock.read().trusted  # unknown: a set clock is trusted
    path.write_text("{half")  # a file being rewritten: the last reading stands
    assert clock.read().sync.known is False
    assert type(system_clock({})) is SystemClock


# -- the model --------------------------------------------------------------------------------

def test_a_clock_set_from_1970_corrects_what_it_stamped() -> None:
    track = ClockTrack()
    observe(track, reading(10_000, 0))                    # booted at 1970, not synchronised
    assert track.waiting("set", 600_000) == (True, True)
    assert track.waiting("set", 600_000) == (True, False)
    observe(track, reading(40_000, 0))
    step = REAL_2026 - 50_000
    events = observe(track, reading(50_000, step))        # NTP steps the clock...
    assert any("stepped by" in e for e in events)
    assert track.waiting("set", 600_000)[0] is False      # set: plausible now
    assert track.waiting("sync", 600_000)[0] is True      # not yet vouched for
    events = observe(track, reading(51_000, step, SYNCED))  # ...and vouches for it
    assert any("corrected by" in e for e in events)
    assert track.waiting("sync", 600_000)[0] is False
    fixer = track.fixer
    assert fixer is not None and fixer.active
    assert fixer.classify(5, 30_000) == (step, CLOCK_CORRECTED)         # stamped at 1970 + 30 s
    assert fixer.classify(6, REAL_2026 + 60_000) == (0, CLOCK_OK)       # stamped after the step
    assert fixer.classify(7, REAL_2026 - 86_400_000 * 200) == (0, CLOCK_OK)  # old data, not ours to judge
    assert fixer.classify(8, PLAUSIBLE_SINCE_MS - 1) == (0, CLOCK_UNSYNCED)  # no set clock says that
    assert track.state()["boots"][0]["segments"][0]["delta"] == step
    assert ClockTrack(json.loads(json.dumps(track.state()))).state() == track.state()


def test_a_small_step_is_no_correction_and_slew_is_no_step() -> None:
    track = ClockTrack()
    observe(track, reading(1_000, REAL_2026))
    for i in range(1, 100):
        observe(track, reading(1_000 + 5_000 * i, REAL_2026 + 4 * i))  # chrony slewing hard: 0.8 ms/s
    assert len(track.boots[0].segments) == 1
    observe(track, reading(600_000, REAL_2026 + 900, SYNCED))          # a 0.5 s correction at sync
    assert track.fixer is None and track.boots[0].segments[0].good


def test_waiting_is_bounded_per_boot() -> None:
    track = ClockTrack()
    observe(track, reading(100_000, 0))
    assert track.waiting("set", 5_000)[0]
    observe(track, reading(104_999, 0))
    assert track.waiting("set", 5_000)[0] and track.wait_left_ms(5_000) == 1
    observe(track, reading(105_000, 0))
    assert not track.waiting("set", 5_000)[0]
    assert track.waiting("no", 5_000) == (False, False)
    # the bound survives a restart of the forwarder (same boot): it is saved
    again = ClockTrack(track.state())
    again.observe(reading(106_000, 0), "epoch", 0, lambda: 0)
    assert not again.waiting("set", 5_000)[0]
    # a new boot waits again
    again.observe(reading(1_000, 0, boot_id="boot-b"), "epoch", 0, lambda: 0)
    assert again.waiting("set", 5_000)[0]


def test_a_boot_that_ended_unsynchronised_is_flagged_and_its_rows_told_from_the_next_ones() -> None:
    """Two boots, both starting at 1970 (no RTC): their stamps overlap. Rows of the first, which
    never got a synchronised clock, stay uncorrected and flagged; the second boot's are corrected."""
    track = ClockTrack()
    observe(track, reading(1_000, 0), seen=0)
    observe(track, reading(60_000, 0), seen=40)          # rows 1..40 written at 1970 + [1 s, 60 s]
    observe(track, reading(2_000, 0, boot_id="boot-b"), seen=40)
    assert track.boots[0].segments[0].lost and track.boots[1].first_id == 41
    observe(track, reading(30_000, 0, boot_id="boot-b"), seen=80)   # rows 41..80 at 1970 + [2 s, 30 s]
    step = REAL_2026 - 31_000
    observe(track, reading(31_000, step, SYNCED, boot_id="boot-b"))
    fixer = track.fixer
    assert fixer is not None
    assert fixer.classify(20, 20_000) == (0, CLOCK_UNSYNCED)        # boot a: kept, flagged
    assert fixer.classify(60, 20_000) == (step, CLOCK_CORRECTED)    # boot b: corrected
    assert fixer.classify(90, REAL_2026 + 5_000) == (0, CLOCK_OK)
    jobs = track.archive_jobs(500)
    assert {(j.delta, j.a_hi) for j in jobs} == {(None, 0), (step, 500)}


def test_a_new_controller_file_makes_ids_say_nothing_of_earlier_boots() -> None:
    track = ClockTrack()
    track.observe(reading(1_000, 0), "old-epoch", 0, lambda: 0)
    track.note_seen(1000)
    track.observe(reading(1_000, 0, boot_id="boot-b"), "old-epoch", 0, lambda: 0)
    assert track.boots[1].first_id == 1001
    track.observe(reading(2_000, 0, boot_id="boot-b"), "new-epoch", 0, lambda: 0)
    assert track.boots[1].first_id == 0
    fixer = track.fixer
    assert fixer is not None and [r.first_id for r in fixer.rules] == [0]  # the old boot's rules are out


def test_segments_and_boots_are_bounded() -> None:
    track = ClockTrack()
    for i in range(3 * MAX_SEGMENTS):
        observe(track, reading(1_000 * (i + 1), 10_000 * i))
    assert len(track.boots[0].segments) == MAX_SEGMENTS
    for b in range(10):
        observe(track, reading(1_000, 0, boot_id=f"b{b}"))
    assert len(track.boots) == 3
    assert ClockTrack({"boots": [{"nonsense": 1}]}).boots == []  # another version's state: start over
    bad = track.state()
    bad["boots"][0]["segments"][0]["u"] = "soon"
    assert ClockTrack(bad).boots == []
    assert ClockTrack("not a dict").boots == [] and ClockTrack(track.state()).state() == track.state()


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, int]]:
    """A boot's events: ("wait", ms) advances time (a reading every <= 5 s, a record stamped before
    each), ("step", ms) steps the clock by at least a minute, ("sync", 0) / ("lose", 0)."""
    ops = draw(st.lists(st.one_of(
        st.tuples(st.just("wait"), st.integers(1, 5_000)),
        st.tuples(st.just("step"), st.integers(60_000, 10**12) | st.integers(-10**12, -60_000)),
        st.tuples(st.just("sync"), st.just(0)),
        st.tuples(st.just("lose"), st.just(0)),
    ), min_size=1, max_size=40))
    return ops


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.integers(0, 10**12))
def test_every_record_is_corrected_to_true_time_or_left_as_it_was(ops: list[tuple[str, int]], start: int) -> None:
    """The true time is the offset of any synchronised moment (NTP's). A record stamped while the
    clock was off comes back to the true time exactly once a synchronised segment followed its own;
    one stamped by a vouched clock is never touched; the others wait (pending), untouched."""
    truth = REAL_2026
    offset, synced, boot = start, False, 1_000
    vouched = [False]  # per segment of the simulated clock
    track = ClockTrack()
    records: list[tuple[int, int, int, int]] = []  # (id, ts, true stamp time, segment)
    observe(track, reading(boot, offset))
    for op, arg in ops:
        if op == "wait":
            records.append((len(records) + 1, boot + offset, boot + truth, len(vouched) - 1))
            boot += arg
        elif op == "step":  # a step resets the kernel's sync state until a daemon vouches again
            offset += arg
            synced = False
            vouched.append(False)
        elif op == "sync":
            if abs(offset - truth) > STEP_MS:  # within a second it is a slew, not a step
                vouched.append(True)
            offset, synced, vouched[-1] = truth, True, True
        else:
            synced = False
        observe(track, reading(boot, offset, SYNCED if synced else UNSYNCED), seen=len(records))
    fixer = track.fixer
    for rid, ts, true_ts, seg in records:
        delta, code = fixer.classify(rid, ts) if fixer is not None else (0, CLOCK_OK)
        if vouched[seg] or abs(ts - true_ts) <= STEP_MS:
            assert (delta, code) == (0, CLOCK_OK)
        elif any(vouched[seg + 1:]):
            assert code == CLOCK_CORRECTED and ts + delta == true_ts
        else:
            assert (delta, code) == (0, CLOCK_OK)  # pending: corrected once the clock is synchronised


# -- the archive ------------------------------------------------------------------------------

@pytest.fixture
def archive(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = archive_store.open_archive(tmp_path / "archive.db")
    try:
        yield conn
    finally:
        conn.close()


def fill(conn: sqlite3.Connection, stamps: list[int], clock: int = 0) -> None:
    with conn:
        archive_store.insert_flagged(conn, [(ts, "telemetry", json.dumps({"ts": ts}), clock) for ts in stamps])


def test_archive_copies_are_corrected_once_or_flagged(archive: sqlite3.Connection) -> None:
    fill(archive, [1_000, 2_000, REAL_2026, 3_000])  # ids 1..4
    n, done = archive_store.fix_clock(archive, 0, 4, -2_000, 10_000, REAL_2026)
    assert (n, done) == (3, 4)
    assert archive_store.fix_clock(archive, 0, 4, -2_000, 10_000, REAL_2026) == (0, 4)  # idempotent
    rows = archive.execute("SELECT ts, clock FROM archive ORDER BY id").fetchall()
    assert rows == [(REAL_2026 + 1_000, 1), (REAL_2026 + 2_000, 1), (REAL_2026, 0), (REAL_2026 + 3_000, 1)]
    fill(archive, [5_000, 6_000])  # ids 5, 6
    assert archive_store.fix_clock(archive, 4, 6, 0, 5_500, None, chunk=1) == (1, 5)
    assert archive_store.fix_clock(archive, 5, 6, 0, 5_500, None, chunk=1) == (0, 6)
    assert archive_store.clock_counts(archive) == {1: 3, 2: 1}


def test_a_stamp_before_2025_is_flagged_by_the_archive_itself(archive: sqlite3.Connection) -> None:
    with archive:
        archive_store.insert(archive, [(5_000, "telemetry", "{}"), (PLAUSIBLE_SINCE_MS - 1, "telemetry", "{}"),
                                       (PLAUSIBLE_SINCE_MS, "telemetry", "{}")])
    assert [c for (c,) in archive.execute("SELECT clock FROM archive ORDER BY id")] == [2, 2, 0]


def test_retention_never_by_an_untrusted_clock_nor_past_the_flagged(archive: sqlite3.Connection) -> None:
    day = 86_400_000
    now = REAL_2026
    fill(archive, [5_000] * 30, clock=2)                # stamped at 1970, uncorrectable: kept
    fill(archive, [now - 10 * day] * 50)                # really old
    fill(archive, [now - day // 2] * 20)                # young
    removed = archive_store.enforce_limits(archive, 10**12, 1, chunk=7, now_ms=now, by_age=False)
    assert removed == 0
    removed = archive_store.enforce_limits(archive, 10**12, 1, chunk=7, now_ms=now)
    assert removed == 50  # went past the flagged head, stopped at the young rows
    assert archive.execute("SELECT count(*) FROM archive").fetchone()[0] == 50
    # the size cap alone may remove flagged rows (oldest first), whatever the clock
    removed = archive_store.enforce_limits(archive, 4096, 1, chunk=10, now_ms=now, by_age=False)
    assert removed == 50


def test_the_archive_migration_keeps_existing_rows(tmp_path: Path) -> None:
    path = tmp_path / "archive.db"
    with contextlib.closing(sqlite3.connect(path)) as c:
        c.executescript(archive_store.MIGRATIONS[0])
        c.execute("INSERT INTO archive(ts, type, message) VALUES (1, 'telemetry', '{}')")
        c.execute("PRAGMA user_version = 1")
        c.commit()
    conn = archive_store.open_archive(path)
    try:
        assert conn.execute("SELECT ts, clock FROM archive").fetchall() == [(1, 0)]
        assert archive_store.sequence(conn) == 1
    finally:
        conn.close()


def test_constants_agree() -> None:
    assert PLAUSIBLE_SINCE_MS < REAL_2026 and INF == 2**63 - 1
