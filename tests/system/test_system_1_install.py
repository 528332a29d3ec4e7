"""The .deb in a booted Debian bookworm (systemd-nspawn): lintian, an install without a
configuration that stays idle, units that verify, their sandboxing, a postinst that follows no
link the gatewayd user planted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.box import HTTP_SERVICE, HTTP_SOCKET, INGEST, TARGET, UNITS
from tests.system.nspawn import Container

pytestmark = pytest.mark.system


def test_lintian_clean(gatewayd_deb: Path, tmp_path: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian not installed")
    proc = subprocess.run(["lintian", "--fail-on", "error,warning", str(gatewayd_deb)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmp_path)})  # it leaves cache files there
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_without_configuration_stays_idle(installed: Container) -> None:
    c = installed
    assert "NOT started" in c.install_output
    assert "systemctl enable --now gatewayd.target" in c.install_output
    for unit in [TARGET, *UNITS.values()]:
        assert c.run(["systemctl", "is-enabled", unit], check=False).stdout.strip() == "disabled"
        assert c.active_state(unit) == "inactive"
    c.run(["getent", "passwd", "gatewayd"])
    groups = c.run(["id", "-nG", "gatewayd"]).stdout.split()
    assert "docker" in groups
    conffiles = c.run(["dpkg-query", "-W", "-f", "${Conffiles}", "gatewayd"]).stdout
    for path in ("/etc/gatewayd/gatewayd.toml", "/etc/default/gatewayd", "/etc/cron.d/gatewayd"):
        assert path in conffiles
    assert c.run(["stat", "-c", "%U:%G %a", "/var/lib/gatewayd"]).stdout.strip() == "gatewayd:gatewayd 750"
    c.run(["man", "-w", "gatewayd"], check=False)  # man-db is not in minbase; the files are:
    for page in ("gatewayd.8.gz", "gatewayctl.8.gz", "gatewayd-watchdog.8.gz"):
        c.run(["test", "-f", f"/usr/share/man/man8/{page}"])


def test_units_verify_clean(installed: Container) -> None:
    paths = [f"/lib/systemd/system/{u}" for u in [*UNITS.values(), INGEST, HTTP_SOCKET, HTTP_SERVICE, TARGET]]
    proc = installed.run(["systemd-analyze", "verify", "--man=no", *paths], check=False, timeout=120)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stdout + proc.stderr


# `systemd-analyze security` exposure when the units were last hardened: never worse.
EXPOSURE_LIMITS = {"bridge": 1.1, "forwarder": 0.2, "supervisor": 1.9, "ingest": 1.1, "http": 0.2}


@pytest.mark.parametrize("daemon", list(EXPOSURE_LIMITS))
def test_security_exposure(installed: Container, daemon: str) -> None:
    unit = {**UNITS, "ingest": INGEST, "http": HTTP_SERVICE}[daemon]
    out = installed.run(["systemd-analyze", "security", "--no-pager", unit], timeout=120).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out
    print(f"systemd-analyze security {unit}: exposure {m.group(1)} (limit {EXPOSURE_LIMITS[daemon]})")
    assert float(m.group(1)) <= EXPOSURE_LIMITS[daemon], out


def test_postinst_follows_no_link_the_gatewayd_user_planted(installed: Container) -> None:
    """gatewayd owns /var/lib/gatewayd: links it puts there must not steer root's postinst."""
    c = installed
    c.run("mkdir -p /etc/victim-dir && chmod 0755 /etc/victim-dir && rm -f /etc/victim-file")
    c.run("rm -rf /var/lib/gatewayd/controller && ln -s /etc/victim-dir /var/lib/gatewayd/controller && "
          "ln -sfn /etc/victim-dir /var/lib/gatewayd/watchdog && "
          "ln -sfn /etc/victim-file /var/lib/gatewayd/.installed-idle", user="gatewayd")
    try:
        proc = c.run(["dpkg-reconfigure", "gatewayd"], check=False, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert c.sh("stat -c '%U:%G %a' /etc/victim-dir").strip() == "root:root 755"
        assert c.run(["test", "-e", "/etc/victim-file"], check=False).returncode != 0
        assert c.sh("ls -A /etc/victim-dir").strip() == ""
        assert c.sh("stat -c '%U:%G %a' /var/lib/gatewayd-root").strip() == "root:root 700"
        assert c.run(["test", "-f", "/var/lib/gatewayd-root/installed-idle"], check=False).returncode == 0
    finally:
        c.run("rm -f /var/lib/gatewayd/controller /var/lib/gatewayd/watchdog /var/lib/gatewayd/.installed-idle "
              "&& mkdir -p -m 0750 /var/lib/gatewayd/controller", user="gatewayd")
        c.run("rmdir /etc/victim-dir")
