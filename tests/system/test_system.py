"""gatewayd as its users run it: the .deb installed into a Debian bookworm booted with a real
systemd (systemd-nspawn), mosquitto and the ThingsBoard simulator inside.

The tests share one container and run in file order: install idle, configure and start,
units and journal, watchdogs, cron fallback, operator stop, reboot, remove and purge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.nspawn import REPO_ROOT, Container, ContainerError, wait_until

pytestmark = pytest.mark.system

UNITS = {
    "bridge": "gatewayd-bridge.service",
    "forwarder": "gatewayd-forwarder.service",
    "supervisor": "gatewayd-supervisor.service",
}
INGEST = "gatewayd-ingest.service"  # inactive until an ingest adapter is configured
HTTP_SOCKET, HTTP_SERVICE = "gatewayd-http.socket", "gatewayd-http.service"  # /health, /metrics
TARGET = "gatewayd.target"
DEVICE, TOKEN = "gw-test", "TESTTOKEN-4f2a"
SIM_PORT, SIM_CONTROL = 1884, 8088
WATCHDOG_SEC, RESTART_SEC = 5, 1
STALL_TIMEOUT_S = 5
DEB_DIR = "/root/debs"

TEST_CONFIG = f"""\
# written by tests/system/test_system.py
[thingsboard]
host = "127.0.0.1"
port = {SIM_PORT}
access_token = "{TOKEN}"
device_name = "{DEVICE}"
stall_timeout_s = {STALL_TIMEOUT_S}
reconnect_max_s = 1

[controller]
enabled = false
"""

# Shorter timings than production so the watchdog tests are quick.
TEST_DROPIN = f"""\
[Unit]
StartLimitIntervalSec=120
StartLimitBurst=3

[Service]
WatchdogSec={WATCHDOG_SEC}
RestartSec={RESTART_SEC}
"""

SIMULATOR_UNIT = f"""\
[Unit]
Description=ThingsBoard simulator for the gatewayd system tests
Requires=mosquitto.service
After=mosquitto.service

[Service]
ExecStart=/usr/bin/python3 /opt/gatewayd-test/tb_simulator.py --listen 127.0.0.1:{SIM_PORT} \
  --broker 127.0.0.1:1883 --control-port {SIM_CONTROL} --device {DEVICE}={TOKEN} \
  --capture /var/lib/tb-simulator/capture.jsonl
StateDirectory=tb-simulator
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


# -- helpers -----------------------------------------------------------------------------

def cursor(c: Container) -> str:
    out = c.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"], timeout=30).stdout
    m = re.search(r"-- cursor: (\S+)", out)
    assert m, out
    return m.group(1)


def journal_after(c: Container, cur: str, unit: str | None = None, ident: str | None = None) -> str:
    """Messages logged after `cur` by/about `unit`, or with SYSLOG_IDENTIFIER `ident`.

    Filtered here, not with `journalctl -u/-t`: combined with --after-cursor, journalctl
    252 skips the first matching entry (here: exactly the "Watchdog timeout" line)."""
    lines = []
    for e in c.journal("--after-cursor", cur):
        if unit is not None and unit not in (e.get("_SYSTEMD_UNIT"), e.get("UNIT"), e.get("OBJECT_SYSTEMD_UNIT")):
            continue
        if ident is not None and e.get("SYSLOG_IDENTIFIER") != ident:
            continue
        message = e.get("MESSAGE")
        if isinstance(message, list):       # non-UTF-8 text comes as a byte array
            message = bytes(message).decode("utf-8", "replace")
        lines.append(f"{e.get('SYSLOG_IDENTIFIER', '?')}[{e.get('_PID', '?')}]: {message}")
    return "\n".join(lines)


def sim(c: Container, method: str, path: str, body: Any = None) -> Any:
    return c.http(method, SIM_CONTROL, path, body)


def delivered_values(c: Container) -> list[dict[str, Any]]:
    records = sim(c, "GET", f"/telemetry?device={DEVICE}")["records"]
    return [r["values"] for r in records]


def delivered_seqs(c: Container, tag: str) -> set[int]:
    return {v["seq"] for v in delivered_values(c) if v.get("tag") == tag and "seq" in v}


def send(c: Container, tag: str, seqs: range) -> None:
    script = "\n".join(
        "gatewayctl send " + json.dumps(json.dumps(
            {"ts": int(time.time() * 1000), "values": {"tag": tag, "seq": i}}))
        for i in seqs)
    c.run(script, timeout=120)


