#!/usr/bin/env python3
"""ThingsBoard device-API simulator for gatewayd tests, `make demo` and system tests.

A plain MQTT broker echoes a client's own publishes back to its matching subscriptions;
ThingsBoard never does.  This simulator therefore sits *between* the device and a real
mosquitto as a TCP-level MQTT proxy (MQTT 3.1, 3.1.1 and 5) and rewrites topics:

    device PUBLISH        v1/devices/me/<rest>      -> tb/<dev>/up/<rest>
                          v2/{sw,fw}/request/...    -> tb/<dev>/up/v2/{sw,fw}/request/...
                          /provision/request        -> tb/<dev>/up/provision/request
    device (UN)SUBSCRIBE  v1/devices/me/<rest>      -> tb/<dev>/down/<rest>
                          v2/...                    -> tb/<dev>/down/v2/...
                          /provision/response       -> tb/<dev>/down/provision/response
    broker PUBLISH        tb/<dev>/down/...         -> the device topic above

`<dev>` is the device name the access token (CONNECT username) maps to, with `%`, `/`,
`+`, `#` percent-encoded (see `topic_key`).  Provisioning sessions (username `provision`)
get a private key `__provision_<n>`.

The ThingsBoard logic is a paho client subscribed to `tb/+/up/#` on the same broker:
telemetry / attribute capture (re-published on `tb/<dev>/captured/{telemetry,attributes}`
and appended to `--capture FILE`), attribute requests, server-side and client-side RPC
(`getSessionLimits`), provisioning and OTA package chunks.

A loopback HTTP JSON API (`--control-port`) drives it; `SimulatorClient` below wraps it:

    GET  /health                      {"ok", "listen_port", "topic_root", "broker_connected"}
    GET  /devices                     {"devices": [{"name","token","connected","shared","client"}]}
    GET  /telemetry?device=X[&limit=N] {"device","total","records":[{"ts","values","received_ms"}]}
    GET  /attributes?device=X         {"client":{...},"shared":{...}}
    GET  /stats[?device=X]            per-device counters (connects, attribute_requests, publishes,
                                      telemetry_records, ...), "global" and "faults"
    GET  /faults, /session_limits, /client_rpc?device=X
    POST /devices {name, token?}                  add a device (random token when omitted)
    POST /shared_attributes {device, values?, deleted?}
    POST /rpc {device, method, params, timeout?, persistent?}  -> {"id", "response"}; HTTP 504 on timeout.
                                      persistent (ThingsBoard's persistent RPC): sent again every
                                      PERSISTENT_RESEND_S while the device is connected and has not
                                      answered, so it survives a device that was offline or dropped it
    POST /faults {no_puback?, max_packet_bytes?, rate_limit?, refuse?, drop?, refuse_payloads?}
                                      refuse_payloads: [{"match": TEXT, "code": N}]: an MQTT 5 PUBLISH
                                      whose payload contains TEXT ("" = any) is answered with a PUBACK
                                      of reason code N and not forwarded
    POST /disconnect {device}                     close that device's session
    POST /package {device, title, version, data_b64|text|file, corrupt?, type: "sw"|"fw"}
    POST /client_rpc {method, response, device?}  canned reply to a client-side RPC
    POST /reset                                   zero the counters, forget captured records

Prints `tb_simulator ready listen=HOST:PORT control=HOST:PORT pid=N` on stdout once it
listens and is subscribed on the broker; SIGTERM/SIGINT stop it.  Only the Python standard
library and paho-mqtt (1.6.1 or 2.x) are used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import http.server
import json
import logging
import os
import re
import secrets
import signal
import string
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tb_simulator")

READY_LINE = "tb_simulator ready"
PERSISTENT_RESEND_S = 2.0

# --------------------------------------------------------------------------------------
# MQTT framing helpers
# --------------------------------------------------------------------------------------

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


def _u16(data: bytes, pos: int) -> int:
    if pos + 2 > len(data):
        raise ProtocolError("truncated packet")
    return (data[pos] << 8) | data[pos + 1]


def read_bin(data: bytes, pos: int) -> tuple[bytes, int]:
    n = _u16(data, pos)
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


def topic_key(device_name: str) -> str:
    """The topic level used for a device in `tb/<key>/...` (reversible, no wildcards)."""
    return (device_name.replace("%", "%25").replace("/", "%2F").replace("+", "%2B")
            .replace("#", "%23").replace("\0", "%00"))


def key_to_name(key: str) -> str:
    return urllib.parse.unquote(key)


# device topics ThingsBoard accepts for PUBLISH (v1/devices/me/ + rest)
_V1_UP_EXACT = {"telemetry", "attributes", "claim"}
_V1_UP_PREFIX = ("attributes/request/", "rpc/response/", "rpc/request/")
_OTA_REQUEST_RE = re.compile(r"^v2/(sw|fw)/request/[^/+#]+/chunk/\d+$")
# filters ThingsBoard accepts for SUBSCRIBE
_SUB_ALLOWED = {
    "v1/devices/me/attributes",
    "v1/devices/me/attributes/response/+",
    "v1/devices/me/rpc/request/+",
    "v1/devices/me/rpc/response/+",
    "v2/fw/response/+/chunk/+",
    "v2/sw/response/+/chunk/+",
    "v2/fw/error",
    "v2/sw/error",
    "/provision/response",
}
V1_PREFIX = "v1/devices/me/"


def map_up_topic(base: str, topic: str, provisioning: bool) -> str | None:
    """Device PUBLISH topic -> broker topic, None when ThingsBoard would not accept it."""
    if provisioning:
        return f"{base}/up/provision/request" if topic == "/provision/request" else None
    if topic.startswith(V1_PREFIX):
        rest = topic[len(V1_PREFIX):]
        if rest in _V1_UP_EXACT or (rest.startswith(_V1_UP_PREFIX) and "+" not in rest and "#" not in rest):
            return f"{base}/up/{rest}"
        return None
    if _OTA_REQUEST_RE.match(topic):
        return f"{base}/up/{topic}"
    return None


def map_down_filter(base: str, topic_filter: str) -> str | None:
    """Device SUBSCRIBE filter -> broker filter, None when ThingsBoard would refuse it."""
    if topic_filter not in _SUB_ALLOWED:
        return None
    if topic_filter.startswith(V1_PREFIX):
        return f"{base}/down/{topic_filter[len(V1_PREFIX):]}"
    if topic_filter == "/provision/response":
        return f"{base}/down/provision/response"
    return f"{base}/down/{topic_filter}"


def unmap_down_topic(prefix: str, topic: str) -> str:
    """Broker topic `tb/<key>/down/<rest>` -> device topic."""
    if not topic.startswith(prefix):
        return topic
    rest = topic[len(prefix):]
    if rest.startswith("v2/"):
        return rest
    if rest == "provision/response":
        return "/provision/response"
    return V1_PREFIX + rest


# --------------------------------------------------------------------------------------
# Shared state
# --------------------------------------------------------------------------------------

STAT_KEYS = (
    "connects", "disconnects", "evictions", "publishes", "telemetry_publishes", "telemetry_records",
    "attribute_publishes", "attribute_requests", "rpc_requests_sent", "rpc_responses",
    "client_rpc_requests", "chunk_requests", "invalid_payloads", "unknown_topic_publishes",
    "subscribe_failures", "oversize_closes", "rate_limit_closes", "pubacks_swallowed", "publishes_refused",
)


def now_ms() -> int:
    return int(time.time() * 1000)


class Package:
    def __init__(self, kind: str, title: str, version: str, data: bytes, corrupt: bool) -> None:
        self.kind = kind
        self.title = title
        self.version = version
        self.checksum = hashlib.sha256(data).hexdigest()
        self.size = len(data)
        if corrupt and data:
            served = bytearray(data)
            served[len(served) // 2] ^= 0xFF
            self.served = bytes(served)
        elif corrupt:
            self.served = b"\0"
        else:
            self.served = data

    def attributes(self) -> dict[str, Any]:
        k = self.kind
        return {
            f"{k}_title": self.title,
            f"{k}_version": self.version,
            f"{k}_checksum": self.checksum,
            f"{k}_checksum_algorithm": "SHA256",
            f"{k}_size": self.size,
        }

    def chunk(self, size: int, index: int) -> bytes:
        if size < 1:
            return self.served if index == 0 else b""
        start = size * index
        return self.served[start:start + size]


class Device:
    def __init__(self, name: str, token: str, keep_records: int) -> None:
        self.name = name
        self.token = token
        self.key = topic_key(name)
        self.shared: dict[str, Any] = {}
        self.client: dict[str, Any] = {}
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep_records)
        self.client_rpc: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.packages: dict[str, Package] = {}
        self.next_rpc_id = 0
        self.connected = False

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "token": self.token, "connected": self.connected,
                "shared": dict(self.shared), "client": dict(self.client)}


class Faults:
    def __init__(self, max_packet_bytes: int) -> None:
        self.no_puback = False
        self.max_packet_bytes = max_packet_bytes
        self.refuse = False
        self.rate_limit = 0  # publishes per second per session; 0 = off
        self.refuse_payloads: list[tuple[bytes, int]] = []  # (substring, MQTT 5 PUBACK reason code)

    def refusal(self, payload: bytes) -> int:
        """The reason code to refuse this payload with, 0 to accept it."""
        for match, code in self.refuse_payloads:
            if match in payload:
                return code
        return 0

    def as_dict(self) -> dict[str, Any]:
        return {"no_puback": self.no_puback, "max_packet_bytes": self.max_packet_bytes,
                "refuse": self.refuse, "rate_limit": self.rate_limit,
                "refuse_payloads": [{"match": m.decode("utf-8", "replace"), "code": c}
                                    for m, c in self.refuse_payloads]}


class State:
    """Everything the proxy, the ThingsBoard logic and the control API share."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.lock = threading.RLock()
        self.keep_records: int = args.keep_records
        self.devices: dict[str, Device] = {}
        self.by_token: dict[str, Device] = {}
        self.by_key: dict[str, Device] = {}
        self.faults = Faults(args.max_packet_bytes)
        self.global_stats: dict[str, int] = dict.fromkeys((
            "connections", "refused_connects", "provision_sessions", "provision_requests",
            "provision_success", "provision_not_found", "provision_failure", "invalid_payloads"), 0)
        self.state_file: str | None = args.state
        self.client_rpc_replies: dict[tuple[str, str], Any] = {}
        if self.state_file and os.path.exists(self.state_file):
            self._load(self.state_file)
        for spec in args.device or []:
            name, sep, token = spec.partition("=")
            if not sep or not name or not token:
                raise SystemExit(f"--device wants NAME=TOKEN, got {spec!r}")
            self.add_device(name, token, save=False)
        self.save()

    # registry -------------------------------------------------------------------------
    def add_device(self, name: str, token: str | None = None, save: bool = True) -> Device:
        with self.lock:
            token = token or new_token()
            other = self.by_token.get(token)
            if other is not None and other.name != name:
                raise ValueError(f"token already used by device {other.name!r}")
            dev = self.devices.get(name)
            if dev is None:
                dev = Device(name, token, self.keep_records)
                self.devices[name] = dev
                self.by_key[dev.key] = dev
            else:
                self.by_token.pop(dev.token, None)
                dev.token = token
            self.by_token[token] = dev
        if save:
            self.save()
        return dev

    def device(self, name: str) -> Device:
        with self.lock:
            dev = self.devices.get(name)
        if dev is None:
            raise KeyError(f"unknown device {name!r}")
        return dev

    def count(self, dev: Device | None, key: str, n: int = 1) -> None:
        with self.lock:
            if dev is None:
                self.global_stats[key] = self.global_stats.get(key, 0) + n
            else:
                dev.stats[key] = dev.stats.get(key, 0) + n

    def _load(self, path: str) -> None:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        for name, entry in (data.get("devices") or {}).items():
            dev = self.add_device(name, entry["token"], save=False)
            dev.shared.update(entry.get("shared") or {})
            dev.client.update(entry.get("client") or {})

    def save(self) -> None:
        if not self.state_file:
            return
        with self.lock:
            data = {"devices": {d.name: {"token": d.token, "shared": d.shared, "client": d.client}
                                for d in self.devices.values()}}
            text = json.dumps(data, indent=1, sort_keys=True)
        tmp = f"{self.state_file}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, self.state_file)


