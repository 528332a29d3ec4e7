"""The loopback HTTP JSON control API (see the package docstring for its endpoints)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

from .proxy import Proxy
from .state import STAT_KEYS, Device, State
from .thingsboard import ThingsBoardLogic

log = logging.getLogger(__name__)


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
        assert isinstance(self.server, ControlServer)
        controller = self.server.controller
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
        except Exception as exc:
            log.exception("control API error")
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control: " + format, *args)


class ControlServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    controller: Controller
