"""The cron fallback watchdog's logic (watchdog/gatewayd-watchdog), run on the host against a
fake `systemctl` and `logger` on PATH. The real thing under systemd is in test_system.py."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "watchdog" / "gatewayd-watchdog"
UNITS = ("gatewayd-bridge.service", "gatewayd-forwarder.service", "gatewayd-supervisor.service",
         "gatewayd-ingest.service")
NOW = 1_800_000_000

# A fake systemctl: the state of every unit lives in a JSON file; each call is appended to
# a log; `restart` applies the outcome configured for the unit (default: it comes up).
FAKE_SYSTEMCTL = textwrap.dedent('''\
    #!/usr/bin/python3
    import json, os, sys
    state_path = os.environ["FAKE_STATE"]
    with open(state_path) as fh:
        state = json.load(fh)
    with open(os.environ["FAKE_CALLS"], "a") as fh:
        fh.write(json.dumps(sys.argv[1:]) + "\\n")
    args = [a for a in sys.argv[1:] if a != "--"]
    cmd = args[0]
    units = state["units"]

    def save():
        with open(state_path, "w") as fh:
            json.dump(state, fh)

    if cmd == "is-system-running":
        print(state.get("system", "running"))
        sys.exit(0 if state.get("system", "running") == "running" else 1)
    if cmd == "is-enabled":
        value = units.get(args[1], {}).get("enabled", "disabled")
        print(value)
        sys.exit(0 if value.startswith("enabled") else 1)
    if cmd == "show":
        props, unit, i = [], None, 1
        while i < len(args):
            if args[i] == "-p":
                props.append(args[i + 1]); i += 2
            elif args[i].startswith("--"):
                i += 1
            else:
                unit = args[i]; i += 1
        u = units.get(unit, {})
        defaults = {"ActiveState": "inactive", "SubState": "dead", "Result": "success",
                    "ActiveEnterTimestamp": "", "MainPID": "0"}
        for p in reversed(props):          # systemd does not keep the requested order
            print(f"{p}={u.get(p, defaults.get(p, ''))}")
        sys.exit(0)
    if cmd == "reset-failed":
        u = units.setdefault(args[1], {})
        if u.get("ActiveState") == "failed":
            u["ActiveState"], u["Result"] = "inactive", "success"
        save(); sys.exit(0)
    if cmd == "restart":
        u = units.setdefault(args[1], {})
        outcome = u.get("restart_outcome", "active")
        u["ActiveState"] = outcome
        u["SubState"] = "running" if outcome == "active" else "failed"
        save()
        sys.exit(0 if outcome == "active" else 1)
    if cmd == "reboot":
        state["rebooted"] = state.get("rebooted", 0) + 1
        save(); sys.exit(0)
    print("fake systemctl: unsupported " + " ".join(args), file=sys.stderr)
    sys.exit(3)
''')

FAKE_LOGGER = textwrap.dedent('''\
    #!/usr/bin/python3
    import json, os, sys
    with open(os.environ["FAKE_LOG"], "a") as fh:
        fh.write(json.dumps(sys.argv[1:]) + "\\n")
''')

ALERT = textwrap.dedent('''\
    #!/bin/sh
    printf '%s|%s\\n' "$1" "$2" >> "$ALERT_LOG"
''')


class World:
    """A fake host: systemctl state, heartbeat dir, watchdog state dir, logs."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for name, text in (("systemctl", FAKE_SYSTEMCTL), ("logger", FAKE_LOGGER), ("alert", ALERT)):
            p = self.bin / name
            p.write_text(text)
            p.chmod(0o755)
        self.state_file = tmp / "state.json"
        self.calls_file = tmp / "calls.log"
        self.log_file = tmp / "logger.log"
        self.alert_file = tmp / "alert.log"
        self.run_dir = tmp / "run"
        self.run_dir.mkdir()
        self.wd_state = tmp / "wdstate"
        self.defaults = tmp / "default-gatewayd"
        self.defaults.write_text("GATEWAYD_ALERT_COMMAND=\nGATEWAYD_WATCHDOG_REBOOT_AFTER=0\n")
        self.state: dict[str, Any] = {
            "system": "running",
            "units": {
                "gatewayd.target": {"enabled": "enabled", "ActiveState": "active", "SubState": "active"},
                **{u: {"enabled": "enabled", "ActiveState": "active", "SubState": "running",
                       "ActiveEnterTimestamp": f"@{NOW - 3600}"} for u in UNITS},
            },
        }
        for u in UNITS:
            self.beat(u, age=5)

    def beat(self, unit: str, age: float, now: int = NOW) -> None:
        daemon = unit.removeprefix("gatewayd-").removesuffix(".service")
        hb = self.run_dir / f"{daemon}.heartbeat"
        hb.write_text("pid 1\n")
        os.utime(hb, (now - age, now - age))

    def all_beat(self, now: int) -> None:
        for u in UNITS:
            self.beat(u, age=5, now=now)

    def unit(self, name: str) -> dict[str, Any]:
        return self.state["units"][name]

    def run(self, *args: str, now: int = NOW, **env_extra: str) -> subprocess.CompletedProcess[str]:
        self.state_file.write_text(json.dumps(self.state))
        for f in (self.calls_file, self.log_file, self.alert_file):
            f.unlink(missing_ok=True)
        env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "FAKE_STATE": str(self.state_file),
            "FAKE_CALLS": str(self.calls_file),
            "FAKE_LOG": str(self.log_file),
            "ALERT_LOG": str(self.alert_file),
            "GATEWAYD_DEFAULTS_FILE": str(self.defaults),
            "GATEWAYD_RUNTIME_DIR": str(self.run_dir),
            "GATEWAYD_WATCHDOG_STATE_DIR": str(self.wd_state),
            "GATEWAYD_WATCHDOG_NOW": str(now),
            **env_extra,
        }
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                              timeout=60)
        self.state = json.loads(self.state_file.read_text())
        return proc

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def actions(self) -> list[tuple[str, str]]:
        """(verb, unit) of every state-changing systemctl call."""
        out = []
        for c in self.calls():
            args = [a for a in c if a != "--"]
            if args[0] in ("restart", "reset-failed", "start", "stop", "reboot"):
                out.append((args[0], args[1] if len(args) > 1 else ""))
        return out

    def logs(self) -> list[list[str]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    def messages(self) -> list[str]:
        return [entry[-1] for entry in self.logs()]

    def alerts(self) -> list[str]:
        return self.alert_file.read_text().splitlines() if self.alert_file.exists() else []


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_all_healthy_does_nothing(world: World) -> None:
    proc = world.run()
    assert proc.returncode == 0, proc.stderr
    assert world.actions() == []
    assert world.messages() == []


def test_failed_unit_is_reset_and_restarted_with_a_logged_reason(world: World) -> None:
    world.unit("gatewayd-bridge.service").update(ActiveState="failed", SubState="failed",
                                                 Result="start-limit-hit")
    proc = world.run()
    assert proc.returncode == 0, proc.stderr
    assert world.actions() == [("reset-failed", "gatewayd-bridge.service"),
                               ("restart", "gatewayd-bridge.service")]
    logs = world.logs()
    assert logs, "every action is logged"
    for entry in logs:
        assert entry[:2] == ["-t", "gatewayd-watchdog"]
        assert entry[2] == "-p" and entry[3].startswith("daemon.")
    text = "\n".join(world.messages())
    assert "restarting gatewayd-bridge.service" in text
    assert "start-limit-hit" in text
    assert world.unit("gatewayd-bridge.service")["ActiveState"] == "active"


def test_inactive_unit_is_restarted_while_target_active(world: World) -> None:
    world.unit("gatewayd-forwarder.service").update(ActiveState="inactive", SubState="dead")
    world.run()
    assert ("restart", "gatewayd-forwarder.service") in world.actions()


def test_unit_skipped_by_its_exec_condition_is_left_alone(world: World) -> None:
    """gatewayd-ingest without an adapter: inactive on purpose, never restarted nor alerted."""
    world.unit("gatewayd-ingest.service").update(ActiveState="inactive", SubState="dead", Result="exec-condition")
    proc = world.run()
    assert proc.returncode == 0, proc.stderr
    assert world.actions() == []
    assert world.alerts() == []


@pytest.mark.parametrize("state,sub", [("activating", "auto-restart"), ("activating", "start"),
                                       ("deactivating", "stop-sigterm"), ("reloading", "reload")])
def test_never_fights_systemd(world: World, state: str, sub: str) -> None:
    world.unit("gatewayd-bridge.service").update(ActiveState=state, SubState=sub)
    world.beat("gatewayd-bridge.service", age=10_000)
    world.run()
    assert world.actions() == []


def test_target_stopped_by_operator_means_hands_off(world: World) -> None:
    world.unit("gatewayd.target").update(ActiveState="inactive", SubState="dead")
    for u in UNITS:
        world.unit(u).update(ActiveState="inactive", SubState="dead")
    world.run()
    assert world.actions() == []
    assert world.messages() == []


def test_target_disabled_means_hands_off(world: World) -> None:
    world.unit("gatewayd.target")["enabled"] = "disabled"
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    world.run()
    assert world.actions() == []


@pytest.mark.parametrize("enabled", ["disabled", "masked"])
def test_disabled_unit_is_left_alone(world: World, enabled: str) -> None:
    world.unit("gatewayd-supervisor.service").update(enabled=enabled, ActiveState="inactive")
    world.run()
    assert world.actions() == []


@pytest.mark.parametrize("system", ["starting", "stopping", "maintenance", "initializing"])
def test_system_not_running_means_hands_off(world: World, system: str) -> None:
    world.state["system"] = system
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    world.run()
    assert world.actions() == []


def test_stale_heartbeat_restarts_an_active_unit(world: World) -> None:
    world.beat("gatewayd-forwarder.service", age=600)
    world.run()
    assert world.actions() == [("reset-failed", "gatewayd-forwarder.service"),
                               ("restart", "gatewayd-forwarder.service")]
    assert any("heartbeat" in m and "600s old" in m for m in world.messages())


def test_heartbeat_threshold_is_configurable(world: World) -> None:
    world.beat("gatewayd-forwarder.service", age=100)
    world.run()
    assert world.actions() == []
    world.run(GATEWAYD_HEARTBEAT_MAX_AGE="60")
    assert ("restart", "gatewayd-forwarder.service") in world.actions()


def test_missing_heartbeat_counts_from_unit_start(world: World) -> None:
    (world.run_dir / "bridge.heartbeat").unlink()
    world.unit("gatewayd-bridge.service")["ActiveEnterTimestamp"] = f"@{NOW - 30}"
    world.run()
    assert world.actions() == [], "just started: no heartbeat yet is fine"
    world.unit("gatewayd-bridge.service")["ActiveEnterTimestamp"] = f"@{NOW - 1000}"
    world.run()
    assert ("restart", "gatewayd-bridge.service") in world.actions()


def test_rate_limit_three_per_hour_then_alert_once(world: World) -> None:
    world.defaults.write_text(f"GATEWAYD_ALERT_COMMAND={world.bin / 'alert'}\n")
    unit = "gatewayd-supervisor.service"
    restarts = 0
    alerts: list[str] = []
    for minute in range(6):
        world.unit(unit).update(ActiveState="failed", Result="exit-code")
        world.all_beat(NOW + 60 * minute)
        world.run(now=NOW + 60 * minute)
        restarts += world.actions().count(("restart", unit))
        alerts += world.alerts()
    assert restarts == 3
    limited = [a for a in alerts if "rate limit" in a]
    assert len(limited) == 1, alerts
    assert limited[0].startswith(f"{unit}|")
    # An hour after the first restart, the window has room again.
    world.unit(unit).update(ActiveState="failed")
    world.all_beat(NOW + 3600 + 1)
    world.run(now=NOW + 3600 + 1)
    assert ("restart", unit) in world.actions()


def test_rate_limit_is_per_unit(world: World) -> None:
    for minute in range(3):
        world.unit("gatewayd-bridge.service").update(ActiveState="failed")
        world.all_beat(NOW + 60 * minute)
        world.run(now=NOW + 60 * minute)
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    world.unit("gatewayd-forwarder.service").update(ActiveState="failed")
    world.all_beat(NOW + 300)
    world.run(now=NOW + 300)
    assert world.actions() == [("reset-failed", "gatewayd-forwarder.service"),
                               ("restart", "gatewayd-forwarder.service")]


def test_alert_command_gets_unit_and_reason(world: World) -> None:
    world.defaults.write_text(f"GATEWAYD_ALERT_COMMAND={world.bin / 'alert'}\n")
    world.unit("gatewayd-bridge.service").update(ActiveState="failed", Result="watchdog")
    world.run()
    alerts = world.alerts()
    assert len(alerts) == 1
    unit, reason = alerts[0].split("|", 1)
    assert unit == "gatewayd-bridge.service"
    assert "watchdog" in reason


def test_failing_alert_command_is_logged_not_fatal(world: World) -> None:
    world.defaults.write_text("GATEWAYD_ALERT_COMMAND=/bin/false\n")
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    proc = world.run()
    assert proc.returncode == 0
    assert ("restart", "gatewayd-bridge.service") in world.actions()
    assert any("alert command failed" in m for m in world.messages())


def test_reboot_is_opt_in(world: World) -> None:
    unit = "gatewayd-bridge.service"
    world.unit(unit)["restart_outcome"] = "failed"
    for minute in range(8):
        world.unit(unit).update(ActiveState="failed")
        world.run(now=NOW + 60 * minute)
    assert "reboot" not in [a for a, _ in world.actions()]
    assert world.state.get("rebooted", 0) == 0


def test_reboot_after_n_failed_recoveries_in_a_row(world: World) -> None:
    world.defaults.write_text("GATEWAYD_WATCHDOG_REBOOT_AFTER=2\n"
                              f"GATEWAYD_ALERT_COMMAND={world.bin / 'alert'}\n")
    unit = "gatewayd-bridge.service"
    world.unit(unit)["restart_outcome"] = "failed"
    world.unit(unit).update(ActiveState="failed")
    world.run(now=NOW)
    assert world.state.get("rebooted", 0) == 0
    world.unit(unit).update(ActiveState="failed")
    world.run(now=NOW + 60)
    assert world.state.get("rebooted", 0) == 1
    assert any(a.startswith("system|rebooting") for a in world.alerts())
    assert any("rebooting the system" in m for m in world.messages())
    # Never twice within the reboot interval, however long the failures go on.
    for minute in range(2, 6):
        world.unit(unit).update(ActiveState="failed")
        world.run(now=NOW + 60 * minute)
    assert world.state.get("rebooted", 0) == 1


def test_a_successful_recovery_resets_the_failure_count(world: World) -> None:
    world.defaults.write_text("GATEWAYD_WATCHDOG_REBOOT_AFTER=2\n")
    unit = "gatewayd-bridge.service"
    world.unit(unit).update(ActiveState="failed", restart_outcome="failed")
    world.run(now=NOW)
    world.unit(unit).update(ActiveState="failed", restart_outcome="active")
    world.run(now=NOW + 60)
    world.unit(unit).update(ActiveState="failed", restart_outcome="failed")
    world.run(now=NOW + 120)
    assert world.state.get("rebooted", 0) == 0


def test_dry_run_changes_nothing(world: World) -> None:
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    world.run("--dry-run")
    assert world.actions() == []
    assert any("dry run" in m for m in world.messages())
    assert not list(world.wd_state.glob("*.restarts"))


def test_runs_do_not_overlap(world: World) -> None:
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    world.wd_state.mkdir(parents=True, exist_ok=True)
    with open(world.wd_state / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        proc = world.run()
    assert proc.returncode == 0
    assert world.actions() == []


def test_bad_setting_is_a_usage_error(world: World) -> None:
    world.defaults.write_text("GATEWAYD_WATCHDOG_REBOOT_AFTER=soon\n")
    proc = world.run()
    assert proc.returncode == 2
    assert "GATEWAYD_WATCHDOG_REBOOT_AFTER" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cron_file_runs_it_every_minute_as_root() -> None:
    lines = [line for line in (ROOT / "watchdog" / "gatewayd.cron").read_text().splitlines()
             if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
    assert len(lines) == 1
    fields = lines[0].split(None, 6)
    assert fields[:5] == ["*"] * 5
    assert fields[5] == "root"
    assert "/usr/sbin/gatewayd-watchdog" in fields[6]


# -- root's state and symbolic links -------------------------------------------------------
# The script runs as root; /var/lib/gatewayd and /run/gatewayd belong to the gatewayd user.
# Nothing it writes may be redirected, and nothing there may steer what root does.

def test_default_state_dir_is_outside_the_daemons_directories() -> None:
    text = SCRIPT.read_text()
    assert "GATEWAYD_WATCHDOG_STATE_DIR:-/var/lib/gatewayd-root}" in text
    assert "/var/lib/gatewayd/" not in text


def test_state_dir_created_private(world: World) -> None:
    world.run()
    assert world.wd_state.is_dir() and not world.wd_state.is_symlink()
    assert (world.wd_state.stat().st_mode & 0o777) == 0o700


def test_symlinked_state_dir_is_refused_and_not_followed(world: World) -> None:
    target = world.tmp / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    world.wd_state.symlink_to(target)
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    proc = world.run()
    assert proc.returncode == 1
    assert world.actions() == []
    assert list(target.iterdir()) == []                 # no lock, no history written through it
    assert (target.stat().st_mode & 0o777) == 0o755     # and not chmod'ed through it
    assert any("symbolic link" in m for m in world.messages())


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_state_dir_owned_by_someone_else_is_refused(world: World) -> None:
    world.wd_state.mkdir(mode=0o700)
    os.chown(world.wd_state, 65534, 65534)
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    proc = world.run()
    assert proc.returncode == 1
    assert world.actions() == []
    assert any("is not owned by" in m for m in world.messages())


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_state_dir_inside_a_directory_another_user_owns_is_refused(world: World) -> None:
    """The old layout, /var/lib/gatewayd/watchdog: gatewayd could swap the directory."""
    daemons_dir = world.tmp / "var-lib-gatewayd"
    daemons_dir.mkdir(mode=0o750)
    os.chown(daemons_dir, 65534, 65534)
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    proc = world.run(GATEWAYD_WATCHDOG_STATE_DIR=str(daemons_dir / "watchdog"))
    assert proc.returncode == 1
    assert world.actions() == []
    assert not (daemons_dir / "watchdog").exists()
    assert any("users other than root may change" in m for m in world.messages())


def test_state_dir_in_a_sticky_root_directory_is_fine(world: World) -> None:
    sticky = world.tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    proc = world.run(GATEWAYD_WATCHDOG_STATE_DIR=str(sticky / "wd"))
    assert proc.returncode == 0, proc.stderr
    assert ("restart", "gatewayd-bridge.service") in world.actions()


def test_symlinked_heartbeat_is_not_followed(world: World) -> None:
    """A heartbeat replaced by a link to some fresh file must not hide a wedged daemon."""
    world.unit("gatewayd-bridge.service").update(ActiveEnterTimestamp=f"@{NOW - 3600}")
    fresh = world.tmp / "fresh"
    fresh.write_text("")
    os.utime(fresh, (NOW, NOW))
    hb = world.run_dir / "bridge.heartbeat"
    hb.unlink()
    hb.symlink_to(fresh)
    world.run()
    assert ("restart", "gatewayd-bridge.service") in world.actions()
    assert any("not a regular file" in m for m in world.messages())
    assert fresh.read_text() == ""


@pytest.mark.parametrize("how", ["group-writable", "foreign owner"])
def test_defaults_file_that_others_may_change_is_not_sourced(world: World, how: str) -> None:
    if how == "foreign owner" and os.geteuid() != 0:
        pytest.skip("chown needs root")
    marker = world.tmp / "sourced"
    world.defaults.write_text(f"touch {marker}\nGATEWAYD_ALERT_COMMAND={world.bin / 'alert'}\n")
    if how == "group-writable":
        world.defaults.chmod(0o664)
    else:
        os.chown(world.defaults, 65534, 65534)
    world.unit("gatewayd-bridge.service").update(ActiveState="failed")
    world.run()
    assert not marker.exists()
    assert world.alerts() == []                                  # its alert command was not taken
    assert ("restart", "gatewayd-bridge.service") in world.actions()  # the watchdog still works
    assert any("ignoring it" in m for m in world.messages())
