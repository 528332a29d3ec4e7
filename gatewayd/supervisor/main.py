"""Entry point of `gatewayd supervisor`."""

from __future__ import annotations

from gatewayd.config import Config
from gatewayd.daemon import serve
from gatewayd.supervisor.service import Supervisor


def run(cfg: Config) -> int:
    return serve(cfg, "supervisor", Supervisor)
