"""Provisioning (docs/CONTRACT.md, section 5): success with saved 0600 credentials reused, NOT_FOUND and FAILURE
reported clearly with a backoff while the bridge stays up, and refused credentials."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import start_mosquitto, start_simulator
from tests.integration.test_bridge_support import (
    NotifySocket,
    bridge_config,
    captured_seqs,
    fill,
    outbox_empty,
    start_bridge,
    state,
    wait_for,
)

pytestmark = pytest.mark.integration

KEY, SECRET = "prov-key-1", "prov-secret-1"
NAME = "provisioned-dev"


@pytest.fixture
def tb(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    opts = dict(getattr(request, "param", {}))
    broker = start_mosquitto(tmp_path)
    sim = None
    try:
        sim = start_simulator(tmp_path, broker.port, devices=opts.get("devices", {}), provision_key=KEY,
                              provision_secret=SECRET, capture=tmp_path / "capture.jsonl",
                              extra_args=opts.get("args", []))
        yield sim
    finally:
        if sim is not None:
            sim.stop()
        broker.stop()


def _config(base: Path, port: int, key: str = KEY, secret: str = SECRET, **kw: Any) -> Path:
    return bridge_config(base, port, access_token="", device_name=NAME, provision_device_key=key,
                         provision_device_secret=secret, **kw)


def test_provisioning_success_saves_0600_credentials_and_reuses_them(tmp_path: Path, tb: Any) -> None:
    base = tmp_path / "gw"
    creds = base / "state" / "credentials.json"
    fill(base, range(50))
    bridge = start_bridge(_config(base, tb.port))
    try:
        wait_for(lambda: creds.exists(), 20, what="credentials.json")
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        saved = json.loads(creds.read_text())
        assert saved["accessToken"] == tb.client.token(NAME) and saved["deviceName"] == NAME
        tb.client.wait_connected(NAME, timeout=15)
        wait_for(lambda: outbox_empty(base), 20, what="records delivered with the new token")
        wait_for(lambda: len(captured_seqs(tb.capture_path, NAME)) >= 50, 10, what="records captured")
        assert "provisioned; credentials saved" in bridge.log()
    finally:
        bridge.stop()
    # a restart reuses the saved credentials: no second provisioning
    before = tb.client.stats().get("global", {}).get("provision_success")
    bridge = start_bridge(_config(base, tb.port))
    try:
        bridge.wait_log("connected to", 15)
        assert "saved credentials" in bridge.log().split("bridge ready")[-1]
        assert tb.client.stats().get("global", {}).get("provision_success") == before
    finally:
        bridge.stop()


def _refused(tmp_path: Path, tb: Any, cfg: Path, word: str) -> None:
    base = cfg.parent
    notify = NotifySocket(tmp_path / "notify.sock")
    bridge = start_bridge(cfg, env=notify.env(1_000_000))
    try:
        bridge.wait_log(word, 20)
        got = notify.drain(3.0)
        statuses = [m for _, m in got if m.startswith("STATUS=")]
        assert any("provisioning failed" in m and word in m for m in statuses) or any(
            "provisioning failed" in m for _, m in notify.messages if m.startswith("STATUS=")), statuses
        # stays up and keeps feeding the watchdog while it waits (waiting is not a stall)
        assert len([m for _, m in got if m == "WATCHDOG=1"]) >= 3
        assert bridge.proc is not None and bridge.proc.poll() is None
        err = state(base, "bridge.last_error")
        assert err and word in err["message"]
        assert word in (state(base, "bridge.mqtt") or {}).get("last_error", "")
        log = bridge.log()
        assert "retrying in" in log
        # backoff of at least ~30 s: exactly one attempt so far
        assert log.count("provisioning of device") == 1
        assert not (base / "state" / "credentials.json").exists()
    finally:
        bridge.stop()
        notify.close()


def test_provisioning_not_found(tmp_path: Path, tb: Any) -> None:
    _refused(tmp_path, tb, _config(tmp_path / "gw", tb.port, secret="wrong-secret"), "NOT_FOUND")


@pytest.mark.parametrize("tb", [{"devices": {NAME: "existing-token"}, "args": ["--provision-fail-existing"]}],
                         indirect=True)
def test_provisioning_failure(tmp_path: Path, tb: Any) -> None:
    _refused(tmp_path, tb, _config(tmp_path / "gw", tb.port), "FAILURE")


def test_refused_access_token_backs_off_and_says_why(tmp_path: Path, tb: Any) -> None:
    base = tmp_path / "gw"
    bridge = start_bridge(bridge_config(base, tb.port, access_token="not-a-token", auth_backoff_s=60))
    try:
        bridge.wait_log("refused", 15)
        wait_for(lambda: "refused" in ((state(base, "bridge.mqtt") or {}).get("last_error") or ""), 5,
                 what="the refusal in the state")
        log = bridge.log()
        assert "retrying in 60 s" in log
        assert log.count("refused the configured access token") == 1
    finally:
        bridge.stop()


@pytest.mark.parametrize("saved", [
    {"credentialsType": "ACCESS_TOKEN", "accessToken": "tok\ud800en"},
    {"credentialsType": "ACCESS_TOKEN", "accessToken": "x" * 70000},
    {"credentialsType": "MQTT_BASIC", "userName": "u", "password": {"not": "text"}},
    {"credentialsType": "MQTT_BASIC", "userName": "u", "password": "p", "clientId": "c\u0000d"},
])
def test_unusable_saved_credentials_are_replaced_by_provisioning(tmp_path: Path, tb: Any,
                                                                 saved: dict[str, Any]) -> None:
    """Credentials paho cannot put in a CONNECT (a lone surrogate, a NUL, over 64 KiB, not text),
    as a server's answer or a damaged file left them, failed every connect for ever (a traceback
    per attempt, the watchdog starved): the device was lost until someone deleted the file."""
    base = tmp_path / "gw"
    creds = base / "state" / "credentials.json"
    creds.parent.mkdir(parents=True)
    creds.write_text(json.dumps(saved))
    fill(base, range(5))
    bridge = start_bridge(_config(base, tb.port))
    try:
        wait_for(lambda: len(captured_seqs(tb.capture_path, NAME)) >= 5, 30, what="records delivered")
        assert json.loads(creds.read_text())["accessToken"] == tb.client.token(NAME)
        assert "saved credentials unusable" in bridge.log() and "Traceback" not in bridge.log()
    finally:
        bridge.stop()
