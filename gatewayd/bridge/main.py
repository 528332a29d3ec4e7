"""Entry point of `gatewayd bridge`."""

from __future__ import annotations

from gatewayd.bridge.service import Bridge
from gatewayd.config import Config
from gatewayd.daemon import Runner, single_instance


def run(cfg: Config) -> int:
    single_instance(cfg.runtime_dir, "bridge")
    runner = Runner(Bridge(cfg), cfg.runtime_dir)
    runner.install_signals()
    return runner.run()
