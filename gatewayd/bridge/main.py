"""Entry point of `gatewayd bridge`."""

from __future__ import annotations

from gatewayd.bridge.service import Bridge
from gatewayd.config import Config
from gatewayd.daemon import serve


def run(cfg: Config) -> int:
    return serve(cfg, "bridge", Bridge)
