"""Integrity checks that never delay start-up.

`PRAGMA quick_check` reads every page, minutes on a 2 GB archive on an SD card, so it never
runs before READY. It runs only after an unclean shutdown (a process crash cannot damage a WAL
database; power loss and failing storage can), in a background thread on its own read-only
connection, throttled: every few thousand SQLite steps it sleeps as long as it worked, so it
takes at most about half of one core and of the disk. A WAL reader blocks no writer. The
owner polls `results()` from its loop and alone decides what to do with a damaged file.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gatewayd.store.db import open_readonly
from gatewayd.store.errors import Fault, classify, describe

log = logging.getLogger("gatewayd.store")

STEPS_PER_SLICE = 20_000
MAX_PROBLEMS = 5


@dataclass(frozen=True)
class Result:
    path: Path
    problem: str | None      # None: the file is sound
    seconds: float
    slices: int              # how often the check paused (its cost, in units of STEPS_PER_SLICE)


class UncleanMarker:
    """`<dir>/.<name>.running` exists while a daemon runs; found at start, the last run did not stop cleanly."""

    def __init__(self, directory: Path, name: str):
        self.path = directory / f".{name}.running"

    def arm(self) -> bool:
        """Create the marker; returns whether the previous run ended uncleanly."""
        unclean = self.path.exists()
        try:
            self.path.touch()
        except OSError as e:
            log.debug("cannot create %s: %s", self.path, e)
        return unclean

    def disarm(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class BackgroundCheck:
    """Checks files one after the other in a daemon thread; `stop()` interrupts it within one slice."""

    def __init__(self, paths: list[Path], duty: float = 0.5):
        self.paths = paths
        self.duty = duty
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._results: list[Result] = []
        self._slices = 0
        self._thread = threading.Thread(target=self._run, name="integrity-check", daemon=True)

    def start(self) -> BackgroundCheck:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def results(self) -> list[Result]:
        """Results finished since the last call."""
        with self._lock:
            out, self._results = self._results, []
        return out

    def _run(self) -> None:
        for path in self.paths:
            if self._stop.is_set():
                return
            t0 = time.monotonic()
            self._slices = 0
            problem = self._check(path)
            if self._stop.is_set():
                return
            result = Result(path, problem, time.monotonic() - t0, self._slices)
            with self._lock:
                self._results.append(result)

    def _check(self, path: Path) -> str | None:
        if not path.exists():
            return None
        log.info("integrity check of %s started (the last shutdown was not clean)", path)
        slice_start = time.monotonic()

        def throttle() -> int:
            nonlocal slice_start
            if self._stop.is_set():
                return 1  # interrupts the statement
            self._slices += 1
            worked = time.monotonic() - slice_start
            time.sleep(worked * (1 - self.duty) / self.duty)
            slice_start = time.monotonic()
            return 0

        try:
            conn = open_readonly(path)
        except Exception as e:  # noqa: BLE001 - reported, never raised into the thread's death
            return describe(e) if classify(e) is Fault.CORRUPT else None
        try:
            conn.set_progress_handler(throttle, STEPS_PER_SLICE)
            rows = conn.execute(f"PRAGMA quick_check({MAX_PROBLEMS})").fetchall()
        except Exception as e:  # noqa: BLE001 - classified below; a check that cannot finish is only logged
            if classify(e) is Fault.CORRUPT:
                return describe(e)
            if not self._stop.is_set():
                log.warning("integrity check of %s could not finish: %s", path, describe(e))
            return None
        finally:
            conn.close()
        text = "; ".join(str(r[0]) for r in rows)
        return None if text == "ok" else f"integrity check failed: {text}"
