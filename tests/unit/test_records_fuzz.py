"""Property tests of controller-row validation over everything a controller can store."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.packet import packet_size, utf8_len
from gatewayd.records import INT_MAX, INT_MIN, MAX_JSON_DEPTH, Record, parse, plain_prefix, type_name
from tests.helpers.controller_values import messages, types, valid_records

MAX = 65536
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _reject(name: str) -> None:
    raise ValueError(name)


def depth_and_numbers_ok(obj: Any, depth: int = 1) -> bool:
    """Objects and arrays nest at most MAX_JSON_DEPTH deep (the record itself is level 1)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return True
    if isinstance(obj, int):
        return INT_MIN <= obj <= INT_MAX
    if isinstance(obj, float):
        return math.isfinite(obj)
    if depth > MAX_JSON_DEPTH:
        return False
    items = obj.values() if isinstance(obj, dict) else obj
    return all(depth_and_numbers_ok(v, depth + 1) for v in items)


@SETTINGS
@given(types, messages)
def test_any_row_is_a_publishable_record_or_a_reason(type_: tuple[Any, Any], message: tuple[Any, Any]) -> None:
    result = parse(type_[1], message[1], MAX)
    if isinstance(result, str):
        assert result  # a reason, never an exception
        result.encode("utf-8")
        return
    assert isinstance(result, Record)
    result.payload.encode("utf-8")  # storable and sendable: no lone surrogates
    obj = json.loads(result.payload, parse_constant=_reject)
    assert depth_and_numbers_ok(obj)
    assert INT_MIN <= result.ts <= INT_MAX
    assert packet_size(utf8_len(result.topic), utf8_len(result.payload)) <= MAX


@SETTINGS
@given(valid_records(), st.sampled_from([str, bytes]))
def test_valid_records_always_pass(text: str, form: type) -> None:
    message: Any = text if form is str else text.encode()
    rec = parse("telemetry", message, 1 << 20)
    assert isinstance(rec, Record), rec
    assert json.loads(rec.payload) == json.loads(text)


def test_depth_bound_is_explicit() -> None:
    ok = '{"ts": 1, "values": {"a": ' + "[" * (MAX_JSON_DEPTH - 3) + "]" * (MAX_JSON_DEPTH - 3) + "}}"
    assert isinstance(parse("t", ok, MAX), Record)
    for depth in (MAX_JSON_DEPTH, 900, 5000, 100_000):
        deep = '{"ts": 1, "values": {"a": ' + "[" * depth + "]" * depth + "}}"
        reason = parse("t", deep, 1 << 22)
        assert isinstance(reason, str) and f"deeper than {MAX_JSON_DEPTH}" in reason


def test_number_bounds_are_explicit() -> None:
    assert isinstance(parse("t", f'{{"ts": {INT_MAX}, "values": {{"a": {INT_MIN}}}}}', MAX), Record)
    for bad, why in [(f'{{"ts": {INT_MAX + 1}, "values": {{"a": 1}}}}', "fits in 64 bits"),
                     (f'{{"ts": 1, "values": {{"a": {INT_MAX + 1}}}}}', "does not fit in 64 bits"),
                     ('{"ts": 1, "values": {"a": [1, {"b": -99999999999999999999}]}}', "does not fit in 64 bits"),
                     ('{"ts": 1, "values": {"a": 1e999}}', "too large for a 64-bit float"),
                     ('{"ts": 1, "values": {"a": ' + "9" * 5000 + "}}", "not valid JSON")]:
        reason = parse("t", bad, MAX)
        assert isinstance(reason, str) and why in reason, (bad[:60], reason)


def test_lone_surrogate_escapes_survive_reserialisation() -> None:
    rec = parse("attributes", '{"ts": 1, "values": {"a": "\\ud800x"}}', MAX)
    assert isinstance(rec, Record)
    rec.payload.encode("utf-8")
    assert json.loads(rec.payload) == {"a": "\ud800x"}


@SETTINGS
@given(st.lists(st.tuples(types, messages), max_size=8), st.integers(1024, MAX))
def test_the_plain_fast_path_gives_what_parse_gives(rows: list[tuple[Any, Any]], max_packet: int) -> None:
    """`plain_prefix` is only a faster `parse`: every record it accepts is the one `parse` returns,
    and it stops at the first row it leaves to `parse`."""
    table = [(i, t[1], m[1]) for i, (t, m) in enumerate(rows)]
    names = {t[1]: type_name(t[1]) for t, _ in rows if isinstance(t[1], bytes)}
    good, n = plain_prefix(table, names, max_packet)
    assert 0 <= n <= len(table) and len(good) == n
    for (rid, rec, name), (i, type_, message) in zip(good, table, strict=False):
        assert rid == i and name == names[type_]
        assert parse(name, message, max_packet) == rec


@SETTINGS
@given(st.lists(valid_records(), min_size=1, max_size=20), st.sampled_from(["telemetry", "controller_log", "x"]))
def test_the_plain_fast_path_takes_every_plain_record(texts: list[str], name: str) -> None:
    table = [(i, name.encode(), t.replace(", ", ",").replace(": ", ":").encode()) for i, t in enumerate(texts)]
    good, n = plain_prefix(table, {name.encode(): name}, MAX)
    assert n == len(table)
    assert [(rid, rec) for rid, rec, _ in good] == [(i, parse(name, m, MAX)) for i, _, m in table]
