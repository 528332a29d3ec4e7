"""Keeps the controller container running: the controller thread.

This thread is the only code that changes the container. It inspects it every
`controller.poll_interval_s` and

- starts it when it is missing or stopped (a container found stopped at start-up is started
  at once; one that stops by itself is a failure);
- restarts it after a failure with exponential backoff (`restart_backoff_initial_s` doubling
  up to `restart_backoff_max_s`), never giving up; `crash_loop_threshold` failures in a row
  are reported as a crash loop; running for `restart_reset_after_s` clears the count;
- treats Docker's HEALTHCHECK `unhealthy` and a `health_check` row older than
  `health_check_max_age_s` (counted from the later of the last health check and the start)
  as failures: the container is stopped and restarted like after a crash;
- recreates it when its image or configuration changes (the `io.gatewayd.spec` label),
  which is how software updates and rollbacks switch versions. The same image arriving
  again changes nothing.

The main loop talks to it through commands (each answered with a `Future`) and reads a
snapshot; neither side ever waits for the other. Docker calls that can be slow (stop) run
here, never in the main loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gatewayd.clock import now_ms
from gatewayd.config import Config
from gatewayd.store.controller import read_health_check_ms
from gatewayd.supervisor.docker_api import (
    LABEL_SPEC,
    ContainerInfo,
    ContainerSpec,
    Docker,
    DockerError,
    parse_mount,
)
from gatewayd.supervisor.jobs import Future

log = logging.getLogger("gatewayd.supervisor")

_UNSET: Any = object()


@dataclass(frozen=True)
class Target:
    """The image the controller must run."""

    image: str  # reference shown to people ("ctl:1.2" or an id)
    image_id: str
    version: str = ""
    title: str = ""


class CommandRefused(Exception):
    """A command that cannot be carried out now (answered with an error, not a thread failure)."""


def backoff_delay(failures: int, initial_s: float, max_s: float) -> float:
    """Seconds before the next start after `failures` failures in a row (1 → initial)."""
    if failures <= 0:
        return 0.0
    return float(min(max_s, initial_s * (2 ** min(failures - 1, 30))))


def build_spec(cfg: Config, image: str = "", version: str = "") -> tuple[ContainerSpec, list[str]]:
    """The container spec from config; also the problems found (bad mounts are left out, loudly)."""
    c = cfg["controller"]
    problems: list[str] = []
    binds: list[tuple[str, str, str]] = [(str(cfg.controller_data_dir), c["data_mount_target"], "rw")]
    for m in c["mounts"]:
        try:
            binds.append(parse_mount(m))
        except ValueError as e:
            problems.append(f"[controller] mounts: {e}")
    env = tuple(sorted((str(k), "" if v is None else str(v)) for k, v in c["environment"].items()))
    spec = ContainerSpec(name=c["container_name"], image=image, command=tuple(c["command"]), environment=env,
                         binds=tuple(binds), network_mode=c["network_mode"], devices=tuple(c["devices"]),
                         version=version)
    return spec, problems


class Engine(Protocol):
    """What the manager asks of Docker (`docker_api.Docker`); unit tests hand in a fake."""

    def inspect(self, name: str) -> ContainerInfo | None: ...

    def create_and_start(self, spec: ContainerSpec, image_id: str) -> ContainerInfo: ...

    def start(self, name: str) -> None: ...

    def stop(self, name: str, timeout_s: float) -> None: ...

    def remove(self, name: str) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class ControllerManager:
    def __init__(self, cfg: Config, docker: Engine | None = None, restarts: int = 0,
                 clock: Callable[[], float] = time.monotonic, wall_ms: Callable[[], int] | None = None):
        c = cfg["controller"]
        self.cfg = cfg
        self.name: str = c["container_name"]
        self.poll_s: float = c["poll_interval_s"]
        self.stop_timeout_s: float = c["stop_timeout_s"]
        self.backoff_initial_s: float = c["restart_backoff_initial_s"]
        self.backoff_max_s: float = c["restart_backoff_max_s"]
        self.reset_after_s: float = c["restart_reset_after_s"]
        self.crash_loop_threshold: int = c["crash_loop_threshold"]
        self.hc_max_age_ms = int(c["health_check_max_age_s"] * 1000)
        self.hc_path = cfg.controller_db
        self.base_spec, self.spec_problems = build_spec(cfg)
        self.docker: Engine = docker or Docker(long_timeout_s=c["build_timeout_s"])
        self.clock = clock
        self.wall_ms = wall_ms or now_ms

        self.target: Target | None = None
        self.operator_stopped = False
        self.failures = 0
        self.failures_total = 0
        self.restarts = restarts
        self.starts = 0
        self.last_failure = ""
        self.next_start_at: float | None = None
        self._seen_finished: Any = _UNSET
        self._hc_ms: int | None = None
        self._hc_read_at = float("-inf")
        self._docker_error = ""
        self._crash_loop_reported = False
        self._info: ContainerInfo | None = None

        self._lock = threading.Lock()
        self._cmds: queue.SimpleQueue[tuple[str, Any, Future]] = queue.SimpleQueue()
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()  # (kind, text) for the main loop
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = "waiting_for_image"
        self._since_ms = self.wall_ms()
        self._last_tick_ms = 0

    # -- main-thread API ---------------------------------------------------------------
    def start_thread(self) -> None:
        self._stop.clear()  # a start retried after a failed one (the Runner stops the service in between)
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)
        self._thread.start()

    def stop_thread(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.docker.close()

    def _command(self, name: str, arg: Any = None) -> Future:
        fut = Future()
        self._cmds.put((name, arg, fut))
        self._wake.set()
        return fut

    def set_target(self, target: Target) -> Future:
        """Run this image (recreating the container if it runs another); result: failures_total before."""
        return self._command("target", target)

    def clear_target(self) -> Future:
        """Run nothing: stop and remove the container (a first version failed, none to go back to)."""
        return self._command("clear")

    def restart(self, reason: str) -> Future:
        return self._command("restart", reason)

    def stop_container(self) -> Future:
        return self._command("stop")

    def start_container(self) -> Future:
        return self._command("start")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            info = self._info
            t = self.target
            snap: dict[str, Any] = {
                "state": self._state,
                "since": self._since_ms,
                "restarts": self.restarts,
                "failures_in_row": self.failures,
                "failures_total": self.failures_total,
                "last_failure": self.last_failure or None,
                "image": t.image if t else None,
                "image_id": t.image_id if t else None,
                "version": t.version if t else None,
                "title": t.title if t else None,
                "container": self.name,
                "container_id": info.id[:12] if info else None,
                "status": info.status if info else None,
                "health": info.health if info else None,
                "exit_code": info.exit_code if info and not info.running else None,
                "started_ms": info.started_ms if info and info.running else None,
                "health_check_ms": self._hc_ms,
                "next_start_ms": None,
                "operator_stopped": self.operator_stopped,
                "docker_error": self._docker_error or None,
                "last_tick_ms": self._last_tick_ms,
            }
            if self.next_start_at is not None:
                snap["next_start_ms"] = self.wall_ms() + int(max(0.0, self.next_start_at - self.clock()) * 1000)
        return snap

    # -- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        error_wait = self.poll_s
        while not self._stop.is_set():
            try:
                self.tick()
                error_wait = self.poll_s
                wait = self.poll_s
            except DockerError as e:
                self._docker_unavailable(str(e))
                error_wait = min(max(error_wait * 2, self.poll_s), 30.0)
                wait = error_wait
            except Exception:
                log.exception("controller thread: unexpected error")
                wait = max(self.poll_s, 1.0)
            self._wake.wait(wait)
            self._wake.clear()

    def _docker_unavailable(self, text: str) -> None:
        if text != self._docker_error:
            log.error("Docker: %s", text)
            self.events.put(("error", f"Docker: {text}"))
        with self._lock:
            self._docker_error = text
        self._set_state("docker_unavailable")
        self.docker.reset()

    def _set_state(self, state: str) -> None:
        with self._lock:
            if state != self._state:
                self._state = state
                self._since_ms = self.wall_ms()

    def _set_info(self, info: ContainerInfo | None) -> None:
        with self._lock:
            self._info = info
            self._docker_error = ""
            self._last_tick_ms = self.wall_ms()

    def tick(self) -> None:
        """One inspection and whatever it calls for (commands first)."""
        while True:
            try:
                name, arg, fut = self._cmds.get_nowait()
            except queue.Empty:
                break
            try:
                fut.set(result=self._do_command(name, arg))
            except CommandRefused as e:
                fut.set(error=str(e))
            except DockerError as e:
                fut.set(error=str(e))
                raise
            except Exception as e:
                fut.set(error=f"{type(e).__name__}: {e}")
                raise
        self._reconcile()

    def _do_command(self, name: str, arg: Any) -> Any:
        if name == "target":
            assert isinstance(arg, Target)
            before = self.failures_total
            changed = self.target is None or self.target.image_id != arg.image_id
            with self._lock:
                self.target = arg
            if changed:
                # A new version starts with a clean slate; the old one's failures are not its own.
                self.failures = 0
                self.next_start_at = None
                self._crash_loop_reported = False
            self._reconcile()
            return {"failures_total_before": before, "changed": changed}
        if name == "clear":
            with self._lock:
                self.target = None
                self.failures = 0
            self.next_start_at = None
            self._crash_loop_reported = False
            info = self.docker.inspect(self.name)
            if info is not None:
                if info.running:
                    self._stop_container()
                self.docker.remove(self.name)
            self._reconcile()
            return {"failures_total_before": self.failures_total, "changed": info is not None}
        if name in ("restart", "start") and self.target is None:
            raise CommandRefused("the controller image is not ready yet (see the supervisor's log)")
        if name == "restart":
            reason = str(arg)
            log.info("restarting the controller: %s", reason)
            with self._lock:
                self.operator_stopped = False
            info = self.docker.inspect(self.name)
            if info is not None and info.running:
                self._stop_container()
            self.next_start_at = self.clock()
            self._count_restart()
            self._reconcile(counted=True)
            return {"restarted": True}
        if name == "stop":
            with self._lock:
                self.operator_stopped = True
            info = self.docker.inspect(self.name)
            if info is not None and info.running:
                self._stop_container()
            self._reconcile()
            return {"stopped": True}
        if name == "start":
            with self._lock:
                self.operator_stopped = False
            self.next_start_at = self.clock()
            self._reconcile()
            return {"started": True}
        raise ValueError(f"unknown controller command {name}")

    def _count_restart(self) -> None:
        with self._lock:
            self.restarts += 1

    def _stop_container(self) -> None:
        self.docker.stop(self.name, self.stop_timeout_s)
        after = self.docker.inspect(self.name)
        self._seen_finished = after.finished_ms if after else None
        self._set_info(after)

    def _health_check_ms(self) -> int | None:
        now = self.clock()
        interval = min(5.0, max(self.hc_max_age_ms / 4000.0, 0.2))
        if now - self._hc_read_at >= interval:
            self._hc_read_at = now
            value = read_health_check_ms(self.hc_path)
            with self._lock:
                self._hc_ms = value
        return self._hc_ms

    def _failure(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            self.failures_total += 1
            self.last_failure = reason
        delay = backoff_delay(self.failures, self.backoff_initial_s, self.backoff_max_s)
        self.next_start_at = self.clock() + delay
        if self.failures >= self.crash_loop_threshold:
            text = (f"controller is crash-looping: {self.failures} failures in a row, last: {reason}; "
                    f"next start in {delay:.0f} s")
            log.error("%s", text)
            if not self._crash_loop_reported:
                self._crash_loop_reported = True
                self.events.put(("crash_loop", text))
        else:
            log.warning("controller failed (%s); restarting in %.1f s", reason, delay)
            self.events.put(("failure", reason))

    def _desired_spec(self) -> ContainerSpec:
        assert self.target is not None
        b = self.base_spec
        return ContainerSpec(name=b.name, image=self.target.image, command=b.command, environment=b.environment,
                             binds=b.binds, network_mode=b.network_mode, devices=b.devices,
                             version=self.target.version)

    def _create(self, counted: bool) -> None:
        assert self.target is not None
        spec = self._desired_spec()
        try:
            info = self.docker.create_and_start(spec, self.target.image_id)
        except DockerError as e:
            if "Conflict" in str(e) or "already in use" in str(e):
                raise
            self._failure(f"cannot start container: {e}")
            self._set_state("crash_loop" if self.failures >= self.crash_loop_threshold else "backoff")
            return
        self.starts += 1
        self._seen_finished = None
        self.next_start_at = None
        self._set_info(info)
        log.info("controller container %s started (image %s%s)%s", self.name, self.target.image,
                 f", version {self.target.version}" if self.target.version else "",
                 "" if not counted else f", restart #{self.restarts}")
        self._set_state("starting" if info.health == "starting" else "running" if info.running else "exited")

    def _reconcile(self, counted: bool = False) -> None:
        if self.target is None:
            self._set_info(self.docker.inspect(self.name))
            self._set_state("waiting_for_image")
            return
        info = self.docker.inspect(self.name)
        self._set_info(info)
        now = self.clock()
        if self.operator_stopped:
            if info is not None and info.running:
                self._stop_container()
            self._set_state("stopped")
            return
        if info is None:
            if self.next_start_at is not None and now < self.next_start_at:
                self._set_state("crash_loop" if self.failures >= self.crash_loop_threshold else "backoff")
                return
            self._create(counted)
            return
        digest = self._desired_spec().digest(self.target.image_id)
        if info.labels.get(LABEL_SPEC) != digest:
            why = ("runs another image" if info.image_id != self.target.image_id
                   else "was created with another configuration")
            log.info("controller container %s %s; recreating it", self.name, why)
            if info.running:
                self._stop_container()
            self.docker.remove(self.name)
            self._create(counted)
            return
        if info.running:
            self._check_running(info, now)
            return
        # Not running: count a stop we did not cause as a failure, then start when due.
        if self._seen_finished is _UNSET:
            self._seen_finished = info.finished_ms  # found stopped at start-up: start it now
        elif info.finished_ms != self._seen_finished:
            self._seen_finished = info.finished_ms
            detail = f"exited with code {info.exit_code}"
            if info.oom_killed:
                detail += " (out of memory)"
            if info.error:
                detail += f": {info.error}"
            self._failure(detail)
        if self.next_start_at is not None and now < self.next_start_at:
            self._set_state("crash_loop" if self.failures >= self.crash_loop_threshold else "backoff")
            return
        try:
            self.docker.start(self.name)
        except DockerError as e:
            self._failure(f"cannot start container: {e}")
            return
        self.starts += 1
        if not counted:
            self._count_restart()
        self.next_start_at = None
        info = self.docker.inspect(self.name)
        self._set_info(info)
        log.info("controller container %s started again (restart #%d)", self.name, self.restarts)
        self._set_state("starting" if info is not None and info.health == "starting" else "running")

    def _check_running(self, info: ContainerInfo, now: float) -> None:
        if self._seen_finished is _UNSET:
            self._seen_finished = info.finished_ms
        if info.health == "unhealthy":
            self._set_state("unhealthy")
            self._failure("Docker HEALTHCHECK reports unhealthy")
            self._stop_container()
            return
        hc = self._health_check_ms()
        wall = self.wall_ms()
        alive = max(hc or 0, info.started_ms or 0)
        if alive and wall - alive > self.hc_max_age_ms:
            age = (wall - alive) / 1000
            self._failure(f"no health_check for {age:.0f} s (limit {self.hc_max_age_ms / 1000:.0f} s)")
            self._stop_container()
            return
        if self.failures and info.started_ms and wall - info.started_ms >= self.reset_after_s * 1000:
            log.info("controller has run for %.0f s; clearing %d failure(s)", self.reset_after_s, self.failures)
            with self._lock:
                self.failures = 0
            self._crash_loop_reported = False
        self._set_state("starting" if info.health == "starting" else "running")
