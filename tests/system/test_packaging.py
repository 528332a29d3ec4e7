"""Quick checks of the packaging sources (no root, no container): the units' contract, the
generated default configuration, and the postinst's "is it configured?" helper."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import load
from gatewayd.schema import SCHEMA

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gatewayd-bridge.service", "gatewayd-forwarder.service", "gatewayd-supervisor.service",
            "gatewayd-ingest.service")


class UnitFile(configparser.RawConfigParser):
    """A systemd unit file as sections and keys; key names keep their case."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def unit(name: str) -> configparser.RawConfigParser:
    p = UnitFile(strict=False, interpolation=None)
    p.read(ROOT / "units" / name)
    return p


@pytest.mark.parametrize("name", SERVICES)
def test_service_contract(name: str) -> None:
    u = unit(name)
    daemon = name.removeprefix("gatewayd-").removesuffix(".service")
    svc, un, inst = u["Service"], u["Unit"], u["Install"]
    assert svc["Type"] == "notify"
    assert svc["ExecStart"] == f"/usr/bin/gatewayd {daemon}"
    assert svc["WatchdogSec"] == "30"
    assert svc["Restart"] == "on-failure"
    assert "RestartSec" in svc and "TimeoutStopSec" in svc
    assert svc["RestartPreventExitStatus"] == "78"
    assert "PYTHONFAULTHANDLER=1" in svc["Environment"].split()
    assert svc["User"] == "gatewayd"
    assert svc["StateDirectory"] == "gatewayd"
    assert svc["RuntimeDirectory"] == "gatewayd"
    assert svc["RuntimeDirectoryPreserve"] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["PrivateTmp"] == "yes"
    assert svc["ProtectHome"] == "yes"
    assert svc["CapabilityBoundingSet"] == ""
    assert svc["UMask"] == "0027"
    assert "StartLimitIntervalSec" in un and "StartLimitBurst" in un
    assert un["PartOf"] == "gatewayd.target"
    assert inst["WantedBy"] == "gatewayd.target"
    families = set(svc["RestrictAddressFamilies"].split())
    if daemon == "ingest":
        assert svc["ExecCondition"] == "/usr/bin/gatewayd ingest --configured"
    if daemon == "supervisor":
        assert svc["SupplementaryGroups"] == "docker"
        assert "AF_NETLINK" in families
    else:
        assert "AF_NETLINK" not in families


def test_http_units_contract() -> None:
    """The endpoint: socket-activated on the configured default, a user of its own that can
    read the databases, nothing writable, no network of its own; not watched by cron."""
    sock, svc = unit("gatewayd-http.socket"), unit("gatewayd-http.service")
    assert sock["Socket"]["ListenStream"] == SCHEMA["http"]["listen"].default
    assert sock["Socket"]["Accept"] == "no" and sock["Unit"]["PartOf"] == "gatewayd.target"
    assert "Install" not in sock  # the generator adds it to gatewayd.target, unless [http] listen is empty
    s = svc["Service"]
    assert s["ExecStart"] == "/usr/bin/gatewayd http" and s["Type"] == "notify" and s["WatchdogSec"] == "30"
    assert s["DynamicUser"] == "yes" and s["SupplementaryGroups"] == "gatewayd"
    assert s["PrivateNetwork"] == "yes" and s["RestrictAddressFamilies"] == "AF_UNIX"
    assert s["ProtectSystem"] == "strict" and "ReadWritePaths" not in s and "StateDirectory" not in s
    assert svc["Unit"]["Requires"] == "gatewayd-http.socket" and svc["Unit"]["PartOf"] == "gatewayd.target"
    assert "gatewayd-http" not in (ROOT / "watchdog" / "gatewayd-watchdog").read_text()
    install = (ROOT / "debian" / "gatewayd.install").read_text()
    assert "units/gatewayd-http-generator lib/systemd/system-generators/" in install
    assert os.access(ROOT / "units" / "gatewayd-http-generator", os.X_OK)


def test_target_enables_every_service() -> None:
    u = unit("gatewayd.target")
    assert set(u["Install"]["Also"].split()) == set(SERVICES)
    assert u["Install"]["WantedBy"] == "multi-user.target"


def generated_config() -> str:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-default-config.py")],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def test_default_config_lists_every_key_commented_out(tmp_path: Path) -> None:
    text = generated_config()
    def sections(doc: dict[str, Any], prefix: str = "") -> list[str]:
        return [name for k, v in doc.items() for name in [prefix + k, *sections(v, prefix + k + ".")]]

    assert sorted(sections(tomllib.loads(text))) == sorted(SCHEMA), "sections only, every key commented out"
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for name in keys:
            assert f"\n# {name} = " in text, f"{section}.{name} missing from the default config"
    path = tmp_path / "gatewayd.toml"
    path.write_text(text)
    cfg = load(path, env={})
    assert cfg.sources == [str(path)]


def is_configured(tmp_path: Path, files: dict[str, str], env: dict[str, str] | None = None,
                  defaults: str = "") -> subprocess.CompletedProcess[str]:
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    (tmp_path / "default").write_text(defaults)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "GATEWAYD_CONFIG": str(etc / "gatewayd.toml"),
        "GATEWAYD_DEFAULTS_FILE": str(tmp_path / "default"),
        "GATEWAYD_STATE_DIR": str(state),
        **(env or {}),
    }
    return subprocess.run([sys.executable, str(ROOT / "debian" / "is-configured")], env=environ,
                          capture_output=True, text=True, timeout=60)


def test_not_configured_without_credentials(tmp_path: Path) -> None:
    proc = is_configured(tmp_path, {"gatewayd.toml": generated_config()})
    assert proc.returncode == 1
    assert "no credentials" in proc.stdout


def test_configured_with_a_token_in_conf_d(tmp_path: Path) -> None:
    proc = is_configured(tmp_path, {"gatewayd.toml": generated_config(),
                                    "conf.d/50-site.toml": '[thingsboard]\nhost = "tb"\naccess_token = "x"\n'})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "access token" in proc.stdout


def test_configured_with_a_provisioning_key_from_etc_default(tmp_path: Path) -> None:
    proc = is_configured(tmp_path, {"gatewayd.toml": ""},
                         defaults="THINGSBOARD_PROVISION_DEVICE_KEY=k\nTHINGSBOARD_PROVISION_DEVICE_SECRET=s\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "provisioning key" in proc.stdout


def test_configured_with_saved_credentials(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "credentials.json").write_text("{}")
    proc = is_configured(tmp_path, {"gatewayd.toml": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_not_configured_when_the_config_is_invalid(tmp_path: Path) -> None:
    proc = is_configured(tmp_path, {"gatewayd.toml": '[thingsboard]\naccess_token = "x"\nport = 0\n'})
    assert proc.returncode == 1
    assert "port" in proc.stdout
