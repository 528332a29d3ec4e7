"""Fixtures of the system tests: the .deb, the cached bookworm rootfs, a booted container, and
the gateway in it at its stages (`box`: simulator up, .deb copied in; `installed`; `running`).

One container serves the whole package: `test_system_1_install.py` to `test_system_4_removal.py`
run in file order against it (install idle, configure and run, watchdogs and reboots, remove and
purge); each file also runs alone, the fixtures bringing the container to the stage it needs.
The system tests need root (debootstrap, systemd-nspawn, nsenter); elsewhere they skip.
`GATEWAYD_TEST_DEB=/path/to/gatewayd_x_all.deb` reuses a package instead of building one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.brokers import SIMULATOR_PACKAGE
from tests.system.box import DEB_DIR, SIMULATOR_DIR, SIMULATOR_UNIT, TEST_CONFIG, TEST_DROPIN, UNITS, sim
from tests.system.nspawn import Container, build_deb, build_rootfs, wait_until


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "system tests need root (debootstrap, systemd-nspawn, nsenter)"
    elif os.environ.get("GATEWAYD_SKIP_SYSTEM_TESTS"):
        reason = "GATEWAYD_SKIP_SYSTEM_TESTS is set"
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("system") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def gatewayd_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("GATEWAYD_TEST_DEB")
    if given:
        return Path(given).resolve()
    return build_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def nspawn_rootfs() -> Path:
    return build_rootfs()


@pytest.fixture(scope="package")
def container(nspawn_rootfs: Path) -> Iterator[Container]:
    """One booted container for the system tests (see the module docstring)."""
    c = Container(nspawn_rootfs)
    try:
        c.start()
        yield c
    finally:
        if c.running():
            # Leave the evidence in the test output when something went wrong.
            try:
                print(c.journal_text("-n", "300"))
            except Exception:  # noqa: BLE001 - the journal is evidence only; the container goes anyway
                pass
        c.destroy()


@pytest.fixture(scope="package")
def box(container: Container, gatewayd_deb: Path) -> Container:
    """The container with the simulator running and the .deb copied in (not installed)."""
    c = container
    c.copy_in(SIMULATOR_PACKAGE, f"{SIMULATOR_DIR}/{SIMULATOR_PACKAGE.name}")
    c.copy_in(gatewayd_deb, f"{DEB_DIR}/{gatewayd_deb.name}")
    c.write("/etc/systemd/system/tb-simulator.service", SIMULATOR_UNIT)
    c.run("systemctl daemon-reload && systemctl enable --now mosquitto.service tb-simulator.service")
    # The cron fallback is exercised on purpose (test_system_3_recovery); until then it must not
    # race the tests.
    c.run(["systemctl", "stop", "cron.service"])
    wait_until(lambda: sim(c, "GET", "/health").get("broker_connected"), 60, 0.5, "simulator up")
    return c


@pytest.fixture(scope="package")
def deb_name(gatewayd_deb: Path) -> str:
    return gatewayd_deb.name


@pytest.fixture(scope="package")
def installed(box: Container, deb_name: str) -> Container:
    """Installed without a configuration: it must stay idle."""
    proc = box.run(["apt-get", "install", "-y", "--no-install-recommends", f"{DEB_DIR}/{deb_name}"],
                   check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    box.install_output = proc.stdout + proc.stderr
    return box


@pytest.fixture(scope="package")
def running(installed: Container) -> Container:
    """Configured (conf.d drop-in, quicker unit timings) and started via dpkg-reconfigure."""
    c = installed
    c.write("/etc/gatewayd/conf.d/50-test.toml", TEST_CONFIG, mode=0o640, owner="root:gatewayd")
    for unit in UNITS.values():
        c.write(f"/etc/systemd/system/{unit}.d/50-test.conf", TEST_DROPIN)
    c.run(["systemctl", "daemon-reload"])
    proc = c.run(["dpkg-reconfigure", "gatewayd"], check=False, timeout=180)
    c.reconfigure_output = proc.stdout + proc.stderr
    assert proc.returncode == 0, c.reconfigure_output
    return c
