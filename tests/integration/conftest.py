"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import start_mosquitto
from tests.helpers.daemons import Daemon


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
