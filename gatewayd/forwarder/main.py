"""Entry point of `gatewayd forwarder`."""

from __future__ import annotations

from gatewayd.config import Config
from gatewayd.daemon import Runner, single_instance
from gatewayd.forwarder.service import Forwarder


def run(cfg: Config) -> int:
    single_instance(cfg.runtime_dir, "forwarder")
    runner = Runner(Forwarder(cfg), cfg.runtime_dir)
    runner.install_signals()
    return runner.run()
