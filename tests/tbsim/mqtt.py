"""MQTT 3.1, 3.1.1 and 5 framing: the few packet fields the proxy reads or rewrites.

Only what a topic-rewriting proxy needs: variable byte integers, strings, MQTT 5 properties
(split, filtered), CONNECT parsing, and the CONNECT/CONNACK the proxy sends in a device's name.
Malformed input raises `ProtocolError`, which closes that one session.
"""

from __future__ import annotations

import asyncio
from typing import Any

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

MQTT5 = 5

# property id -> kind (MQTT 5, section 2.2.2.2)
_PROP_KIND: dict[int, str] = {
    0x01: "b", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "var", 0x11: "u32",
    0x12: "str", 0x13: "u16", 0x15: "str", 0x16: "bin", 0x17: "b", 0x18: "u32", 0x19: "b",
    0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "u16", 0x22: "u16", 0x23: "u16", 0x24: "b",
    0x25: "b", 0x26: "pair", 0x27: "u32", 0x28: "b", 0x29: "b", 0x2A: "b",
}
PROP_SESSION_EXPIRY = 0x11
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_AUTH_METHOD = 0x15
PROP_AUTH_DATA = 0x16
PROP_TOPIC_ALIAS_MAX = 0x22

# CONNACK codes
RC3_SERVER_UNAVAILABLE = 3
RC3_BAD_CREDENTIALS = 4
RC3_NOT_AUTHORIZED = 5
RC5_SERVER_UNAVAILABLE = 0x88
RC5_BAD_CREDENTIALS = 0x86
RC5_NOT_AUTHORIZED = 0x87
RC5_TOPIC_NAME_INVALID = 0x90
RC5_TOPIC_FILTER_INVALID = 0x8F
RC3_SUB_FAILURE = 0x80


class ProtocolError(Exception):
    """The peer sent bytes that are not valid MQTT."""


def encode_varint(value: int) -> bytes:
    if value < 0 or value > 268_435_455:
        raise ProtocolError(f"remaining length out of range: {value}")
    out = bytearray()
    while True:
        byte = value % 128
        value //= 128
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """Decode a variable byte integer at `pos`; None when incomplete."""
    value = 0
    mult = 1
    for i in range(4):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value += (byte & 0x7F) * mult
        if byte < 0x80:
            return value, pos + i + 1
        mult *= 128
    raise ProtocolError("malformed variable byte integer")


def read_u16(data: bytes, pos: int) -> int:
    if pos + 2 > len(data):
        raise ProtocolError("truncated packet")
    return (data[pos] << 8) | data[pos + 1]


def read_bin(data: bytes, pos: int) -> tuple[bytes, int]:
    n = read_u16(data, pos)
    end = pos + 2 + n
    if end > len(data):
        raise ProtocolError("truncated string")
    return data[pos + 2:end], end


def read_str(data: bytes, pos: int) -> tuple[str, int]:
    raw, pos = read_bin(data, pos)
    try:
        return raw.decode("utf-8"), pos
    except UnicodeDecodeError as exc:
        raise ProtocolError("invalid UTF-8 string") from exc


