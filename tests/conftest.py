"""Shared pytest setup: the repository root on sys.path, so `tests.helpers` and `gatewayd` import."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from gatewayd.notify import Notifier

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def notifier(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Notifier]:
    """Makes a Notifier that sees exactly the systemd variables given (none: outside systemd)."""

    def make(**env: str) -> Notifier:
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        from gatewayd.notify import Notifier

        return Notifier()

    return make
