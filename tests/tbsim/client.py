"""Client of the simulator's control API, for tests, `make demo` and the benches (stdlib only)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from .topics import topic_key


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
            except (ValueError, AttributeError):  # not JSON, or not an object
                msg = str(exc)
            raise SimulatorError(exc.code, msg) from None

    # reads
    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def devices(self) -> list[dict[str, Any]]:
        return self._call("GET", "/devices")["devices"]

    def token(self, device: str) -> str | None:
        for d in self.devices():
            if d["name"] == device:
                return d["token"]
        return None

    def telemetry(self, device: str, limit: int = 0) -> list[dict[str, Any]]:
        return self._call("GET", "/telemetry", query={"device": device, "limit": limit})["records"]

    def attributes(self, device: str) -> dict[str, Any]:
        return self._call("GET", "/attributes", query={"device": device})

    def stats(self, device: str | None = None) -> dict[str, Any]:
        return self._call("GET", "/stats", query={"device": device} if device else None)

    def faults(self) -> dict[str, Any]:
        return self._call("GET", "/faults")

    def client_rpc_requests(self, device: str) -> list[dict[str, Any]]:
        return self._call("GET", "/client_rpc", query={"device": device})["requests"]

    def session_limits(self) -> dict[str, Any]:
        return self._call("GET", "/session_limits")

    # actions
    def add_device(self, name: str, token: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/devices", {"name": name, "token": token})

    def set_shared_attributes(self, device: str, values: dict[str, Any] | None = None,
                              deleted: list[str] | None = None) -> dict[str, Any]:
        return self._call("POST", "/shared_attributes",
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
        return self._call("POST", "/faults", faults)

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
        return self._call("POST", "/package", body)

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
        return self.wait_until(lambda: (s if (s := self.stats(device))[key] >= at_least else None),
                               timeout, what=f"{device}.{key} >= {at_least}")

    def wait_for_telemetry(self, device: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        self.wait_stat(device, "telemetry_records", count, timeout)
        return self.telemetry(device)

    def wait_connected(self, device: str, connected: bool = True, timeout: float = 10.0) -> None:
        self.wait_until(lambda: self.stats(device)["connected"] == connected, timeout,
                        what=f"{device} connected={connected}")
