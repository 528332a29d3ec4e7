"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import start_mosquitto
from tests.helpers.daemons import Daemon
from tests.helpers.docker_env import Dockerd, docker_cli, ensure_base_image, ensure_dockerd, stop_dockerd


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    """A real mosquitto on a free loopback port, stopped by PID afterwards."""
    b = start_mosquitto(tmp_path)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test appends here are stopped afterwards (SIGTERM, then SIGKILL, by PID)."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Dockerd]:
    """A real Docker engine with the offline base image; started if it was not running (and then
    stopped again at the end, unless GATEWAYD_TEST_KEEP_DOCKERD=1); the tests skip without one."""
    if docker_cli() is None:
        pytest.skip("the docker CLI is not installed")
    try:
        handle = ensure_dockerd()
        ensure_base_image()
    except RuntimeError as e:
        pytest.skip(f"no Docker engine: {e}")
    try:
        yield handle
    finally:
        if os.environ.get("GATEWAYD_TEST_KEEP_DOCKERD") != "1":
            stop_dockerd(handle)