def status(c: Container) -> dict[str, Any]:
    proc = c.run(["gatewayctl", "status", "--json"], check=False, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def wait_active(c: Container, unit: str, timeout: float = 60) -> None:
    wait_until(lambda: c.active_state(unit) == "active", timeout, 0.25, f"{unit} active")


def wait_all_inactive(c: Container, timeout: float = 60) -> None:
    def all_down() -> bool:
        return all(c.active_state(u) in ("inactive", "failed") for u in [TARGET, *UNITS.values()])
    wait_until(all_down, timeout, 0.25, "gatewayd units inactive")


def drive_past_start_limit(c: Container, unit: str, timeout: float = 90) -> None:
    """SIGKILL the main process again and again until systemd gives up on the unit.

    (It then stays `failed`; its Result stays that of the last crash, `signal`, because
    systemd records start-limit-hit only over a successful result.)"""
    cur = cursor(c)
    deadline = time.monotonic() + timeout
    while True:
        props = c.show(unit, "ActiveState", "MainPID")
        if props["ActiveState"] == "failed":
            break
        assert time.monotonic() < deadline, f"{unit} never hit its start limit: {props}"
        pid = int(props["MainPID"])
        if props["ActiveState"] == "active" and pid > 0:
            c.run(["kill", "-KILL", str(pid)], check=False)
            wait_until(lambda p=pid: c.main_pid(unit) != p, 30, 0.1, f"{unit} main PID {pid} gone")
        else:
            time.sleep(0.2)
    log = journal_after(c, cur, unit=unit)
    assert "Start request repeated too quickly" in log, log
    time.sleep(2)
    assert c.active_state(unit) == "failed", "systemd gave up: only the fallback brings it back"


def ensure_running(c: Container, *units: str) -> None:
    """Start from a known state even if an earlier test left a unit down."""
    c.run(["systemctl", "reset-failed", *UNITS.values()], check=False)
    c.run(["systemctl", "start", TARGET], check=False, timeout=120)
    for unit in units or UNITS.values():
        wait_active(c, unit, 60)


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def box(container: Container, gatewayd_deb: Path) -> Container:
    """The container with the simulator running and the .deb copied in (not installed)."""
    c = container
    c.copy_in(REPO_ROOT / "scripts" / "tb_simulator.py", "/opt/gatewayd-test/tb_simulator.py")
    c.copy_in(gatewayd_deb, f"{DEB_DIR}/{gatewayd_deb.name}")
    c.write("/etc/systemd/system/tb-simulator.service", SIMULATOR_UNIT)
    c.run("systemctl daemon-reload && systemctl enable --now mosquitto.service tb-simulator.service")
    # The cron fallback is exercised on purpose below; until then it must not race the tests.
    c.run(["systemctl", "stop", "cron.service"])
    wait_until(lambda: sim(c, "GET", "/health").get("broker_connected"), 60, 0.5, "simulator up")
    return c


@pytest.fixture(scope="module")
def deb_name(gatewayd_deb: Path) -> str:
    return gatewayd_deb.name


@pytest.fixture(scope="module")
def installed(box: Container, deb_name: str) -> Container:
    """Installed without a configuration: it must stay idle."""
    proc = box.run(["apt-get", "install", "-y", "--no-install-recommends", f"{DEB_DIR}/{deb_name}"],
                   check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    box.install_output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return box


@pytest.fixture(scope="module")
def running(installed: Container) -> Container:
    """Configured (conf.d drop-in, quicker unit timings) and started via dpkg-reconfigure."""
    c = installed
    c.write("/etc/gatewayd/conf.d/50-test.toml", TEST_CONFIG, mode=0o640, owner="root:gatewayd")
    for unit in UNITS.values():
        c.write(f"/etc/systemd/system/{unit}.d/50-test.conf", TEST_DROPIN)
    c.run(["systemctl", "daemon-reload"])
    proc = c.run(["dpkg-reconfigure", "gatewayd"], check=False, timeout=180)
    c.reconfigure_output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == 0, c.reconfigure_output  # type: ignore[attr-defined]
    return c


# -- the package -------------------------------------------------------------------------

def test_lintian_clean(gatewayd_deb: Path, tmp_path: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian not installed")
    proc = subprocess.run(["lintian", "--fail-on", "error,warning", str(gatewayd_deb)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmp_path)})  # it leaves cache files there
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_without_configuration_stays_idle(installed: Container) -> None:
    c = installed
    assert "NOT started" in c.install_output  # type: ignore[attr-defined]
    assert "systemctl enable --now gatewayd.target" in c.install_output  # type: ignore[attr-defined]
    for unit in [TARGET, *UNITS.values()]:
        assert c.run(["systemctl", "is-enabled", unit], check=False).stdout.strip() == "disabled"
        assert c.active_state(unit) == "inactive"
    c.run(["getent", "passwd", "gatewayd"])
    groups = c.run(["id", "-nG", "gatewayd"]).stdout.split()
    assert "docker" in groups
    conffiles = c.run(["dpkg-query", "-W", "-f", "${Conffiles}", "gatewayd"]).stdout
    for path in ("/etc/gatewayd/gatewayd.toml", "/etc/default/gatewayd", "/etc/cron.d/gatewayd"):
        assert path in conffiles
    assert c.run(["stat", "-c", "%U:%G %a", "/var/lib/gatewayd"]).stdout.strip() == "gatewayd:gatewayd 750"
    c.run(["man", "-w", "gatewayd"], check=False)  # man-db is not in minbase; the files are:
    for page in ("gatewayd.8.gz", "gatewayctl.8.gz", "gatewayd-watchdog.8.gz"):
        c.run(["test", "-f", f"/usr/share/man/man8/{page}"])


def test_units_verify_clean(installed: Container) -> None:
    paths = [f"/lib/systemd/system/{u}" for u in [*UNITS.values(), INGEST, HTTP_SOCKET, HTTP_SERVICE, TARGET]]
    proc = installed.run(["systemd-analyze", "verify", "--man=no", *paths], check=False, timeout=120)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stdout + proc.stderr


# `systemd-analyze security` exposure when the units were last hardened: never worse.
EXPOSURE_LIMITS = {"bridge": 1.1, "forwarder": 0.2, "supervisor": 1.9, "ingest": 1.1, "http": 0.2}


@pytest.mark.parametrize("daemon", list(EXPOSURE_LIMITS))
def test_security_exposure(installed: Container, daemon: str) -> None:
    unit = {**UNITS, "ingest": INGEST, "http": HTTP_SERVICE}[daemon]
    out = installed.run(["systemd-analyze", "security", "--no-pager", unit], timeout=120).stdout
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out
    print(f"systemd-analyze security {unit}: exposure {m.group(1)} (limit {EXPOSURE_LIMITS[daemon]})")
    assert float(m.group(1)) <= EXPOSURE_LIMITS[daemon], out


def test_postinst_follows_no_link_the_gatewayd_user_planted(installed: Container) -> None:
    """gatewayd owns /var/lib/gatewayd: links it puts there must not steer root's postinst."""
    c = installed
    c.run("mkdir -p /etc/victim-dir && chmod 0755 /etc/victim-dir && rm -f /etc/victim-file")
    c.run("rm -rf /var/lib/gatewayd/controller && ln -s /etc/victim-dir /var/lib/gatewayd/controller && "
          "ln -sfn /etc/victim-dir /var/lib/gatewayd/watchdog && "
          "ln -sfn /etc/victim-file /var/lib/gatewayd/.installed-idle", user="gatewayd")
    try:
        proc = c.run(["dpkg-reconfigure", "gatewayd"], check=False, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert c.sh("stat -c '%U:%G %a' /etc/victim-dir").strip() == "root:root 755"
        assert c.run(["test", "-e", "/etc/victim-file"], check=False).returncode != 0
        assert c.sh("ls -A /etc/victim-dir").strip() == ""
        assert c.sh("stat -c '%U:%G %a' /var/lib/gatewayd-root").strip() == "root:root 700"
        assert c.run(["test", "-f", "/var/lib/gatewayd-root/installed-idle"], check=False).returncode == 0
    finally:
        c.run("rm -f /var/lib/gatewayd/controller /var/lib/gatewayd/watchdog /var/lib/gatewayd/.installed-idle "
              "&& mkdir -p -m 0750 /var/lib/gatewayd/controller", user="gatewayd")
        c.run("rmdir /etc/victim-dir")


# -- configured and running --------------------------------------------------------------

def test_configured_install_enables_and_starts_the_target(running: Container) -> None:
    c = running
    assert "enabling and starting gatewayd.target" in c.reconfigure_output  # type: ignore[attr-defined]
    for unit in [TARGET, *UNITS.values()]:
        assert c.run(["systemctl", "is-enabled", unit], check=False).stdout.strip() == "enabled"
    wait_active(c, TARGET)


INGEST_CONFIG = """\
[ingest.spool]
directory = "/var/lib/gatewayd/spool"

[ingest.http]
listen = "127.0.0.1:9102"
"""

POST = """\
import json, urllib.request
body = json.dumps([{"tag": "ingest-http", "seq": i} for i in range(5)]).encode()
req = urllib.request.Request("http://127.0.0.1:9102/api/v1/telemetry", data=body,
                             headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=30).status)
"""


def test_ingest_is_enabled_but_inactive_without_an_adapter(running: Container) -> None:
    c = running
    wait_active(c, TARGET)
    assert c.run(["systemctl", "is-enabled", INGEST], check=False).stdout.strip() == "enabled"
    wait_until(lambda: c.show(INGEST, "Result")["Result"] == "exec-condition", 30, 0.5, "the ExecCondition verdict")
    assert c.active_state(INGEST) == "inactive"
    st = status(c)
    assert st["units"]["ingest"] == "inactive" and st["ingest"]["adapters"] == []
    assert not [r for r in st["degraded_reasons"] if "ingest" in r], st["degraded_reasons"]
    c.run(["gatewayd-watchdog", "--dry-run", "--verbose"], check=False)
    assert c.active_state(INGEST) == "inactive"


def test_ingest_spool_and_http_reach_thingsboard(running: Container) -> None:
    c = running
    c.write("/etc/gatewayd/conf.d/60-ingest.toml", INGEST_CONFIG, mode=0o640, owner="root:gatewayd")
    c.write(f"/etc/systemd/system/{INGEST}.d/50-test.conf", TEST_DROPIN)
    try:
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "restart", TARGET], timeout=120)
        wait_active(c, INGEST, 60)
        props = c.show(INGEST, "Type", "WatchdogUSec", "User")
        assert props == {"Type": "notify", "WatchdogUSec": f"{WATCHDOG_SEC}s", "User": "gatewayd"}
        wait_until(lambda: c.run(["test", "-d", "/var/lib/gatewayd/spool"], check=False).returncode == 0, 30, 0.5,
                   "the spool directory")
        lines = "".join(json.dumps({"tag": "ingest-spool", "seq": i}) + "\n" for i in range(5))
        c.write("/var/lib/gatewayd/spool/.drop.tmp", lines)
        c.run(["mv", "/var/lib/gatewayd/spool/.drop.tmp", "/var/lib/gatewayd/spool/drop.jsonl"])
        assert c.run(["python3", "-c", POST], timeout=60).stdout.strip() == "200"
        wait_until(lambda: delivered_seqs(c, "ingest-spool") == set(range(5))
                   and delivered_seqs(c, "ingest-http") == set(range(5)), 60, 0.5, "ingested records at ThingsBoard")
        assert c.run(["ls", "-A", "/var/lib/gatewayd/spool"]).stdout.strip() == ""
        wait_until(lambda: c.run(["stat", "-c", "%Y", "/run/gatewayd/ingest.heartbeat"], check=False).returncode == 0,
                   30, 0.5, "the ingest heartbeat")
        st = status(c)
        assert st["units"]["ingest"] == "active" and st["ingest"]["adapters"] == ["http", "spool"]
    finally:
        c.run(["rm", "-f", "/etc/gatewayd/conf.d/60-ingest.toml"])
        c.run(["systemctl", "restart", TARGET], check=False, timeout=120)
    wait_until(lambda: c.active_state(INGEST) == "inactive", 60, 0.5, "ingest inactive again")


@pytest.mark.parametrize("daemon", list(UNITS))
def test_unit_active_notify_with_status(running: Container, daemon: str) -> None:
    c = running
    unit = UNITS[daemon]
    wait_active(c, unit, 60)
    props = c.show(unit, "Type", "StatusText", "WatchdogUSec", "User", "NRestarts")
    assert props["Type"] == "notify"
    assert props["User"] == "gatewayd"
    assert props["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    wait_until(lambda: c.show(unit, "StatusText")["StatusText"], 30, 0.5, f"{unit} STATUS=")
    text = c.run(["systemctl", "status", "--no-pager", unit], check=False).stdout
    assert re.search(r"^\s*Status: \".+\"", text, re.M), text
    # Still the first process: it did not crash-loop on its way up.
    time.sleep(2)
    assert c.active_state(unit) == "active"


@pytest.mark.parametrize("daemon", list(UNITS))
def test_heartbeat_file_is_fresh(running: Container, daemon: str) -> None:
    c = running
    wait_active(c, UNITS[daemon], 60)

    def age() -> float | None:
        proc = c.run(["stat", "-c", "%Y", f"/run/gatewayd/{daemon}.heartbeat"], check=False)
        if proc.returncode != 0:
            return None
        now = float(c.run(["date", "+%s"]).stdout)
        return now - float(proc.stdout)

    wait_until(lambda: (a := age()) is not None and a <= WATCHDOG_SEC * 2, 30, 0.5,
               f"a fresh /run/gatewayd/{daemon}.heartbeat")


@pytest.mark.parametrize("daemon", list(UNITS))
def test_journal_has_daemon_logs_with_priorities(running: Container, daemon: str) -> None:
    c = running
    wait_active(c, UNITS[daemon], 60)
    entries = wait_until(
        lambda: [e for e in c.journal("-u", UNITS[daemon]) if e.get("SYSLOG_IDENTIFIER") == f"gatewayd-{daemon}"],
        30, 0.5, f"log lines of gatewayd-{daemon}")
    assert all("PRIORITY" in e for e in entries)
    assert {e["PRIORITY"] for e in entries} <= {"0", "1", "2", "3", "4", "5", "6", "7"}
    # The <N> prefixes become priorities, they do not stay in the text.
    assert not any(re.match(r"<\d>", str(e.get("MESSAGE", ""))) for e in entries)


def test_the_sandboxed_forwarder_knows_whether_the_clock_is_synchronised(running: Container) -> None:
    """ProtectClock= refuses adjtimex even for reading, so the forwarder asks timedated
    (timedatectl over D-Bus) and reports a known state at start. (Inside systemd-nspawn the
    container's own filter also refuses timedated's adjtimex, so the answer here is "not
    synchronised"; nspawn must not be given @clock: the container could set the host's clock.)"""
    c = running
    out = c.run(["systemd-analyze", "security", "--no-pager", UNITS["forwarder"]], timeout=120).stdout
    assert re.search(r"✓ ProtectClock=", out), out
    wait_active(c, UNITS["forwarder"])
    lines = wait_until(lambda: [str(e.get("MESSAGE")) for e in c.journal("-u", UNITS["forwarder"])
                                if "clock: boot" in str(e.get("MESSAGE"))], 30, 0.5, "the forwarder's clock line")
    assert "the clock reads" in lines[-1] and "unknown" not in lines[-1], lines
    check = c.run(["gatewayctl", "check"], check=False).stdout
    assert re.search(r"\] clock: \d{4}-\d\d-\d\d .* UTC, ", check), check


def test_forwarder_warning_lands_with_warning_priority(running: Container) -> None:
    """A bad controller row is dead-lettered with a warning: PRIORITY=4 in the journal."""
    c = running
    wait_active(c, UNITS["forwarder"])
    db = "/var/lib/gatewayd/controller/communication_queue.db"
    c.run(["sqlite3", "-cmd", ".timeout 5000", db,
           "INSERT INTO messages(type, message) VALUES ('telemetry', 'this is not json');"],
          user="gatewayd")

    def warned() -> list[dict[str, Any]]:
        return [e for e in c.journal("-u", UNITS["forwarder"], "-p", "warning")
                if e.get("SYSLOG_IDENTIFIER") == "gatewayd-forwarder" and e.get("PRIORITY") == "4"]

    wait_until(warned, 30, 0.5, "a PRIORITY=4 line from the forwarder")

    def forwarded() -> list[dict[str, Any]]:
        return [v for v in delivered_values(c) if v.get("gw_log_daemon") == "forwarder"
                and v.get("gw_log_level") == "warning" and "dead-lettered" in str(v.get("gw_log_message"))]

    # the sandboxed unit also queued it for ThingsBoard, where it arrives as telemetry
    wait_until(forwarded, 60, 0.5, "the forwarder's warning at the simulator")


def test_records_flow_to_thingsboard(running: Container) -> None:
    c = running
    send(c, "flow", range(5))
    wait_until(lambda: delivered_seqs(c, "flow") >= set(range(5)), 60, 0.5, "5 records at the simulator")


SCRAPE = """\
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen("http://" + sys.argv[1], timeout=30) as r:
        code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
print(code)
sys.stdout.write(body.decode())
"""


def scrape(c: Container, where: str) -> tuple[int, str]:
    out = c.run(["python3", "-c", SCRAPE, where], timeout=60).stdout
    code, _, body = out.partition("\n")
    return int(code), body


def test_http_endpoint_is_socket_activated(running: Container) -> None:
    """Nothing runs until the first scrape; it starts then, reads as its own user, exits when
    idle, and [http] listen (through the generator) moves it."""
    from prometheus_client.parser import text_string_to_metric_families

    c = running
    ensure_running(c)
    c.write("/etc/gatewayd/conf.d/60-http.toml", "[http]\nidle_exit_s = 3\n", mode=0o640, owner="root:gatewayd")
    c.run(["systemctl", "restart", HTTP_SOCKET])
    wait_until(lambda: c.active_state(HTTP_SOCKET) == "active", 30, 0.5, "the socket listening")
    assert c.active_state(HTTP_SERVICE) == "inactive"  # costs nothing until scraped
    # an earlier test left a dead letter: seen, so no longer degraded (run as root, it acts as gatewayd)
    acked = c.run(["gatewayctl", "dead-letters", "ack"])
    assert "0 unacknowledged" in acked.stdout and "acting as user gatewayd" in acked.stderr, acked
    wait_until(lambda: status(c)["healthy"], 60, 0.5, "a healthy gateway")
    code, body = scrape(c, "127.0.0.1:9101/metrics")
    assert code == 200
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"gatewayd_ledger_records", "gatewayd_queue_depth", "gatewayd_oldest_queued_age_seconds",
            "gatewayd_mqtt_connected", "gatewayd_unit_up", "gatewayd_publish_records"} <= names
    assert c.active_state(HTTP_SERVICE) == "active"  # started by the first connection
    pid = c.main_pid(HTTP_SERVICE)
    user = c.run(["ps", "-o", "user=", "-p", str(pid)]).stdout.strip()
    assert user not in ("root", "gatewayd"), user  # a user of its own (DynamicUser)
    code, body = scrape(c, "127.0.0.1:9101/health")
    health = json.loads(body)
    assert code == 200 and health["healthy"] and health["units"]["bridge"] == "active", body
    assert all(health["daemons"][d]["doing"] for d in UNITS), health["daemons"]
    # idle for 3 s: the process ends, the socket stays; the next scrape starts it again
    wait_until(lambda: c.active_state(HTTP_SERVICE) == "inactive", 30, 0.5, "the endpoint exiting when idle")
    assert c.show(HTTP_SERVICE, "Result")["Result"] == "success"
    assert c.active_state(HTTP_SOCKET) == "active"
    assert scrape(c, "127.0.0.1:9101/health")[0] == 200
    # the bridge stopped: degraded
    c.run(["systemctl", "stop", UNITS["bridge"]])
    try:
        code, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(scrape(c, "127.0.0.1:9101/health")),
                                30, 0.5, "/health 503")
        assert "bridge is inactive" in json.loads(body)["degraded_reasons"]
    finally:
        c.run(["systemctl", "start", UNITS["bridge"]])
    # another address from the configuration, applied by daemon-reload (the generator)
    c.write("/etc/gatewayd/conf.d/60-http.toml", '[http]\nlisten = "127.0.0.1:9109"\n', mode=0o640,
            owner="root:gatewayd")
    try:
        c.run("systemctl daemon-reload && systemctl restart gatewayd-http.socket")
        assert scrape(c, "127.0.0.1:9109/metrics")[0] == 200
        assert c.run(["python3", "-c", SCRAPE, "127.0.0.1:9101/metrics"], check=False).returncode != 0
    finally:
        c.run(["rm", "-f", "/etc/gatewayd/conf.d/60-http.toml"])
        c.run("systemctl daemon-reload && systemctl restart gatewayd-http.socket")
    assert scrape(c, "127.0.0.1:9101/metrics")[0] == 200
    journal = c.journal_text("-u", HTTP_SERVICE)
    assert "Traceback" not in journal, journal


