"""The main-loop runner every daemon shares: signals, readiness, progress-gated watchdog, heartbeat.

A daemon supplies a `Service`; `run()` owns the loop. The watchdog is fed only when the
service's `step()` reports progress, so a daemon that is alive but stuck is restarted by
systemd (and, failing that, by the cron fallback, which reads the heartbeat file).

Start-up survives transient faults: when `start()` fails on a locked, full, read-only or
unreachable database (or another OS error), the daemon still reports READY, says in STATUS=
and its runtime status file what it waits for, and retries `start()` from the loop with a
bounded backoff (its `stop()` runs first, so a retry starts clean). Restarting would not
help against such a fault, so the loop keeps feeding the watchdog while it waits; a fault
of any other kind (a bug, a newer schema) still ends the process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gatewayd.clock import now_ms
from gatewayd.notify import Notifier
from gatewayd.store.errors import Fault, classify, describe
from gatewayd.store.faults import is_full
from gatewayd.store.space import release_reserve

if TYPE_CHECKING:
    from gatewayd.config import Config

log = logging.getLogger("gatewayd.daemon")

HEARTBEAT_EVERY_S = 5.0
SHUTDOWN_TIMEOUT_S = 10.0
ERROR_BACKOFF_MAX_S = 5.0
STATUS_STORE_EVERY_S = 5.0
START_BACKOFF_INITIAL_S = 0.5
START_BACKOFF_MAX_S = 30.0


class Service(Protocol):
    name: str

    def start(self) -> None:
        """Open databases and connections; READY=1 follows only if this returns."""

    def step(self) -> tuple[bool, float]:
        """One loop iteration: (made progress / healthy, seconds to wait before the next)."""

    def status(self) -> str:
        """One line for systemd's STATUS=."""

    def report_error(self, text: str) -> None:
        """Remember the last error where `gatewayctl status` can read it."""

    # Optional: `report_status(text)` remembers the STATUS= line where `gatewayctl status`
    # reads it (called on change, at most every STATUS_STORE_EVERY_S, and when stopping).

    def stop(self) -> None:
        """Release resources; bounded by SHUTDOWN_TIMEOUT_S."""


def service_fds(service: Service) -> list[int]:
    """File descriptors whose readiness should end the loop's wait early (optional `fds()`)."""
    fds = getattr(service, "fds", None)
    return list(fds()) if fds is not None else []


def service_health(service: Service) -> dict[str, Any]:
    """The optional `health()`: {"fault": str | None, "files": {name: [dev, inode]}}."""
    health = getattr(service, "health", None)
    return dict(health()) if health is not None else {}


def start_fault(exc: BaseException) -> bool:
    """Whether a failed `start()` is worth waiting out rather than exiting on."""
    return isinstance(exc, OSError) or classify(exc) is Fault.TRANSIENT


