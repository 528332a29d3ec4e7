"""One group commit (the rows every adapter gathered since the last, and what to do after), and
what an adapter is to the ingest loop and the loop to an adapter."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gatewayd.store.ingest import Row, SpoolMark


@dataclass
class Batch:
    rows: list[Row] = field(default_factory=list)
    marks: list[SpoolMark] = field(default_factory=list)
    on_commit: list[Callable[[], None]] = field(default_factory=list)  # acknowledge the senders
    on_fail: list[Callable[[str], None]] = field(default_factory=list)  # keep or refuse, with the reason

    def __bool__(self) -> bool:
        return bool(self.rows or self.marks or self.on_commit)


class Adapter(Protocol):
    name: str

    def fds(self) -> list[int]: ...

    def poll(self, now: float) -> None:
        """Do I/O; gather records, commit nothing."""

    def fill(self, batch: Batch, room: int) -> None:
        """Add gathered records (up to about `room` rows that can be held back) to the batch."""

    def wait(self, now: float) -> float:
        """Seconds until the adapter needs the loop again."""

    def has_work(self) -> bool: ...

    def status(self) -> str: ...

    def stop(self) -> None: ...


class Host(Protocol):
    """What the adapters that need more than a commit callback see of the ingest service."""

    over_cap: bool                     # the controller queue is over `ingest.max_queue_rows`
    ctrl: sqlite3.Connection | None    # the controller database (spool marks live there)

    def wake(self) -> None:
        """Make the loop look at the adapters now (called from other threads)."""

    def report_error(self, text: str) -> None: ...