def test_state_files_belong_to_gatewayd_databases_0640(running: Container) -> None:
    """After daemons and `gatewayctl send` run as root: nothing root-owned, databases 0640."""
    c = running
    foreign = c.sh("find /var/lib/gatewayd /run/gatewayd ! -user gatewayd -printf '%p %u\\n'")
    assert foreign.strip() == "", foreign
    modes = c.sh("find /var/lib/gatewayd -name '*.db' -printf '%p %m\\n'").split("\n")
    modes = [m for m in modes if m.strip()]
    assert len(modes) >= 3, modes
    assert all(m.endswith(" 640") for m in modes), modes


# -- systemd's watchdog ------------------------------------------------------------------

@pytest.mark.parametrize("daemon", list(UNITS))
def test_sigstop_is_restarted_by_the_systemd_watchdog(running: Container, daemon: str) -> None:
    c = running
    unit = UNITS[daemon]
    ensure_running(c, unit)
    time.sleep(WATCHDOG_SEC / 2 + 0.5)  # settled: at least one ping since start
    old = c.main_pid(unit)
    cur = cursor(c)
    c.run(["kill", "-STOP", str(old)])
    t0 = time.monotonic()

    def back() -> bool:
        props = c.show(unit, "ActiveState", "MainPID")
        return props["ActiveState"] == "active" and int(props["MainPID"]) not in (0, old)

    wait_until(back, 60, 0.2, f"{unit} restarted after SIGSTOP")
    elapsed = time.monotonic() - t0
    log = journal_after(c, cur, unit=unit)
    assert "Watchdog timeout" in log, log
    # WatchdogSec + RestartSec, plus the time to start again (and some slack for slow CI).
    assert elapsed <= WATCHDOG_SEC + RESTART_SEC + 8, f"took {elapsed:.1f} s\n{log}"
    # PYTHONFAULTHANDLER=1: the abort left the threads' tracebacks in the journal.
    assert "Fatal Python error: Aborted" in log or "Current thread" in log, log


