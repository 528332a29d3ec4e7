"""The configured gateway running under systemd: the target, notify units with status and
heartbeats, journal priorities, ingest adapters, records reaching the simulator, the
socket-activated /health and /metrics endpoint, state file ownership."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.system.box import (
    HTTP_SERVICE,
    HTTP_SOCKET,
    INGEST,
    TARGET,
    TEST_DROPIN,
    UNITS,
    WATCHDOG_SEC,
    delivered_seqs,
    delivered_values,
    ensure_running,
    send,
    status,
    wait_active,
)
from tests.system.nspawn import Container, wait_until

pytestmark = pytest.mark.system


def test_configured_install_enables_and_starts_the_target(running: Container) -> None:
    c = running
    assert "enabling and starting gatewayd.target" in c.reconfigure_output
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
