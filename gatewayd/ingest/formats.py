"""ThingsBoard payload formats → controller queue rows `(type, message)`.

Device format (as ThingsBoard's device API takes it): an object of values, `{"ts", "values"}`,
or an array of those. Gateway format: `{"<device>": [<device format item>, ...]}` or
`{"<device>": {<values>}}`. gatewayd is one ThingsBoard device, so a gateway-format record
carries its device in its keys: `{"<device>.<key>": value}` (two devices' keys never collide
at one timestamp).

Conversion only reshapes. Whatever cannot be reshaped (not UTF-8, not JSON, an element that
is not an object) is handed on as it came, and the forwarder dead-letters it with the
reason like any bad controller row; a malformed element never holds back the good ones
around it. A record without `ts` gets the time it was received, as ThingsBoard does.
"""

from __future__ import annotations

import json
from typing import Any

from gatewayd.store.ingest import Row

TELEMETRY = "telemetry"
ATTRIBUTES = "attributes"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_loads = json.JSONDecoder(parse_constant=_reject_constant).decode


def dumps(obj: Any) -> str:
    """Compact JSON; `\\u` escapes only where UTF-8 cannot hold the text (lone surrogates)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return json.dumps(obj, separators=(",", ":"))
    return text


def decode(payload: bytes | str) -> tuple[bool, Any]:
    """(True, the JSON value) or (False, the payload to hand on as it came)."""
    if isinstance(payload, bytes):
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            return False, payload
    else:
        text = payload
    try:
        return True, _loads(text)
    except (ValueError, RecursionError):
        return False, text


def _record(item: Any, type_: str, now_ms: int, device: str | None = None) -> Row:
    if type(item) is not dict:
        return type_, dumps(item if device is None else {device: item})
    if "ts" in item and "values" in item:
        ts, values = item["ts"], item["values"]
    else:
        ts, values = now_ms, item
    if device is not None and type(values) is dict:
        values = {f"{device}.{k}": v for k, v in values.items()}
    return type_, dumps({"ts": ts, "values": values})


def device_rows(payload: bytes | str, type_: str, now_ms: int) -> list[Row]:
    ok, obj = decode(payload)
    if not ok:
        return [(type_, obj)]
    if type(obj) is list:
        return [_record(item, type_, now_ms) for item in obj]
    return [_record(obj, type_, now_ms)]


def gateway_rows(payload: bytes | str, type_: str, now_ms: int) -> list[Row]:
    ok, obj = decode(payload)
    if not ok:
        return [(type_, obj)]
    if type(obj) is not dict:
        return [(type_, dumps(obj))]
    rows: list[Row] = []
    for device, entry in obj.items():
        for item in entry if type(entry) is list else [entry]:
            rows.append(_record(item, type_, now_ms, device))
    return rows


def spool_type(name: str) -> str:
    """`<name>.attributes.json[l]` holds client attributes; any other spool file telemetry."""
    stem = name.rsplit(".", 1)[0]
    return ATTRIBUTES if stem.endswith(".attributes") else TELEMETRY
