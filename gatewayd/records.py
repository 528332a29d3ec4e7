"""Validation of controller records: what is publishable, and why a row is not."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gatewayd.packet import PUBLISH_OVERHEAD, packet_size, utf8_len
from gatewayd.store.queues import KIND_ATTRIBUTES, KIND_TELEMETRY, PRIO_ATTRIBUTES, PRIO_TELEMETRY
from gatewayd.topics import TOPIC_ATTRIBUTES, TOPIC_TELEMETRY

if TYPE_CHECKING:
    from gatewayd.privacy import Policy

@dataclass(slots=True)
class Record:
    kind: str
    priority: int
    topic: str
    payload: str
    ts: int
    archive: bool


class Dropped:
    """A record the privacy policy drops whole (counted in the ledger's `dropped`, reason `privacy`)."""

    __slots__ = ()


DROPPED = Dropped()


# Built once: json.dumps with arguments builds an encoder per call.
_ENCODE = (json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode,
           json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode)


def _dumps(obj: object, ascii_only: bool = False) -> str:
    return _ENCODE[ascii_only](obj)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON (ThingsBoard would reject the record)")


# raw_decode skips json.loads' wrapper (half the cost on this hot path); NaN/Infinity are
# refused because Python accepts them and ThingsBoard does not.
_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_decode = _decoder.raw_decode
# raw_decode without its Python frame: (obj, end), StopIteration at a bad start
_scan: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]
_WS = " \t\n\r"
_MISSING = object()
_CHANGED: dict[str, object] = {}

# Explicit bounds, so that no record can reach a limit of Python, SQLite or ThingsBoard:
# nesting (the JSON parser and encoder recurse), integers (SQLite and ThingsBoard store 64-bit
# signed integers), floats (a literal such as 1e999 becomes infinity).
MAX_JSON_DEPTH = 64
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_TYPE_BYTES = 256

def values_problem(values: dict[str, object]) -> str | None:
    """Why parsed `values` nest too deep or hold a number ThingsBoard cannot store, or None.

    An iterative walk, so no depth can exhaust Python's stack (the JSON decoder itself stops
    at the interpreter's recursion limit, which `parse` turns into a reason). `values` sits at
    depth 2 of the record.
    """
    stack: list[tuple[object, int]] = [(v, 3) for v in values.values()]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not INT_MIN <= v <= INT_MAX:
                return f"holds an integer that does not fit in 64 bits ({str(v)[:30]}…)"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return "holds a number too large for a 64-bit float"
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"are nested deeper than {MAX_JSON_DEPTH} levels"
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return None


def type_name(type_: object) -> str:
    """The controller's `type` as text: bytes decoded (invalid UTF-8 replaced), numbers as digits."""
    if isinstance(type_, str):
        return type_
    if isinstance(type_, bytes):
        return type_.decode("utf-8", "replace")
    return "" if type_ is None else str(type_)


def plain_prefix(rows: Sequence[tuple[int, object, object]], names: Mapping[Any, str],
                 max_packet: int) -> tuple[list[tuple[int, Record, str]], int]:
    """The forwarder's fast path over a batch read from the controller: (id, Record, type name) of
    the leading rows that are plain telemetry, and how many rows that was.

    Plain: a type seen before (`names`, raw value -> name) other than attributes, UTF-8 bytes short
    enough for any packet, holding exactly `{"ts": <int>, "values": {<flat, finite scalars>}}` and
    no surrounding space. For such a row `parse` returns the same Record; the first other row ends
    the prefix, and the caller judges it and the rest with `parse`. One loop with its names local
    costs about half of a call of `parse` per row.
    """
    good: list[tuple[int, Record, str]] = []
    append = good.append
    scan = _scan
    lo, hi = INT_MIN, INT_MAX
    longest = (max_packet - PUBLISH_OVERHEAD - len(TOPIC_TELEMETRY)) // 4  # bytes: 4 per character at most
    kind, prio, topic = KIND_TELEMETRY, PRIO_TELEMETRY, TOPIC_TELEMETRY
    n = 0
    try:
        for rid, type_, message in rows:
            name = names.get(type_)
            if name is None or name == "attributes" or type(message) is not bytes or len(message) > longest:
                break
            text = message.decode()
            obj, end = scan(text, 0)
            if end != len(text) or type(obj) is not dict or len(obj) != 2:
                break
            ts = obj.get("ts")
            values = obj.get("values")
            if type(ts) is not int or ts > hi or ts < lo or type(values) is not dict or not values:
                break
            for v in values.values():
                t = type(v)
                if t is float:
                    if v - v != 0.0:
                        break
                elif t is int:
                    if v > hi or v < lo:
                        break
                elif t is not str and t is not bool and v is not None:
                    break
            else:
                append((rid, Record(kind, prio, topic, text, ts, "log" not in name), name))
                n += 1
                continue
            break
    except Exception:  # noqa: BLE001 - not plain: `parse` gives the reason
        pass
    return good, n


