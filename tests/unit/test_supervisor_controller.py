"""Controller lifecycle logic with a fake Docker and a fake clock (the real engine: integration tests)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import load
from gatewayd.supervisor.controller import ControllerManager, Target, backoff_delay, build_spec
from gatewayd.supervisor.docker_api import (
    LABEL_SPEC,
    ContainerInfo,
    ContainerSpec,
    DockerError,
    parse_mount,
    parse_time_ms,
    safe_tag,
    split_image_ref,
)
from tests.helpers.daemons import write_config


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000_000

    def monotonic(self) -> float:
        return self.mono

    def wall_ms(self) -> int:
        return self.wall

    def advance(self, s: float) -> None:
        self.mono += s
        self.wall += int(s * 1000)


class FakeDocker:
    """Just enough of docker_api.Docker: one named container."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.c: dict[str, Any] | None = None
        self.calls: list[str] = []
        self.fail_create: str | None = None
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise DockerError("cannot reach the Docker engine")

    def info(self) -> ContainerInfo | None:
        if self.c is None:
            return None
        return ContainerInfo(id="abc123", name="ctl", image_id=self.c["image_id"], status=self.c["status"],
                             exit_code=self.c.get("exit_code"), started_ms=self.c.get("started_ms"),
                             finished_ms=self.c.get("finished_ms"), health=self.c.get("health"),
                             labels=self.c["labels"])

    def inspect(self, name: str) -> ContainerInfo | None:
        self._check()
        return self.info()

    def create_and_start(self, spec: ContainerSpec, image_id: str) -> ContainerInfo:
        self._check()
        self.calls.append(f"create {image_id}")
        if self.fail_create:
            raise DockerError(self.fail_create)
        self.c = {"image_id": image_id, "status": "running", "started_ms": self.clock.wall, "finished_ms": None,
                  "labels": {LABEL_SPEC: spec.digest(image_id)}}
        info = self.info()
        assert info is not None
        return info

    def start(self, name: str) -> None:
        self._check()
        self.calls.append("start")
        assert self.c is not None
        self.c.update(status="running", started_ms=self.clock.wall, health=None)

    def stop(self, name: str, timeout_s: float) -> None:
        self.calls.append("stop")
        assert self.c is not None
        if self.c["status"] == "running":
            self.exit(137)

    def remove(self, name: str) -> None:
        self.calls.append("remove")
        self.c = None

    def exit(self, code: int) -> None:
        assert self.c is not None
        self.c.update(status="exited", exit_code=code, finished_ms=self.clock.wall)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def env(tmp_path: Path) -> tuple[ControllerManager, FakeDocker, Clock]:
    cfg = load(write_config(tmp_path, {"controller": {
        "enabled": True, "image": "ctl:1", "container_name": "ctl", "restart_backoff_initial_s": 1,
        "restart_backoff_max_s": 4, "crash_loop_threshold": 3, "restart_reset_after_s": 20,
        "health_check_max_age_s": 30, "mounts": ["/srv/a:/a:ro", "bad-mount"]}}), env={})
    clock = Clock()
    fake = FakeDocker(clock)
    mgr = ControllerManager(cfg, docker=fake, clock=clock.monotonic, wall_ms=clock.wall_ms)
    return mgr, fake, clock


T1 = Target(image="ctl:1", image_id="sha256:one", version="1")
T2 = Target(image="ctl:2", image_id="sha256:two", version="2")


def test_backoff_doubles_to_the_cap() -> None:
    assert [backoff_delay(n, 10, 300) for n in range(0, 8)] == [0, 10, 20, 40, 80, 160, 300, 300]
    assert backoff_delay(1000, 10, 300) == 300


def test_spec_from_config_mounts_data_dir_and_reports_bad_mounts(env: Any, tmp_path: Path) -> None:
    mgr, _, _ = env
    assert mgr.spec_problems and "bad-mount" in mgr.spec_problems[0]
    binds = dict((h, (t, m)) for h, t, m in mgr.base_spec.binds)
    assert binds[str(tmp_path / "controller")] == ("/data", "rw")
    assert binds["/srv/a"] == ("/a", "ro")
    cfg = mgr.cfg
    s1, _ = build_spec(cfg)
    assert s1.digest("x") == s1.digest("x") != s1.digest("y")