def test_bridge_progress_watchdog_trips_without_pubacks(running: Container) -> None:
    c = running
    unit = UNITS["bridge"]
    ensure_running(c, unit)
    cur = cursor(c)
    sim(c, "POST", "/faults", {"no_puback": True})
    try:
        send(c, "stall", range(3))
        wait_until(lambda: "Watchdog timeout" in journal_after(c, cur, unit=unit),
                   STALL_TIMEOUT_S + WATCHDOG_SEC + 30, 0.5, "the bridge's watchdog to trip")
        wait_until(lambda: c.show(unit, "NRestarts")["NRestarts"] != "0", 30, 0.25,
                   "systemd to restart the bridge")
    finally:
        sim(c, "POST", "/faults", {"no_puback": False})
    wait_active(c, unit, 60)
    wait_until(lambda: delivered_seqs(c, "stall") >= {0, 1, 2}, 90, 0.5, "stalled records delivered")


def test_supervisor_may_restart_its_units_but_nothing_else(running: Container) -> None:
    """The polkit rule behind the restart_gateway/reboot RPCs: user gatewayd, our units only."""
    c = running
    own = c.run(["systemctl", "--no-ask-password", "try-restart", UNITS["forwarder"]],
                user="gatewayd", check=False)
    assert own.returncode == 0, own.stderr
    other = c.run(["systemctl", "--no-ask-password", "restart", "mosquitto.service"],
                  user="gatewayd", check=False)
    assert other.returncode != 0
    wait_active(c, UNITS["forwarder"])


