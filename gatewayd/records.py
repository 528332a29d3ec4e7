"""Validation of controller records: what is publishable, and why a row is not."""

from __future__ import annotations

import json
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


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON (ThingsBoard would reject the record)")


# raw_decode skips json.loads' wrapper (half the cost on this hot path); NaN/Infinity are
# refused because Python accepts them and ThingsBoard does not.
_decode = json.JSONDecoder(parse_constant=_reject_constant).raw_decode
_WS = " \t\n\r"


def parse(type_: object, message: object, max_packet: int) -> Record | str:
    """A publishable Record, or the reason the row must go to the dead letters."""
    if isinstance(message, bytes):
        try:
            message = message.decode()
        except UnicodeDecodeError:
            return "message is not UTF-8 text"
    if not isinstance(message, str):
        return "message is missing" if message is None else f"message is not text ({type(message).__name__})"
    try:
        obj, end = _decode(message, len(message) - len(message.lstrip(_WS)))
    except ValueError as e:
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
    if "values" not in obj:
        return "'values' is missing"
    values = obj["values"]
    if not isinstance(values, dict):
        return "'values' must be a JSON object"
    if not values:
        return "'values' is empty"
    type_name = type_ if isinstance(type_, str) else ""
    if type_name == "attributes":
        rec = Record(KIND_ATTRIBUTES, PRIO_ATTRIBUTES, TOPIC_ATTRIBUTES, _dumps(values), ts, True)
    else:
        # The controller's own text is already the wire format when it holds nothing else.
        payload = message if len(obj) == 2 else _dumps({"ts": ts, "values": values})
        rec = Record(KIND_TELEMETRY, PRIO_TELEMETRY, TOPIC_TELEMETRY, payload, ts, "log" not in type_name)
    # Cheap bound first: a UTF-8 character is at most 4 bytes.
    if PUBLISH_OVERHEAD + len(rec.topic) + 4 * len(rec.payload) > max_packet:
        size = packet_size(rec.topic, rec.payload)
        if size > max_packet:
            return f"record needs a {size}-byte MQTT packet, more than the maximum of {max_packet} bytes"
    return rec
