"""The bridge's state database (`queues.db`): followed by file identity, and waited out when it fails
(a full disk, a lock held too long, a read-only or vanished file, an I/O error).

Such faults are of the moment (`store.errors`, `store.faults`): the bridge stays up, closes its MQTT
session (an inbound message it could not store is never acknowledged; an outbox row stays until its
deletion commits), says why once in the journal, in STATUS= and — as soon as a write succeeds — in
`gatewayctl status`, releases the disk reserve on a full disk, and tries again with a backoff from
0.5 s to `RETRY_MAX_S`, each time on a freshly opened connection. A damaged file (SQLITE_CORRUPT,
NOTADB) is moved aside like every daemon does, and the next try starts a new one.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from gatewayd.store import queues
from gatewayd.store.db import Tracked
from gatewayd.store.faults import FaultState

log = logging.getLogger("gatewayd.bridge")

RETRY_MAX_S = 10.0


class StoreFault(FaultState):
    """Whether queues.db is usable, and when to try it again. While it is not, it is not touched."""

    def __init__(self, path: Path, state_dir: Path) -> None:
        super().__init__("bridge", log, state_dir, self._usable, initial=0.5, maximum=RETRY_MAX_S)
        self.path = path
        self.tracked = Tracked(path, self._open)
        self._check = True

    def _usable(self) -> sqlite3.Connection | None:
        return None if self.faulted else self.tracked.conn

    def _open(self, path: Path) -> sqlite3.Connection:
        return queues.open_queues(path, check=self._check)

    def open(self, check: bool) -> sqlite3.Connection:
        """A fresh connection (the old one closed); raises what opening raises."""
        self._check = check
        return self.tracked.reopen()

    def failed(self, exc: BaseException, now: float, what: str, owned: Tracked | None = None) -> float:
        """A damaged queues.db is moved aside (unless another daemon did already); the next try opens
        a new one."""
        return super().failed(exc, now, what, owned or self.tracked)

    def status(self, now: float) -> str:
        return f"{self.text}; MQTT session closed, retrying in {max(0.0, self.retry_at - now):.0f} s"
