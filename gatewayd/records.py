"""Validation of controller records: what is publishable, and why a row is not."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from gatewayd.store.queues import (
    KIND_ATTRIBUTES,
    KIND_TELEMETRY,
    PRIO_ATTRIBUTES,
    PRIO_TELEMETRY,
    TOPIC_ATTRIBUTES,
    TOPIC_TELEMETRY,
)

# MQTT PUBLISH framing around topic and payload: fixed header (<= 5), topic length (2),
# packet id (2), and 2 for the brackets when a telemetry record travels in a JSON array.
PUBLISH_OVERHEAD = 11


@dataclass(slots=True)
class Record:
    kind: str
    priority: int
    topic: str
    payload: str
    ts: int
    archive: bool


def packet_size(topic: str, payload: str) -> int:
    return PUBLISH_OVERHEAD + len(topic.encode()) + len(payload.encode())


def _dumps(obj: object, ascii_only: bool = False) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=ascii_only)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON (ThingsBoard would reject the record)")


# raw_decode skips json.loads' wrapper (half the cost on this hot path); NaN/Infinity are
# refused because Python accepts them and ThingsBoard does not.
_decode = json.JSONDecoder(parse_constant=_reject_constant).raw_decode
_WS = " \t\n\r"

# Explicit bounds, so that no record can reach a limit of Python, SQLite or ThingsBoard:
# nesting (the JSON parser and encoder recurse), integers (SQLite and ThingsBoard store 64-bit
# signed integers), floats (a literal such as 1e999 becomes infinity).
MAX_JSON_DEPTH = 64
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_TYPE_BYTES = 256

# Only a document holding one of these can break the integer or float bounds: 19+ digit runs
# and 3-digit exponents. A cheap search spares the exact walk for ordinary records.
_SUSPECT_NUMBER = re.compile(r"\d{19}|[eE][+-]?\d{3}")
_DEPTH_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit` (brackets inside strings ignored)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for m in _DEPTH_TOKENS.finditer(text):
        c = m.group()[0]
        if c == "[" or c == "{":
            depth += 1
            if depth > limit:
                return True
        elif c == "]" or c == "}":
            depth -= 1
    return False


def number_problem(value: object) -> str | None:
    """Why a parsed JSON value holds a number ThingsBoard cannot store, or None (iterative walk)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) is int:
            if not INT_MIN <= v <= INT_MAX:
                return f"integer {str(v)[:30]}… does not fit in 64 bits"
        elif type(v) is float:
            if not math.isfinite(v):
                return "a number is too large for a 64-bit float"
        elif type(v) is dict:
            stack.extend(v.values())
        elif type(v) is list:
            stack.extend(v)
    return None


def type_name(type_: object) -> str:
    """The controller's `type` as text: bytes decoded (invalid UTF-8 replaced), numbers as digits."""
    if isinstance(type_, str):
        return type_
    if isinstance(type_, bytes):
        return type_.decode("utf-8", "replace")
    return "" if type_ is None else str(type_)


def parse(type_: object, message: object, max_packet: int) -> Record | str:
    """A publishable Record, or the reason the row must go to the dead letters.

    `type_` and `message` may be anything SQLite can hold (str or bytes for TEXT and BLOB, int,
    float, None); bytes are decoded here, strictly, never by the database driver.
    """
    if isinstance(message, bytes):
        try:
            message = message.decode()
        except UnicodeDecodeError as e:
            return f"message is not UTF-8 text (byte 0x{message[e.start]:02x} at offset {e.start})"
    if not isinstance(message, str):
        return "message is missing" if message is None else f"message is not text ({type(message).__name__})"
    if too_deep(message):
        return f"message is not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        obj, end = _decode(message, len(message) - len(message.lstrip(_WS)))
    except (ValueError, RecursionError) as e:
        return f"message is not valid JSON: {e}"
    if end != len(message) and message[end:].strip(_WS):
        return f"message is not valid JSON: extra data at char {end}"
    if type(obj) is not dict:
        return "message is not a JSON object"
    if "ts" not in obj:
        return "'ts' is missing"
    ts = obj["ts"]
    if isinstance(ts, bool) or not isinstance(ts, int):
        return f"'ts' must be an integer (epoch milliseconds), got {_dumps(ts)[:40]}"
    if not INT_MIN <= ts <= INT_MAX:
        return f"'ts' must be an integer (epoch milliseconds) that fits in 64 bits, got {str(ts)[:40]}"
    if "values" not in obj:
        return "'values' is missing"
    values = obj["values"]
    if not isinstance(values, dict):
        return "'values' must be a JSON object"
    if not values:
        return "'values' is empty"
    if _SUSPECT_NUMBER.search(message):
        problem = number_problem(values)
        if problem:
            return f"'values' holds a number out of range: {problem}"
    name = type_name(type_)
    # Escapes may decode to lone surrogates, which only an ASCII encoding can carry.
    ascii_only = "\\u" in message
    if name == "attributes":
        rec = Record(KIND_ATTRIBUTES, PRIO_ATTRIBUTES, TOPIC_ATTRIBUTES, _dumps(values, ascii_only), ts, True)
    else:
        # The controller's own text is already the wire format when it holds nothing else.
        payload = message if len(obj) == 2 else _dumps({"ts": ts, "values": values}, ascii_only)
        rec = Record(KIND_TELEMETRY, PRIO_TELEMETRY, TOPIC_TELEMETRY, payload, ts, "log" not in name)
    # Cheap bound first: a UTF-8 character is at most 4 bytes.
    if PUBLISH_OVERHEAD + len(rec.topic) + 4 * len(rec.payload) > max_packet:
        size = packet_size(rec.topic, rec.payload)
        if size > max_packet:
            return f"record needs a {size}-byte MQTT packet, more than the maximum of {max_packet} bytes"
    return rec
