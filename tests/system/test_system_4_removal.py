"""Upgrade, remove (data and configuration kept) and purge (nothing left behind)."""

from __future__ import annotations

import pytest

from tests.system.box import DEB_DIR, TARGET, UNITS, ensure_running, wait_active, wait_all_inactive
from tests.system.nspawn import Container, ContainerError, wait_until

pytestmark = pytest.mark.system


def test_upgrade_restarts_the_running_gateway(running: Container, deb_name: str) -> None:
    """An upgrade (here: a reinstall) stops the daemons before unpacking, starts them after."""
    c = running
    ensure_running(c)
    before = {u: c.main_pid(u) for u in UNITS.values()}
    c.run(["apt-get", "install", "--reinstall", "-y", "--no-install-recommends", f"{DEB_DIR}/{deb_name}"],
          timeout=300)
    for unit, pid in before.items():
        wait_active(c, unit, 60)
        assert c.main_pid(unit) != pid, f"{unit} still runs the old code"
    assert c.run(["systemctl", "is-enabled", TARGET], check=False).stdout.strip() == "enabled"


def test_remove_keeps_data_and_configuration(running: Container, deb_name: str) -> None:
    c = running
    c.run(["apt-get", "remove", "-y", "gatewayd"], timeout=300)
    wait_all_inactive(c, 60)
    for unit in UNITS.values():
        assert c.run(["systemctl", "cat", unit], check=False).returncode != 0
    c.run(["test", "-f", "/etc/gatewayd/conf.d/50-test.toml"])
    c.run(["test", "-f", "/var/lib/gatewayd/queues.db"])
    c.run(["getent", "passwd", "gatewayd"])
    # A reinstall picks up where it left off.
    c.run(["apt-get", "install", "-y", "--no-install-recommends", f"{DEB_DIR}/{deb_name}"], timeout=300)
    wait_active(c, UNITS["forwarder"], 60)
    assert c.run(["systemctl", "is-enabled", TARGET], check=False).stdout.strip() == "enabled"


def test_purge_leaves_no_units_data_or_user(running: Container) -> None:
    c = running
    c.run(["apt-get", "purge", "-y", "gatewayd"], timeout=300)
    wait_all_inactive(c, 60)
    listed = c.run(["systemctl", "list-unit-files", "--no-legend", "gatewayd*"], check=False).stdout
    assert listed.strip() == "", listed
    # Asking about a unit (as wait_all_inactive just did) loads it as "not-found" until systemd's
    # garbage collection runs: wait for that rather than racing it.
    def loaded() -> str:
        return c.run(["systemctl", "list-units", "--all", "--no-legend", "gatewayd*"], check=False).stdout

    wait_until(lambda: "gatewayd" not in loaded(), 30, 0.5, "no gatewayd unit loaded after the purge")
    leftovers = c.run("find /etc/systemd /lib/systemd /run/systemd/system -name 'gatewayd*' 2>/dev/null || true").stdout
    assert leftovers.strip() == "", leftovers
    for path in ("/etc/gatewayd", "/var/lib/gatewayd", "/var/lib/gatewayd-root", "/etc/default/gatewayd",
                 "/etc/cron.d/gatewayd",
                 "/usr/sbin/gatewayd-watchdog", "/usr/bin/gatewayd"):
        assert c.run(["test", "-e", path], check=False).returncode != 0, f"{path} left behind"
    assert c.run(["getent", "passwd", "gatewayd"], check=False).returncode != 0
    assert c.run(["getent", "group", "gatewayd"], check=False).returncode != 0
    with pytest.raises(ContainerError):
        c.run(["dpkg-query", "-W", "gatewayd"])
