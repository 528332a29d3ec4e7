"""ThingsBoard's side of the device API, as a paho client on the broker (`<root>/+/up/#`).

Telemetry and attribute capture, attribute requests, server-side and client-side RPC
(`getSessionLimits`), OTA package chunks and provisioning.  Runs in paho's network thread;
an error in one message is logged and never stops it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from .state import Device, Package, State, new_token, now_ms

log = logging.getLogger(__name__)

PERSISTENT_RESEND_S = 2.0


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
        except Exception:  # never kill the paho thread
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
