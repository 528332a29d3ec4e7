"""Start gatewayd daemons as real processes in a temp dir, wait for "ready", stop them by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatewayd.config import render_toml

ROOT = Path(__file__).resolve().parents[2]


def write_config(base: Path, sections: dict[str, dict[str, Any]] | None = None) -> Path:
    """A config whose every path lives under `base`; `sections` overrides/extends it.

    Forwarding gatewayd's own log lines to ThingsBoard is off unless a test turns it on
    (`"logging": {"forward_level": ...}`): tests that count outbox rows or the records the
    server received would otherwise also count the warnings their faults provoke."""
    data: dict[str, dict[str, Any]] = {
        "paths": {
            "state_dir": str(base / "state"),
            "runtime_dir": str(base / "run"),
            "controller_data_dir": str(base / "controller"),
        },
        "controller": {"enabled": False},
        "logging": {"forward_level": "off"},
    }
    for name, keys in (sections or {}).items():
        data.setdefault(name, {}).update(keys)
    text = render_toml(data)
    path = base / "gatewayd.toml"
    base.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy (returned) or raise TimeoutError.

    The one bounded wait of the test helpers (`brokers.wait_until` is this function).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Daemon:
    """One `python -m gatewayd <name>` process with its stderr captured to a file."""

    def __init__(self, name: str, config: Path, python: str | None = None, env: dict[str, str] | None = None,
                 argv_prefix: list[str] | None = None):
        """`argv_prefix` wraps the command (e.g. `setpriv --reuid ...` to run it as another user)."""
        self.name = name
        self.argv_prefix = list(argv_prefix or [])
        self.config = config
        self.python = python or sys.executable
        self.env = env or {}
        self.log_path = config.parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> Daemon:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.env)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.argv_prefix, self.python, "-m", "gatewayd", self.name,
                                          "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        if wait_ready:
            self.wait_log(f"{self.name} ready", timeout)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return text in self.log()[self._log_offset:]

        wait_for(seen, timeout, what=f"{self.name} to log {text!r}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