def wait_connected(c: Container, timeout: float = 60) -> None:
    wait_until(lambda: status(c)["mqtt"]["connected"], timeout, 0.5, "the bridge connected")


def test_restart_gateway_rpc_restarts_all_units(running: Container) -> None:
    """The supervisor, sandboxed and unprivileged, restarts gatewayd.target (polkit)."""
    c = running
    ensure_running(c)
    wait_connected(c)
    before = {u: c.main_pid(u) for u in UNITS.values()}
    reply = sim(c, "POST", "/rpc", {"device": DEVICE, "method": "restart_gateway", "params": {},
                                   "timeout": 20})
    assert "error" not in reply["response"], reply

    def all_restarted() -> bool:
        for unit, pid in before.items():
            props = c.show(unit, "ActiveState", "MainPID")
            if props["ActiveState"] != "active" or int(props["MainPID"]) in (0, pid):
                return False
        return True

    wait_until(all_restarted, 90, 0.5, "all three units restarted by the RPC")


# -- the cron fallback watchdog ----------------------------------------------------------

def test_fallback_watchdog_recovers_a_unit_past_its_start_limit(running: Container) -> None:
    c = running
    unit = UNITS["forwarder"]
    ensure_running(c, unit)
    drive_past_start_limit(c, unit)
    cur = cursor(c)
    c.run(["gatewayd-watchdog"], timeout=180)
    wait_active(c, unit, 30)
    log = journal_after(c, cur, ident="gatewayd-watchdog")
    assert f"restarting {unit}: failed" in log, log