def parse(type_: object, message: object, max_packet: int, policy: Policy | None = None) -> Record | str | Dropped:
    """A publishable Record, or the reason the row must go to the dead letters, or DROPPED.

    `type_` and `message` may be anything SQLite can hold (str or bytes for TEXT and BLOB, int,
    float, None); bytes are decoded here, strictly, never by the database driver. This is the
    forwarder's hot path: the common case runs no Python function besides the JSON decoder.
    `policy` (privacy) is applied to a valid record's values; the packet limit is checked after it.
    """
    if type(message) is bytes:
        try:
            message = message.decode()
        except UnicodeDecodeError as e:
            return f"message is not UTF-8 text (byte 0x{message[e.start]:02x} at offset {e.start})"
    elif not isinstance(message, str):
        return "message is missing" if message is None else f"message is not text ({type(message).__name__})"
    try:
        obj, end = _decode(message, len(message) - len(message.lstrip(_WS)))
    except ValueError as e:
        return f"message is not valid JSON: {e}"
    except RecursionError:
        return f"message is nested deeper than {MAX_JSON_DEPTH} levels"
    if end != len(message) and message[end:].strip(_WS):
        return f"message is not valid JSON: extra data at char {end}"
    if type(obj) is not dict:
        return "message is not a JSON object"
    ts = obj.get("ts", _MISSING)
    if type(ts) is not int:
        if ts is _MISSING:
            return "'ts' is missing"
        return f"'ts' must be an integer (epoch milliseconds), got {_dumps(ts)[:40]}"
    if ts > INT_MAX or ts < INT_MIN:
        return f"'ts' must be an integer (epoch milliseconds) that fits in 64 bits, got {str(ts)[:40]}"
    values = obj.get("values", _MISSING)
    if type(values) is not dict:
        return "'values' is missing" if values is _MISSING else "'values' must be a JSON object"
    if not values:
        return "'values' is empty"
    for v in values.values():
        t = type(v)
        if (t is float and v - v != 0.0) or (t is int and (v > INT_MAX or v < INT_MIN)) or t is dict or t is list:
            problem = values_problem(values)
            if problem:
                return f"'values' {problem}"
            break
    if policy is not None and (kept := policy.apply(values)) is not values:
        if kept is None:
            return DROPPED
        values, obj = kept, _CHANGED  # the controller's text no longer says it: serialise again
    name = type_ if type(type_) is str else type_name(type_)
    if name == "attributes":
        rec = Record(KIND_ATTRIBUTES, PRIO_ATTRIBUTES, TOPIC_ATTRIBUTES, _dumps(values, "\\u" in message), ts, True)
    elif len(obj) == 2:
        # The controller's own text is already the wire format when it holds nothing else.
        rec = Record(KIND_TELEMETRY, PRIO_TELEMETRY, TOPIC_TELEMETRY, message, ts, "log" not in name)
    else:
        # Escapes may decode to lone surrogates, which only an ASCII encoding can carry.
        payload = _dumps({"ts": ts, "values": values}, "\\u" in message)
        rec = Record(KIND_TELEMETRY, PRIO_TELEMETRY, TOPIC_TELEMETRY, payload, ts, "log" not in name)
    # Cheap bound first: a UTF-8 character is at most 4 bytes.
    if PUBLISH_OVERHEAD + len(rec.topic) + 4 * len(rec.payload) > max_packet:
        size = packet_size(utf8_len(rec.topic), utf8_len(rec.payload))
        if size > max_packet:
            return f"record needs a {size}-byte MQTT packet, more than the maximum of {max_packet} bytes"
    return rec