def enc_bin(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ProtocolError("string too long")
    return len(value).to_bytes(2, "big") + value


def enc_str(value: str) -> bytes:
    return enc_bin(value.encode("utf-8"))


def read_props(data: bytes, pos: int) -> tuple[bytes, int]:
    """Return (raw property bytes without the length prefix, position after them)."""
    dec = decode_varint(data, pos)
    if dec is None:
        raise ProtocolError("truncated properties")
    length, start = dec
    end = start + length
    if end > len(data):
        raise ProtocolError("truncated properties")
    return data[start:end], end


def split_props(raw: bytes) -> list[tuple[int, bytes]]:
    """Split raw properties into (identifier, bytes including the identifier)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(raw):
        dec = decode_varint(raw, pos)
        if dec is None:
            raise ProtocolError("truncated property id")
        pid, p = dec
        kind = _PROP_KIND.get(pid)
        if kind is None:
            raise ProtocolError(f"unknown property 0x{pid:02x}")
        if kind == "b":
            p += 1
        elif kind == "u16":
            p += 2
        elif kind == "u32":
            p += 4
        elif kind == "var":
            dv = decode_varint(raw, p)
            if dv is None:
                raise ProtocolError("truncated property")
            p = dv[1]
        elif kind in ("str", "bin"):
            p = read_bin(raw, p)[1]
        else:  # pair
            p = read_bin(raw, read_bin(raw, p)[1])[1]
        if p > len(raw):
            raise ProtocolError("truncated property")
        out.append((pid, raw[pos:p]))
        pos = p
    return out


def filter_props(raw: bytes, drop: set[int]) -> bytes:
    """Properties with the ids in `drop` removed, re-encoded with their length prefix."""
    kept = b"".join(chunk for pid, chunk in split_props(raw) if pid not in drop)
    return encode_varint(len(kept)) + kept


def make_packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_varint(len(body)) + body


def connack(level: int, code: int) -> bytes:
    if level >= MQTT5:
        return make_packet(CONNACK << 4, bytes([0, code, 0]))
    return make_packet(CONNACK << 4, bytes([0, code]))


async def read_packet(reader: asyncio.StreamReader, max_len: int) -> bytes:
    first = await reader.readexactly(1)
    header = bytearray(first)
    while True:
        b = await reader.readexactly(1)
        header += b
        if b[0] < 0x80:
            break
        if len(header) > 5:
            raise ProtocolError("malformed remaining length")
    dec = decode_varint(header, 1)
    assert dec is not None
    length = dec[0]
    if length > max_len:
        raise ProtocolError(f"packet too large ({length} bytes)")
    body = await reader.readexactly(length)
    return bytes(header) + body


def parse_connect(pkt: bytes) -> dict[str, Any]:
    """The fields of a whole CONNECT packet; ProtocolError when it is not one."""
    dec = decode_varint(pkt, 1)
    if dec is None:
        raise ProtocolError("truncated CONNECT")
    p = dec[1]
    proto, p = read_str(pkt, p)
    if proto not in ("MQTT", "MQIsdp"):
        raise ProtocolError(f"unknown protocol name {proto!r}")
    if p + 4 > len(pkt):
        raise ProtocolError("truncated CONNECT")
    level = pkt[p]
    flags = pkt[p + 1]
    keepalive = read_u16(pkt, p + 2)
    p += 4
    props = b""
    if level >= MQTT5:
        props, p = read_props(pkt, p)
    client_id, p = read_str(pkt, p)
    if flags & 0x04:  # will
        if level >= MQTT5:
            p = read_props(pkt, p)[1]
        p = read_bin(pkt, p)[1]
        p = read_bin(pkt, p)[1]
    username = None
    password = None
    if flags & 0x80:
        username, p = read_str(pkt, p)
    if flags & 0x40:
        password, p = read_bin(pkt, p)
    return {"proto": proto, "level": level, "flags": flags, "keepalive": keepalive, "props": props,
            "client_id": client_id, "username": username, "password": password}


def build_broker_connect(parsed: dict[str, Any], client_id: str) -> bytes:
    """The CONNECT sent to the real broker: clean, anonymous, no will, unique client id."""
    vh = enc_str(parsed["proto"]) + bytes([parsed["level"], 0x02]) + parsed["keepalive"].to_bytes(2, "big")
    if parsed["level"] >= MQTT5:
        vh += filter_props(parsed["props"], {PROP_SESSION_EXPIRY, PROP_TOPIC_ALIAS_MAX, PROP_AUTH_METHOD,
                                             PROP_AUTH_DATA})
    return make_packet(CONNECT << 4, vh + enc_str(client_id))


def rewrite_connack(pkt: bytes, level: int) -> bytes:
    if level < MQTT5:
        return pkt
    dec = decode_varint(pkt, 1)
    if dec is None:
        raise ProtocolError("truncated CONNACK")
    p = dec[1]
    head = pkt[p:p + 2]
    raw, _ = read_props(pkt, p + 2)
    return make_packet(pkt[0], head + filter_props(raw, {PROP_TOPIC_ALIAS_MAX, PROP_ASSIGNED_CLIENT_ID}))