def test_waits_for_an_image_then_creates_and_adopts(env: Any) -> None:
    mgr, fake, _ = env
    mgr.tick()
    assert mgr.snapshot()["state"] == "waiting_for_image" and fake.calls == []
    fut = mgr.set_target(T1)
    mgr.tick()
    assert fut.done() and fut.result["changed"]
    assert fake.calls == ["create sha256:one"]
    assert mgr.snapshot()["state"] == "running"
    # a second manager (supervisor restarted) adopts the running container: nothing restarted
    mgr2 = ControllerManager(mgr.cfg, docker=fake, clock=mgr.clock, wall_ms=mgr.wall_ms)
    mgr2.set_target(T1)
    mgr2.tick()
    mgr2.tick()
    assert fake.calls == ["create sha256:one"]
    assert mgr2.snapshot()["restarts"] == 0


def test_same_target_again_changes_nothing(env: Any) -> None:
    mgr, fake, _ = env
    mgr.set_target(T1)
    mgr.tick()
    fut = mgr.set_target(Target(image="ctl:1", image_id="sha256:one", version="1"))
    mgr.tick()
    assert fut.result["changed"] is False
    assert fake.calls == ["create sha256:one"]


def test_new_target_recreates(env: Any) -> None:
    mgr, fake, _ = env
    mgr.set_target(T1)
    mgr.tick()
    mgr.set_target(T2)
    mgr.tick()
    assert fake.calls == ["create sha256:one", "stop", "remove", "create sha256:two"]
    assert mgr.snapshot()["version"] == "2"


def test_crash_restarts_with_growing_delays_and_crash_loop(env: Any) -> None:
    mgr, fake, clock = env
    mgr.set_target(T1)
    mgr.tick()
    delays = []
    for _ in range(4):
        fake.exit(1)
        mgr.tick()  # sees the exit: a failure, start scheduled
        t0 = clock.mono
        starts_before = fake.calls.count("start")
        while fake.calls.count("start") == starts_before:
            clock.advance(0.25)
            mgr.tick()
            assert clock.mono - t0 < 10
        delays.append(round(clock.mono - t0))
    assert delays == [1, 2, 4, 4]
    snap = mgr.snapshot()
    assert snap["restarts"] == 4 and snap["failures_in_row"] == 4 and snap["failures_total"] == 4
    events = []
    while not mgr.events.empty():
        events.append(mgr.events.get())
    assert [k for k, _ in events].count("crash_loop") == 1
    assert "exited with code 1" in events[-1][1] or "crash-looping" in events[2][1]
    fake.exit(1)
    mgr.tick()
    assert mgr.snapshot()["state"] == "crash_loop"
    # running long enough clears the count
    clock.advance(4)
    mgr.tick()
    clock.advance(21)
    mgr.tick()
    assert mgr.snapshot()["failures_in_row"] == 0


def test_exit_found_at_startup_starts_at_once(env: Any) -> None:
    mgr, fake, _ = env
    mgr.set_target(T1)
    mgr.tick()
    fake.exit(0)
    mgr2 = ControllerManager(mgr.cfg, docker=fake, clock=mgr.clock, wall_ms=mgr.wall_ms)
    mgr2.set_target(T1)
    mgr2.tick()
    assert fake.calls[-1] == "start"
    assert mgr2.snapshot()["failures_total"] == 0


def test_unhealthy_is_a_failure_and_restarts(env: Any) -> None:
    mgr, fake, clock = env
    mgr.set_target(T1)
    mgr.tick()
    fake.c["health"] = "unhealthy"
    mgr.tick()
    assert fake.calls[-1] == "stop"
    assert mgr.snapshot()["last_failure"] == "Docker HEALTHCHECK reports unhealthy"
    clock.advance(1.1)
    mgr.tick()
    assert fake.calls[-1] == "start"
    assert mgr.snapshot()["failures_total"] == 1  # our own stop is not counted as a second failure