def test_cron_runs_the_fallback_watchdog(running: Container) -> None:
    c = running
    unit = UNITS["forwarder"]
    ensure_running(c, unit)
    drive_past_start_limit(c, unit)
    cur = cursor(c)
    c.run(["systemctl", "start", "cron.service"])
    # cron runs it at the top of the next minute.
    wait_active(c, unit, 90)
    log = journal_after(c, cur, ident="gatewayd-watchdog")
    assert f"restarting {unit}" in log, log


def test_operator_stop_is_respected_and_queued_records_arrive_after_start(running: Container) -> None:
    c = running
    ensure_running(c)
    send(c, "stopstart", range(0, 10))
    c.run(["systemctl", "stop", TARGET], timeout=120)
    wait_all_inactive(c)
    send(c, "stopstart", range(10, 20))        # enqueued while the gateway is stopped
    cur = cursor(c)
    c.run(["gatewayd-watchdog"], timeout=60)
    # ... and cron had its turn too (it is running since the previous test).
    wait_until(lambda: "gatewayd-watchdog" in journal_after(c, cur, ident="CRON"), 75, 1.0,
               "a cron run of gatewayd-watchdog")
    time.sleep(3)
    for unit in UNITS.values():
        assert c.active_state(unit) in ("inactive", "failed"), f"{unit} was started behind the operator's back"
    assert "restarting" not in journal_after(c, cur, ident="gatewayd-watchdog")
    c.run(["systemctl", "start", TARGET], timeout=120)
    for unit in UNITS.values():
        wait_active(c, unit, 60)
    wait_until(lambda: status(c)["ledger"]["ingested"] >= 20, 30, 0.5, "all 20 records ingested")
    wait_until(lambda: delivered_seqs(c, "stopstart") >= set(range(20)), 90, 0.5,
               "all 20 records at the simulator")


