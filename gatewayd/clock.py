"""The system clock as gatewayd judges it: wall time, time since boot, and whether the kernel
says the wall clock is synchronised.

Synchronised means what `timedatectl` ("System clock synchronized") and systemd's
`time-sync.target` mean: the kernel's NTP maximum error (`adjtimex`, read-only, no privilege
needed) is below 16 s. Any step of the clock (`date -s`, an NTP step) resets it, until a time
daemon vouches for the clock again. Where `adjtimex` is refused (the units keep `ProtectClock=yes`,
whose seccomp filter refuses even a read), the flag file of systemd-timesyncd is the first
fallback and `timedatectl` (timedated reads adjtimex for us, over D-Bus; asked at most once a
minute) the second; without any of them the state is unknown.

The source is injectable: `GATEWAYD_TEST_CLOCK=<file>` makes every reading come from a small
JSON file a test rewrites (`{"offset_ms": N, "synced": true|false|null, "boot_id": "...",
"boot_offset_ms": N}`), so the real forwarder process can be started at 1970 and stepped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_TEST_CLOCK = "GATEWAYD_TEST_CLOCK"
# A wall clock before this has not been set since boot (no RTC, an RTC reset to 2000, ...).
PLAUSIBLE_SINCE_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
MAXERROR_SYNCED_US = 16_000_000          # the kernel's NTP_PHASE_LIMIT; systemd's ntp_synced()
STA_UNSYNC = 0x0040
TIME_ERROR = 5
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")
TIMEDATECTL = ("timedatectl", "show", "--property=NTPSynchronized", "--value")
TIMEDATECTL_EVERY_S = 60.0
TIMEDATECTL_TIMEOUT_S = 2.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def now_ms() -> int:
    """Wall time in epoch milliseconds: the one way gatewayd stamps anything."""
    return time.time_ns() // 1_000_000


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """glibc's `struct timex` (the `long` fields follow the platform: 32-bit on armhf)."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time", _Timeval), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
                ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
                ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
                ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("_reserved", ctypes.c_int * 11)]


@dataclass(frozen=True)
class Sync:
    known: bool
    synced: bool
    source: str                  # "adjtimex", "timesyncd", "test", or why it is unknown
    maxerror_us: int | None = None
    unsync_flag: bool | None = None

    def describe(self) -> str:
        if not self.known:
            return f"synchronisation unknown ({self.source})"
        state = "synchronised" if self.synced else "not synchronised"
        if self.maxerror_us is not None:
            state += f" (maximum error {self.maxerror_us / 1e6:g} s"
            state += ", STA_UNSYNC set)" if self.unsync_flag else ")"
        return state


@dataclass(frozen=True)
class Reading:
    """One look at the clocks. `offset_ms` (wall minus time since boot) changes only when the
    wall clock is stepped or slewed, so a jump in it is a step."""

    boot_id: str
    boot_ms: int
    wall_ms: int
    sync: Sync

    @property
    def offset_ms(self) -> int:
        return self.wall_ms - self.boot_ms

    @property
    def plausible(self) -> bool:
        return self.wall_ms >= PLAUSIBLE_SINCE_MS

    @property
    def trusted(self) -> bool:
        """The wall clock is known to be right: synchronised, or (state unknown) at least set."""
        return self.sync.synced if self.sync.known else self.plausible


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


class SystemClock:
    """The kernel's clocks. `adjtimex` with `modes = 0` only reads (about 2 µs)."""

    def __init__(self) -> None:
        self._boot_id = _boot_id()
        self._adjtimex: Any = None
        self._refused: str | None = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self._adjtimex = getattr(libc, "adjtimex", None) or libc.ntp_adjtime
            self._adjtimex.argtypes = [ctypes.POINTER(_Timex)]
            self._adjtimex.restype = ctypes.c_int
        except (OSError, AttributeError) as e:
            self._refused = f"no adjtimex: {e}"
        self._tx = _Timex()
        self._asked_at = float("-inf")
        self._answer: bool | None = None

    def _timedated(self) -> bool | None:
        """timedated's NTPSynchronized, asked at most once a minute (a subprocess, off the hot path)."""
        now = time.monotonic()
        if now - self._asked_at >= TIMEDATECTL_EVERY_S:
            self._asked_at = now
            try:
                out = subprocess.run(TIMEDATECTL, capture_output=True, text=True, timeout=TIMEDATECTL_TIMEOUT_S,
                                     check=False, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.SubprocessError):
                self._answer = None
            else:
                value = out.stdout.strip()
                self._answer = {"yes": True, "no": False}.get(value) if out.returncode == 0 else None
        return self._answer

    def wall_ms(self) -> int:
        return now_ms()

    def sync(self) -> Sync:
        if self._adjtimex is not None:
            tx = self._tx
            tx.modes = 0
            state = self._adjtimex(ctypes.byref(tx))
            if state >= 0:
                return Sync(True, tx.maxerror < MAXERROR_SYNCED_US, "adjtimex", int(tx.maxerror),
                            bool(tx.status & STA_UNSYNC))
            self._refused = f"adjtimex: {os.strerror(ctypes.get_errno())}"
        if TIMESYNCD_FLAG.exists():
            return Sync(True, True, "timesyncd")
        answer = self._timedated()
        if answer is not None:
            return Sync(True, answer, "timedated")
        return Sync(False, False, self._refused or "unknown")

    def read(self) -> Reading:
        sync = self.sync()
        boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000
        return Reading(self._boot_id, boot, self.wall_ms(), sync)


class FileClock(SystemClock):
    """The test source: the real clocks shifted by what a JSON file says, re-read when it changes."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._spec: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                spec = json.loads(self.path.read_text())
                self._spec = spec if isinstance(spec, dict) else {}
                self._stamp = stamp
        except (OSError, ValueError):
            pass  # a file being rewritten: keep the last reading
        return self._spec

    def wall_ms(self) -> int:
        return super().wall_ms() + int(self._load().get("offset_ms", 0))

    def sync(self) -> Sync:
        synced = self._load().get("synced")
        return Sync(False, False, "test: unknown") if synced is None else Sync(True, bool(synced), "test")

    def read(self) -> Reading:
        spec = self._load()
        real = super().read()
        boot = real.boot_ms + int(spec.get("boot_offset_ms", 0))
        return Reading(str(spec.get("boot_id", real.boot_id)), boot, self.wall_ms(), self.sync())


def system_clock(env: dict[str, str] | None = None) -> SystemClock:
    """The kernel's clocks, or the test source named by $GATEWAYD_TEST_CLOCK."""
    path = (os.environ if env is None else env).get(ENV_TEST_CLOCK)
    return FileClock(Path(path)) if path else SystemClock()