def _health(path: Path, ms: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS health_check(id INTEGER PRIMARY KEY, timestamp_ms INTEGER)")
    conn.execute("INSERT OR REPLACE INTO health_check(id, timestamp_ms) VALUES (1, ?)", (ms,))
    conn.commit()
    conn.close()


def test_stale_health_check_restarts(env: Any) -> None:
    mgr, fake, clock = env
    mgr.set_target(T1)
    mgr.tick()
    _health(mgr.hc_path, clock.wall)
    clock.advance(25)
    _health(mgr.hc_path, clock.wall)  # fresh: no restart
    clock.advance(25)
    mgr.tick()
    assert "stop" not in fake.calls
    clock.advance(10)  # 35 s since the last health check > 30
    mgr.tick()
    assert fake.calls[-1] == "stop"
    assert "no health_check" in mgr.snapshot()["last_failure"]


def test_restart_stop_start_commands(env: Any) -> None:
    mgr, fake, _ = env
    mgr.set_target(T1)
    mgr.tick()
    f = mgr.restart("test")
    mgr.tick()
    assert f.result == {"restarted": True}
    assert fake.calls[-2:] == ["stop", "start"]
    assert mgr.snapshot()["restarts"] == 1 and mgr.snapshot()["failures_total"] == 0
    mgr.stop_container()
    mgr.tick()
    mgr.tick()
    assert mgr.snapshot()["state"] == "stopped" and fake.c["status"] == "exited"
    n = len(fake.calls)
    mgr.tick()
    assert len(fake.calls) == n  # stays stopped
    mgr.start_container()
    mgr.tick()
    assert fake.c["status"] == "running"


def test_create_failure_backs_off(env: Any) -> None:
    mgr, fake, clock = env
    fake.fail_create = "No such image: sha256:one"
    mgr.set_target(T1)
    mgr.tick()
    assert mgr.snapshot()["state"] == "backoff"
    n = len(fake.calls)
    mgr.tick()
    assert len(fake.calls) == n  # waits
    fake.fail_create = None
    clock.advance(1.1)
    mgr.tick()
    assert mgr.snapshot()["state"] == "running"


def test_docker_down_is_reported_by_the_thread(env: Any) -> None:
    mgr, fake, _ = env
    fake.down = True
    with pytest.raises(DockerError):
        mgr.tick()
    mgr._docker_unavailable("cannot reach the Docker engine")
    assert mgr.snapshot()["state"] == "docker_unavailable"


def test_docker_helpers() -> None:
    assert parse_time_ms("0001-01-01T00:00:00Z") is None
    assert parse_time_ms("2026-01-02T03:04:05.123456789Z") == 1767323045123
    assert parse_time_ms("2026-01-02T03:04:05+01:00") == 1767319445000
    assert parse_time_ms("garbage") is None
    assert split_image_ref("reg:5000/a/b:1.2") == ("reg:5000/a/b", "1.2")
    assert split_image_ref("reg:5000/a/b") == ("reg:5000/a/b", None)
    assert split_image_ref("a@sha256:00") == ("a", None)
    assert safe_tag("v1.2+build/7") == "v1.2_build_7"
    assert safe_tag("-x") == "v-x"
    assert parse_mount("/a:/b") == ("/a", "/b", "rw")
    with pytest.raises(ValueError):
        parse_mount("a:/b")
    info = ContainerInfo.from_attrs({"Id": "x", "Name": "/n", "Image": "sha256:i",
                                     "State": {"Status": "running", "StartedAt": "2026-01-02T03:04:05Z",
                                               "FinishedAt": "0001-01-01T00:00:00Z",
                                               "Health": {"Status": "healthy"}},
                                     "Config": {"Labels": {"a": "b"}}})
    assert info.running and info.health == "healthy" and info.name == "n" and info.finished_ms is None


def test_restart_before_an_image_is_ready_is_refused(env: Any) -> None:
    mgr, fake, _ = env
    f = mgr.restart("test")
    mgr.tick()
    assert f.error and "not ready" in f.error and fake.calls == []
