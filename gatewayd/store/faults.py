"""How every daemon waits out a database fault: the one implementation they share.

A fault of the moment (`errors.Fault.TRANSIENT`: locked, full, read-only, I/O, cannot open) keeps
the daemon up. `FaultState` logs it once with its reason (again only when the reason changes),
keeps it for STATUS= and the runtime status file, records it for `gatewayctl status` as soon as
`queues.db` takes a write, schedules the next try with a backoff doubling to a bound, releases
the disk reserve when the disk is full (so the ledger, deletions after PUBACK and RPC replies
still fit), and logs the recovery once.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Callable, Hashable
from pathlib import Path

from gatewayd.store import queues
from gatewayd.store.db import Tracked
from gatewayd.store.errors import SQLITE_BUSY, SQLITE_FULL, SQLITE_LOCKED, Fault, classify, describe, primary_code
from gatewayd.store.space import release_reserve

BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 10.0


def is_full(exc: BaseException) -> bool:
    """SQLITE_FULL, or the OS saying there is no space left."""
    return primary_code(exc) == SQLITE_FULL or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)


def keep_connection(exc: BaseException) -> bool:
    """A lock or a full disk is waited out on the same connection; after any other fault the file is
    opened again (a file opened read-only stays read-only, and one that came back may be another)."""
    return primary_code(exc) in (SQLITE_BUSY, SQLITE_LOCKED, SQLITE_FULL)


def code_name(exc: BaseException) -> str:
    """SQLite's name of the error (SQLITE_FULL, …), else the exception's type: what makes two faults the same."""
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


class FaultState:
    """The fault a daemon is waiting out, if any, and when to try again.

    `db` returns the connection to record errors in (`queues.record_error`), or None while it must
    not be touched; what could not be recorded is kept and written by `flush()` later.
    """

    def __init__(self, daemon: str, log: logging.Logger, state_dir: Path,
                 db: Callable[[], sqlite3.Connection | None], initial: float = BACKOFF_INITIAL_S,
                 maximum: float = BACKOFF_MAX_S):
        self.daemon = daemon
        self.log = log
        self.state_dir = state_dir
        self.db = db
        self.initial = initial
        self.maximum = maximum
        self.text: str | None = None     # None: no fault
        self.kind: Fault | None = None    # of the last exception reported through `failed`
        self.key: Hashable | None = None
        self.since = 0.0
        self.backoff = 0.0
        self.retry_at = 0.0
        self.unrecorded: str | None = None

    @property
    def faulted(self) -> bool:
        return self.text is not None

    def waiting(self, now: float) -> bool:
        return now < self.retry_at

    def report(self, key: Hashable, text: str, now: float, level: int = logging.WARNING,
               exc: BaseException | None = None) -> None:
        """Log and record a fault once; the same fault again only updates the status."""
        if self.text is None:
            self.since = now
        self.text = text
        if key != self.key:
            self.key = key
            self.log.log(level, "%s; will retry", text, exc_info=exc)
            self.record(text)

    def failed(self, exc: BaseException, now: float, what: str, owned: Tracked | None = None) -> float:
        """`what` failed with `exc`: free the reserve if the disk is full, report once, and return the
        seconds until the next try. A bug (not a fault of the moment) is logged with its traceback.

        `owned`: the file is gatewayd's, so if it is damaged it is moved aside (the next try opens a new
        one); if it cannot even be renamed, that is the fault waited out."""
        if is_full(exc):
            release_reserve(self.state_dir)
        kind = classify(exc)
        if kind is Fault.CORRUPT and owned is not None:
            try:
                owned.move_aside(describe(exc))
            except OSError as e:
                exc, kind = e, classify(e)
        self.kind = kind
        level = {Fault.BUG: logging.ERROR, Fault.CORRUPT: logging.CRITICAL}.get(kind, logging.WARNING)
        self.report((what, code_name(exc)), f"{what}: {describe(exc)}", now, level, exc if kind is Fault.BUG else None)
        return self.retry_later(now)

    def retry_later(self, now: float) -> float:
        self.backoff = min(self.maximum, self.backoff * 2 or self.initial)
        self.retry_at = now + self.backoff
        return self.backoff

    def clear(self, now: float) -> None:
        """The fault is gone (a write succeeded): say so once."""
        if self.text is not None and self.key is not None:
            self.log.info("recovered: %s (after %.0f s)", self.text, now - self.since)
            self.record(f"recovered: {self.text}")
        self.text = None
        self.key = None
        self.kind = None
        self.backoff = 0.0
        self.retry_at = 0.0
        self.flush()

    def status(self, now: float) -> str:
        return f"{self.text}; retrying in {max(0.0, self.retry_at - now):.0f} s"

    def store_status(self, text: str) -> None:
        """The daemon's STATUS= line for `gatewayctl status` (`queues.record_status`), unless queues.db
        must not be touched now (the runtime status file says why)."""
        conn = self.db()
        if conn is not None:
            queues.record_status(conn, self.daemon, text)

    def record(self, text: str) -> None:
        """`queues.record_error` now, or as soon as the database takes writes again."""
        self.unrecorded = text
        self.flush()

    def flush(self) -> None:
        if self.unrecorded is None:
            return
        conn = self.db()
        if conn is None:
            return
        try:
            queues.record_error(conn, self.daemon, self.unrecorded)
        except sqlite3.Error as e:
            self.log.debug("cannot record the last error yet: %s", e)
            return
        self.unrecorded = None
