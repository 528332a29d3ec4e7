from __future__ import annotations

import json

import pytest

from gatewayd.packet import packet_size, utf8_len
from gatewayd.records import Record, parse
from gatewayd.store.queues import KIND_ATTRIBUTES, KIND_TELEMETRY, PRIO_ATTRIBUTES
from gatewayd.topics import TOPIC_TELEMETRY

MAX = 65536


def ok(type_: object, message: object) -> Record:
    rec = parse(type_, message, MAX)
    assert isinstance(rec, Record), rec
    return rec


@pytest.mark.parametrize("message, reason", [
    ("not json", "not valid JSON"),
    (None, "message is missing"),
    (b"\xff\xfe", "not UTF-8"),
    (12, "not text"),
    ("[1, 2]", "not a JSON object"),
    ('"str"', "not a JSON object"),
    ('{"values": {"a": 1}}', "'ts' is missing"),
    ('{"ts": "1", "values": {"a": 1}}', "'ts' must be an integer"),
    ('{"ts": 1.5, "values": {"a": 1}}', "'ts' must be an integer"),
    ('{"ts": true, "values": {"a": 1}}', "'ts' must be an integer"),
    ('{"ts": 1}', "'values' is missing"),
    ('{"ts": 1, "values": [1]}', "'values' must be a JSON object"),
    ('{"ts": 1, "values": {}}', "'values' is empty"),
    ('{"ts": 1, "values": {"a": NaN}}', "NaN is not valid JSON"),
    ('{"ts": 1, "values": {"a": -Infinity}}', "-Infinity is not valid JSON"),
    ('{"ts": 1, "values": {"a": 1}} trailing', "extra data"),
])
def test_invalid_rows_have_reasons(message: object, reason: str) -> None:
    result = parse("telemetry", message, MAX)
    assert isinstance(result, str)
    assert reason in result


def test_telemetry_normalised() -> None:
    rec = ok("telemetry", '{ "ts": 5, "values": {"t": 21.5}, "extra": 1 }')
    assert rec.kind == KIND_TELEMETRY and rec.topic == TOPIC_TELEMETRY and rec.archive
    assert json.loads(rec.payload) == {"ts": 5, "values": {"t": 21.5}}


def test_compact_controller_text_is_the_payload() -> None:
    text = ' {"ts": 7, "values": {"a": 1}}\n'
    rec = ok("telemetry", text)
    assert rec.payload == text and json.loads("[" + rec.payload + "]") == [{"ts": 7, "values": {"a": 1}}]


def test_unknown_and_null_type_is_telemetry() -> None:
    assert ok("weird", '{"ts": 1, "values": {"a": 1}}').kind == KIND_TELEMETRY
    assert ok(None, '{"ts": 1, "values": {"a": 1}}').kind == KIND_TELEMETRY


def test_log_types_not_archived() -> None:
    rec = ok("controller_log", '{"ts": 1, "values": {"msg": "x"}}')
    assert rec.kind == KIND_TELEMETRY and not rec.archive


def test_attributes_publish_values_object() -> None:
    rec = ok("attributes", '{"ts": 1, "values": {"fw": "1.2"}}')
    assert rec.kind == KIND_ATTRIBUTES and rec.priority == PRIO_ATTRIBUTES
    assert json.loads(rec.payload) == {"fw": "1.2"}


def test_oversized_record() -> None:
    big = json.dumps({"ts": 1, "values": {"blob": "x" * MAX}})
    reason = parse("telemetry", big, MAX)
    assert isinstance(reason, str) and "more than the maximum of 65536 bytes" in reason


def test_size_counts_utf8_bytes() -> None:
    # 20,000 three-byte characters fit by character count but not by bytes.
    msg = json.dumps({"ts": 1, "values": {"s": "€" * 22000}}, ensure_ascii=False)
    assert isinstance(parse("telemetry", msg, MAX), str)
    small = ok("telemetry", json.dumps({"ts": 1, "values": {"s": "€" * 100}}, ensure_ascii=False))
    assert packet_size(utf8_len(small.topic), utf8_len(small.payload)) < 400
