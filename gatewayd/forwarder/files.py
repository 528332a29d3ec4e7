"""The forwarder's three databases by name, and how a failure of one reaches its loop: every
database or OS error is tagged with the file it concerns (`on`) and classified by the loop."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from gatewayd.store.errors import describe

QUEUES, ARCHIVE, CONTROLLER = "queues.db", "archive.db", "controller database"


class StoreFault(Exception):
    """A database call failed; `where` names the file, `exc` is SQLite's (or the OS's) error."""

    def __init__(self, where: str, exc: BaseException):
        super().__init__(f"{where}: {describe(exc)}")
        self.where = where
        self.exc = exc


class Paused(Exception):
    """Bulk records must wait (disk space); not an error of any database."""


@contextlib.contextmanager
def on(where: str) -> Iterator[None]:
    """Tag database and OS errors with the file they concern; anything else is a bug and passes."""
    try:
        yield
    except (sqlite3.Error, OSError) as e:
        raise StoreFault(where, e) from e
