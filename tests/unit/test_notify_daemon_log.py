from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gatewayd.daemon import AlreadyRunning, Runner, single_instance
from gatewayd.log import SyslogPrefixFormatter
from gatewayd.notify import Notifier


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.01)
    return s, path


def drain(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out


def test_notifier_without_socket_is_silent(notifier: Callable[..., Notifier]) -> None:
    n = notifier()
    assert not n.enabled and n.watchdog_interval is None
    n.ready("x")
    n.watchdog()


def test_notifier_sends_and_halves_watchdog(tmp_path: Path, notifier: Callable[..., Notifier]) -> None:
    s, path = notify_socket(tmp_path)
    n = notifier(NOTIFY_SOCKET=path, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid()))
    assert n.watchdog_interval == 15.0
    n.ready("up")
    n.status("busy")
    n.status("busy")  # unchanged status is not resent
    n.watchdog()
    msgs = drain(s)
    assert msgs[0].startswith("READY=1\nSTATUS=up")
    assert msgs[1:] == ["STATUS=busy", "WATCHDOG=1"]


def test_watchdog_for_other_pid_ignored(notifier: Callable[..., Notifier]) -> None:
    assert notifier(WATCHDOG_USEC="1000", WATCHDOG_PID="1").watchdog_interval is None


def test_abstract_socket(tmp_path: Path, notifier: Callable[..., Notifier]) -> None:
    name = f"gatewayd-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(1)
    notifier(NOTIFY_SOCKET="@" + name).watchdog()
    assert s.recv(100) == b"WATCHDOG=1"


def test_status_in_any_script_arrives_as_utf8(tmp_path: Path, notifier: Callable[..., Notifier]) -> None:
    s, path = notify_socket(tmp_path)
    notifier(NOTIFY_SOCKET=path).status("waiting: disk „voll“ — 残り 0 B")
    assert drain(s) == ["STATUS=waiting: disk „voll“ — 残り 0 B"]


def test_pings_resume_after_systemd_replaced_its_socket(tmp_path: Path, notifier: Callable[..., Notifier]) -> None:
    s, path = notify_socket(tmp_path)
    n = notifier(NOTIFY_SOCKET=path)
    n.watchdog()
    assert drain(s) == ["WATCHDOG=1"]
    s.close()
    os.unlink(path)
    n.watchdog()  # nobody listens: lost, and no exception
    s, _ = notify_socket(tmp_path)  # systemd re-executed: a new socket at the same path
    n.watchdog()
    assert drain(s) == ["WATCHDOG=1"]
    s.close()


class FakeService:
    name = "fake"

    def __init__(self) -> None:
        self.healthy = True
        self.steps = 0
        self.started = self.stopped = False
        self.errors: list[str] = []
        self.fail = False

    def start(self) -> None:
        self.started = True

    def step(self) -> tuple[bool, float]:
        self.steps += 1
        if self.fail:
            raise ValueError("boom")
        return self.healthy, 0.01

    def status(self) -> str:
        return f"steps {self.steps}"

    def report_error(self, text: str) -> None:
        self.errors.append(text)

    def stop(self) -> None:
        self.stopped = True


def test_runner_pings_only_while_progressing(tmp_path: Path, notifier: Callable[..., Notifier]) -> None:
    s, path = notify_socket(tmp_path)
    svc = FakeService()
    runner = Runner(svc, tmp_path, notifier(NOTIFY_SOCKET=path, WATCHDOG_USEC="100000"))
    t = threading.Thread(target=runner.run)
    t.start()
    try:
        time.sleep(0.5)
        first = drain(s)
        assert first[0].startswith("READY=1")
        assert first.count("WATCHDOG=1") >= 3
        assert (tmp_path / "fake.heartbeat").read_text().startswith("pid ")
        svc.healthy = False
        time.sleep(0.1)
        drain(s)
        time.sleep(0.5)
        assert "WATCHDOG=1" not in drain(s)
        svc.healthy = True
        time.sleep(0.3)
        assert "WATCHDOG=1" in drain(s)
        svc.fail = True
        time.sleep(0.3)
        drain(s)
        time.sleep(0.4)
        assert "WATCHDOG=1" not in drain(s)
        assert svc.errors and svc.errors[0] == "ValueError: boom"
    finally:
        runner.request_stop()
        t.join(5)
    assert svc.stopped
    assert any(m.startswith("STOPPING=1") for m in drain(s))
    assert not (tmp_path / "fake.heartbeat").exists()


def test_single_instance(tmp_path: Path) -> None:
    fd = single_instance(tmp_path, "x")
    with pytest.raises(AlreadyRunning):
        single_instance(tmp_path, "x")
    os.close(fd)
    os.close(single_instance(tmp_path, "x"))


def test_log_prefixes_every_line() -> None:
    f = SyslogPrefixFormatter(timestamps=False)
    rec = logging.LogRecord("gatewayd.x", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert f.format(rec) == "<4>gatewayd.x: a\n<4>gatewayd.x: b"
    rec = logging.LogRecord("g", logging.DEBUG, __file__, 1, "d", None, None)
    assert f.format(rec).startswith("<7>")
    rec = logging.LogRecord("g", logging.ERROR, __file__, 1, "e", None, None)
    assert f.format(rec).startswith("<3>")
