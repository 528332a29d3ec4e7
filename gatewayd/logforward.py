"""gatewayd's own warnings and errors to ThingsBoard, for every daemon (installed by `gatewayd.cli`).

A logging handler at `[logging] forward_level` hands each record to a writer thread that
queues it as telemetry `gw_log_level`, `gw_log_message`, `gw_log_daemon` through its own
connection to `queues.db`, so nothing a daemon's loop does waits for it:

- low priority: outbox rows of priority `PRIO_LOG`, sent in id order behind the controller
  telemetry already queued, never counted in the ledger, dropped with the oldest telemetry
  when the outbox is over its caps;
- deduplicated: a line similar to one sent (same daemon, level, logger and text once digits are
  ignored) within `forward_repeat_window_s` is only counted; when the window ends, one line
  "<the last one> (repeated N times ...)" says how many;
- rate-limited: at most `forward_max_per_min` lines in any minute, all daemons together
  (`store.logs`); what is over the limit is counted and reported by one line later;
- masked: registered secrets are masked (`redact`) when the record is made and again when
  the line is queued;
- never recursive: what the writer thread logs itself (its own failures, SQLite's) goes to
  stderr only; a failure to queue is classified (`store.errors`): the lines are held (a
  bounded number), retried with a backoff up to a minute, and the failure is reported once.
  A full disk therefore costs one attempt per backoff step, never a loop.

The journal keeps every line; what reaches ThingsBoard is a bounded summary of it.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatewayd.clock import now_ms
from gatewayd.log import level_name
from gatewayd.redact import redact
from gatewayd.store import logs, queues
from gatewayd.store.db import file_identity
from gatewayd.store.errors import Fault, classify, describe

log = logging.getLogger("gatewayd.logforward")

NO_FORWARD = "gatewayd_no_forward"  # `extra={NO_FORWARD: True}`: this record stays in the journal
# Bytes of the JSON-encoded message: with its keys and timestamp a line stays under the smallest
# packet limit the bridge may learn (1024 bytes), so a log line is never dead-lettered for its size.
MAX_MESSAGE_BYTES = 800
PENDING_MAX = 1000  # records waiting for the writer thread
HELD_MAX = 200  # lines kept while the database refuses them (or forward_max_per_min, if larger)
RUNS_MAX = 256  # distinct lines remembered for deduplication
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
CLOSE_TIMEOUT_S = 2.0
_DIGITS = re.compile(r"\d+")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}


def fit_json(text: str, limit: int) -> str:
    """The longest prefix of `text` (marked with "…" when cut) whose JSON string encoding fits `limit` bytes."""
    if len(json.dumps(text)) <= limit:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(json.dumps(text[:mid] + "…")) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


@dataclass
class Line:
    ms: int
    levelno: int
    logger: str
    text: str

    @property
    def key(self) -> tuple[int, str, str]:
        return self.levelno, self.logger, _DIGITS.sub("#", self.text)


@dataclass
class _Run:
    until: float  # end of the window (monotonic)
    repeats: int = 0
    last: Line | None = None


@dataclass
class Deduper:
    """Similar lines within `window_s` of the first are counted, then summarised once."""

    window_s: float
    runs: dict[tuple[int, str, str], _Run] = field(default_factory=dict)

    def offer(self, line: Line, now: float) -> Line | None:
        """The line to send now, or None when it only adds to a run."""
        key = line.key
        run = self.runs.get(key)
        if run is not None and now < run.until:
            run.repeats += 1
            run.last = line
            return None
        self.runs.pop(key, None)
        if len(self.runs) >= RUNS_MAX:
            self._evict()
        self.runs[key] = _Run(until=now + self.window_s)
        return line

    def _evict(self) -> None:
        """Forget the oldest run without repeats, else the oldest run (its count is lost)."""
        quiet = next((k for k, r in self.runs.items() if not r.repeats), None)
        self.runs.pop(quiet if quiet is not None else next(iter(self.runs)))

    def due(self, now: float) -> list[Line]:
        """Summaries of the runs whose window ended; a run still repeating starts a new window."""
        out: list[Line] = []
        for key, run in list(self.runs.items()):
            if now < run.until:
                continue
            if run.repeats and run.last is not None:
                last = run.last
                out.append(Line(last.ms, last.levelno, last.logger,
                                f"{last.text} (repeated {run.repeats} times in {self.window_s:g} s)"))
                self.runs[key] = _Run(until=now + self.window_s)
            else:
                del self.runs[key]
        return out

    def next_due(self) -> float | None:
        """When the next summary is due (runs without repeats need no wake-up)."""
        return min((r.until for r in self.runs.values() if r.repeats), default=None)


class ForwardHandler(logging.Handler):
    """Hands records at its level to the forwarder; cheap and non-blocking, from any thread."""

    def __init__(self, forwarder: LogForwarder, level: int):
        super().__init__(level)
        self.forwarder = forwarder

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, NO_FORWARD, False) or record.thread == self.forwarder.thread_id:
            return
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                text += f" [{type(exc).__name__}: {exc}]"
        except Exception:  # noqa: BLE001 - a broken record must not break the daemon
            return
        self.forwarder.offer(Line(int(record.created * 1000), record.levelno, record.name, text))


class LogForwarder:
    """The writer thread and its bookkeeping. `store` queues lines and returns how many it took."""

    def __init__(self, daemon: str, store: Callable[[list[tuple[int, dict[str, Any]]]], int],
                 max_per_min: int, window_s: float, clock: Callable[[], float] = time.monotonic,
                 close_store: Callable[[], None] | None = None):
        self.daemon = daemon
        self.store = store
        self.close_store = close_store
        self.max_per_min = max_per_min
        self.clock = clock
        self.dedup = Deduper(window_s)
        self.thread_id: int | None = None
        self._pending: collections.deque[Line] = collections.deque()
        self._overflow = 0  # records refused by a full `_pending` (counted under `_lock`)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.held: list[Line] = []
        self.suppressed = 0  # lines not forwarded (rate limit, overflow) since the last report
        self.retry_at = 0.0  # monotonic; no store attempt before
        self.backoff = 0.0
        self.failure: str | None = None
        self.forwarded = 0

    # -- any thread ----------------------------------------------------------------------
    def offer(self, line: Line) -> None:
        with self._lock:
            if len(self._pending) >= PENDING_MAX:
                self._overflow += 1
                return
            self._pending.append(line)
        self._wake.set()

    # -- the thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="logforward", daemon=True)
        self._thread.start()
        self.thread_id = self._thread.ident

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Queue what is pending (summaries of runs included), within `timeout`."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        self.thread_id = threading.get_ident()
        try:
            while True:
                stopping = self._stopping.is_set()
                try:
                    self.work(final=stopping)
                except Exception as e:  # noqa: BLE001 - the forwarder must never take the daemon down
                    self._failed(e)
                if stopping:
                    break
                self._wake.wait(self._timeout())
                self._wake.clear()
        finally:
            if self.close_store is not None:
                self.close_store()

    def _timeout(self) -> float | None:
        now = self.clock()
        times = [t for t in (self.dedup.next_due(),) if t is not None]
        if self.held or self.suppressed:
            times.append(max(self.retry_at, now + (60.0 / max(self.max_per_min, 1) if self.suppressed else 0.0)))
        return None if not times else max(0.05, min(times) - now)

    def work(self, final: bool = False) -> None:
        """One pass: deduplicate the new records, add due summaries, queue what may go."""
        now = self.clock()
        with self._lock:
            new = list(self._pending)
            self._pending.clear()
            self.suppressed += self._overflow
            self._overflow = 0
        lines = [line for line in (self.dedup.offer(x, now) for x in new) if line is not None]
        lines.extend(self.dedup.due(float("inf") if final else now))
        self.held.extend(lines)
        excess = len(self.held) - max(HELD_MAX, self.max_per_min)
        if excess > 0:
            self.suppressed += excess
            del self.held[:excess]
        if not self.held and not self.suppressed:
            return
        if now < self.retry_at and not final:
            return
        # The report of what was not sent goes first, so it is never the line left out.
        report = [Line(now_ms(), logging.WARNING, log.name,
                       f"{self.suppressed} log line(s) of the {self.daemon} not sent to ThingsBoard "
                       f"(at most forward_max_per_min = {self.max_per_min} are; the journal has them all)")
                  ] if self.suppressed else []
        batch = report + self.held
        try:
            taken = self.store([(x.ms, self.values(x)) for x in batch])
        except Exception as e:  # noqa: BLE001 - classified below; a newer schema is a BUG, also retried later
            self._failed(e)
            return
        if self.failure is not None:
            log.info("log lines are sent to ThingsBoard again", extra={NO_FORWARD: True})
            self.failure = None
        self.backoff = 0.0
        self.forwarded += taken
        # Lines over the limit are not kept for later (they would arrive late and crowd the next
        # minute): they are counted and reported.
        if report and not taken:
            self.suppressed += len(self.held)
        else:
            self.suppressed = len(batch) - taken
        self.held = []
        if taken < len(batch):
            self.retry_at = now + 60.0 / max(self.max_per_min, 1)

    def values(self, line: Line) -> dict[str, Any]:
        # Surrogate pairs become their character, a lone surrogate U+FFFD: ThingsBoard stores UTF-8.
        text = redact(line.text).encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        text = fit_json(text, MAX_MESSAGE_BYTES)
        return {"gw_log_level": level_name(line.levelno), "gw_log_message": text, "gw_log_daemon": self.daemon}

    def _failed(self, e: BaseException) -> None:
        fault = classify(e)
        if fault is Fault.DATA:
            # One line's content: drop the batch rather than retry it for ever.
            self.suppressed += len(self.held)
            self.held = []
            text = f"log lines dropped: {describe(e)}"
        else:
            self.backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self.backoff * 2))
            self.retry_at = self.clock() + self.backoff
            text = f"cannot queue log lines for ThingsBoard: {describe(e)} ({fault.value})"
            if fault is Fault.CORRUPT and self.close_store is not None:
                self.close_store()  # the daemon moves the file aside; open the new one next time
        if text != self.failure:
            self.failure = text
            log.warning("%s; %d held, next attempt in %.0f s", text, len(self.held), self.backoff,
                        extra={NO_FORWARD: True})


class QueuesStore:
    """`store.logs.queue_log_lines` on a connection of its own, opened when first needed and
    again when the file at the path is another one (a damaged file moved aside by a daemon)."""

    def __init__(self, path: Path, max_per_min: int):
        self.path = path
        self.max_per_min = max_per_min
        self.conn: sqlite3.Connection | None = None
        self.identity: tuple[int, int] | None = None

    def __call__(self, lines: list[tuple[int, dict[str, Any]]]) -> int:
        if self.conn is not None and file_identity(self.path) != self.identity:
            self.close()
        if self.conn is None:
            self.conn = queues.open_queues(self.path, check=False)
            self.identity = file_identity(self.path)
        return logs.queue_log_lines(self.conn, lines, self.max_per_min)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass
            self.conn = None


def install(cfg: Any, daemon: str) -> LogForwarder | None:
    """Forward this process's log lines at `[logging] forward_level` and above; None when off."""
    c = cfg["logging"]
    if c["forward_level"] == "off" or c["forward_max_per_min"] <= 0:
        return None
    store = QueuesStore(cfg.queues_db, c["forward_max_per_min"])
    fwd = LogForwarder(daemon, store, c["forward_max_per_min"], float(c["forward_repeat_window_s"]),
                       close_store=store.close)
    fwd.start()
    logging.getLogger().addHandler(ForwardHandler(fwd, LEVELS[c["forward_level"]]))
    return fwd