def test_reboot_rpc_reboots_the_device(running: Container) -> None:
    c = running
    ensure_running(c)
    wait_connected(c)
    boots = c.boots
    reply = sim(c, "POST", "/rpc", {"device": DEVICE, "method": "reboot", "params": {}, "timeout": 20})
    assert "error" not in reply["response"], reply
    c.await_reboot(timeout=90, down_timeout=90)
    assert c.boots == boots + 1
    for unit in [TARGET, *UNITS.values()]:
        wait_active(c, unit, 60)


def test_records_survive_a_reboot(running: Container) -> None:
    c = running
    ensure_running(c)
    sim(c, "POST", "/faults", {"refuse": True, "drop": True})   # ThingsBoard unreachable
    send(c, "reboot", range(15))
    wait_until(lambda: status(c)["queues"]["controller"] == 0, 30, 0.5, "records moved to the outbox")
    c.reboot()                                # the simulator comes back without the fault
    wait_active(c, TARGET, 60)
    for unit in UNITS.values():
        wait_active(c, unit, 60)
    wait_until(lambda: sim(c, "GET", "/health").get("broker_connected"), 60, 0.5, "simulator up")
    wait_until(lambda: delivered_seqs(c, "reboot") >= set(range(15)), 90, 0.5,
               "records queued before the reboot delivered after it")


