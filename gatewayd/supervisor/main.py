"""Entry point of `gatewayd supervisor`."""

from __future__ import annotations

from gatewayd.config import Config
from gatewayd.daemon import Runner, single_instance
from gatewayd.supervisor.service import Supervisor


def run(cfg: Config) -> int:
    single_instance(cfg.runtime_dir, "supervisor")
    runner = Runner(Supervisor(cfg), cfg.runtime_dir)
    runner.install_signals()
    return runner.run()
