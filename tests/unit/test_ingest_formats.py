"""ThingsBoard payload formats → controller rows, and the ingest configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.config import ConfigError, load
from gatewayd.ingest import formats
from gatewayd.records import Record, parse

NOW = 1_800_000_000_000
ROOT = Path(__file__).resolve().parents[2]

json_values = st.recursive(  # integers as ThingsBoard stores them (64 bits; records.parse refuses others)
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25)


def rows_of(obj: object, fn=formats.device_rows, type_: str = "telemetry") -> list[tuple[str, object]]:
    return [(t, json.loads(m) if isinstance(m, str) else m) for t, m in fn(json.dumps(obj), type_, NOW)]


def test_device_format_shapes() -> None:
    assert rows_of({"a": 1}) == [("telemetry", {"ts": NOW, "values": {"a": 1}})]
    assert rows_of({"ts": 5, "values": {"a": 1}}) == [("telemetry", {"ts": 5, "values": {"a": 1}})]
    assert rows_of([{"ts": 5, "values": {"a": 1}}, {"b": 2}]) == [
        ("telemetry", {"ts": 5, "values": {"a": 1}}), ("telemetry", {"ts": NOW, "values": {"b": 2}})]
    assert rows_of({"a": 1}, type_="attributes") == [("attributes", {"ts": NOW, "values": {"a": 1}})]
    assert rows_of([]) == []
    assert rows_of([3, "x"]) == [("telemetry", 3), ("telemetry", "x")]


def test_gateway_format_carries_the_device_in_the_keys() -> None:
    assert rows_of({"Pump A": [{"ts": 5, "values": {"rpm": 1}}, {"t": 2}], "B": {"x": 3}}, formats.gateway_rows) == [
        ("telemetry", {"ts": 5, "values": {"Pump A.rpm": 1}}),
        ("telemetry", {"ts": NOW, "values": {"Pump A.t": 2}}),
        ("telemetry", {"ts": NOW, "values": {"B.x": 3}}),
    ]
    assert rows_of({"B": [7]}, formats.gateway_rows) == [("telemetry", {"B": 7})]
    assert rows_of([1], formats.gateway_rows) == [("telemetry", [1])]


def test_what_cannot_be_reshaped_goes_on_as_it_came() -> None:
    assert formats.device_rows(b"\xff\x00", "telemetry", NOW) == [("telemetry", b"\xff\x00")]
    assert formats.device_rows(b"{nope", "telemetry", NOW) == [("telemetry", "{nope")]
    assert formats.device_rows(b'{"a": NaN}', "telemetry", NOW) == [("telemetry", '{"a": NaN}')]
    deep = "[" * 100_000 + "]" * 100_000
    assert formats.device_rows(deep, "telemetry", NOW) == [("telemetry", deep)]


def test_a_lone_surrogate_is_kept_escaped() -> None:
    [(_, message)] = formats.device_rows('{"a": "\\ud800"}', "telemetry", NOW)
    assert isinstance(message, str)
    message.encode()  # storable as UTF-8 text
    assert json.loads(message)["values"]["a"] == "\ud800"


def test_spool_type_from_the_name() -> None:
    assert formats.spool_type("x.attributes.jsonl") == "attributes"
    assert formats.spool_type("x.attributes.json") == "attributes"
    assert formats.spool_type("attributes.jsonl") == "telemetry"
    assert formats.spool_type("x.jsonl") == "telemetry"


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=2000) | json_values.map(lambda v: json.dumps(v).encode()),
       gateway=st.booleans(), type_=st.sampled_from(["telemetry", "attributes"]))
def test_any_payload_becomes_rows_the_forwarder_can_judge(payload: bytes, gateway: bool, type_: str) -> None:
    """Never raises; every row is text (or the undecodable bytes) whose verdict is a record or a reason."""
    fn = formats.gateway_rows if gateway else formats.device_rows
    for t, message in fn(payload, type_, NOW):
        assert t == type_
        if isinstance(message, bytes):
            assert message == payload
            continue
        message.encode()
        verdict = parse(t, message, 65536)
        assert isinstance(verdict, (Record, str))


@settings(max_examples=200, deadline=None)
@given(records=st.lists(st.fixed_dictionaries({
    "ts": st.integers(min_value=0, max_value=2**53),
    "values": st.dictionaries(st.text(min_size=1, max_size=10), json_values, min_size=1, max_size=4)}),
    max_size=10))
def test_valid_records_survive_unchanged(records: list[dict[str, object]]) -> None:
    rows = formats.device_rows(json.dumps(records).encode(), "telemetry", NOW)
    assert [json.loads(m) for _, m in rows] == records
    assert all(isinstance(parse(t, m, 10**9), Record) for t, m in rows)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gatewayd.toml"
    p.write_text(text)
    return p


def test_ingest_config_tables_and_checks(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[ingest.mqtt]\nhost = "127.0.0.1"\ntopics = ["a/#"]\n'
                               '[ingest.http]\nlisten = "[::1]:9102"\nbearer_token = "tok"\n'), env={})
    assert cfg.ingest_adapters() == ["mqtt", "http"]
    assert cfg["ingest.mqtt"]["topics"] == ["a/#"] and cfg["ingest.mqtt"]["client_id"] == "gatewayd-ingest"
    assert cfg.masked()["ingest.http"]["bearer_token"] != "tok"
    assert cfg.warnings == []
    assert load(write(tmp_path, ""), env={}).ingest_adapters() == []
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, '[ingest.http]\nlisten = "9102"\n[ingest.spool]\ndirectory = "rel"\n'
                             '[ingest.mqtt]\nhost = "h"\ntopics = []\nattribute_topics = []\ngateway_topics = []\n'
                             'gateway_attribute_topics = []\nreceive_maximum = 0\nbogus = 1\n'), env={})
    text = "\n".join(e.value.problems)
    assert "[ingest.http] listen" in text and "[ingest.spool] directory" in text
    assert "[ingest.mqtt] receive_maximum" in text and "topic list must be non-empty" in text


@pytest.mark.parametrize("text,code", [("", 1), ('[ingest.spool]\ndirectory = "/srv/spool"\n', 0),
                                       ('[ingest.http]\nlisten = "bad"\n', 0)])
def test_configured_is_the_units_exec_condition(tmp_path: Path, text: str, code: int) -> None:
    """1: no adapter (the unit stays inactive); 0: start it (an invalid config then fails loudly, 78)."""
    proc = subprocess.run([sys.executable, "-m", "gatewayd", "ingest", "--configured", "--config",
                           str(write(tmp_path, text))], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == code, proc.stderr
