"""Logging to stderr with syslog priority prefixes, so journald keeps each line's level.

Two formats (`[logging] format`): `text` (`<N>name: message`, one line per traceback line) and
`json` (one JSON object per record, the traceback inside it). A JSON line carries the `<N>`
prefix only when stderr is journald's stream: journald strips it into PRIORITY and keeps pure
JSON in MESSAGE, while a shipper reading the raw stream (a pipe, a file, a container runtime)
gets lines that parse as JSON, with the level in `priority` and `level`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from gatewayd.redact import redact

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


LEVEL_NAMES = ((logging.CRITICAL, "critical"), (logging.ERROR, "error"), (logging.WARNING, "warning"),
               (logging.INFO, "info"))


def priority(levelno: int) -> int:
    for level, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def level_name(levelno: int) -> str:
    """The configuration's word for a level: critical, error, warning, info, debug."""
    return next((name for level, name in LEVEL_NAMES if levelno >= level), "debug")


def journald_stderr() -> bool:
    """Is stderr journald's stream? systemd sets JOURNAL_STREAM to its `device:inode`."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


class SyslogPrefixFormatter(logging.Formatter):
    """`<N>name: message`, every line of a traceback prefixed too (journald splits lines).

    Registered secrets (`gatewayd.redact`) are masked in the message and the traceback."""

    def __init__(self, timestamps: bool):
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + redact(record.exc_text or self.formatException(record.exc_info))
        prefix = f"<{priority(record.levelno)}>"
        if self.timestamps:
            ms = int(record.msecs)
            prefix += time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created)) + f".{ms:03d} "
        prefix += f"{record.name}: "
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ms), level, priority, daemon, logger, message,
    exception (the traceback, when there is one). Secrets are masked as in the text format."""

    def __init__(self, daemon: str, prefix: bool):
        super().__init__()
        self.daemon = daemon
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        doc = {"time": stamp, "level": level_name(record.levelno), "priority": priority(record.levelno),
               "daemon": self.daemon, "logger": record.name, "message": redact(record.getMessage())}
        if record.exc_info:
            doc["exception"] = redact(record.exc_text or self.formatException(record.exc_info))
        line = json.dumps(doc, ensure_ascii=False)
        return f"<{doc['priority']}>{line}" if self.prefix else line


class _RedactingRecord(logging.LogRecord):
    """A record whose message and traceback have registered secrets masked, whichever handler
    formats it (formatters use a preset `exc_text` instead of formatting the exception again)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.exc_info and self.exc_info[0] is not None:
            self.exc_text = redact(logging.Formatter().formatException(self.exc_info))

    def getMessage(self) -> str:
        return redact(super().getMessage())


def setup(name: str, level: str = "info", fmt: str = "text") -> logging.Logger:
    """Configure the root logger once per process; journald adds its own timestamps."""
    logging.setLogRecordFactory(_RedactingRecord)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(name.rpartition(".")[2], prefix=journald_stderr()))
    else:
        handler.setFormatter(SyslogPrefixFormatter(timestamps="JOURNAL_STREAM" not in os.environ))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return logging.getLogger(name)


class Throttle:
    """Log a repeating condition at most once per `every_s` for each key; repeats go to debug."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def log(self, key: str, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) >= self.every_s:
            self._last[key] = now
            self.logger.log(level, msg, *args)
        else:
            self.logger.debug(msg, *args)
