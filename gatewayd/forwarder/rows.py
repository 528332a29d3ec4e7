"""Controller rows off the forwarder's fast path: a value that is not text or too long to read,
a type not seen before, and the dead letter of a row (readable text, and the exact bytes when
text cannot hold them)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gatewayd.forwarder.clockgate import Good
from gatewayd.forwarder.files import CONTROLLER, on
from gatewayd.privacy import Policy
from gatewayd.records import MAX_TYPE_BYTES, Record, parse, type_name
from gatewayd.store import controller as controller_store
from gatewayd.store.controller import Oversized
from gatewayd.store.queues import DeadLetter

RAW_KEEP_BYTES = 1 << 20         # what a dead letter keeps of an oversized value
TYPE_NAMES_MAX = 1000            # controller types remembered as text


def id_ranges(ids: Sequence[int]) -> list[list[int]]:
    """Ascending ids as inclusive [first, last] ranges of consecutive values."""
    if not ids:
        return []
    if ids[-1] - ids[0] + 1 == len(ids):
        return [[ids[0], ids[-1]]]
    out = [[ids[0], ids[0]]]
    for i in ids[1:]:
        if i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def display(value: object) -> tuple[str | None, bytes | None]:
    """(text for the dead letter's `message`, exact bytes when the text cannot hold them)."""
    if isinstance(value, bytes):
        try:
            return value.decode(), None
        except UnicodeDecodeError:
            return value.decode("utf-8", "backslashreplace"), value
    if value is None:
        return None, None
    return repr(value), None


def dead_letter(row: controller_store.Row, reason: str, type_text: str | None = None,
                ctrl: sqlite3.Connection | None = None) -> DeadLetter:
    """The dead letter of a row: its reason, readable text, and the exact bytes when text cannot
    hold them (the first RAW_KEEP_BYTES of a value too long to read whole)."""
    rid, type_, message = row
    if type_text is None:
        type_text = display(type_)[0]
    if isinstance(message, Oversized):
        assert ctrl is not None
        with on(CONTROLLER):
            head = controller_store.read_prefix(ctrl, rid, "message", RAW_KEEP_BYTES)
        return DeadLetter(rid, type_text, None, reason, head, message.length)
    text, raw = display(message)
    return DeadLetter(rid, type_text, text, reason, raw, len(raw) if raw is not None else None)


def examine(ctrl: sqlite3.Connection, row: controller_store.Row, names: dict[controller_store.Value, str],
            max_message: int, max_packet: int, policy: Policy | None) -> Good | DeadLetter | None:
    """The careful path for one row: a value that is not text, too long, or a type not seen before
    (remembered in `names`). None: the privacy policy drops it."""
    rid, type_, message = row
    type_len = type_.length if isinstance(type_, Oversized) else len(type_) if isinstance(type_, bytes) else 0
    if type_len > MAX_TYPE_BYTES:
        if isinstance(type_, bytes):
            head: bytes | None = type_[:MAX_TYPE_BYTES]
        else:
            with on(CONTROLLER):
                head = controller_store.read_prefix(ctrl, rid, "type", MAX_TYPE_BYTES)
        text = display(head)[0]
        return dead_letter(row, f"type is {type_len} bytes long, more than {MAX_TYPE_BYTES}",
                           f"{text}…" if text is not None else None, ctrl)
    if isinstance(message, Oversized):
        return dead_letter(row, f"message is {message.length} bytes, more than the {max_message} a "
                           f"record may have (the first {min(message.length, RAW_KEEP_BYTES)} bytes are kept)",
                           None, ctrl)
    name = type_name(type_)
    if len(names) >= TYPE_NAMES_MAX:
        names.clear()
    names[type_] = name
    try:
        rec = parse(name, message, max_packet, policy)
    except Exception as e:  # noqa: BLE001 - one row's problem, never the queue's
        rec = f"cannot be processed ({type(e).__name__}: {e})"
    if isinstance(rec, str):
        return dead_letter(row, rec)
    if not isinstance(rec, Record):
        return None
    return rid, rec, name
