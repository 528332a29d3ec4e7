"""Fixtures of the system tests: the .deb, the cached bookworm rootfs, a booted container.

The system tests need root (debootstrap, systemd-nspawn, nsenter); elsewhere they skip.
`GATEWAYD_TEST_DEB=/path/to/gatewayd_x_all.deb` reuses a package instead of building one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.nspawn import Container, build_deb, build_rootfs


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


@pytest.fixture(scope="module")
def container(nspawn_rootfs: Path) -> Iterator[Container]:
    """One booted container for a whole test module (tests in it run in order)."""
    c = Container(nspawn_rootfs)
    try:
        c.start()
        yield c
    finally:
        if c.running():
            # Leave the evidence in the test output when something went wrong.
            try:
                print(c.journal_text("-n", "300"))
            except Exception:  # noqa: BLE001
                pass
        c.destroy()
