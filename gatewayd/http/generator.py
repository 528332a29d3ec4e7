"""systemd generator: `[http] listen` decides whether and where gatewayd-http.socket listens.

systemd runs generators at boot and at every `systemctl daemon-reload`, before it loads the
units; this one reads the gatewayd configuration and writes into the generator directory
(first argument):
- `gatewayd.target.wants/gatewayd-http.socket` unless `[http] listen` is empty, so the
  endpoint starts and stops with gatewayd.target;
- a drop-in `gatewayd-http.socket.d/50-listen.conf` when the address is not the unit's own.
A configuration that cannot be read leaves the unit's defaults (the daemons refuse to start
on it anyway, and say why). Never fails: a generator's failure would only hide the endpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gatewayd.config import SCHEMA, ConfigError, load

SOCKET = "gatewayd-http.socket"
UNIT_PATH = "/lib/systemd/system/" + SOCKET


def generate(out_dir: Path, listen: str) -> None:
    if not listen:
        return
    wants = out_dir / "gatewayd.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / SOCKET
    if not link.is_symlink():
        link.symlink_to(UNIT_PATH)
    if listen.startswith("localhost:"):
        listen = "127.0.0.1:" + listen.partition(":")[2]
    if listen != SCHEMA["http"]["listen"].default:
        dropin = out_dir / f"{SOCKET}.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "50-listen.conf").write_text(
            "# written by gatewayd-http-generator from [http] listen in the gatewayd configuration\n"
            f"[Socket]\nListenStream=\nListenStream={listen}\n")


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: gatewayd-http-generator NORMAL_DIR [EARLY_DIR LATE_DIR]", file=sys.stderr)
        return 0
    try:
        listen = load(os.environ.get("GATEWAYD_CONFIG")).data["http"]["listen"]
    except ConfigError as e:
        print(f"gatewayd-http-generator: configuration not usable ({e.problems[0]}); "
              f"{SOCKET} keeps its defaults", file=sys.stderr)
        listen = SCHEMA["http"]["listen"].default
    try:
        generate(Path(argv[0]), listen)
    except OSError as e:
        print(f"gatewayd-http-generator: {e}", file=sys.stderr)
    return 0
