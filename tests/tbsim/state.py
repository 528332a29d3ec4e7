"""What the proxy, the ThingsBoard logic and the control API share: devices, packages, faults."""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import secrets
import string
import threading
import time
from typing import Any

from .topics import topic_key

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