def new_token() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(20))


# --------------------------------------------------------------------------------------
# The MQTT proxy (asyncio)
# --------------------------------------------------------------------------------------

READ_SIZE = 256 * 1024
CONNECT_TIMEOUT_S = 10.0
HARD_MAX_PACKET = 16 * 1024 * 1024


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


class Session:
    """One device connection and its private connection to the broker."""

    def __init__(self, proxy: Proxy, seq: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.state = proxy.state
        self.seq = seq
        self.reader = reader
        self.writer = writer
        self.broker_reader: asyncio.StreamReader | None = None
        self.broker_writer: asyncio.StreamWriter | None = None
        self.level = 4
        self.key = ""
        self.base = ""
        self.device: Device | None = None
        self.provisioning = False
        self.closed = False
        self.registered = False
        self.close_reason = ""
        self.down_prefix = ""
        self.invalid_subs: dict[int, list[int]] = {}
        self.rl_window = 0.0
        self.rl_count = 0
        self.peer = writer.get_extra_info("peername")

    # lifecycle -------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        log.info("session %d (%s) closed: %s", self.seq, self.device.name if self.device else self.key,
                 reason)
        for w in (self.writer, self.broker_writer):
            if w is not None:
                try:
                    w.close()
                except Exception:  # noqa: BLE001 - closing a broken transport
                    pass

    async def run(self) -> None:
        try:
            if not await self._handshake():
                return
            await self._relay()
        except TimeoutError:
            self.close("timeout waiting for CONNECT/CONNACK")
        except (ProtocolError, ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            self.close(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one broken session must not hurt the others
            log.exception("session %d: unexpected error", self.seq)
            self.close(f"internal error: {exc!r}")
        finally:
            self.close(self.close_reason or "done")
            self.proxy.forget(self)
            for w in (self.writer, self.broker_writer):
                if w is not None:
                    try:
                        await asyncio.wait_for(w.wait_closed(), 1.0)
                    except Exception:  # noqa: BLE001
                        pass

    async def _handshake(self) -> bool:
        pkt = await asyncio.wait_for(read_packet(self.reader, 1 << 20), CONNECT_TIMEOUT_S)
        if pkt[0] >> 4 != CONNECT:
            self.close("first packet is not CONNECT")
            return False
        parsed = parse_connect(pkt)
        self.level = parsed["level"]
        username = parsed["username"]
        st = self.state
        if username == "provision":
            self.provisioning = True
            self.key = f"__provision_{os.getpid()}_{self.seq}"
            st.count(None, "provision_sessions")
        else:
            with st.lock:
                dev = st.by_token.get(username) if username else None
            if dev is None:
                st.count(None, "refused_connects")
                log.info("session %d: refused unknown access token %r", self.seq, username)
                code = RC5_NOT_AUTHORIZED if self.level >= MQTT5 else RC3_NOT_AUTHORIZED
                self.writer.write(connack(self.level, code))
                await self.writer.drain()
                self.close("bad access token")
                return False
            self.device = dev
            self.key = dev.key
        self.base = f"{self.proxy.root}/{self.key}"
        self.down_prefix = f"{self.base}/down/"
        # connect to the real broker
        try:
            broker_reader, broker_writer = await asyncio.wait_for(
                asyncio.open_connection(self.proxy.broker_host, self.proxy.broker_port, limit=1 << 20),
                CONNECT_TIMEOUT_S)
        except OSError as exc:
            log.warning("session %d: broker unreachable: %s", self.seq, exc)
            code = RC5_SERVER_UNAVAILABLE if self.level >= MQTT5 else RC3_SERVER_UNAVAILABLE
            self.writer.write(connack(self.level, code))
            await self.writer.drain()
            self.close("broker unreachable")
            return False
        self.broker_reader, self.broker_writer = broker_reader, broker_writer
        broker_writer.write(build_broker_connect(parsed, f"tbsim-{os.getpid()}-{self.seq}"))
        await broker_writer.drain()
        ack = await asyncio.wait_for(read_packet(broker_reader, 1 << 20), CONNECT_TIMEOUT_S)
        if ack[0] >> 4 != CONNACK:
            raise ProtocolError("broker did not answer CONNACK")
        ack = rewrite_connack(ack, self.level)
        dec = decode_varint(ack, 1)
        if dec is None or dec[1] + 2 > len(ack):
            raise ProtocolError("short CONNACK from the broker")
        rc = ack[dec[1] + 1]
        if rc != 0:
            self.writer.write(ack)
            await self.writer.drain()
            self.close(f"broker refused the connection ({rc})")
            return False
        if self.closed:  # dropped while connecting
            return False
        self.proxy.register(self)
        self.writer.write(ack)
        await self.writer.drain()
        if self.provisioning:
            self.proxy.loop.call_later(self.proxy.provision_close_after, self.close,
                                       "provisioning session timeout")
        return True

    async def _relay(self) -> None:
        assert self.broker_reader is not None and self.broker_writer is not None
        up = asyncio.ensure_future(self._pump(self.reader, self.broker_writer, self._from_device,
                                              self.state.faults.max_packet_bytes + 131072))
        down = asyncio.ensure_future(self._pump(self.broker_reader, self.writer, self._from_broker,
                                                HARD_MAX_PACKET))
        done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        reason = "closed"
        for t in done:
            if not t.cancelled() and t.exception() is None:
                reason = t.result()
            elif not t.cancelled():
                reason = f"error: {t.exception()!r}"
        self.close(reason)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    handler: Callable[[bytearray], tuple[list[bytes], int, str | None]],
                    max_len: int) -> str:
        buf = bytearray()
        name = "device" if reader is self.reader else "broker"
        try:
            while not self.closed:
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    return f"{name} closed the connection"
                buf += chunk
                out, consumed, reason = handler_with_limit(handler, buf, max_len)
                if consumed:
                    del buf[:consumed]
                if out:
                    writer.write(b"".join(out) if len(out) > 1 else out[0])
                if reason:
                    if out:
                        try:
                            await asyncio.wait_for(writer.drain(), 1.0)
                        except Exception:  # noqa: BLE001
                            pass
                    return reason
                if out:
                    await writer.drain()
            return self.close_reason or "closed"
        except ProtocolError as exc:
            return f"protocol error from {name}: {exc}"
        except (ConnectionError, OSError) as exc:
            return f"{name} connection error: {exc}"

    # device -> broker -------------------------------------------------------------------
    def _from_device(self, buf: bytearray) -> tuple[list[bytes], int, str | None]:
        out: list[bytes] = []
        pos = 0
        passed = 0  # start of the pending pass-through run
        n = len(buf)
        faults = self.state.faults
        while pos < n:
            dec = decode_varint(buf, pos + 1)
            if dec is None:
                break
            rl, body = dec
            end = body + rl
            ptype = buf[pos] >> 4
            if ptype == PUBLISH and rl > faults.max_packet_bytes + 131072:
                # certainly larger than the limit: do not wait for the rest
                self._flush(out, buf, passed, pos)
                self.state.count(self.device, "oversize_closes")
                return out, pos, f"oversized PUBLISH ({rl} bytes)"
            if end > n:
                break
            if ptype in (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, CONNECT):
                self._flush(out, buf, passed, pos)
                pkt = bytes(buf[pos:end])
                if ptype == PUBLISH:
                    repl, reason = self._device_publish(pkt, body - pos)
                elif ptype == SUBSCRIBE:
                    repl, reason = self._device_subscribe(pkt, body - pos), None
                elif ptype == UNSUBSCRIBE:
                    repl, reason = self._device_unsubscribe(pkt, body - pos), None
                else:
                    repl, reason = None, "second CONNECT"
                if reason:
                    return out, end, reason
                if repl is not None:
                    out.append(repl)
                passed = end
            pos = end
        self._flush(out, buf, passed, pos)
        return out, pos, None

    @staticmethod
    def _flush(out: list[bytes], buf: bytearray, start: int, end: int) -> None:
        if end > start:
            out.append(bytes(buf[start:end]))

    def _device_publish(self, pkt: bytes, body: int) -> tuple[bytes | None, str | None]:
        st = self.state
        faults = st.faults
        dev = self.device
        qos = (pkt[0] >> 1) & 0x03
        topic_b, p = read_bin(pkt, body)
        pid = 0
        if qos:
            pid = _u16(pkt, p)
            p += 2
        after_topic = body + 2 + len(topic_b)
        payload_start = p
        if self.level >= MQTT5:
            payload_start = read_props(pkt, p)[1]
        payload_len = len(pkt) - payload_start
        st.count(dev, "publishes")
        if len(topic_b) + payload_len > faults.max_packet_bytes:
            st.count(dev, "oversize_closes")
            return None, (f"PUBLISH of {len(topic_b) + payload_len} bytes (topic + payload) exceeds "
                          f"{faults.max_packet_bytes}")
        if faults.rate_limit > 0:
            t = self.proxy.loop.time()
            if t - self.rl_window >= 1.0:
                self.rl_window = t
                self.rl_count = 0
            self.rl_count += 1
            if self.rl_count > faults.rate_limit:
                st.count(dev, "rate_limit_closes")
                return None, f"rate limit exceeded ({faults.rate_limit} publishes/s)"
        if qos == 1 and self.level >= MQTT5 and faults.refuse_payloads:
            code = faults.refusal(pkt[payload_start:])
            if code:
                st.count(dev, "publishes_refused")
                self._send_to_device(self._puback(pid, code))
                return None, None
        try:
            topic = topic_b.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("topic is not UTF-8") from exc
        new_topic = map_up_topic(self.base, topic, self.provisioning)
        if new_topic is None:
            st.count(dev, "unknown_topic_publishes")
            log.info("session %d: unsupported publish topic %r", self.seq, topic)
            if self.provisioning:
                return None, f"unsupported topic {topic!r} in a provisioning session"
            if qos == 1:
                self._send_to_device(self._puback(pid, RC5_TOPIC_NAME_INVALID))
            elif qos == 2:
                return None, f"unsupported topic {topic!r} at QoS 2"
            return None, None
        nt = new_topic.encode("utf-8")
        rest = pkt[after_topic:]
        return make_packet(pkt[0], enc_bin(nt) + rest), None

    def _puback(self, pid: int, reason: int) -> bytes:
        if self.level >= MQTT5:
            return make_packet(PUBACK << 4, pid.to_bytes(2, "big") + bytes([reason]))
        return make_packet(PUBACK << 4, pid.to_bytes(2, "big"))

    def _send_to_device(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)

    def _device_subscribe(self, pkt: bytes, body: int) -> bytes:
        pid = _u16(pkt, body)
        p = body + 2
        head = pkt[body:p]
        if self.level >= MQTT5:
            props, p2 = read_props(pkt, p)
            head += pkt[p:p2]
            p = p2
        parts = [head]
        invalid: list[int] = []
        idx = 0
        while p < len(pkt):
            topic_filter, p = read_str(pkt, p)
            if p >= len(pkt):
                raise ProtocolError("SUBSCRIBE without options byte")
            options = pkt[p:p + 1]
            p += 1
            mapped = map_down_filter(self.base, topic_filter)
            if mapped is None:
                invalid.append(idx)
                self.state.count(self.device, "subscribe_failures")
                log.info("session %d: refused subscription %r", self.seq, topic_filter)
                mapped = f"{self.base}/invalid"
            parts.append(enc_str(mapped) + options)
            idx += 1
        if idx == 0:
            raise ProtocolError("SUBSCRIBE without topic filters")
        if invalid:
            self.invalid_subs[pid] = invalid
        return make_packet(pkt[0], b"".join(parts))

    def _device_unsubscribe(self, pkt: bytes, body: int) -> bytes:
        p = body + 2
        if self.level >= MQTT5:
            p = read_props(pkt, p)[1]
        parts = [pkt[body:p]]
        while p < len(pkt):
            topic_filter, p = read_str(pkt, p)
            mapped = map_down_filter(self.base, topic_filter) or f"{self.base}/invalid"
            parts.append(enc_str(mapped))
        return make_packet(pkt[0], b"".join(parts))

    # broker -> device -------------------------------------------------------------------
    def _from_broker(self, buf: bytearray) -> tuple[list[bytes], int, str | None]:
        out: list[bytes] = []
        pos = 0
        passed = 0
        n = len(buf)
        faults = self.state.faults
        while pos < n:
            dec = decode_varint(buf, pos + 1)
            if dec is None:
                break
            rl, body = dec
            end = body + rl
            if end > n:
                break
            ptype = buf[pos] >> 4
            if ptype == PUBLISH or (ptype == SUBACK and self.invalid_subs) or (
                    ptype == PUBACK and faults.no_puback):
                self._flush(out, buf, passed, pos)
                pkt = bytes(buf[pos:end])
                if ptype == PUBLISH:
                    out.append(self._broker_publish(pkt, body - pos))
                elif ptype == SUBACK:
                    out.append(self._broker_suback(pkt, body - pos))
                else:
                    self.state.count(self.device, "pubacks_swallowed")
                passed = end
            pos = end
        self._flush(out, buf, passed, pos)
        return out, pos, None

    def _broker_publish(self, pkt: bytes, body: int) -> bytes:
        topic, _ = read_str(pkt, body)
        new_topic = unmap_down_topic(self.down_prefix, topic)
        if new_topic == topic:
            return pkt
        return make_packet(pkt[0], enc_str(new_topic) + pkt[body + 2 + len(topic.encode("utf-8")):])

    def _broker_suback(self, pkt: bytes, body: int) -> bytes:
        pid = _u16(pkt, body)
        invalid = self.invalid_subs.pop(pid, None)
        if not invalid:
            return pkt
        p = body + 2
        if self.level >= MQTT5:
            p = read_props(pkt, p)[1]
        codes = bytearray(pkt[p:])
        fail = RC5_TOPIC_FILTER_INVALID if self.level >= MQTT5 else RC3_SUB_FAILURE
        for i in invalid:
            if i < len(codes):
                codes[i] = fail
        return make_packet(pkt[0], pkt[body:p] + bytes(codes))


def handler_with_limit(handler: Callable[[bytearray], tuple[list[bytes], int, str | None]],
                       buf: bytearray, max_len: int) -> tuple[list[bytes], int, str | None]:
    out, consumed, reason = handler(buf)
    if reason is None and consumed < len(buf):
        dec = decode_varint(buf, consumed + 1) if len(buf) > consumed + 1 else None
        if dec is not None and dec[0] > max_len:
            return out, consumed, f"packet of {dec[0]} bytes exceeds {max_len}"
    return out, consumed, reason


def parse_connect(pkt: bytes) -> dict[str, Any]:
    dec = decode_varint(pkt, 1)
    assert dec is not None
    p = dec[1]
    proto, p = read_str(pkt, p)
    if proto not in ("MQTT", "MQIsdp"):
        raise ProtocolError(f"unknown protocol name {proto!r}")
    level = pkt[p]
    flags = pkt[p + 1]
    keepalive = _u16(pkt, p + 2)
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
    assert dec is not None
    p = dec[1]
    head = pkt[p:p + 2]
    raw, _ = read_props(pkt, p + 2)
    return make_packet(pkt[0], head + filter_props(raw, {PROP_TOPIC_ALIAS_MAX, PROP_ASSIGNED_CLIENT_ID}))


class Proxy:
    def __init__(self, state: State, listen_host: str, listen_port: int, broker_host: str,
                 broker_port: int, provision_close_after: float, root: str = "tb") -> None:
        self.state = state
        self.root = root
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.provision_close_after = provision_close_after
        self.loop = asyncio.get_running_loop()
        self.server: asyncio.Server | None = None
        self.sessions: dict[str, Session] = {}  # key -> session
        self.all_sessions: set[Session] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.seq = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port,
                                                 limit=1 << 20, reuse_address=True)
        sock = self.server.sockets[0]
        self.listen_port = sock.getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state.faults.refuse:
            writer.close()
            return
        self.seq += 1
        self.state.count(None, "connections")
        session = Session(self, self.seq, reader, writer)
        self.all_sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await session.run()
        finally:
            self.all_sessions.discard(session)
            if task is not None:
                self.tasks.discard(task)

    def register(self, session: Session) -> None:
        old = self.sessions.get(session.key)
        if old is not None and old is not session:
            self.state.count(old.device, "evictions")
            old.close("evicted by a new session with the same token")
        self.sessions[session.key] = session
        session.registered = True
        if session.device is not None:
            with self.state.lock:
                session.device.connected = True
            self.state.count(session.device, "connects")

    def forget(self, session: Session) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            if session.device is not None:
                with self.state.lock:
                    session.device.connected = False
        if session.device is not None and session.registered:
            self.state.count(session.device, "disconnects")

    def close_key(self, key: str, reason: str) -> bool:
        s = self.sessions.get(key)
        if s is None:
            return False
        s.close(reason)
        return True

    def drop_all(self) -> int:
        sessions = list(self.all_sessions)
        for s in sessions:
            s.close("dropped by fault injection")
        return len(sessions)

    async def set_refuse(self, refuse: bool) -> None:
        self.state.faults.refuse = refuse
        if refuse and self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        elif not refuse and self.server is None:
            self.server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port,
                                                     limit=1 << 20, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.drop_all()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1.0)


