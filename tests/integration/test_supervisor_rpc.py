"""The supervisor as a real process (controller disabled: no Docker): RPCs, archive, files, durability.

The test plays the bridge: it writes what ThingsBoard sends into the inbound table and
reads what the supervisor queues in the outbox.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.store import archive as archive_store
from tests.helpers.daemons import ROOT, wait_for, write_config
from tests.helpers.supervisor_env import SupervisorEnv, merge_sections

pytestmark = pytest.mark.integration

CONTRACT_METHODS = {"list", "ping", "status", "restart_controller", "reboot", "shutdown", "restart_gateway",
                "run_command", "init_files", "archive_republish_messages", "archive_discard_messages",
                "controller_logs"}


class Env(SupervisorEnv):
    """A supervisor whose power actions only touch files in `marks`, and quick file checks."""

    def __init__(self, base: Path, sections: dict[str, dict[str, Any]] | None = None):
        self.marks = base / "marks"
        self.marks.mkdir(parents=True, exist_ok=True)
        defaults: dict[str, dict[str, Any]] = {
            "supervisor": {
                "telemetry_interval_s": 1,
                "rpc_reply_deadline_s": 2,
                "run_command_allow": ["echo **", "/bin/sleep **", f"{shlex.quote(sys.executable)} **",
                                      "/usr/bin/env"],
                "run_command_timeout_s": 20,
                "run_command_max_output_bytes": 1000,
                "reboot_command": ["/usr/bin/touch", str(self.marks / "reboot")],
                "shutdown_command": ["/usr/bin/touch", str(self.marks / "shutdown")],
                "restart_gateway_command": ["/usr/bin/touch", str(self.marks / "restart_gateway")],
                "power_action_delay_s": 3,
                "udev": False,
            },
            "files": {"check_interval_s": 0.5},
        }
        super().__init__(base, merge_sections(defaults, sections))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path).start()
    try:
        yield e
    finally:
        e.stop()


def test_every_method_answers_with_a_json_object(env: Env) -> None:
    b = env.b
    b.rpc(1, "ping", {})
    assert env.b.reply(1)["pong"] is True
    b.rpc(2, "list")
    methods = b.reply(2)["methods"]
    assert set(methods) >= CONTRACT_METHODS
    b.rpc(3, "status")
    st = b.reply(3)
    assert st["controller"] == {"enabled": False} and "queues" in st and "error" not in st
    for i, m in enumerate(("system_info", "devices", "sw_status", "init_files"), start=10):
        b.rpc(i, m)
        assert "error" not in b.reply(i), m
    b.rpc(20, "run_command", {"command": "echo hello world"})
    r = b.reply(20)
    assert r["exit_code"] == 0 and r["output"] == "hello world\n"
    b.rpc(21, "run_command", {"command": [sys.executable, "-c", "print('z' * 5000)"]})
    r = b.reply(21)
    assert r["truncated"] and r["output_bytes"] == 5001 and len(r["output"]) < 1100
    errors = {
        30: ("no_such_method", {}, "unknown method"),
        31: ("run_command", {}, "params.command is required"),
        32: ("run_command", {"command": "rm -rf /"}, "not allowed"),
        33: ("run_command", {"command": "echo x", "timeout_s": -1}, "timeout_s"),
        34: ("archive_republish_messages", {"start_timestamp_ms": 1}, "end_timestamp_ms is required"),
        35: ("archive_discard_messages", {"start_timestamp_ms": "x", "end_timestamp_ms": 2}, "integer"),
        36: ("archive_discard_messages", {"start_timestamp_ms": 5, "end_timestamp_ms": 2}, "before"),
        37: ("archive_republish_messages", [1, 2], "JSON object"),
        38: ("restart_controller", {}, "disabled"),
        39: ("controller_logs", {}, "disabled"),
        40: ("job_status", {"job": 999999}, "no such job"),
        41: (17, {}, "method"),
    }
    for rid, (method, params, _text) in errors.items():
        b.rpc(rid, method, params)
    for rid, (method, _params, text) in errors.items():
        r = b.reply(rid)
        assert set(r) == {"error"} and text in r["error"], (method, r)
    # malformed requests are answered too
    b.inbound("v1/devices/me/rpc/request/50", b"{not json")
    b.inbound("v1/devices/me/rpc/request/51", b"[1,2]")
    b.inbound("v1/devices/me/rpc/request/52", b'{"params": {}}')
    for rid in (50, 51, 52):
        assert "error" in b.reply(rid)
    # gatewayctl sees the supervisor's state
    out = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(env.config), "status", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    st = json.loads(out.stdout)
    assert st["controller"]["state"] == "disabled" and st["units"]["supervisor"] == "active"


def test_malformed_inbound_is_dead_lettered_and_the_daemon_carries_on(env: Env) -> None:
    b = env.b
    b.inbound("v1/devices/me/attributes", b"\xff\xfe not json")
    b.inbound("v1/devices/me/attributes", b"[1]")
    b.inbound("v1/devices/me/attributes", json.dumps({"FILES": 42, "sw_version": {"x": 1}}))
    b.inbound("some/unknown/topic", b"hello")
    b.inbound("v2/sw/response/123/chunk/0", b"\x00\x01")  # no download active: dropped
    b.rpc(1, "ping")
    assert b.reply(1)["pong"]
    wait_for(lambda: b.conn.execute("SELECT count(*) FROM inbound").fetchone()[0] == 0, 10, what="inbound drained")
    reasons = [r[0] for r in b.conn.execute("SELECT reason FROM dead_letters ORDER BY id")]
    assert len(reasons) == 3 and "not valid JSON" in reasons[0] and "no handler" in reasons[2]
    assert "FILE_ERROR_FILES" in b.attributes()
    assert env.daemon.proc is not None and env.daemon.proc.poll() is None


def test_duplicate_delivery_runs_once_and_each_copy_gets_the_same_reply(env: Env, tmp_path: Path) -> None:
    b = env.b
    runs = tmp_path / "runs"
    script = f"open({str(runs)!r}, 'a').write('run\\n'); print('once')"
    for _ in range(3):
        b.rpc(7, "run_command", {"command": [sys.executable, "-c", script]})
    b.reply(7)
    b.rpc(8, "ping")
    b.reply(8)
    wait_for(lambda: len(b.replies(7)) == 3, 10, what="a reply for every copy")
    replies = b.replies(7)
    assert replies[0]["output"] == "once\n" and replies[1:] == replies[:1] * 2
    assert runs.read_text() == "run\n"
    assert b.conn.execute("SELECT count(*) FROM inbound").fetchone()[0] == 0


def test_command_outliving_the_rpc_timeout(env: Env) -> None:
    b = env.b
    t0 = time.monotonic()
    b.rpc(1, "run_command", {"command": [sys.executable, "-c", "import time; time.sleep(4); print('late')"]})
    r = b.reply(1, timeout=5)
    assert time.monotonic() - t0 < 4 and r["state"] == "running" and isinstance(r["job"], int)
    b.rpc(2, "ping")  # the loop is free meanwhile
    b.reply(2, timeout=2)
    result = wait_for(lambda: next((v["rpc_result"] for v in b.telemetry() if "rpc_result" in v), None), 10,
                      what="the late result")
    assert result["rpc_id"] == "1" and result["output"] == "late\n" and result["exit_code"] == 0
    b.rpc(3, "job_status", {"job": r["job"]})
    st = b.reply(3)
    assert st["state"] == "succeeded" and st["result"]["output"] == "late\n"
    # a command that outlives its own timeout is killed
    b.rpc(4, "run_command", {"command": "/bin/sleep 30", "timeout_s": 1})
    r = b.reply(4)
    assert r["timed_out"] is True and r["exit_code"] != 0


def test_power_actions_reply_first_then_act(env: Env) -> None:
    b = env.b
    b.rpc(1, "reboot")
    r = b.reply(1)
    assert r["ok"] is True and r["action"] == "reboot"
    assert not (env.marks / "reboot").exists()  # the reply is not delivered yet: waiting
    wait_for(lambda: (env.marks / "reboot").exists(), 10, what="reboot after the delay")
    # once the bridge delivers the reply, the action follows at once
    b.rpc(2, "restart_gateway")
    b.reply(2)
    row_id = b.conn.execute("SELECT id FROM outbox WHERE topic = 'v1/devices/me/rpc/response/2'").fetchone()[0]
    t0 = time.monotonic()
    b.deliver([row_id])
    wait_for(lambda: (env.marks / "restart_gateway").exists(), 10, what="restart_gateway")
    assert time.monotonic() - t0 < 2.5
    b.rpc(3, "shutdown")
    assert b.reply(3)["action"] == "shutdown"
    wait_for(lambda: (env.marks / "shutdown").exists(), 10, what="shutdown")


def test_power_action_command_missing_is_an_error(tmp_path: Path) -> None:
    e = Env(tmp_path, {"supervisor": {"reboot_command": ["/nonexistent/systemctl", "reboot"]}}).start()
    try:
        e.b.rpc(1, "reboot")
        assert "not found" in e.b.reply(1)["error"]
    finally:
        e.stop()


def test_crash_mid_command_neither_loses_nor_repeats(tmp_path: Path) -> None:
    e = Env(tmp_path, {"supervisor": {"rpc_reply_deadline_s": 30}}).start()
    count = tmp_path / "runs"
    script = f"open({str(count)!r}, 'a').write('run\\n'); import time; time.sleep(3)"
    try:
        e.b.rpc(1, "run_command", {"command": [sys.executable, "-c", script]})
        wait_for(count.exists, 10, what="the command to start")
        e.daemon.kill9()
        assert e.b.replies(1) == []
        e.daemon.start()
        r = e.b.reply(1)
        assert "interrupted" in r["error"]
        e.b.rpc(2, "ping")
        e.b.reply(2)
        time.sleep(4)
        assert count.read_text() == "run\n"  # not run a second time
        assert len(e.b.replies(1)) == 1
    finally:
        e.stop()


def test_archive_republish_and_discard_report_real_counts(env: Env) -> None:
    a = archive_store.open_archive(env.cfg.archive_db)
    rows = [(ts, "telemetry", json.dumps({"ts": ts, "values": {"n": i}}))
            for i, ts in enumerate([1000, 2000, 2000, 2000, 2999, 3000, 5000])]
    a.executemany("INSERT INTO archive(ts, type, message) VALUES (?,?,?)", rows)
    a.close()
    b = env.b
    before = len(b.outbox("telemetry"))
    b.rpc(1, "archive_republish_messages", {"start_timestamp_ms": 2000, "end_timestamp_ms": 3000})
    assert b.reply(1)["count"] == 4
    republished = [json.loads(p) for _, _, _, _, p in b.outbox("telemetry")[before:]
                   if "n" in json.loads(p)["values"]]
    assert sorted(x["values"]["n"] for x in republished) == [1, 2, 3, 4]
    b.rpc(2, "archive_count_messages", {"start_timestamp_ms": 0, "end_timestamp_ms": 10**13})
    assert b.reply(2)["count"] == 7
    b.rpc(3, "archive_discard_messages", {"start_timestamp_ms": 1000, "end_timestamp_ms": 3000})
    assert b.reply(3)["count"] == 5
    b.rpc(4, "archive_discard_messages", {"start_timestamp_ms": 1000, "end_timestamp_ms": 3000})
    assert b.reply(4)["count"] == 0
    b.rpc(5, "archive_count_messages", {"start_timestamp_ms": 0, "end_timestamp_ms": 10**13})
    assert b.reply(5)["count"] == 2


def test_telemetry_and_device_facts(env: Env) -> None:
    b = env.b
    values = wait_for(lambda: next((v for v in b.telemetry() if "controller_state" in v), None), 10,
                      what="periodic telemetry")
    assert values["controller_state"] == "disabled"
    assert {"cpu_percent", "memory_percent", "disk_percent", "uptime_s"} <= set(values) or "load_1m" in values
    assert b.raw("v1/devices/me/attributes/request/"), "attributes requested at start"


def test_remote_files(env: Env, tmp_path: Path) -> None:
    b = env.b
    root = env.cfg.controller_data_dir
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "escape")
    (root / "good.conf").write_text("old\n")
    files = {
        "good": {"path": str(root / "good.conf"), "write_version": 1},
        "dots": {"path": f"{root}/../dots.conf"},
        "abs": {"path": str(outside / "abs.conf"), "create_if_not_exist": True},
        "link": {"path": str(root / "escape" / "link.conf"), "create_if_not_exist": True},
        "blob": {"path": "blob.bin", "encoding": "base64", "create_if_not_exist": True},
    }
    b.shared({"FILES": files})
    wait_for(lambda: "FILE_HASHES" in b.attributes(), 10, what="FILE_HASHES")
    # content requested for the version not yet written
    wait_for(lambda: any("FILE_CONTENT_good" in p for _, _, p in b.raw("v1/devices/me/attributes/request/")), 5,
             what="the content request")
    attrs = b.attributes()
    assert attrs["FILE_READ_good"] == "old\n"
    for key, text in (("dots", "'..'"), ("abs", "outside the allowed roots"), ("link", "symbolic link")):
        assert text in attrs[f"FILE_ERROR_{key}"], key
    # the server answers the content request, and pushes contents for the refused files
    b.inbound("v1/devices/me/attributes/response/77", json.dumps({"shared": {"FILE_CONTENT_good": "new\n"}}))
    b.shared({"FILE_CONTENT_dots": "x", "FILE_CONTENT_abs": "x", "FILE_CONTENT_link": "x",
              "FILE_CONTENT_blob": "AAEC"})
    wait_for(lambda: (root / "blob.bin").exists(), 10, what="blob written")
    assert (root / "good.conf").read_text() == "new\n"
    assert (root / "blob.bin").read_bytes() == b"\x00\x01\x02"
    assert list(outside.iterdir()) == [] and not (root.parent / "dots.conf").exists()
    assert not [p for p in root.iterdir() if ".tmp" in p.name]
    hashes = wait_for(lambda: b.attributes()["FILE_HASHES"]["good"]["write_version"] == 1
                      and b.attributes()["FILE_HASHES"], 5, what="hashes")
    import hashlib

    assert hashes["good"]["hash"] == hashlib.md5(b"new\n").hexdigest()
    # an edit on disk is noticed and reported
    (root / "good.conf").write_text("edited\n")
    wait_for(lambda: b.attributes().get("FILE_READ_good") == "edited\n", 10, what="change detection")
    # definitions survive a restart; a refresh with the same version writes nothing
    env.daemon.stop()
    env.daemon.start()
    b.inbound("v1/devices/me/attributes/response/78",
              json.dumps({"shared": {"FILES": files, "FILE_CONTENT_good": "new\n"}}))
    b.rpc(9, "init_files")
    r = b.reply(9)
    assert r["files"]["good"]["write_version"] == 1 and "outside" in r["files"]["abs"]["error"]
    assert (root / "good.conf").read_text() == "edited\n"


def test_config_check_lists_the_new_keys(tmp_path: Path) -> None:
    cfgp = write_config(tmp_path)
    out = subprocess.run([sys.executable, "-m", "gatewayd", "--check-config", "--config", str(cfgp)],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0
    for key in ("rpc_reply_deadline_s", "reboot_command", "update_stable_s", "check_interval_s"):
        assert key in out.stdout
