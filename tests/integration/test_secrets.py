"""No secret leaves the gateway in anything it prints, logs, ships or replies.

Distinct secrets are planted in every place one can live (the main config, a conf.d drop-in,
environment variables, `${VAR}` expansion, the controller's environment, a URL password,
credentials.json, a private key file); then the real daemons run against the ThingsBoard
simulator at log level debug, RPCs are asked, and every output is searched for them:
`gatewayd --check-config` (good and bad configs), the daemons' stderr (what journald keeps),
`gatewayctl status|check` (text and JSON), the support bundle, and everything the server
received (RPC replies, telemetry, attributes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import MASK
from tests.helpers.brokers import MOSQUITTO_BIN, free_port, start_mosquitto, start_simulator
from tests.helpers.daemons import ROOT, Daemon, wait_for, write_config
from tests.helpers.tls import issue, make_ca

pytestmark = pytest.mark.integration

DEVICE = "secrets-dev"
RPCS: list[tuple[str, Any]] = [("ping", {}), ("status", {}), ("list", {}), ("system_info", {}),
                               ("sw_status", {}), ("devices", {}), ("job_status", {"job": 4242}),
                               ("no_such_method", {})]


def planted(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:16]}"


SECRETS = {k: planted(k) for k in ("tokfile", "tokenv", "provkey", "provsecret", "ctlenv", "ctlexpanded",
                                   "urlpass", "saved", "savedpw", "badlist", "ingesttoken", "ingestmqttpw")}
SECRETS["badint"] = str(10**17 + uuid.uuid4().int % 10**17)  # a number where a string belongs


def run(cmd: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=full, **kw)


def gatewayctl(cfg: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), *args], env)


def check_config(cfg: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "gatewayd", "--check-config", "--config", str(cfg)], env)


def leaks(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [v for v in (*SECRETS.values(), *extra) if v in text]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    if not os.path.exists(MOSQUITTO_BIN):
        pytest.skip("mosquitto is not installed")
    base = tmp_path / "gw"
    ca = make_ca(tmp_path / "pki")
    device_cert = issue(ca, tmp_path / "pki", "device", DEVICE, client=True)
    cfg = write_config(base, {
        "thingsboard": {"host": "127.0.0.1", "port": 1, "access_token": SECRETS["tokfile"], "device_name": DEVICE,
                        "reconnect_max_s": 1.0, "client_cert": str(device_cert.cert),
                        "client_key": str(device_cert.key)},
        "controller": {"enabled": False, "environment": {"API_KEY": SECRETS["ctlenv"], "DB_PASSWORD": "${MY_SECRET}"},
                       "repository": f"https://deploy:{SECRETS['urlpass']}@git.example.invalid/ctl.git"},
        "supervisor": {"telemetry_interval_s": 1, "udev": False},
        "logging": {"level": "debug", "forward_level": "debug", "forward_max_per_min": 100000},
        "ingest.http": {"listen": f"127.0.0.1:{free_port()}", "bearer_token": SECRETS["ingesttoken"]},
    })
    (base / "conf.d").mkdir()
    (base / "conf.d" / "50-provisioning.toml").write_text(
        f'[thingsboard]\nprovision_device_key = "{SECRETS["provkey"]}"\n'
        f'provision_device_secret = "{SECRETS["provsecret"]}"\n')
    (base / "state").mkdir()
    creds = base / "state" / "credentials.json"
    creds.write_text(json.dumps({"credentialsType": "MQTT_BASIC", "accessToken": SECRETS["saved"],
                                 "userName": SECRETS["saved"], "password": SECRETS["savedpw"]}))
    creds.chmod(0o600)
    env = {"THINGSBOARD_ACCESS_TOKEN": SECRETS["tokenv"], "MY_SECRET": SECRETS["ctlexpanded"]}
    broker = start_mosquitto(tmp_path)
    with open(base / "conf.d" / "60-ingest.toml", "w") as fh:
        fh.write(f'[ingest.mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "ingest"\n'
                 f'password = "{SECRETS["ingestmqttpw"]}"\n')
    daemons: list[Daemon] = []
    try:
        sim = start_simulator(tmp_path, broker.port, devices={DEVICE: SECRETS["tokenv"]})
        env["THINGSBOARD_PORT"] = str(sim.port)
        try:
            for name in ("forwarder", "bridge", "supervisor", "ingest"):
                daemons.append(Daemon(name, cfg, env=env).start(timeout=30))
            yield {"cfg": cfg, "env": env, "sim": sim, "base": base, "daemons": daemons,
                   "key_body": device_cert.key_pem_body(), "tmp": tmp_path}
        finally:
            for d in daemons:
                d.stop()
            sim.stop()
    finally:
        broker.stop()


def test_planted_secrets_appear_in_no_output(world: dict[str, Any]) -> None:
    cfg, env, sim = world["cfg"], world["env"], world["sim"]
    extra = (world["key_body"],)
    outputs: dict[str, str] = {}

    # the data path works with the secret token (so the daemons really used their secrets)
    sent = gatewayctl(cfg, env, "send", '{"probe": 1}')
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: any(r["values"].get("probe") == 1 for r in sim.client.telemetry(DEVICE)), 30,
             what="the probe record at the server")
    for method, params in RPCS:
        outputs[f"rpc {method}"] = json.dumps(sim.client.rpc(DEVICE, method, params, timeout=15))
    assert json.loads(outputs["rpc status"])["gatewayd"]
    assert "error" in json.loads(outputs["rpc no_such_method"])
    wait_for(lambda: any("gw_ingested" in r["values"] or "controller_state" in r["values"]
                         for r in sim.client.telemetry(DEVICE)), 20, what="the supervisor's telemetry")

    good = check_config(cfg, env)
    assert good.returncode == 0, good.stderr
    outputs["check-config"] = good.stdout + good.stderr
    assert MASK in good.stdout

    for args in (["status"], ["status", "--json"], ["check"], ["check", "--json"]):
        r = gatewayctl(cfg, env, *args)
        assert r.returncode in (0, 1), r.stderr
        outputs["gatewayctl " + " ".join(args)] = r.stdout + r.stderr

    bundle = world["tmp"] / "bundle.tar.gz"
    r = gatewayctl(cfg, env, "support-bundle", "-o", str(bundle))
    assert r.returncode == 0, r.stderr
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            if f is not None:
                outputs[f"bundle {m.name}"] = f.read().decode()
    assert MASK in outputs["bundle gatewayd-support/config.toml"]

    # a broken config: the problems are listed without the offending secret values
    bad = world["base"] / "conf.d" / "90-bad.toml"
    bad.write_text(f'[thingsboard]\nprovision_device_key = {SECRETS["badint"]}\n'
                   f'provision_device_secret = ["{SECRETS["badlist"]}"]\n'
                   f'[controller]\nenvironment = {{ NESTED = {{ deep = "{SECRETS["badlist"]}" }} }}\n')
    broken = check_config(cfg, env)
    bad.unlink()
    assert broken.returncode == 78
    outputs["check-config (invalid)"] = broken.stdout + broken.stderr
    assert "[thingsboard] provision_device_key" in broken.stderr
    assert "[thingsboard] provision_device_secret" in broken.stderr

    for d in world["daemons"]:
        d.stop()
        outputs[f"stderr of {d.name}"] = d.log()
        assert f"{d.name} ready" in outputs[f"stderr of {d.name}"]

    outputs["server telemetry"] = json.dumps(sim.client.telemetry(DEVICE))
    # every log line went to the server too (forwarded at debug level), checked with the rest
    forwarded = {r["values"]["gw_log_daemon"] for r in sim.client.telemetry(DEVICE) if "gw_log_message" in r["values"]}
    assert forwarded >= {"forwarder", "bridge", "supervisor", "ingest"}, forwarded
    outputs["server attributes"] = json.dumps(sim.client.attributes(DEVICE))

    found = {where: leaks(text, extra) for where, text in outputs.items()}
    assert not {k: v for k, v in found.items() if v}, found
    assert len(outputs) >= 25
    assert str(world["tmp"] / "pki" / "device.key") in outputs["check-config"]  # the path, never the key
    assert "[controller] environment" in outputs["check-config (invalid)"]
