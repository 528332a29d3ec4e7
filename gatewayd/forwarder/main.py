"""Entry point of `gatewayd forwarder`."""

from __future__ import annotations

from gatewayd.config import Config
from gatewayd.daemon import serve
from gatewayd.forwarder.service import Forwarder


def run(cfg: Config) -> int:
    return serve(cfg, "forwarder", Forwarder)
