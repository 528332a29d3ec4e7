"""The configuration's range, tried on the real daemons: every daemon refuses exactly what
`--check-config` refuses (exit 78, the same lines), and the largest values it accepts run —
records flow, no traceback. Before the bounds, `inf` crashed the forwarder at start, an
integer beyond 64 bits wedged its loop on an OverflowError and a keep-alive over 65535 kept
the bridge from ever connecting, all with `--check-config` saying 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from gatewayd.config import MAX_INT, MAX_NUMBER
from gatewayd.schema import SCHEMA
from tests.helpers.daemons import ROOT, wait_for, write_config
from tests.helpers.datapath import controller_db, writer
from tests.helpers.gateway import gateway

# What a huge value legitimately switches off or makes unusable here, not what it breaks.
LEFT_ALONE = {("forwarder", "min_free_bytes"), ("forwarder", "reserve_bytes")}


def largest_accepted() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        if section.startswith(("ingest", "http", "paths")):
            continue
        for name, key in keys.items():
            types = key.type if isinstance(key.type, tuple) else (key.type,)
            if (section, name) in LEFT_ALONE or bool in types:
                continue
            value: Any = None
            if float in types:
                value = MAX_NUMBER
            elif int in types:
                value = MAX_INT
                if key.check is not None and key.check(value):
                    value = next(v for v in (65535, 4294967295) if key.check(v) is None) if name != "port" else None
            if value is not None:
                out.setdefault(section, {})[name] = value
    return out


def test_every_daemon_refuses_what_check_config_refuses(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"forwarder": {"wait_for_clock_max_s": float("inf")},
                                     "thingsboard": {"keepalive_s": 70000},
                                     "ingest.spool": {"directory": str(tmp_path / "spool\0")}})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gatewayd", *args, "--config", str(config)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    check = run("--check-config")
    assert check.returncode == 78
    lines = check.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in check.stderr, lines
    for daemon in ("bridge", "forwarder", "supervisor", "ingest", "http"):
        r = run(daemon)
        assert (r.returncode, r.stderr.strip().splitlines()) == (78, lines), (daemon, r.stderr[-2000:])


def test_the_largest_accepted_values_run(tmp_path: Path) -> None:
    sections = largest_accepted()
    assert sections["thingsboard"]["keepalive_s"] == 65535
    with gateway(tmp_path, sections) as gw:
        check = subprocess.run([sys.executable, "-m", "gatewayd", "--check-config", "--config", str(gw.config)],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert check.returncode == 0, check.stderr
        with writer(controller_db(gw.base)) as w:
            w.records(range(20))
        wait_for(lambda: len([v for v in gw.delivered() if "seq" in v]) == 20, 30, 0.2, what="delivery")
        code, status = gw.status()
        assert code == 0, status["degraded_reasons"]
        assert status["ledger"]["balanced"] and status["ledger"]["delivered"] == 20
        for name, daemon in gw.daemons.items():
            assert daemon.proc is not None and daemon.proc.poll() is None, name
            assert "Traceback" not in daemon.log(), (name, daemon.log()[-3000:])
