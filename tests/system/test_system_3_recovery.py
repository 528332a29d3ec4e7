"""Recovery under systemd: the watchdogs (systemd's, the bridge's progress gate, the cron
fallback), the operator's stop respected, the restart_gateway and reboot RPCs, records that
survive a reboot."""

from __future__ import annotations

import time

import pytest

from tests.system.box import (
    DEVICE,
    RESTART_SEC,
    STALL_TIMEOUT_S,
    TARGET,
    UNITS,
    WATCHDOG_SEC,
    cursor,
    delivered_seqs,
    drive_past_start_limit,
    ensure_running,
    journal_after,
    send,
    sim,
    status,
    wait_active,
    wait_all_inactive,
    wait_connected,
)
from tests.system.nspawn import Container, wait_until

pytestmark = pytest.mark.system


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

def forwarder_given_up(c: Container) -> tuple[str, str]:
    """The forwarder's unit, failed for good (systemd gave up on it), and a journal cursor."""
    unit = UNITS["forwarder"]
    ensure_running(c, unit)
    drive_past_start_limit(c, unit)
    return unit, cursor(c)


def test_fallback_watchdog_recovers_a_unit_past_its_start_limit(running: Container) -> None:
    c = running
    unit, cur = forwarder_given_up(c)
    c.run(["gatewayd-watchdog"], timeout=180)
    wait_active(c, unit, 30)
    log = journal_after(c, cur, ident="gatewayd-watchdog")
    assert f"restarting {unit}: failed" in log, log


def test_cron_runs_the_fallback_watchdog(running: Container) -> None:
    c = running
    unit, cur = forwarder_given_up(c)
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
