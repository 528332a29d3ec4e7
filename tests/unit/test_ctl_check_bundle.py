from __future__ import annotations

import json
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

from gatewayd import diagnostics
from gatewayd.config import load
from tests.helpers.daemons import ROOT, write_config


def ctl(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_check_reports_unreachable_broker_and_missing_credentials(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = write_config(tmp_path, {"thingsboard": {"host": "127.0.0.1", "port": port}})
    r = ctl(cfg, "check", "--json")
    assert r.returncode == 1
    results = {x["name"]: x for x in json.loads(r.stdout)}
    assert results["broker reachable"]["outcome"] == "failed"
    assert results["credentials"]["outcome"] == "failed"
    assert results["docker"]["outcome"] == "ok"  # controller disabled in the test config
    assert results["config"]["outcome"] == "ok"


def test_check_passes_with_listening_broker_and_token(tmp_path: Path) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cfg = write_config(tmp_path, {"thingsboard": {"host": "127.0.0.1", "port": srv.getsockname()[1],
                                                      "access_token": "t"}})
        results = diagnostics.run_all(load(cfg, env={}))
    by = {r.name: r for r in results}
    assert by["broker reachable"].outcome == "ok"
    assert by["credentials"].outcome == "ok"
    assert by["tls"].outcome == "warning"


def test_saved_credentials_mode_checked(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), env={})
    cfg.state_dir.mkdir(parents=True)
    cfg.credentials_file.write_text('{"credentialsType": "ACCESS_TOKEN", "credentialsValue": "x"}')
    cfg.credentials_file.chmod(0o644)
    assert diagnostics.check_credentials(cfg).outcome == "warning"
    cfg.credentials_file.chmod(0o600)
    assert diagnostics.check_credentials(cfg).outcome == "ok"


def test_support_bundle_masks_secrets(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"thingsboard": {"access_token": "TOPSECRET"}})
    out = tmp_path / "bundle.tar.gz"
    r = ctl(cfg, "support-bundle", "-o", str(out))
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:
        names = sorted(m.name for m in tar.getmembers())
        texts = {m.name: member.read().decode() for m in tar.getmembers() if (member := tar.extractfile(m))}
    assert names == sorted(f"gatewayd-support/{n}" for n in
                           ("status.json", "config.toml", "check.json", "journal.txt", "dead_letters.json",
                            "version.txt"))
    assert all("TOPSECRET" not in t for t in texts.values())
    assert "********" in texts["gatewayd-support/config.toml"]
    assert (out.stat().st_mode & 0o777) == 0o600