class RuntimeStatus:
    """`<runtime_dir>/<name>.status`: the daemon's current fault and the files it has open, as JSON.

    It lives beside the heartbeat (tmpfs), so `gatewayctl status` learns why a daemon waits even
    when that daemon cannot write any database. Rewritten only when its content changes.
    """

    def __init__(self, runtime_dir: Path, name: str):
        self.path = runtime_dir / f"{name}.status"
        self._key: tuple[str | None, str] | None = None
        self._since_ms = 0

    def update(self, fault: str | None, files: dict[str, Any] | None = None) -> None:
        key = (fault, json.dumps(files or {}, sort_keys=True))
        if key == self._key:
            return
        if self._key is None or key[0] != self._key[0]:
            self._since_ms = now_ms()
        self._key = key
        value = {"pid": os.getpid(), "fault": fault, "since_ms": self._since_ms, "files": files or {}}
        tmp = self.path.with_suffix(".status.tmp")
        try:
            tmp.write_text(json.dumps(value))
            os.replace(tmp, self.path)
        except OSError as e:
            log.debug("cannot write %s: %s", self.path, e)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def read_runtime_status(runtime_dir: Path, name: str) -> dict[str, Any] | None:
    """What `RuntimeStatus` last wrote, or None (no file, or a daemon that is gone)."""
    try:
        value = json.loads((runtime_dir / f"{name}.status").read_text())
        os.kill(int(value["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, dict) else None


class Heartbeat:
    """`<runtime_dir>/<name>.heartbeat`: its mtime is the time of the last progress."""

    def __init__(self, runtime_dir: Path, name: str):
        self.path = runtime_dir / f"{name}.heartbeat"
        self.written = False

    def beat(self) -> None:
        """The first beat of a process writes its pid: a file left by one killed with SIGKILL
        names a dead pid, and `gatewayctl status` (without systemd) took the daemon for down."""
        try:
            if self.written:
                os.utime(self.path)
                return
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot update heartbeat %s: %s", self.path, e)
            return
        try:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(f"pid {os.getpid()}\n")
            os.replace(tmp, self.path)
            self.written = True
        except OSError as e:
            log.warning("cannot update heartbeat %s: %s", self.path, e)

    def clear(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass


class Runner:
    def __init__(self, service: Service, runtime_dir: Path, notifier: Notifier | None = None,
                 state_dir: Path | None = None):
        """`state_dir`: where the disk reserve is, released when `start()` finds the disk full."""
        self.service = service
        self.state_dir = state_dir
        self.notifier = notifier or Notifier()
        self.heartbeat = Heartbeat(runtime_dir, service.name)
        self.runtime_status = RuntimeStatus(runtime_dir, service.name)
        self.stop_event = threading.Event()
        self._errors_in_row = 0
        self._stored_status: str | None = None
        self._stored_at = float("-inf")
        self._start_fault: str | None = None
        self._start_backoff = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stop_event.is_set():
            log.info("received %s, stopping", signal.Signals(signum).name)
        self.request_stop()

    def request_stop(self) -> None:
        self.stop_event.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (AttributeError, ValueError):
            pass

    def run(self) -> int:
        started = self._try_start()
        self.notifier.ready(self._report_status(self._status()))
        log.info("%s ready", self.service.name)
        interval = min(self.notifier.watchdog_interval or HEARTBEAT_EVERY_S, HEARTBEAT_EVERY_S)
        last_ping = float("-inf")
        next_start = time.monotonic() + self._start_backoff
        try:
            while not self.stop_event.is_set():
                if started:
                    healthy, wait = self._step()
                elif time.monotonic() >= next_start:
                    started = self._try_start()
                    next_start = time.monotonic() + self._start_backoff
                    healthy, wait = True, 0.0 if started else self._start_backoff
                else:
                    healthy, wait = True, next_start - time.monotonic()
                now = time.monotonic()
                if healthy and now - last_ping >= interval:
                    self.notifier.watchdog()
                    self.heartbeat.beat()
                    last_ping = now
                self.notifier.status(self._report_status(self._status()))
                self._write_runtime_status(started)
                if wait > 0:
                    if healthy:
                        wait = min(wait, max(0.0, last_ping + interval - time.monotonic()))
                    self._wait(wait)
        finally:
            self._shutdown()
        return 0

    def _report_status(self, text: str, force: bool = False) -> str:
        """Store the STATUS= line through the service (throttled: it is a database write)."""
        store = getattr(self.service, "report_status", None)
        now = time.monotonic()
        due = force or now - self._stored_at >= STATUS_STORE_EVERY_S
        if store is not None and text != self._stored_status and due:
            try:
                store(text)
                self._stored_status, self._stored_at = text, now
            except Exception as e:  # noqa: BLE001 - only a report; the next change tries again
                log.debug("cannot store the status line: %s", e)
        return text

    def _try_start(self) -> bool:
        """Run `start()`; on a transient fault remember why, clean up, and let the loop retry."""
        try:
            self.service.start()
        except Exception as e:
            if not start_fault(e):
                raise
            if self.state_dir is not None and is_full(e):
                release_reserve(self.state_dir)
            text = f"cannot start yet: {describe(e)}"
            if text != self._start_fault:
                log.warning("%s %s; retrying", self.service.name, text)
            self._start_fault = text
            self._start_backoff = min(START_BACKOFF_MAX_S, self._start_backoff * 2 or START_BACKOFF_INITIAL_S)
            try:
                self.service.stop()
            except Exception as stop_error:  # noqa: BLE001 - a half-started service may not stop cleanly
                log.debug("stop after a failed start: %s", stop_error)
            return False
        if self._start_fault:
            log.info("%s started after: %s", self.service.name, self._start_fault)
        self._start_fault = None
        self._start_backoff = 0.0
        return True

    def _status(self) -> str:
        if self._start_fault:
            return f"waiting: {self._start_fault} (retrying every {self._start_backoff:.0f} s at most)"
        return self.service.status()

    def _write_runtime_status(self, started: bool) -> None:
        health = service_health(self.service) if started else {}
        self.runtime_status.update(self._start_fault or health.get("fault"), health.get("files"))

    def _wait(self, timeout: float) -> None:
        """Sleep until the timeout, a stop request, or one of the service's fds is readable."""
        fds = [self._wake_r, *service_fds(self.service)]
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def _step(self) -> tuple[bool, float]:
        try:
            result = self.service.step()
            self._errors_in_row = 0
            return result
        except Exception as e:  # noqa: BLE001 - a daemon's loop must survive any one failure
            self._errors_in_row += 1
            text = f"{type(e).__name__}: {e}"
            log.error("%s loop failed (%d in a row): %s\n%s", self.service.name, self._errors_in_row, text,
                      traceback.format_exc().rstrip())
            try:
                self.service.report_error(text)
            except Exception:  # noqa: BLE001 - reporting must not fail the loop a second time
                pass
            return False, min(ERROR_BACKOFF_MAX_S, 0.1 * 2 ** min(self._errors_in_row, 6))

    def _shutdown(self) -> None:
        self.notifier.stopping(self._report_status(f"{self.service.name} stopping", force=True))

        def hard_exit() -> None:
            log.critical("shutdown took longer than %.0f s, exiting hard", SHUTDOWN_TIMEOUT_S)
            os._exit(1)

        timer = threading.Timer(SHUTDOWN_TIMEOUT_S, hard_exit)
        timer.daemon = True
        timer.start()
        try:
            self.service.stop()
        finally:
            timer.cancel()
            self.heartbeat.clear()
            self.runtime_status.clear()
        log.info("%s stopped", self.service.name)


class AlreadyRunning(Exception):
    pass


def serve(cfg: Config, name: str, make: Callable[[Config], Service]) -> int:
    """Run daemon `name` in the foreground: one instance at a time, its service made once the lock is held."""
    single_instance(cfg.runtime_dir, name)
    runner = Runner(make(cfg), cfg.runtime_dir, state_dir=cfg.state_dir)
    runner.install_signals()
    return runner.run()


def single_instance(runtime_dir: Path, name: str) -> int:
    """Hold an exclusive lock for the life of the process: two forwarders (or two bridges
    fighting over one MQTT session) would break the exactly-once moves. Returns the fd."""
    import fcntl

    runtime_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(runtime_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another gatewayd {name} is running (lock {runtime_dir / (name + '.lock')})") from None
    return fd
