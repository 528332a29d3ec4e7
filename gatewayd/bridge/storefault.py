"""The bridge's state database (`queues.db`) when it fails: a full disk, a lock held too long, a
read-only or vanished file, an I/O error.

Such faults are of the moment (`store.errors`): the bridge stays up, closes its MQTT session
(an inbound message it could not store is never acknowledged; an outbox row stays until its
deletion commits), says why once in the journal, in STATUS= and — as soon as a write succeeds —
in `gatewayctl status`, and tries again with a backoff from 0.5 s to `RETRY_MAX_S`, each time on a
freshly opened connection. Only corruption is not handled here: it propagates, and the start-up
check of the restarted daemon moves the file aside.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from gatewayd.bridge.provisioning import Backoff
from gatewayd.store import queues
from gatewayd.store.errors import Fault, classify, describe

log = logging.getLogger("gatewayd.bridge")

RETRY_MAX_S = 10.0


class StoreFault:
    """Whether queues.db is usable, and when to try it again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reason: str | None = None   # None: usable
        self.since = 0.0
        self.retry_at = 0.0
        self.backoff = Backoff(0.5, RETRY_MAX_S)
        self.unrecorded: str | None = None  # an error `gatewayctl status` has not seen yet

    @property
    def faulted(self) -> bool:
        return self.reason is not None

    def open(self, db: sqlite3.Connection | None, check: bool) -> sqlite3.Connection:
        """A fresh connection (the old one closed); raises what opening raises."""
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass
        return queues.open_queues(self.path, check=check)

    def failed(self, exc: BaseException, now: float, what: str) -> None:
        """`what` failed with `exc`: remember, log once per reason, schedule the next try.

        Re-raises corruption, which no retry cures."""
        if classify(exc) is Fault.CORRUPT:
            raise exc
        reason = describe(exc)
        delay = self.backoff.next()
        self.retry_at = now + delay
        if self.reason is None:
            self.since = now
        if reason != self.reason:
            log.error("%s: %s; the bridge stays up with its MQTT session closed (nothing is lost) and tries "
                      "again in %.1f s, then at least every %.0f s", what, reason, delay, RETRY_MAX_S)
        else:
            log.debug("%s: %s; next try in %.1f s", what, reason, delay)
        self.reason = reason

    def recovered(self, now: float) -> None:
        if self.reason is not None:
            log.warning("the state database %s is usable again after %.0f s (%s)", self.path, now - self.since,
                        self.reason)
        self.reason = None
        self.backoff.reset()

    def record(self, db: sqlite3.Connection | None, text: str) -> None:
        """`queues.record_error`, or keep the text for later when the database refuses the write."""
        self.unrecorded = text
        if db is not None:
            self.flush(db)

    def flush(self, db: sqlite3.Connection) -> None:
        if self.unrecorded is None:
            return
        try:
            queues.record_error(db, "bridge", self.unrecorded)
        except sqlite3.Error as e:
            log.debug("cannot record the last error yet: %s", e)
            return
        self.unrecorded = None

    def status(self, now: float) -> str:
        return (f"state database unavailable: {self.reason}; MQTT session closed, retrying in "
                f"{max(0.0, self.retry_at - now):.0f} s")
