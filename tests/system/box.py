"""The gateway in the system tests' container: names, timings, units, and the helpers the tests
drive it with (journal, the simulator's control API, `gatewayctl`, systemd states)."""

from __future__ import annotations

import json
import re
import time
from functools import partial
from typing import Any

from tests.system.nspawn import Container, wait_until

UNITS = {
    "bridge": "gatewayd-bridge.service",
    "forwarder": "gatewayd-forwarder.service",
    "supervisor": "gatewayd-supervisor.service",
}
INGEST = "gatewayd-ingest.service"  # inactive until an ingest adapter is configured
HTTP_SOCKET, HTTP_SERVICE = "gatewayd-http.socket", "gatewayd-http.service"  # /health, /metrics
TARGET = "gatewayd.target"
DEVICE, TOKEN = "gw-test", "TESTTOKEN-4f2a"
SIM_PORT, SIM_CONTROL = 1884, 8088
WATCHDOG_SEC, RESTART_SEC = 5, 1
STALL_TIMEOUT_S = 5
DEB_DIR = "/root/debs"
SIMULATOR_DIR = "/opt/gatewayd-test"  # holds tbsim/, the simulator package

TEST_CONFIG = f"""\
# written by the system tests (tests/system)
[thingsboard]
host = "127.0.0.1"
port = {SIM_PORT}
access_token = "{TOKEN}"
device_name = "{DEVICE}"
stall_timeout_s = {STALL_TIMEOUT_S}
reconnect_max_s = 1

[controller]
enabled = false
"""

# Shorter timings than production so the watchdog tests are quick.
TEST_DROPIN = f"""\
[Unit]
StartLimitIntervalSec=120
StartLimitBurst=3

[Service]
WatchdogSec={WATCHDOG_SEC}
RestartSec={RESTART_SEC}
"""

SIMULATOR_UNIT = f"""\
[Unit]
Description=ThingsBoard simulator for the gatewayd system tests
Requires=mosquitto.service
After=mosquitto.service

[Service]
Environment=PYTHONPATH={SIMULATOR_DIR}
ExecStart=/usr/bin/python3 -m tbsim --listen 127.0.0.1:{SIM_PORT} \
  --broker 127.0.0.1:1883 --control-port {SIM_CONTROL} --device {DEVICE}={TOKEN} \
  --capture /var/lib/tb-simulator/capture.jsonl
StateDirectory=tb-simulator
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def cursor(c: Container) -> str:
    out = c.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"], timeout=30).stdout
    m = re.search(r"-- cursor: (\S+)", out)
    assert m, out
    return m.group(1)


def journal_after(c: Container, cur: str, unit: str | None = None, ident: str | None = None) -> str:
    """Messages logged after `cur` by/about `unit`, or with SYSLOG_IDENTIFIER `ident`.

    Filtered here, not with `journalctl -u/-t`: combined with --after-cursor, journalctl
    252 skips the first matching entry (here: exactly the "Watchdog timeout" line)."""
    lines = []
    for e in c.journal("--after-cursor", cur):
        if unit is not None and unit not in (e.get("_SYSTEMD_UNIT"), e.get("UNIT"), e.get("OBJECT_SYSTEMD_UNIT")):
            continue
        if ident is not None and e.get("SYSLOG_IDENTIFIER") != ident:
            continue
        message = e.get("MESSAGE")
        if isinstance(message, list):       # non-UTF-8 text comes as a byte array
            message = bytes(message).decode("utf-8", "replace")
        lines.append(f"{e.get('SYSLOG_IDENTIFIER', '?')}[{e.get('_PID', '?')}]: {message}")
    return "\n".join(lines)


def sim(c: Container, method: str, path: str, body: Any = None) -> Any:
    return c.http(method, SIM_CONTROL, path, body)


def delivered_values(c: Container) -> list[dict[str, Any]]:
    records = sim(c, "GET", f"/telemetry?device={DEVICE}")["records"]
    return [r["values"] for r in records]


def delivered_seqs(c: Container, tag: str) -> set[int]:
    return {v["seq"] for v in delivered_values(c) if v.get("tag") == tag and "seq" in v}


def send(c: Container, tag: str, seqs: range) -> None:
    script = "\n".join(
        "gatewayctl send " + json.dumps(json.dumps(
            {"ts": int(time.time() * 1000), "values": {"tag": tag, "seq": i}}))
        for i in seqs)
    c.run(script, timeout=120)


def status(c: Container) -> dict[str, Any]:
    proc = c.run(["gatewayctl", "status", "--json"], check=False, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def wait_active(c: Container, unit: str, timeout: float = 60) -> None:
    wait_until(lambda: c.active_state(unit) == "active", timeout, 0.25, f"{unit} active")


def wait_all_inactive(c: Container, timeout: float = 60) -> None:
    def all_down() -> bool:
        return all(c.active_state(u) in ("inactive", "failed") for u in [TARGET, *UNITS.values()])
    wait_until(all_down, timeout, 0.25, "gatewayd units inactive")


def drive_past_start_limit(c: Container, unit: str, timeout: float = 90) -> None:
    """SIGKILL the main process again and again until systemd gives up on the unit.

    (It then stays `failed`; its Result stays that of the last crash, `signal`, because
    systemd records start-limit-hit only over a successful result.)"""
    cur = cursor(c)
    deadline = time.monotonic() + timeout

    def gone(pid: int) -> bool:
        return c.main_pid(unit) != pid

    while True:
        props = c.show(unit, "ActiveState", "MainPID")
        if props["ActiveState"] == "failed":
            break
        assert time.monotonic() < deadline, f"{unit} never hit its start limit: {props}"
        pid = int(props["MainPID"])
        if props["ActiveState"] == "active" and pid > 0:
            c.run(["kill", "-KILL", str(pid)], check=False)
            wait_until(partial(gone, pid), 30, 0.1, f"{unit} main PID {pid} gone")
        else:
            time.sleep(0.2)
    log = journal_after(c, cur, unit=unit)
    assert "Start request repeated too quickly" in log, log
    time.sleep(2)
    assert c.active_state(unit) == "failed", "systemd gave up: only the fallback brings it back"


def ensure_running(c: Container, *units: str) -> None:
    """Start from a known state even if an earlier test left a unit down."""
    c.run(["systemctl", "reset-failed", *UNITS.values()], check=False)
    c.run(["systemctl", "start", TARGET], check=False, timeout=120)
    for unit in units or UNITS.values():
        wait_active(c, unit, 60)


def wait_connected(c: Container, timeout: float = 60) -> None:
    wait_until(lambda: status(c)["mqtt"]["connected"], timeout, 0.5, "the bridge connected")
