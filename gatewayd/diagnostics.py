"""`gatewayctl check`: what an operator checks first when a gateway misbehaves (like `iotedge check`).

Each check returns a Result; none of them changes anything on the device.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gatewayd.config import Config

OK, WARN, FAIL = "ok", "warning", "failed"
CERT_WARN_DAYS = 30
MIN_FREE_BYTES = 200 * 1024 * 1024
MIN_FREE_FRACTION = 0.05
EARLIEST_SANE_TIME = 1735689600  # 2025-01-01: a clock before this has not been set since boot


@dataclass
class Result:
    name: str
    outcome: str
    detail: str


def check_config(cfg: Config) -> Result:
    detail = f"loaded from {', '.join(cfg.sources) or 'defaults only'}"
    if cfg.warnings:
        return Result("config", WARN, detail + "; " + "; ".join(cfg.warnings))
    return Result("config", OK, detail)


def _tls_context(cfg: Config) -> ssl.SSLContext:
    tb = cfg["thingsboard"]
    ctx = ssl.create_default_context(cafile=tb["ca_cert"] or None)
    if tb["client_cert"]:
        ctx.load_cert_chain(tb["client_cert"], tb["client_key"] or None)
    return ctx


def check_broker(cfg: Config, timeout: float = 5.0) -> list[Result]:
    tb = cfg["thingsboard"]
    where = f"{tb['host']}:{tb['port']}"
    try:
        sock = socket.create_connection((tb["host"], tb["port"]), timeout=timeout)
    except OSError as e:
        return [Result("broker reachable", FAIL, f"{where}: {e.strerror or e}")]
    results = [Result("broker reachable", OK, f"TCP connection to {where}")]
    if not tb["tls"]:
        sock.close()
        results.append(Result("tls", WARN, "TLS is off: credentials and data travel in plain text"))
        return results
    try:
        with _tls_context(cfg).wrap_socket(sock, server_hostname=tb["host"]) as tls:
            cert = tls.getpeercert() or {}
    except (ssl.SSLError, OSError) as e:
        sock.close()
        results.append(Result("tls certificate", FAIL, f"{where}: {e}"))
        return results
    not_after = cert.get("notAfter")
    if not isinstance(not_after, str):
        results.append(Result("tls certificate", WARN, "server certificate has no expiry date"))
        return results
    days = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400
    outcome = FAIL if days < 0 else WARN if days < CERT_WARN_DAYS else OK
    results.append(Result("tls certificate", outcome, f"valid, expires {not_after} ({days:.0f} days)"))
    return results


def check_credentials(cfg: Config) -> Result:
    tb = cfg["thingsboard"]
    if tb["access_token"]:
        return Result("credentials", OK, "access token configured")
    if cfg.credentials_file.exists():
        try:
            saved = json.loads(cfg.credentials_file.read_text())
        except (OSError, ValueError) as e:
            return Result("credentials", FAIL, f"{cfg.credentials_file} unreadable: {e}")
        mode = cfg.credentials_file.stat().st_mode & 0o777
        if mode & 0o077:
            return Result("credentials", WARN, f"{cfg.credentials_file} has mode {mode:o}; should be 600")
        kind = saved.get("credentialsType", "ACCESS_TOKEN") if isinstance(saved, dict) else "?"
        return Result("credentials", OK, f"provisioned credentials saved ({kind})")
    if tb["provision_device_key"]:
        return Result("credentials", WARN, "no token yet; the bridge will provision the device")
    if tb["client_cert"]:
        return Result("credentials", OK, "X.509 client certificate configured")
    return Result("credentials", FAIL, "no access token, no saved credentials, no provisioning key")


def _docker_ping(sock_path: str, timeout: float) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        return s.recv(256).decode(errors="replace").split("\r\n", 1)[0]
    finally:
        s.close()


def check_docker(cfg: Config, timeout: float = 5.0) -> Result:
    if not cfg["controller"]["enabled"]:
        return Result("docker", OK, "controller disabled; Docker not needed")
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return Result("docker", WARN, f"DOCKER_HOST={host} not checked")
    path = host[len("unix://"):]
    try:
        status = _docker_ping(path, timeout)
    except OSError as e:
        return Result("docker", FAIL, f"{path}: {e.strerror or e}")
    return Result("docker", OK if " 200 " in status + " " else FAIL, f"{path}: {status}")


def check_disk(cfg: Config) -> Result:
    target = cfg.state_dir if cfg.state_dir.exists() else Path("/")
    usage = shutil.disk_usage(target)
    free_pct = 100 * usage.free / usage.total
    detail = f"{target}: {usage.free / 2**20:.0f} MiB free ({free_pct:.1f}%)"
    low = usage.free < MIN_FREE_BYTES or usage.free < MIN_FREE_FRACTION * usage.total
    return Result("disk headroom", WARN if low else OK, detail)


def check_clock() -> Result:
    now = time.time()
    if now < EARLIEST_SANE_TIME:
        return Result("clock", FAIL, f"system time {time.ctime(now)} is before 2025: not set since boot?")
    synced = Path("/run/systemd/timesync/synchronized").exists()
    return Result("clock", OK, time.strftime("%Y-%m-%d %H:%M:%S %Z") + (" (NTP synchronized)" if synced else ""))


def check_journal() -> Result:
    if Path("/run/systemd/journal/socket").exists():
        persistent = Path("/var/log/journal").is_dir()
        return Result("journal", OK if persistent else WARN,
                      "journald running" + ("" if persistent else "; logs are not kept across reboots "
                                                               "(create /var/log/journal)"))
    return Result("journal", WARN, "journald not running: logs go to stderr only")


def check_state(cfg: Config) -> Result:
    from gatewayd.store.db import corrupt_copies

    if not cfg.queues_db.exists():
        return Result("state", WARN, f"{cfg.queues_db} does not exist yet")
    damaged = corrupt_copies(cfg.state_dir, cfg.controller_data_dir)
    if damaged:
        return Result("state", WARN, f"damaged databases were moved aside: {', '.join(damaged)}")
    return Result("state", OK, f"{cfg.state_dir}")


def run_all(cfg: Config) -> list[Result]:
    checks: list[Callable[[], Result | list[Result]]] = [
        lambda: check_config(cfg),
        lambda: check_credentials(cfg),
        lambda: check_broker(cfg),
        lambda: check_docker(cfg),
        lambda: check_disk(cfg),
        check_clock,
        check_journal,
        lambda: check_state(cfg),
    ]
    results: list[Result] = []
    for check in checks:
        try:
            r = check()
        except Exception as e:  # noqa: BLE001 - a broken check is itself a finding
            r = Result(getattr(check, "__name__", "check"), FAIL, f"check crashed: {type(e).__name__}: {e}")
        results.extend(r if isinstance(r, list) else [r])
    return results


def as_dicts(results: list[Result]) -> list[dict[str, str]]:
    return [asdict(r) for r in results]
