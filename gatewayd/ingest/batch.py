"""One group commit: the rows every adapter gathered since the last, and what to do after."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gatewayd.store.ingest import Row, SpoolMark


@dataclass
class Batch:
    rows: list[Row] = field(default_factory=list)
    marks: list[SpoolMark] = field(default_factory=list)
    on_commit: list[Callable[[], None]] = field(default_factory=list)  # acknowledge the senders
    on_fail: list[Callable[[str], None]] = field(default_factory=list)  # keep or refuse, with the reason

    def __bool__(self) -> bool:
        return bool(self.rows or self.marks or self.on_commit)