# --------------------------------------------------------------------------------------
# ThingsBoard logic (paho client)
# --------------------------------------------------------------------------------------

def make_paho_client(client_id: str, protocol: int | None = None) -> Any:
    """A paho client with the callback API v2 on paho 2.x, v1 on paho 1.x."""
    import paho.mqtt.client as mqtt

    kwargs: dict[str, Any] = {"client_id": client_id,
                              "protocol": mqtt.MQTTv311 if protocol is None else protocol}
    if hasattr(mqtt, "CallbackAPIVersion"):
        kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION2
    if kwargs["protocol"] != getattr(mqtt, "MQTTv5", 5):
        kwargs["clean_session"] = True
    return mqtt.Client(**kwargs)


_compact = json.JSONEncoder(separators=(",", ":")).encode


def reason_value(rc: Any) -> int:
    """Integer value of a paho rc / ReasonCode (works on paho 1.x and 2.x)."""
    if isinstance(rc, int):
        return rc
    return int(getattr(rc, "value", 0) or 0)


class ThingsBoardLogic:
    def __init__(self, state: State, args: argparse.Namespace,
                 proxy_close: Callable[[str, str], None]) -> None:
        self.state = state
        self.args = args
        self.root: str = args.topic_root
        self.proxy_close = proxy_close
        self.subscribed = threading.Event()
        self.pending_rpc: dict[tuple[str, int], tuple[threading.Event, list[Any]]] = {}
        self.chunk_sizes: dict[tuple[str, str], int] = {}
        self.capture_lock = threading.Lock()
        self.capture: Any = None
        if args.capture:
            self.capture = open(args.capture, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.client = make_paho_client(f"tbsim-logic-{os.getpid()}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.reconnect_delay_set(0.2, 2)
        self.client.max_inflight_messages_set(1000)

    def start(self) -> None:
        self.client.connect_async(self.args.broker_host, self.args.broker_port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
        if self.capture is not None:
            with self.capture_lock:
                self.capture.close()
                self.capture = None

    # paho callbacks ------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, properties: Any = None) -> None:
        if reason_value(rc) != 0:
            log.warning("ThingsBoard logic: broker refused connection: %s", rc)
            return
        client.subscribe(f"{self.root}/+/up/#", qos=1)

    def _on_subscribe(self, *args: Any) -> None:
        self.subscribed.set()
        log.info("ThingsBoard logic subscribed to %s/+/up/#", self.root)

    def _on_disconnect(self, *args: Any) -> None:
        self.subscribed.clear()
        log.info("ThingsBoard logic disconnected from the broker")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            self._dispatch(msg.topic, msg.payload)
        except Exception:  # noqa: BLE001 - never kill the paho thread
            log.exception("error handling %s", msg.topic)

    # helpers -------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes | str | dict[str, Any] | list[Any], qos: int = 1) -> None:
        if isinstance(payload, dict | list):
            payload = json.dumps(payload, separators=(",", ":"))
        self.client.publish(topic, payload, qos=qos)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/", 3)
        if len(parts) < 4 or parts[0] != self.root or parts[2] != "up":
            return
        key, rest = parts[1], parts[3]
        if key.startswith("__provision_"):
            # only our own provisioning sessions (several simulators may share a broker)
            if key.startswith(f"__provision_{os.getpid()}_") and rest == "provision/request":
                self._provision(key, payload)
            return
        with self.state.lock:
            dev = self.state.by_key.get(key)
        if dev is None:
            return
        if rest == "telemetry":
            self._telemetry(dev, payload)
        elif rest == "attributes":
            self._client_attributes(dev, payload)
        elif rest.startswith("attributes/request/"):
            self._attribute_request(dev, rest[len("attributes/request/"):], payload)
        elif rest.startswith("rpc/response/"):
            self._rpc_response(dev, rest[len("rpc/response/"):], payload)
        elif rest.startswith("rpc/request/"):
            self._client_rpc(dev, rest[len("rpc/request/"):], payload)
        elif rest.startswith("v2/"):
            self._ota_chunk(dev, rest, payload)

    def _invalid(self, dev: Device, what: str, payload: bytes) -> None:
        self.state.count(dev, "invalid_payloads")
        self.state.count(None, "invalid_payloads")
        log.warning("device %s: invalid %s payload: %r", dev.name, what, payload[:200])

    # telemetry / attributes ----------------------------------------------------------
    def _telemetry(self, dev: Device, payload: bytes) -> None:
        received = now_ms()
        try:
            data = json.loads(payload)
        except ValueError:
            self._invalid(dev, "telemetry", payload)
            return
        items = data if isinstance(data, list) else [data]
        records: list[dict[str, Any]] = []
        for item in items:
            if not isinstance(item, dict):
                self._invalid(dev, "telemetry", payload)
                return
            if "ts" in item and "values" in item and isinstance(item["values"], dict):
                records.append({"ts": item["ts"], "values": item["values"], "received_ms": received})
            else:
                records.append({"ts": received, "values": item, "received_ms": received})
        with self.state.lock:
            dev.stats["telemetry_publishes"] += 1
            dev.stats["telemetry_records"] += len(records)
            dev.records.extend(records)
        self.publish(f"{self.root}/{dev.key}/captured/telemetry", payload)
        if self.capture is not None:
            name = _compact(dev.name)
            enc = _compact
            lines = [f'{{"device":{name},"ts":{enc(r["ts"])},"values":{enc(r["values"])},'
                     f'"received_ms":{received}}}\n' for r in records]
            with self.capture_lock:
                if self.capture is not None:
                    self.capture.write("".join(lines))
                    self.capture.flush()

    def _client_attributes(self, dev: Device, payload: bytes) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self._invalid(dev, "attributes", payload)
            return
        with self.state.lock:
            dev.stats["attribute_publishes"] += 1
            dev.client.update(data)
        self.publish(f"{self.root}/{dev.key}/captured/attributes", payload)
        if self.capture is not None:
            line = json.dumps({"device": dev.name, "attributes": data, "received_ms": now_ms()})
            with self.capture_lock:
                if self.capture is not None:
                    self.capture.write(line + "\n")
                    self.capture.flush()
        self.state.save()

    def _attribute_request(self, dev: Device, req_id: str, payload: bytes) -> None:
        self.state.count(dev, "attribute_requests")
        try:
            data = json.loads(payload) if payload.strip() else {}
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self._invalid(dev, "attribute request", payload)
            return

        def keys(field: str) -> list[str] | None:
            value = data.get(field)
            if value is None:
                return None
            if not isinstance(value, str):  # ThingsBoard wants comma-separated strings
                return []
            return [k.strip() for k in value.split(",") if k.strip()]

        shared_keys = keys("sharedKeys")
        client_keys = keys("clientKeys")
        with self.state.lock:
            if shared_keys is None and client_keys is None:
                client = dict(dev.client)
                shared = dict(dev.shared)
            else:
                client = {k: dev.client[k] for k in client_keys or [] if k in dev.client}
                shared = {k: dev.shared[k] for k in shared_keys or [] if k in dev.shared}
        reply: dict[str, Any] = {}
        # like ThingsBoard: an empty section is left out
        if client:
            reply["client"] = client
        if shared:
            reply["shared"] = shared
        self.publish(f"{self.root}/{dev.key}/down/attributes/response/{req_id}", reply)

    # RPC ---------------------------------------------------------------------------
    def server_rpc(self, dev: Device, method: str, params: Any, timeout: float,
                   persistent: bool = False) -> tuple[bool, Any, int]:
        with self.state.lock:
            dev.next_rpc_id += 1
            rpc_id = dev.next_rpc_id
            event = threading.Event()
            slot: list[Any] = []
            self.pending_rpc[(dev.name, rpc_id)] = (event, slot)
        deadline = time.monotonic() + timeout
        try:
            while True:
                with self.state.lock:
                    send = dev.connected or not persistent
                    if send:
                        dev.stats["rpc_requests_sent"] += 1
                if send:
                    self.publish(f"{self.root}/{dev.key}/down/rpc/request/{rpc_id}",
                                 {"method": method, "params": params})
                left = deadline - time.monotonic()
                ok = event.wait(max(0.0, min(left, PERSISTENT_RESEND_S if persistent else left)))
                if ok or not persistent or time.monotonic() >= deadline:
                    break
        finally:
            with self.state.lock:
                self.pending_rpc.pop((dev.name, rpc_id), None)
        return ok, (slot[0] if slot else None), rpc_id

    def _rpc_response(self, dev: Device, rpc_id: str, payload: bytes) -> None:
        self.state.count(dev, "rpc_responses")
        try:
            value: Any = json.loads(payload)
        except ValueError:
            value = payload.decode("utf-8", "replace")
        try:
            key = (dev.name, int(rpc_id))
        except ValueError:
            return
        with self.state.lock:
            entry = self.pending_rpc.get(key)
        if entry is None:
            log.info("device %s: late or unknown RPC response %s", dev.name, rpc_id)
            return
        entry[1].append(value)
        entry[0].set()

    def session_limits(self) -> dict[str, Any]:
        a = self.args
        messages = a.rate_limit_messages
        if self.state.faults.rate_limit > 0:
            messages = f"{self.state.faults.rate_limit}:1"
        return {"maxPayloadSize": self.state.faults.max_packet_bytes, "maxInflightMessages": a.max_inflight,
                "rateLimits": {"messages": messages, "telemetryMessages": a.rate_limit_telemetry_messages,
                               "telemetryDataPoints": a.rate_limit_telemetry_datapoints}}

    def _client_rpc(self, dev: Device, req_id: str, payload: bytes) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            self._invalid(dev, "client RPC", payload)
            return
        method = data["method"]
        with self.state.lock:
            dev.stats["client_rpc_requests"] += 1
            dev.client_rpc.append({"id": req_id, "method": method, "params": data.get("params"),
                                   "received_ms": now_ms()})
            canned = self.state.client_rpc_replies.get((dev.name, method),
                                                       self.state.client_rpc_replies.get(("", method)))
        reply: Any = None
        if canned is not None:
            reply = canned
        elif method == "getSessionLimits" and not self.args.no_session_limits:
            reply = self.session_limits()
        if reply is not None:
            self.publish(f"{self.root}/{dev.key}/down/rpc/response/{req_id}", reply)

    # OTA --------------------------------------------------------------------------
    def _ota_chunk(self, dev: Device, rest: str, payload: bytes) -> None:
        parts = rest.split("/")  # v2/sw/request/<reqId>/chunk/<n>
        if len(parts) != 6 or parts[2] != "request" or parts[4] != "chunk":
            return
        kind, req_id, index = parts[1], parts[3], int(parts[5])
        self.state.count(dev, "chunk_requests")
        text = payload.decode("ascii", "replace").strip()
        try:
            size = int(text) if text else 0
        except ValueError:
            self._invalid(dev, "chunk request", payload)
            return
        ck = (dev.name, req_id)
        with self.state.lock:
            if size > 0:
                self.chunk_sizes[ck] = size
                if len(self.chunk_sizes) > 1000:
                    self.chunk_sizes.pop(next(iter(self.chunk_sizes)))
            else:
                size = self.chunk_sizes.get(ck, 0)
            pkg = dev.packages.get(kind)
        if size > self.state.faults.max_packet_bytes or pkg is None:
            error = "PAYLOAD_TOO_LARGE" if pkg is not None else "NOT_FOUND"
            self.publish(f"{self.root}/{dev.key}/down/v2/fw/error", error.encode())
            # ThingsBoard closes the session after an OTA error; let the error go out first
            threading.Timer(0.2, self.proxy_close, (dev.key, f"OTA error {error}")).start()
            return
        self.publish(f"{self.root}/{dev.key}/down/v2/{kind}/response/{req_id}/chunk/{index}",
                     pkg.chunk(size, index))

    def set_package(self, dev: Device, kind: str, title: str, version: str, data: bytes,
                    corrupt: bool) -> Package:
        pkg = Package(kind, title, version, data, corrupt)
        with self.state.lock:
            dev.packages[kind] = pkg
            attrs = pkg.attributes()
            dev.shared.update(attrs)
        self.state.save()
        self.publish(f"{self.root}/{dev.key}/down/attributes", attrs)
        return pkg

    def set_shared(self, dev: Device, values: dict[str, Any], deleted: list[str]) -> None:
        with self.state.lock:
            dev.shared.update(values)
            for k in deleted:
                dev.shared.pop(k, None)
        self.state.save()
        if values:
            self.publish(f"{self.root}/{dev.key}/down/attributes", values)
        if deleted:
            self.publish(f"{self.root}/{dev.key}/down/attributes", {"deleted": deleted})

    # provisioning -----------------------------------------------------------------
    def _provision(self, key: str, payload: bytes) -> None:
        st = self.state
        st.count(None, "provision_requests")
        try:
            req = json.loads(payload)
        except ValueError:
            req = None
        reply: dict[str, Any]
        if not isinstance(req, dict):
            reply = {"status": "FAILURE", "errorMsg": "Invalid provision request payload"}
        elif (not self.args.provision_key or req.get("provisionDeviceKey") != self.args.provision_key
              or req.get("provisionDeviceSecret") != self.args.provision_secret):
            reply = {"status": "NOT_FOUND", "errorMsg": "Provision data was not found!"}
        else:
            reply = self._provision_device(req)
        status = reply["status"]
        st.count(None, {"SUCCESS": "provision_success", "NOT_FOUND": "provision_not_found"}.get(
            status, "provision_failure"))
        log.info("provisioning request %s -> %s", {k: v for k, v in (req or {}).items()
                                                    if k != "provisionDeviceSecret"}
                 if isinstance(req, dict) else req, status)
        self.publish(f"{self.root}/{key}/down/provision/response", reply)

    def _provision_device(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self.state
        name = req.get("deviceName")
        if not isinstance(name, str) or not name:
            name = f"device-{secrets.token_hex(4)}"
        ctype = req.get("credentialsType") or "ACCESS_TOKEN"
        if ctype != "ACCESS_TOKEN":
            return {"status": "FAILURE", "errorMsg": f"Unsupported credentials type {ctype}"}
        with st.lock:
            existing = st.devices.get(name)
            if existing is not None:
                if self.args.provision_fail_existing:
                    return {"status": "FAILURE", "errorMsg": f"Device with name {name} already exists!"}
                return {"status": "SUCCESS", "credentialsType": "ACCESS_TOKEN",
                        "credentialsValue": existing.token}
            token = req.get("token") if isinstance(req.get("token"), str) and req.get("token") else None
            if token is not None and token in st.by_token:
                return {"status": "FAILURE", "errorMsg": "Device credentials are already in use!"}
            dev = st.add_device(name, token or new_token(), save=False)
        st.save()
        return {"status": "SUCCESS", "credentialsType": "ACCESS_TOKEN", "credentialsValue": dev.token}


# --------------------------------------------------------------------------------------
# Control API (HTTP, loopback)
# --------------------------------------------------------------------------------------

class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Controller:
    """Implements the control API; runs in HTTP handler threads."""

    def __init__(self, state: State, tb: ThingsBoardLogic, loop: asyncio.AbstractEventLoop,
                 proxy: Proxy) -> None:
        self.state = state
        self.tb = tb
        self.loop = loop
        self.proxy = proxy

    def _in_loop(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=5)

    def _device(self, name: Any) -> Device:
        if not isinstance(name, str):
            raise ControlError(400, "device (a name) is required")
        try:
            return self.state.device(name)
        except KeyError as exc:
            raise ControlError(404, str(exc)) from exc

    def get(self, path: str, query: dict[str, str]) -> Any:
        st = self.state
        if path == "/health":
            return {"ok": True, "listen_port": self.proxy.listen_port, "topic_root": self.tb.root,
                    "broker_connected": self.tb.subscribed.is_set()}
        if path == "/devices":
            with st.lock:
                return {"devices": [d.summary() for d in st.devices.values()]}
        if path == "/telemetry":
            dev = self._device(query.get("device"))
            limit = int(query.get("limit", "0") or 0)
            with st.lock:
                records = list(dev.records)
                total = dev.stats["telemetry_records"]
            if limit > 0:
                records = records[-limit:]
            return {"device": dev.name, "total": total, "records": records}
        if path == "/attributes":
            dev = self._device(query.get("device"))
            with st.lock:
                return {"client": dict(dev.client), "shared": dict(dev.shared)}
        if path == "/stats":
            with st.lock:
                devices = {d.name: dict(d.stats, connected=d.connected) for d in st.devices.values()}
                result = {"devices": devices, "global": dict(st.global_stats), "faults": st.faults.as_dict()}
            if "device" in query:
                if query["device"] not in devices:
                    raise ControlError(404, f"unknown device {query['device']!r}")
                return devices[query["device"]]
            return result
        if path == "/faults":
            return st.faults.as_dict()
        if path == "/client_rpc":
            dev = self._device(query.get("device"))
            with st.lock:
                return {"requests": list(dev.client_rpc)}
        if path == "/session_limits":
            return self.tb.session_limits()
        raise ControlError(404, f"no such endpoint GET {path}")

    def post(self, path: str, body: dict[str, Any]) -> Any:
        st = self.state
        if path == "/devices":
            name = body.get("name")
            if not isinstance(name, str) or not name:
                raise ControlError(400, "name is required")
            try:
                dev = st.add_device(name, body.get("token"))
            except ValueError as exc:
                raise ControlError(409, str(exc)) from exc
            return dev.summary()
        if path == "/shared_attributes":
            dev = self._device(body.get("device"))
            values = body.get("values") or {}
            deleted = body.get("deleted") or []
            if not isinstance(values, dict) or not isinstance(deleted, list):
                raise ControlError(400, "values must be an object and deleted a list")
            self.tb.set_shared(dev, values, [str(k) for k in deleted])
            with st.lock:
                return {"shared": dict(dev.shared)}
        if path == "/rpc":
            dev = self._device(body.get("device"))
            method = body.get("method")
            if not isinstance(method, str):
                raise ControlError(400, "method is required")
            timeout = float(body.get("timeout", 10.0))
            ok, value, rpc_id = self.tb.server_rpc(dev, method, body.get("params", {}), timeout,
                                                   bool(body.get("persistent", False)))
            if not ok:
                raise ControlError(504, f"no RPC response from {dev.name} within {timeout} s (id {rpc_id})")
            return {"id": rpc_id, "response": value}
        if path == "/faults":
            f = st.faults
            if "no_puback" in body:
                f.no_puback = bool(body["no_puback"])
            if "max_packet_bytes" in body:
                f.max_packet_bytes = int(body["max_packet_bytes"])
            if "rate_limit" in body:
                f.rate_limit = int(body["rate_limit"] or 0)
            if "refuse_payloads" in body:
                f.refuse_payloads = [(str(r.get("match", "")).encode("utf-8"), int(r["code"]))
                                     for r in body["refuse_payloads"] or []]
            if "refuse" in body:
                refuse = bool(body["refuse"])
                self._in_loop(lambda: self.proxy.set_refuse(refuse))
            dropped = 0
            if body.get("drop"):
                dropped = self._in_loop(self.proxy.drop_all)
            log.info("faults now %s (dropped %d sessions)", f.as_dict(), dropped)
            return dict(f.as_dict(), dropped=dropped)
        if path == "/disconnect":
            dev = self._device(body.get("device"))
            closed = self._in_loop(lambda: self.proxy.close_key(dev.key, "disconnected by control API"))
            return {"closed": closed}
        if path == "/package":
            dev = self._device(body.get("device"))
            kind = body.get("type", "sw")
            if kind not in ("sw", "fw"):
                raise ControlError(400, "type must be sw or fw")
            if "data_b64" in body:
                data = base64.b64decode(body["data_b64"])
            elif "text" in body:
                data = str(body["text"]).encode("utf-8")
            elif "file" in body:
                with open(body["file"], "rb") as fh:
                    data = fh.read()
            else:
                raise ControlError(400, "one of data_b64, text, file is required")
            title, version = body.get("title"), body.get("version")
            if not isinstance(title, str) or not isinstance(version, str):
                raise ControlError(400, "title and version (strings) are required")
            pkg = self.tb.set_package(dev, kind, title, version, data, bool(body.get("corrupt")))
            return pkg.attributes()
        if path == "/client_rpc":
            method = body.get("method")
            if not isinstance(method, str):
                raise ControlError(400, "method is required")
            key = (str(body.get("device") or ""), method)
            with st.lock:
                if body.get("response") is None:
                    st.client_rpc_replies.pop(key, None)
                else:
                    st.client_rpc_replies[key] = body["response"]
            return {"ok": True}
        if path == "/reset":
            with st.lock:
                for d in st.devices.values():
                    d.stats = dict.fromkeys(STAT_KEYS, 0)
                    d.records.clear()
                    d.client_rpc.clear()
                st.global_stats = dict.fromkeys(st.global_stats, 0)
            return {"ok": True}
        raise ControlError(404, f"no such endpoint POST {path}")


class ControlHandler(http.server.BaseHTTPRequestHandler):
    server_version = "tb_simulator/1"
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        controller: Controller = self.server.controller  # type: ignore[attr-defined]
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            if method == "GET":
                result = controller.get(url.path, query)
            else:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b"{}"
                try:
                    body = json.loads(raw or b"{}")
                except ValueError as exc:
                    raise ControlError(400, f"body is not JSON: {exc}") from exc
                if not isinstance(body, dict):
                    raise ControlError(400, "body must be a JSON object")
                result = controller.post(url.path, body)
            self._reply(200, result)
        except ControlError as exc:
            self._reply(exc.status, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001
            log.exception("control API error")
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("control: " + format, *args)


class ControlServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    controller: Controller


# --------------------------------------------------------------------------------------
# Python helper for tests
# --------------------------------------------------------------------------------------

class SimulatorError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class SimulatorClient:
    """Client of the simulator's control API (stdlib only)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.base = f"http://{host}:{port}"
        self.timeout = timeout

    topic_key = staticmethod(topic_key)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              query: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", "")
            except Exception:  # noqa: BLE001
                msg = str(exc)
            raise SimulatorError(exc.code, msg) from None

    # reads
    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")  # type: ignore[no-any-return]

    def devices(self) -> list[dict[str, Any]]:
        return self._call("GET", "/devices")["devices"]  # type: ignore[no-any-return]

    def token(self, device: str) -> str | None:
        for d in self.devices():
            if d["name"] == device:
                return d["token"]  # type: ignore[no-any-return]
        return None

    def telemetry(self, device: str, limit: int = 0) -> list[dict[str, Any]]:
        return self._call("GET", "/telemetry", query={"device": device, "limit": limit})["records"]  # type: ignore[no-any-return]

    def attributes(self, device: str) -> dict[str, Any]:
        return self._call("GET", "/attributes", query={"device": device})  # type: ignore[no-any-return]

    def stats(self, device: str | None = None) -> dict[str, Any]:
        return self._call("GET", "/stats", query={"device": device} if device else None)  # type: ignore[no-any-return]

    def faults(self) -> dict[str, Any]:
        return self._call("GET", "/faults")  # type: ignore[no-any-return]

    def client_rpc_requests(self, device: str) -> list[dict[str, Any]]:
        return self._call("GET", "/client_rpc", query={"device": device})["requests"]  # type: ignore[no-any-return]

    def session_limits(self) -> dict[str, Any]:
        return self._call("GET", "/session_limits")  # type: ignore[no-any-return]

    # actions
    def add_device(self, name: str, token: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/devices", {"name": name, "token": token})  # type: ignore[no-any-return]

    def set_shared_attributes(self, device: str, values: dict[str, Any] | None = None,
                              deleted: list[str] | None = None) -> dict[str, Any]:
        return self._call("POST", "/shared_attributes",  # type: ignore[no-any-return]
                          {"device": device, "values": values or {}, "deleted": deleted or []})

    def delete_shared_attributes(self, device: str, keys: list[str]) -> dict[str, Any]:
        return self.set_shared_attributes(device, None, keys)

    def rpc(self, device: str, method: str, params: Any = None, timeout: float = 10.0,
            persistent: bool = False) -> Any:
        """Server-side RPC; returns the device's reply, raises SimulatorError(504) on timeout.

        `persistent`: sent again while the device is connected and has not answered (ThingsBoard's
        persistent RPC), so a device that was offline or dropped the request still gets it."""
        body = {"device": device, "method": method, "params": {} if params is None else params,
                "timeout": timeout, "persistent": persistent}
        return self._call("POST", "/rpc", body, timeout=timeout + 10)["response"]

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """no_puback=bool, max_packet_bytes=int, rate_limit=int, refuse=bool, drop=True,
        refuse_payloads=[{"match": str, "code": int}]."""
        return self._call("POST", "/faults", faults)  # type: ignore[no-any-return]

    def drop(self) -> dict[str, Any]:
        return self.set_faults(drop=True)

    def disconnect(self, device: str) -> bool:
        return bool(self._call("POST", "/disconnect", {"device": device})["closed"])

    def set_package(self, device: str, title: str, version: str, data: bytes | None = None,
                    file: str | None = None, corrupt: bool = False, kind: str = "sw") -> dict[str, Any]:
        body: dict[str, Any] = {"device": device, "title": title, "version": version,
                                "corrupt": corrupt, "type": kind}
        if data is not None:
            body["data_b64"] = base64.b64encode(data).decode("ascii")
        elif file is not None:
            body["file"] = file
        else:
            raise ValueError("data or file is required")
        return self._call("POST", "/package", body)  # type: ignore[no-any-return]

    def set_client_rpc_reply(self, method: str, response: Any, device: str | None = None) -> None:
        self._call("POST", "/client_rpc", {"method": method, "response": response, "device": device})

    def reset(self) -> None:
        self._call("POST", "/reset", {})

    # waiting
    def wait_until(self, predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
                   what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(interval)

    def wait_stat(self, device: str, key: str, at_least: int, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait_until(lambda: (s if (s := self.stats(device))[key] >= at_least else None),  # type: ignore[no-any-return]
                               timeout, what=f"{device}.{key} >= {at_least}")

    def wait_for_telemetry(self, device: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        self.wait_stat(device, "telemetry_records", count, timeout)
        return self.telemetry(device)

    def wait_connected(self, device: str, connected: bool = True, timeout: float = 10.0) -> None:
        self.wait_until(lambda: self.stats(device)["connected"] == connected, timeout,
                        what=f"{device} connected={connected}")


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return "127.0.0.1", int(text)
    return host or "127.0.0.1", int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ThingsBoard device-API simulator (MQTT proxy + TB logic)")
    p.add_argument("--listen", default="127.0.0.1:1884", help="HOST:PORT devices connect to (port 0: any)")
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the real MQTT broker")
    p.add_argument("--control-port", type=int, default=0, help="loopback HTTP control API port (0: any)")
    p.add_argument("--control-host", default="127.0.0.1")
    p.add_argument("--device", action="append", metavar="NAME=TOKEN", help="a known device (repeatable)")
    p.add_argument("--state", metavar="FILE",
                   help="JSON device registry, loaded at start and kept up to date")
    p.add_argument("--provision-key")
    p.add_argument("--provision-secret")
    p.add_argument("--provision-fail-existing", action="store_true",
                   help="provisioning an existing device name answers FAILURE")
    p.add_argument("--provision-close-after", type=float, default=60.0,
                   help="seconds after which a provisioning session is closed (as ThingsBoard)")
    p.add_argument("--capture", metavar="FILE", help="append every telemetry record as a JSON line")
    p.add_argument("--keep-records", type=int, default=10000, help="records kept in memory per device")
    p.add_argument("--max-packet-bytes", type=int, default=65536)
    p.add_argument("--max-inflight", type=int, default=100)
    p.add_argument("--no-session-limits", action="store_true", help="do not answer getSessionLimits")
    p.add_argument("--rate-limit-messages", default="200:1,6000:60")
    p.add_argument("--rate-limit-telemetry-messages", default="200:1,6000:60")
    p.add_argument("--rate-limit-telemetry-datapoints", default="1000000:1,60000000:60")
    p.add_argument("--topic-root", default="tb",
                   help="first topic level of the rewritten topics (several simulators can share a broker)")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.listen_host, args.listen_port = host_port(args.listen)
    args.broker_host, args.broker_port = host_port(args.broker)
    if not args.topic_root or any(c in args.topic_root for c in "/+#$"):
        p.error("--topic-root must be one topic level without wildcards or $")
    if bool(args.provision_key) != bool(args.provision_secret):
        p.error("--provision-key and --provision-secret go together")
    return args


async def amain(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    state = State(args)
    proxy = Proxy(state, args.listen_host, args.listen_port, args.broker_host, args.broker_port,
                  args.provision_close_after, args.topic_root)

    def close_from_thread(key: str, reason: str) -> None:
        loop.call_soon_threadsafe(proxy.close_key, key, reason)

    tb = ThingsBoardLogic(state, args, close_from_thread)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tb.start()
    httpd: ControlServer | None = None
    http_thread: threading.Thread | None = None
    try:
        await proxy.start()
        httpd = ControlServer((args.control_host, args.control_port), ControlHandler)
        httpd.controller = Controller(state, tb, loop, proxy)
        http_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="control", daemon=True)
        http_thread.start()
        deadline = loop.time() + args.startup_timeout
        while not tb.subscribed.is_set():
            if stop.is_set():
                return 0
            if loop.time() > deadline:
                log.error("could not connect to the broker at %s:%d", args.broker_host, args.broker_port)
                return 1
            await asyncio.sleep(0.05)
        print(f"{READY_LINE} listen={args.listen_host}:{proxy.listen_port} "
              f"control={args.control_host}:{httpd.server_address[1]} pid={os.getpid()}", flush=True)
        log.info("listening on %s:%d, broker %s:%d, control port %d", args.listen_host, proxy.listen_port,
                 args.broker_host, args.broker_port, httpd.server_address[1])
        await stop.wait()
        log.info("stopping")
        return 0
    finally:
        await proxy.stop()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        tb.stop()
        state.save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s tb_simulator %(levelname)s %(message)s")
    try:
        return asyncio.run(amain(args))
    except OSError as exc:  # e.g. a port already in use
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
