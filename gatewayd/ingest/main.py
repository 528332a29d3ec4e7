"""Entry point of `gatewayd ingest`."""

from __future__ import annotations

import logging

from gatewayd.config import Config
from gatewayd.daemon import serve
from gatewayd.ingest.service import Ingest

log = logging.getLogger("gatewayd.ingest")


def run(cfg: Config) -> int:
    if not cfg.ingest_adapters():
        log.info("no ingest adapter configured ([ingest.mqtt] host, [ingest.http] listen, "
                 "[ingest.spool] directory); nothing to do")
        return 0
    return serve(cfg, "ingest", Ingest)
