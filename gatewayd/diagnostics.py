"""`gatewayctl check`: what an operator checks first when a gateway misbehaves (like `iotedge check`).

Each check returns a Result; none of them changes anything on the device.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gatewayd.clock import system_clock
from gatewayd.config import Config

OK, WARN, FAIL = "ok", "warning", "failed"
CERT_WARN_DAYS = 30
MIN_FREE_BYTES = 200 * 1024 * 1024
MIN_FREE_FRACTION = 0.05


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


def _tls_context(cfg: Config, verify: bool = True) -> ssl.SSLContext:
    tb = cfg["thingsboard"]
    if verify:
        ctx = ssl.create_default_context(cafile=tb["ca_cert"] or None)
    else:  # only to read the certificate of a server that failed verification
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tb["client_cert"]:
        ctx.load_cert_chain(tb["client_cert"], tb["client_key"] or None)
    return ctx


def _der_item(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start, end) of the content of the DER element at `pos`; ValueError when malformed."""
    if pos + 2 > len(der):
        raise ValueError("truncated certificate")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or pos + n > len(der):
            raise ValueError("bad length in certificate")
        length = int.from_bytes(der[pos:pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise ValueError("truncated certificate")
    return tag, pos, pos + length


def _der_time(der: bytes, pos: int) -> tuple[float, int]:
    tag, start, end = _der_item(der, pos)
    text = der[start:end].decode("ascii", "replace")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049
        fmt, text = "%Y%m%d%H%M%SZ", ("19" if int(text[:2] or 0) >= 50 else "20") + text
    elif tag == 0x18:
        fmt = "%Y%m%d%H%M%SZ"
    else:
        raise ValueError("certificate validity is not a time")
    try:
        when = calendar.timegm(time.strptime(text, fmt))
    except ValueError:
        raise ValueError(f"certificate time {text!r} not understood") from None
    return float(when), end


def cert_validity(der: bytes) -> tuple[float, float]:
    """(notBefore, notAfter) in epoch seconds of a DER X.509 certificate (no dependency beyond
    the standard library: Debian's python3-ssl exposes no parser for a local certificate)."""
    tag, pos, _ = _der_item(der, 0)
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, pos, _ = _der_item(der, pos)
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, end = _der_item(der, pos)
    if tag == 0xA0:  # [0] version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _der_item(der, pos)
    tag, pos, _ = _der_item(der, pos)
    if tag != 0x30:
        raise ValueError("certificate has no validity")
    not_before, pos = _der_time(der, pos)
    not_after, _ = _der_time(der, pos)
    return not_before, not_after


def pem_certificate(path: str) -> bytes:
    """The first certificate of a PEM file, as DER (only certificates are read: never a key)."""
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read(1024 * 1024)
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    i = text.find(begin)
    j = text.find(end, i)
    if i < 0 or j < 0:
        raise ValueError("no PEM certificate in it")
    return ssl.PEM_cert_to_DER_cert(text[i:j + len(end)])


def _expiry(der: bytes, what: str) -> Result:
    """OK, WARN (under CERT_WARN_DAYS) or FAIL (expired or not yet valid), with days to expiry."""
    not_before, not_after = cert_validity(der)
    now = time.time()
    days = (not_after - now) / 86400
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))
    if days < 0:
        return Result(what, FAIL, f"expired {date} ({-days:.0f} days ago)")
    if now < not_before:
        start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_before))
        return Result(what, FAIL, f"not valid before {start} (is the clock right?); expires {date}")
    return Result(what, WARN if days < CERT_WARN_DAYS else OK, f"expires {date} ({days:.0f} days)")


def _unverified_server_cert(cfg: Config, timeout: float) -> bytes | None:
    tb = cfg["thingsboard"]
    try:
        with socket.create_connection((tb["host"], tb["port"]), timeout=timeout) as sock, \
                _tls_context(cfg, verify=False).wrap_socket(sock, server_hostname=tb["host"]) as tls:
            return tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError, ValueError):
        return None


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
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError) as e:
        sock.close()
        why = f"certificate verify failed: {e.verify_message}" if isinstance(e, ssl.SSLCertVerificationError) else e
        detail = f"{where}: {why}"
        seen = _unverified_server_cert(cfg, timeout)
        if seen is not None:
            try:
                detail += f"; its certificate {_expiry(seen, '').detail}"
            except ValueError:
                pass
        results.append(Result("tls certificate", FAIL, detail))
        return results
    if not der:
        results.append(Result("tls certificate", WARN, "the server sent no certificate"))
        return results
    try:
        r = _expiry(der, "tls certificate")
    except ValueError as e:
        r = Result("tls certificate", WARN, f"verified, but its validity is unreadable: {e}")
    results.append(Result(r.name, r.outcome, f"verified for {tb['host']}, {r.detail}"))
    return results


def check_client_certificate(cfg: Config) -> list[Result]:
    """The X.509 device certificate: readable, matching its key, days to expiry."""
    tb = cfg["thingsboard"]
    if not tb["client_cert"]:
        return []
    name = "tls client certificate"
    if not tb["tls"]:
        return [Result(name, WARN, "client_cert is set but tls = false: it is not used")]
    try:
        r = _expiry(pem_certificate(tb["client_cert"]), name)
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(tb["client_cert"], tb["client_key"] or None)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError; its text never holds key material
        return [Result(name, FAIL, f"{tb['client_cert']}: {getattr(e, 'strerror', None) or e}")]
    return [Result(name, r.outcome, f"{tb['client_cert']}: {r.detail}")]


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
    """Set (not before 2025) and synchronised (the kernel's NTP state, as `timedatectl` reads it)."""
    r = system_clock().read()
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r.wall_ms / 1000))
    if not r.plausible:
        return Result("clock", FAIL, f"system time {when} is before 2025: not set since boot; "
                      "controller records wait for it (see [forwarder] wait_for_clock)")
    if r.sync.known and r.sync.synced:
        return Result("clock", OK, f"{when}, {r.sync.describe()} ({r.sync.source})")
    return Result("clock", WARN, f"{when}, {r.sync.describe()}: timestamps are not verified and archive "
                  "retention by age is paused until the clock is synchronised (is an NTP client such as "
                  "systemd-timesyncd running?)")


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
        lambda: check_client_certificate(cfg),
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