# -- removal -----------------------------------------------------------------------------

def test_upgrade_restarts_the_running_gateway(running: Container, deb_name: str) -> None:
    """An upgrade (here: a reinstall) stops the daemons before unpacking, starts them after."""
    c = running
    ensure_running(c)
    before = {u: c.main_pid(u) for u in UNITS.values()}
    c.run(["apt-get", "install", "--reinstall", "-y", "--no-install-recommends", f"{DEB_DIR}/{deb_name}"],
          timeout=300)
    for unit, pid in before.items():
        wait_active(c, unit, 60)
        assert c.main_pid(unit) != pid, f"{unit} still runs the old code"
    assert c.run(["systemctl", "is-enabled", TARGET], check=False).stdout.strip() == "enabled"


def test_remove_keeps_data_and_configuration(running: Container, deb_name: str) -> None:
    c = running
    c.run(["apt-get", "remove", "-y", "gatewayd"], timeout=300)
    wait_all_inactive(c, 60)
    for unit in UNITS.values():
        assert c.run(["systemctl", "cat", unit], check=False).returncode != 0
    c.run(["test", "-f", "/etc/gatewayd/conf.d/50-test.toml"])
    c.run(["test", "-f", "/var/lib/gatewayd/queues.db"])
    c.run(["getent", "passwd", "gatewayd"])
    # A reinstall picks up where it left off.
    c.run(["apt-get", "install", "-y", "--no-install-recommends", f"{DEB_DIR}/{deb_name}"], timeout=300)
    wait_active(c, UNITS["forwarder"], 60)
    assert c.run(["systemctl", "is-enabled", TARGET], check=False).stdout.strip() == "enabled"


def test_purge_leaves_no_units_data_or_user(running: Container) -> None:
    c = running
    c.run(["apt-get", "purge", "-y", "gatewayd"], timeout=300)
    wait_all_inactive(c, 60)
    listed = c.run(["systemctl", "list-unit-files", "--no-legend", "gatewayd*"], check=False).stdout
    assert listed.strip() == "", listed
    loaded = c.run(["systemctl", "list-units", "--all", "--no-legend", "gatewayd*"], check=False).stdout
    assert "gatewayd" not in loaded, loaded
    leftovers = c.run("find /etc/systemd /lib/systemd /run/systemd/system -name 'gatewayd*' 2>/dev/null || true").stdout
    assert leftovers.strip() == "", leftovers
    for path in ("/etc/gatewayd", "/var/lib/gatewayd", "/var/lib/gatewayd-root", "/etc/default/gatewayd",
                 "/etc/cron.d/gatewayd",
                 "/usr/sbin/gatewayd-watchdog", "/usr/bin/gatewayd"):
        assert c.run(["test", "-e", path], check=False).returncode != 0, f"{path} left behind"
    assert c.run(["getent", "passwd", "gatewayd"], check=False).returncode != 0
    assert c.run(["getent", "group", "gatewayd"], check=False).returncode != 0
    with pytest.raises(ContainerError):
        c.run(["dpkg-query", "-W", "gatewayd"])
