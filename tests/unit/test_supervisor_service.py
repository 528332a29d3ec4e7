"""Main-loop wiring: hot-plug handling, no Docker when the controller is disabled, jobs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gatewayd.supervisor.jobs import Jobs
from gatewayd.supervisor.system import DeviceReporter, Devices
from tests.helpers.daemons import ROOT, write_config


class FakeUdevDevice:
    def __init__(self, action: str, node: str):
        self.action = action
        self.subsystem = "tty"
        self.device_node = node
        self.device_type = None
        self.properties = {"ID_BUS": "usb", "ID_VENDOR_ID": "0403", "ID_MODEL_ID": "6001"}
        self.attributes: dict[str, bytes] = {}

    def find_parent(self, *a: Any) -> None:
        return None


class FakeMonitor:
    def __init__(self) -> None:
        self.events: list[FakeUdevDevice] = []

    def poll(self, timeout: float = 0) -> FakeUdevDevice | None:
        assert timeout == 0  # never blocks the loop
        return self.events.pop(0) if self.events else None


def test_hotplug_is_reported_and_restarts_the_controller() -> None:
    mon = FakeMonitor()
    inventory: list[dict[str, Any]] = []
    devices = Devices(monitor=mon, lister=lambda: list(inventory))
    published: list[dict[str, Any]] = []
    restarts: list[str] = []
    reporter = DeviceReporter(devices, ["0403:6001"], 65536, published.append, restarts.append)
    reporter.start()
    assert published == [{DeviceReporter.ATTRIBUTE: []}]
    now = time.monotonic()
    reporter.poll(now)
    assert restarts == []
    inventory.append({"subsystem": "tty", "devnode": "/dev/ttyUSB0", "id": "0403:6001"})
    mon.events.append(FakeUdevDevice("add", "/dev/ttyUSB0"))
    reporter.poll(now)
    assert restarts == ["device /dev/ttyUSB0 appeared"]
    reporter.poll(now + 0.5)  # debounced: not yet published
    assert len(published) == 1
    reporter.poll(now + 1.5)
    assert published[-1] == {DeviceReporter.ATTRIBUTE: inventory}
    # a removal is reported, and restarts nothing
    inventory.clear()
    mon.events.append(FakeUdevDevice("remove", "/dev/ttyUSB0"))
    reporter.poll(now + 3)
    reporter.poll(now + 5)
    assert published[-1] == {DeviceReporter.ATTRIBUTE: []}
    assert len(restarts) == 1


def test_disabled_controller_never_touches_docker(tmp_path: Path) -> None:
    cfgp = write_config(tmp_path, {"controller": {"enabled": False}, "supervisor": {"udev": False}})
    code = f"""
import sys
from gatewayd.config import load
from gatewayd.supervisor.service import Supervisor
s = Supervisor(load({str(cfgp)!r}, env={{}}))
s.start()
for _ in range(5):
    s.step()
s.stop()
print("docker" in sys.modules, "docker.api" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": "unix:///nonexistent.sock"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_jobs_run_in_the_background_and_report() -> None:
    jobs = Jobs(keep=2)

    def slow(x: int) -> int:
        time.sleep(0.3)
        return x * 2

    t0 = time.monotonic()
    j = jobs.submit("slow", slow, 21)
    assert time.monotonic() - t0 < 0.1 and not j.done() and j.summary()["state"] == "running"
    assert j.wait(5) and j.result == 42 and j.summary()["result"] == 42
    bad = jobs.submit("bad", lambda: 1 / 0)
    bad.wait(5)
    assert bad.state == "failed" and "division" in (bad.error or "")
    jobs.submit("third", lambda: None).wait(5)
    assert jobs.get(j.id) is None  # only the most recent are kept
    got = jobs.submit("with job", lambda job: job.id, pass_job=True)
    got.wait(5)
    assert got.result == got.id
