"""A whole gateway on loopback for integration tests: mosquitto, the ThingsBoard simulator,
the daemons as real processes, `gatewayd http`, and `gatewayctl` run as a command.
Everything started here is stopped by its PID when the block ends."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.brokers import MosquittoProcess, SimulatorProcess, free_port, start_mosquitto, start_simulator
from tests.helpers.daemons import ROOT, Daemon, wait_for, write_config

DEVICE, TOKEN = "ops-gw", "ops-gw-token"
DAEMONS = ("bridge", "forwarder", "supervisor")


@dataclass
class Gateway:
    base: Path
    config: Path
    broker: MosquittoProcess
    sim: SimulatorProcess
    http_port: int
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))

    def status(self) -> tuple[int, dict[str, Any]]:
        r = self.ctl("status", "--json")
        return r.returncode, json.loads(r.stdout)

    def ledger(self) -> dict[str, Any]:
        return self.status()[1]["ledger"]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET",
            timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
        return http_request(self.http_port, path, headers, method, timeout)

    def health(self) -> tuple[int, dict[str, Any]]:
        code, _, body = self.get("/health")
        return code, json.loads(body)

    def delivered(self) -> list[dict[str, Any]]:
        return [r["values"] for r in self.sim.client.telemetry(DEVICE)]


def http_request(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET",
                 timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """A request with a real HTTP client: (status, headers, body), also for 4xx/5xx."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def gateway_config(base: Path, sim_port: int, http_port: int,
                   sections: dict[str, dict[str, Any]] | None = None) -> Path:
    merged: dict[str, dict[str, Any]] = {
        "thingsboard": {"host": "127.0.0.1", "port": sim_port, "access_token": TOKEN, "device_name": DEVICE,
                        "reconnect_max_s": 0.5},
        "supervisor": {"udev": False, "telemetry_interval_s": 3600},
        "http": {"listen": f"127.0.0.1:{http_port}"},
    }
    for name, keys in (sections or {}).items():
        merged.setdefault(name, {}).update(keys)
    return write_config(base, merged)


@contextlib.contextmanager
def gateway(tmp_path: Path, sections: dict[str, dict[str, Any]] | None = None,
            daemons: tuple[str, ...] = DAEMONS, http: bool = True) -> Iterator[Gateway]:
    broker = start_mosquitto(tmp_path)
    started: list[Any] = [broker]
    try:
        sim = start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN})
        started.append(sim)
        port = free_port()
        base = tmp_path / "gw"
        gw = Gateway(base, gateway_config(base, sim.port, port, sections), broker, sim, port)
        for name in (*daemons, *(("http",) if http else ())):
            gw.daemons[name] = Daemon(name, gw.config).start()
            started.append(gw.daemons[name])
        yield gw
    finally:
        for p in reversed(started):
            p.stop()


def wait_healthy(gw: Gateway, timeout: float = 30) -> dict[str, Any]:
    def healthy() -> dict[str, Any] | None:
        code, st = gw.status()
        return st if code == 0 else None

    return wait_for(healthy, timeout, 0.2, what="gatewayctl status healthy")
