"""What ThingsBoard sends or a container writes is never trusted: the real supervisor process
(controller disabled, no Docker) against FIFOs, huge files, `${VAR}` paths, odd RPCs, a clock
step over an interrupted command, and run_command's argument and environment limits.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemons import wait_for
from tests.helpers.supervisor_env import SupervisorEnv, merge_sections

pytestmark = pytest.mark.integration

SECRET = "gw-planted-secret-4711"
GIB = 1 << 30

# Runs `python -m gatewayd ...` with the wall clock shifted by $GWTEST_CLOCK_OFFSET_S (a fake time
# source for one real process: monotonic time is untouched, as after an NTP step).
SHIFTED_PYTHON = """#!/bin/sh
exec {python} -c '
import os, runpy, sys, time
offset = float(os.environ["GWTEST_CLOCK_OFFSET_S"])
real_time, real_time_ns = time.time, time.time_ns
time.time = lambda: real_time() + offset
time.time_ns = lambda: real_time_ns() + int(offset * 1e9)
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
' "$@"
"""


def env_for(base: Path, sections: dict[str, dict[str, Any]] | None = None,
            env: dict[str, str] | None = None) -> SupervisorEnv:
    defaults: dict[str, dict[str, Any]] = {
        "supervisor": {"telemetry_interval_s": 60, "rpc_reply_deadline_s": 30, "udev": False,
                       "run_command_allow": [f"{shlex.quote(sys.executable)} **", "/usr/bin/env",
                                             "echo hello *"]},
        "files": {"check_interval_s": 0.5},
    }
    return SupervisorEnv(base, merge_sections(defaults, sections), env={"GWTEST_SECRET": SECRET, **(env or {})})


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[SupervisorEnv]:
    e = env_for(tmp_path).start()
    try:
        yield e
    finally:
        e.stop()


def outbox_text(e: SupervisorEnv) -> str:
    return "\n".join(p for *_, p in e.b.outbox())


def test_fifo_and_oversized_files_never_stop_the_supervisor(tmp_path: Path) -> None:
    e = env_for(tmp_path, {"files": {"max_file_bytes": 1 << 20}})
    root = e.cfg.controller_data_dir
    root.mkdir(parents=True)
    os.mkfifo(root / "pipe")
    with open(root / "huge.bin", "wb") as f:
        f.truncate(64 * GIB)  # sparse: reading it would take minutes
    (root / "ok.txt").write_text("fine\n")
    files = {"pipe": {"path": "pipe"}, "huge": {"path": "huge.bin", "encoding": "base64"}, "ok": {"path": "ok.txt"}}
    e.start()
    try:
        e.b.shared({"FILES": files})
        e.b.rpc(1, "ping")
        assert e.b.reply(1)["pong"] is True
        attrs = wait_for(lambda: (a := e.b.attributes()).get("FILE_READ_ok") and "FILE_ERROR_huge" in a
                         and "FILE_ERROR_pipe" in a and a, 15, what="the files reported")
        assert "FIFO" in attrs["FILE_ERROR_pipe"]
        assert "max_file_bytes" in attrs["FILE_ERROR_huge"]
        assert attrs["FILE_READ_ok"] == "fine\n"
        hashes = wait_for(lambda: e.b.attributes().get("FILE_HASHES"), 10, what="FILE_HASHES")
        assert hashes["ok"]["hash"] == hashlib.md5(b"fine\n").hexdigest() and hashes["pipe"]["hash"] is None
        # the definitions are saved: a restart with the FIFO still there reaches READY and answers
        e.daemon.stop()
        e.daemon.start(timeout=20)
        e.b.rpc(2, "init_files")
        report = e.b.reply(2)
        assert "FIFO" in report["files"]["pipe"]["error"] and report["files"]["ok"]["error"] is None
    finally:
        e.stop()


def test_hashing_a_large_file_happens_off_the_main_loop(tmp_path: Path) -> None:
    e = env_for(tmp_path, {"files": {"max_file_bytes": 4 * GIB}})
    root = e.cfg.controller_data_dir
    root.mkdir(parents=True)
    size = 3 * GIB // 2
    with open(root / "big.bin", "wb") as f:
        f.truncate(size)
    e.start()
    try:
        e.b.shared({"FILES": {"big": {"path": "big.bin", "encoding": "base64"}}})
        e.b.rpc(1, "ping")  # queued behind FILES: answered while the file is being hashed
        e.b.reply(1)
        zeros = hashlib.md5(usedforsecurity=False)
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            zeros.update(block)

        def hashed() -> int | None:
            for rid, _, _, _, payload in e.b.outbox("attributes"):
                if (json.loads(payload).get("FILE_HASHES") or {}).get("big", {}).get("hash") == zeros.hexdigest():
                    return int(rid)
            return None

        hash_row = wait_for(hashed, 120, what="the hash of the large file")
        reply_row = e.b.conn.execute("SELECT id FROM outbox WHERE topic = 'v1/devices/me/rpc/response/1'"
                                     ).fetchone()[0]
        assert reply_row < hash_row, "the ping waited for the hash: file work ran in the main loop"
    finally:
        e.stop()


def test_server_paths_never_see_the_environment(sup: SupervisorEnv, tmp_path: Path) -> None:
    root = sup.cfg.controller_data_dir
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "escape")
    (root / "named.txt").write_text("by variable\n")
    files = {
        "plain": {"path": "${GWTEST_SECRET}.txt", "create_if_not_exist": True},
        "bare": {"path": "$GWTEST_SECRET/x"},
        "link": {"path": "escape/${GWTEST_SECRET}"},
        "abs": {"path": "/${GWTEST_SECRET}/y"},
        "home": {"path": "~/z"},
        "allowed": {"path": "${CONTROLLER_DATA_DIR}/named.txt"},
    }
    sup.b.shared({"FILES": files, "FILE_CONTENT_plain": "x"})
    sup.b.rpc(1, "init_files")
    report = sup.b.reply(1)
    attrs = wait_for(lambda: (a := sup.b.attributes()).get("FILE_ERROR_link") and a, 10, what="the files")
    assert SECRET not in outbox_text(sup)
    assert not any(SECRET in p.name for p in root.rglob("*")) and list(outside.iterdir()) == []
    assert attrs.get("FILE_READ_allowed") == "by variable\n"
    for key in ("plain", "bare", "link", "abs"):
        assert "path_variables" in attrs[f"FILE_ERROR_{key}"], key
        assert "path_variables" in report["files"][key]["error"], key
    assert "'~' is not expanded" in attrs["FILE_ERROR_home"]


def test_every_malformed_files_entry_is_refused_alone(sup: SupervisorEnv) -> None:
    root = sup.cfg.controller_data_dir
    (root / "good.txt").write_text("good\n")
    raw = ('{"good": {"path": "good.txt"}, "\\ud800bad": {"path": "x"}, "": {"path": "y"},'
           ' "surrogate": {"path": "a\\udcffb"}, "dots": {"path": "../etc/passwd"},'
           ' "abs": {"path": "/etc/passwd"}, "nul": {"path": "a\\u0000b"}, "type": {"path": 42},'
           ' "list": [1], "enc": {"path": "e", "encoding": {"x": 1}},'
           ' "flag": {"path": "f", "create_if_not_exist": "yes"},'
           ' "nan": {"path": "n", "write_version": NaN}, "deep": ' + "[" * 500 + "]" * 500 + "}")
    sup.b.inbound("v1/devices/me/attributes", '{"FILES": ' + raw + "}")
    sup.b.rpc(1, "ping")
    sup.b.reply(1)
    attrs = wait_for(lambda: (a := sup.b.attributes()).get("FILE_READ_good") and a, 10, what="the good file")
    assert attrs["FILE_READ_good"] == "good\n"
    for key, text in (("surrogate", "Unicode"), ("dots", "'..'"), ("abs", "outside"), ("nul", "NUL"),
                      ("type", "'path'"), ("list", "object"), ("enc", "encoding"), ("flag", "true or false"),
                      ("nan", "write_version"), ("deep", "object")):
        assert text in attrs[f"FILE_ERROR_{key}"], key
    assert "\\ud800bad" in attrs["FILE_ERROR_FILES"] and "'' refused" in attrs["FILE_ERROR_FILES"]
    assert sup.daemon.proc is not None and sup.daemon.proc.poll() is None


ODD_RPCS: list[bytes] = [
    b"\xff\xfe\x00 not utf-8",
    b"not json at all",
    b"[" * 100000 + b"]" * 100000,
    b'{"method": ' + b"[" * 50000 + b"]" * 50000 + b"}",
    b'{"method": "\\ud800ping"}',
    b'{"method": "ping\\udcff", "params": {"a": "\\udfff"}}',
    b'{"method": "run_command", "params": {"command": ["/usr/bin/env", "\\udcff"]}}',
    b'{"method": "status", "params": ' + b'{"a":' * 20000 + b"1" + b"}" * 20000 + b"}",
    b'{"method": "archive_count_messages", "params": {"start_timestamp_ms": "' + b"9" * 6000 + b'",'
    b' "end_timestamp_ms": 1}}',
    b"null",
    b'"ping"',
    b'{"method": null}',
    b'{"method": "ping", "params": NaN}',
]


def test_odd_rpcs_each_get_an_error_reply(sup: SupervisorEnv) -> None:
    for i, payload in enumerate(ODD_RPCS):
        sup.b.inbound(f"v1/devices/me/rpc/request/{100 + i}", payload)
    sup.b.rpc(1, "ping")
    assert sup.b.reply(1)["pong"] is True
    for i, payload in enumerate(ODD_RPCS):
        reply = sup.b.reply(100 + i)
        replies = sup.b.replies(100 + i)
        assert len(replies) == 1, payload[:60]
        if i != len(ODD_RPCS) - 1:  # NaN params: ping ignores its params
            assert set(reply) == {"error"} and reply["error"], payload[:60]
    assert sup.b.conn.execute("SELECT count(*) FROM inbound").fetchone()[0] == 0
    assert sup.b.conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0


def shifted_python(tmp_path: Path) -> str:
    script = tmp_path / "python-shifted"
    script.write_text(SHIFTED_PYTHON.format(python=shlex.quote(sys.executable)))
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("step_s", [2 * 3600, -2 * 3600])
def test_interrupted_command_is_never_rerun_after_a_clock_step(tmp_path: Path, step_s: int) -> None:
    # the program alone (any arguments before argument patterns existed; none now) and with any arguments
    e = env_for(tmp_path, {"supervisor": {"run_command_allow": [sys.executable, f"{shlex.quote(sys.executable)} **"]}})
    runs = tmp_path / "runs"
    script = f"open({str(runs)!r}, 'a').write('run\\n'); import time; time.sleep(30)"
    e.start()
    try:
        e.b.rpc(1, "run_command", {"command": [sys.executable, "-c", script]})
        wait_for(runs.exists, 15, what="the command to start")
        e.daemon.kill9()
        assert e.b.replies(1) == []
        # the same machine two hours later (or earlier): the wall clock stepped, the row is still there
        e.daemon.python = shifted_python(tmp_path)
        e.daemon.env["GWTEST_CLOCK_OFFSET_S"] = str(step_s)
        e.daemon.start()
        reply = e.b.reply(1)
        assert "interrupted" in reply["error"]
        e.b.rpc(2, "ping")
        assert abs(e.b.reply(2)["ts"] / 1000 - step_s - __import__("time").time()) < 600  # the clock is shifted
        # a redelivery of the same request is not run either: it gets the same answer
        e.b.rpc(1, "run_command", {"command": [sys.executable, "-c", script]})
        wait_for(lambda: len(e.b.replies(1)) == 2, 10, what="the answer to the redelivery")
        assert e.b.replies(1)[1] == reply
        assert runs.read_text() == "run\n"
    finally:
        e.stop()


def test_run_command_gets_a_minimal_environment_and_only_allowed_arguments(sup: SupervisorEnv) -> None:
    b = sup.b
    b.rpc(1, "run_command", {"command": "/usr/bin/env"})
    out = b.reply(1)["output"]
    assert SECRET not in out and "GWTEST_SECRET" not in out
    assert sorted(out.split()) == ["LANG=C.UTF-8", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    b.rpc(2, "run_command", {"command": "echo hello world"})
    assert b.reply(2)["output"] == "hello world\n"
    for rid, command in ((3, "echo bye"), (4, "echo hello two words"), (5, "echo hello"), (6, "/usr/bin/env FOO=1"),
                         (7, ["/usr/bin/env", "-i", "sh"])):
        b.rpc(rid, "run_command", {"command": command})
        assert "not allowed" in b.reply(rid)["error"], command
