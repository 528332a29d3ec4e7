"""The simulator's MQTT framing and topic rewriting (tests/tbsim), over all the bytes and text a
device can send: what parses comes back as it was written, what does not is a ProtocolError
(which closes that one session), never another exception."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tbsim import mqtt, topics

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VARINT_MAX = 268_435_455


def varint(n: int) -> bytes:
    """Written here again, independently of the code under test (MQTT 5 section 1.5.5)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def text(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


@st.composite
def properties(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """MQTT 5 properties of every kind: (identifier, its bytes including the identifier)."""
    out = []
    for pid in draw(st.lists(st.sampled_from(sorted(mqtt._PROP_KIND)), max_size=6)):
        kind = mqtt._PROP_KIND[pid]
        if kind in ("b", "u16", "u32"):
            size = {"b": 1, "u16": 2, "u32": 4}[kind]
            value = draw(st.binary(min_size=size, max_size=size))
        elif kind == "var":
            value = varint(draw(st.integers(0, VARINT_MAX)))
        elif kind == "str":
            value = text(draw(st.text(max_size=20)).encode())
        elif kind == "bin":
            value = text(draw(st.binary(max_size=20)))
        else:
            value = text(draw(st.text(max_size=10)).encode()) + text(draw(st.text(max_size=10)).encode())
        out.append((pid, bytes([pid]) + value))
    return out


def with_length(chunks: list[tuple[int, bytes]]) -> bytes:
    raw = b"".join(c for _, c in chunks)
    return varint(len(raw)) + raw


@SETTINGS
@given(st.integers(0, VARINT_MAX), st.binary(max_size=8))
def test_varint_round_trip_and_incomplete_prefixes(n: int, tail: bytes) -> None:
    enc = mqtt.encode_varint(n)
    assert enc == varint(n) and 1 <= len(enc) <= 4
    assert mqtt.decode_varint(enc + tail, 0) == (n, len(enc))
    for cut in range(len(enc)):
        assert mqtt.decode_varint(enc[:cut], 0) is None


@pytest.mark.parametrize("n", [-1, VARINT_MAX + 1])
def test_varint_out_of_range_is_a_protocol_error(n: int) -> None:
    with pytest.raises(mqtt.ProtocolError):
        mqtt.encode_varint(n)


@SETTINGS
@given(properties(), st.sets(st.sampled_from(sorted(mqtt._PROP_KIND))))
def test_properties_split_and_filter(chunks: list[tuple[int, bytes]], drop: set[int]) -> None:
    raw = b"".join(c for _, c in chunks)
    assert mqtt.split_props(raw) == chunks
    assert mqtt.read_props(with_length(chunks) + b"rest", 0) == (raw, len(with_length(chunks)))
    assert mqtt.filter_props(raw, drop) == with_length([c for c in chunks if c[0] not in drop])


@st.composite
def connects(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A CONNECT as a device writes it, and the fields it carries."""
    level = draw(st.sampled_from([3, 4, 5]))
    proto = "MQIsdp" if level == 3 else "MQTT"
    keepalive = draw(st.integers(0, 0xFFFF))
    client_id = draw(st.text(max_size=23))
    username = draw(st.none() | st.text(max_size=30))
    password = draw(st.none() | st.binary(max_size=30))
    will = draw(st.none() | st.tuples(st.text(max_size=20), st.binary(max_size=20)))
    props = draw(properties()) if level == 5 else []
    flags = (0x02 | (0x04 if will is not None else 0) | (0x80 if username is not None else 0)
             | (0x40 if password is not None else 0))
    body = text(proto.encode()) + bytes([level, flags]) + keepalive.to_bytes(2, "big")
    if level == 5:
        body += with_length(props)
    body += text(client_id.encode())
    if will is not None:
        body += (varint(0) if level == 5 else b"") + text(will[0].encode()) + text(will[1])
    body += text(username.encode()) if username is not None else b""
    body += text(password) if password is not None else b""
    fields = {"proto": proto, "level": level, "flags": flags, "keepalive": keepalive,
              "props": b"".join(c for _, c in props), "client_id": client_id, "username": username,
              "password": password}
    return fields, bytes([mqtt.CONNECT << 4]) + varint(len(body)) + body


@SETTINGS
@given(connects())
def test_connect_parses_and_goes_to_the_broker_clean_and_anonymous(connect: tuple[dict[str, Any], bytes]) -> None:
    fields, pkt = connect
    assert mqtt.parse_connect(pkt) == fields
    sent = mqtt.parse_connect(mqtt.build_broker_connect(fields, "tbsim-1"))
    dropped = {mqtt.PROP_SESSION_EXPIRY, mqtt.PROP_TOPIC_ALIAS_MAX, mqtt.PROP_AUTH_METHOD, mqtt.PROP_AUTH_DATA}
    kept = b"".join(c for pid, c in mqtt.split_props(fields["props"]) if pid not in dropped)
    assert sent == {**fields, "flags": 0x02, "props": kept, "client_id": "tbsim-1", "username": None,
                    "password": None}


@SETTINGS
@given(st.binary(max_size=80), st.sampled_from([b"", b"\x00\x04MQTT\x04", b"\x00\x04MQTT\x05", b"\x00\x06MQIsdp\x03"]))
def test_garbage_is_a_protocol_error_or_parses(data: bytes, head: bytes) -> None:
    body = head + data
    for call in (lambda: mqtt.parse_connect(bytes([0x10]) + varint(len(body)) + body),
                 lambda: mqtt.rewrite_connack(bytes([0x20]) + varint(len(body)) + body, 5),
                 lambda: mqtt.split_props(data), lambda: mqtt.read_props(data, 0),
                 lambda: mqtt.decode_varint(data, 0), lambda: mqtt.read_str(data, 0)):
        try:
            call()
        except mqtt.ProtocolError:
            pass


@SETTINGS
@given(st.text())
def test_topic_key_is_one_level_and_reversible(name: str) -> None:
    key = topics.topic_key(name)
    assert not set(key) & {"/", "+", "#", "\0"}
    assert topics.key_to_name(key) == name


@SETTINGS
@given(st.text(min_size=1).map(topics.topic_key), st.sampled_from(sorted(topics._SUB_ALLOWED)))
def test_allowed_filters_map_to_the_device_and_back(key: str, topic_filter: str) -> None:
    base = f"tb/{key}"
    mapped = topics.map_down_filter(base, topic_filter)
    assert mapped is not None and mapped.startswith(f"{base}/down/")
    assert topics.unmap_down_topic(f"{base}/down/", mapped) == topic_filter


@SETTINGS
@given(st.text(max_size=40))
def test_other_filters_and_wildcard_publishes_are_refused(topic: str) -> None:
    if topic not in topics._SUB_ALLOWED:
        assert topics.map_down_filter("tb/k", topic) is None
    for rest in ("rpc/response/", "attributes/request/", "rpc/request/"):
        if "+" in topic or "#" in topic:
            assert topics.map_up_topic("tb/k", topics.V1_PREFIX + rest + topic, False) is None
        else:
            assert topics.map_up_topic("tb/k", topics.V1_PREFIX + rest + topic, False) == f"tb/k/up/{rest}{topic}"
    assert topics.map_up_topic("tb/k", topic, True) == ("tb/k/up/provision/request"
                                                        if topic == "/provision/request" else None)
