"""Device provisioning (docs/CONTRACT.md, section 5) and the saved credentials file (`<state_dir>/credentials.json`).

The MQTT exchange itself is driven by the bridge's main loop (service.py); this module holds
the parts that need no network: the request, the answer's interpretation, the backoff, and
saving/loading credentials (mode 0600, written atomically).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd.clock import now_ms

BACKOFF_INITIAL_S = 30.0
BACKOFF_MAX_S = 30 * 60.0
RESPONSE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Credentials:
    """What the bridge connects with: MQTT username (the access token), optional client id/password."""

    username: str
    password: str | None = None
    client_id: str | None = None
    source: str = "config"

    def describe(self) -> str:
        return {"config": "the configured access token",
                "file": "saved credentials",
                "provisioned": "freshly provisioned credentials"}.get(self.source, self.source)


class ProvisioningError(Exception):
    """The server refused provisioning (NOT_FOUND, FAILURE, unexpected answer)."""


def client_id_for_provisioning() -> str:
    # Never the literal "provision": ThingsBoard treats that client id specially.
    return "gatewayd-prov-" + secrets.token_hex(4)


def request_payload(device_name: str, key: str, secret: str) -> str:
    return json.dumps({"deviceName": device_name, "provisionDeviceKey": key,
                       "provisionDeviceSecret": secret}, separators=(",", ":"))


MQTT_STRING_MAX = 65535


def _mqtt_text(value: Any, what: str, optional: bool = False) -> str | None:
    """`value` as an MQTT UTF-8 string (user name, password, client id), or ValueError: a value
    paho cannot encode (a lone surrogate, a NUL, over 64 KiB, a JSON object) failed every
    connect, for ever, once saved."""
    if value is None and optional:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode text") from None
    if "\0" in value or size > MQTT_STRING_MAX:
        raise ValueError(f"{what} cannot be sent over MQTT (a NUL character, or over {MQTT_STRING_MAX} bytes)")
    return value


def _basic(value: dict[str, Any], source: str) -> Credentials:
    return Credentials(username=_mqtt_text(value.get("userName"), "userName") or "",
                       password=_mqtt_text(value.get("password"), "password", optional=True),
                       client_id=_mqtt_text(value.get("clientId") or None, "clientId", optional=True),
                       source=source)


def parse_response(payload: bytes) -> Credentials:
    """Credentials from a SUCCESS answer; ProvisioningError with a clear reason otherwise."""
    try:
        data = json.loads(payload)
    except ValueError:
        raise ProvisioningError(f"provisioning answer is not JSON: {payload[:200]!r}") from None
    if not isinstance(data, dict):
        raise ProvisioningError(f"provisioning answer is not a JSON object: {payload[:200]!r}")
    status = data.get("status")
    if status != "SUCCESS":
        msg = data.get("errorMsg") or data.get("error") or "no reason given"
        raise ProvisioningError(f"provisioning refused by the server: {status or 'no status'}: {msg}")
    ctype = data.get("credentialsType", "ACCESS_TOKEN")
    value = data.get("credentialsValue")
    try:
        if ctype == "ACCESS_TOKEN" and isinstance(value, str) and value:
            return Credentials(username=_mqtt_text(value, "the access token") or "", source="provisioned")
        if ctype == "MQTT_BASIC" and isinstance(value, dict) and value.get("userName"):
            return _basic(value, "provisioned")
    except ValueError as e:
        raise ProvisioningError(f"provisioning answer has unusable credentials: {e}") from None
    raise ProvisioningError(f"provisioning answer has unsupported credentials: type {ctype!r}")


def save(path: Path, creds: Credentials, device_name: str) -> None:
    """Write credentials.json with mode 0600 atomically (temp file, fsync, rename, fsync dir)."""
    basic = creds.password is not None or bool(creds.client_id)
    data: dict[str, Any] = {"credentialsType": "MQTT_BASIC" if basic else "ACCESS_TOKEN",
                            "accessToken": creds.username, "deviceName": device_name,
                            "savedMs": now_ms()}
    if data["credentialsType"] == "MQTT_BASIC":
        data.update({"userName": creds.username, "password": creds.password, "clientId": creds.client_id})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (json.dumps(data, indent=2) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load(path: Path) -> Credentials | None:
    """Saved credentials, or None when there are none; ValueError when the file is unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    try:
        if data.get("credentialsType") == "MQTT_BASIC" and data.get("userName"):
            return _basic(data, "file")
        token = data.get("accessToken")
        if isinstance(token, str) and token:
            return Credentials(_mqtt_text(token, "accessToken") or "", source="file")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    raise ValueError(f"{path}: no accessToken in it")


class Backoff:
    """Exponential backoff with jitter, the bridge's one retry policy; `reset()` after a success.

    The cap grows with consecutive failures (`initial`, doubling, at most `maximum`). With a
    `jitter` fraction each wait is the cap ± that fraction (provisioning, MQTT 5 refusals:
    one device's own pace). With `full_jitter` each wait is uniform in [0, cap] (AWS's "full
    jitter"): the first retries stay fast (within `initial`, then twice that), and a fleet that
    lost its server together is spread over the whole cap instead of coming back in step.
    """

    MAX_DOUBLINGS = 64

    def __init__(self, initial: float, maximum: float, jitter: float = 0.2, *, full_jitter: bool = False,
                 rng: random.Random | None = None):
        self.initial = initial
        self.maximum = max(maximum, initial)
        self.jitter = jitter
        self.full_jitter = full_jitter
        self.failures = 0
        self.current = 0.0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The wait before the next attempt; counts one more failure."""
        self.current = min(self.maximum, self.initial * 2.0 ** min(self.failures, self.MAX_DOUBLINGS))
        self.failures += 1
        if self.full_jitter:
            return self._rng.uniform(0.0, self.current)
        spread = self.current * self.jitter
        return max(0.0, self.current + self._rng.uniform(-spread, spread))

    def reset(self) -> None:
        self.failures = 0
        self.current = 0.0
