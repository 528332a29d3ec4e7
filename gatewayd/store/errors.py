"""What a database error means, so that every daemon reacts to it the same way.

Only real corruption justifies moving a file aside. A lock, a full disk, a read-only or
missing file, an I/O error are faults of the moment: the daemon stays up, says what is
wrong, retries with a bounded backoff and loses nothing. An error caused by one row's
content (too big, an integer out of range, text that cannot be encoded) is that row's
problem alone: it goes to the dead letters and the rest flows.
"""

from __future__ import annotations

import enum
import sqlite3


class Fault(enum.Enum):
    CORRUPT = "corrupt"        # move a gatewayd-owned file aside; report a controller's file
    TRANSIENT = "transient"    # stay up, report, retry with backoff
    DATA = "data"              # one row's content: dead-letter that row
    BUG = "bug"                # a programming error (bad SQL): report loudly, retry like transient


# SQLite primary result codes (the low byte of an extended code).
SQLITE_ERROR = 1
SQLITE_PERM = 3
SQLITE_ABORT = 4
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_NOMEM = 7
SQLITE_READONLY = 8
SQLITE_INTERRUPT = 9
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_PROTOCOL = 15
SQLITE_SCHEMA = 17
SQLITE_TOOBIG = 18
SQLITE_CONSTRAINT = 19
SQLITE_MISMATCH = 20
SQLITE_AUTH = 23
SQLITE_RANGE = 25
SQLITE_NOTADB = 26

_CORRUPT = {SQLITE_CORRUPT, SQLITE_NOTADB}
_TRANSIENT = {SQLITE_PERM, SQLITE_ABORT, SQLITE_BUSY, SQLITE_LOCKED, SQLITE_NOMEM, SQLITE_READONLY,
              SQLITE_INTERRUPT, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_PROTOCOL, SQLITE_SCHEMA,
              SQLITE_AUTH}
_DATA = {SQLITE_TOOBIG, SQLITE_CONSTRAINT, SQLITE_MISMATCH, SQLITE_RANGE}


def primary_code(exc: BaseException) -> int | None:
    """SQLite's primary result code of an exception, when it carries one (Python >= 3.11)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def classify(exc: BaseException) -> Fault:
    """Which of the four reactions an exception raised by a database call deserves."""
    code = primary_code(exc)
    if code in _CORRUPT:
        return Fault.CORRUPT
    if code in _TRANSIENT:
        return Fault.TRANSIENT
    if code in _DATA:
        return Fault.DATA
    if isinstance(exc, (OverflowError, UnicodeError, ValueError, RecursionError, sqlite3.DataError,
                        sqlite3.IntegrityError)):
        return Fault.DATA
    if isinstance(exc, OSError):
        return Fault.TRANSIENT
    if isinstance(exc, sqlite3.DatabaseError) and code is None:
        # Older bindings without error codes: fall back to SQLite's own wording.
        text = str(exc).lower()
        if "malformed" in text or "not a database" in text:
            return Fault.CORRUPT
        return Fault.TRANSIENT
    return Fault.BUG


def describe(exc: BaseException) -> str:
    """One line for the journal, STATUS= and `gatewayctl status`: the message and SQLite's code name."""
    name = getattr(exc, "sqlite_errorname", None)
    text = str(exc) or type(exc).__name__
    return f"{text} ({name})" if name else f"{type(exc).__name__}: {text}"


def is_transient(exc: BaseException) -> bool:
    return classify(exc) is Fault.TRANSIENT
