"""A device installed with no controller configured gets its first one from ThingsBoard.

mosquitto + the ThingsBoard simulator + the bridge + the supervisor + a real Docker engine;
`[controller]` names no image and no repository. ThingsBoard then names the controller with
`sw_title` / `sw_version`: an image on the device (made with `docker import`), or an OTA
package (a `docker save` archive fetched over MQTT in chunks). It runs, and keeps running
across a restart of the supervisor without being fetched again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import load
from gatewayd.store import queues
from tests.helpers.brokers import MOSQUITTO_BIN, thingsboard
from tests.helpers.daemons import Daemon, wait_for, write_config
from tests.helpers.docker_env import (
    build_image,
    container_state,
    docker,
    import_image,
    remove_images,
)
from tests.helpers.supervisor_env import LOOP, controller_name, controller_section, dockerfile

pytestmark = [pytest.mark.integration, pytest.mark.docker]

DEVICE = "first-controller"
TOKEN = "first-controller-token"


class World:
    def __init__(self, sim: Any, name: str, base: Path, bridge: Daemon, supervisor: Daemon):
        self.sim, self.name, self.base, self.bridge, self.supervisor = sim, name, base, bridge, supervisor
        self.cfg = load(base / "gatewayd.toml", env={})

    def sw_states(self) -> list[tuple[str, str | None]]:
        return [(r["values"]["sw_state"], r["values"].get("sw_version")) for r in self.sim.client.telemetry(DEVICE)
                if "sw_state" in r["values"]]

    def controller_state(self) -> dict[str, Any]:
        conn = queues.open_queues(self.cfg.queues_db, check=False)
        try:
            return dict(queues.get_state(conn, "supervisor.controller") or {})
        finally:
            conn.close()

    def version_file(self) -> str:
        try:
            return (self.base / "controller" / "version").read_text().strip()
        except FileNotFoundError:
            return ""


@pytest.fixture
def world(tmp_path: Path, docker_engine: Any) -> Iterator[World]:
    if not os.path.exists(MOSQUITTO_BIN):
        pytest.skip("mosquitto is not installed")
    with controller_name("gwfirst") as name, thingsboard(tmp_path, devices={DEVICE: TOKEN}) as (_broker, sim):
        base = tmp_path / "gw"
        cfg = write_config(base, {
            "thingsboard": {"host": "127.0.0.1", "port": sim.port, "access_token": TOKEN, "device_name": DEVICE,
                            "reconnect_max_s": 1.0},
            "controller": controller_section(name),  # no image, no repository
            "supervisor": {"telemetry_interval_s": 2, "udev": False},
            "logging": {"forward_level": "warning"},
        })
        bridge = Daemon("bridge", cfg)
        supervisor = Daemon("supervisor", cfg)
        try:
            bridge.start()
            supervisor.start()
            w = World(sim, name, base, bridge, supervisor)
            supervisor.wait_log("waiting for sw_title / sw_version from ThingsBoard", 30)
            assert w.controller_state()["state"] == "waiting_for_image"
            assert container_state(name) is None
            yield w
        finally:
            supervisor.stop()
            bridge.stop()


def test_first_controller_from_an_image_reference(world: World) -> None:
    ref = f"{world.name}-imported"
    import_image(f"{ref}:1", [f"CMD {json.dumps(['/bin/sh', '-c', LOOP.format(v='imported-one')])}"])
    world.sim.client.set_shared_attributes(DEVICE, {"sw_title": ref, "sw_version": "1"})
    wait_for(lambda: ("UPDATED", "1") in world.sw_states(), 90, what="UPDATED")
    assert [s for s, v in world.sw_states() if v == "1"] == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING",
                                                             "UPDATED"]
    wait_for(lambda: world.version_file() == "imported-one", 20, what="the imported controller running")
    st = container_state(world.name)
    assert st is not None and st["status"] == "running"
    assert st["image"] == docker("image", "inspect", "--format", "{{.Id}}", f"{ref}:1").stdout.strip()
    # a restart of the supervisor adopts the running controller: no new update, same container
    world.supervisor.stop()
    world.supervisor.start()
    wait_for(lambda: world.controller_state().get("state") == "running", 30, what="controller adopted")
    after = container_state(world.name)
    assert after is not None and (after["id"], after["started_at"]) == (st["id"], st["started_at"])
    assert world.sw_states().count(("UPDATED", "1")) == 1
    assert "waiting for sw_title" not in world.supervisor.log().split("supervisor stopped")[-1]


def test_first_controller_from_an_ota_package(world: World, tmp_path: Path) -> None:
    pkg = f"{world.name}-pkg:2"
    build_image(pkg, dockerfile("pkg-two"))
    archive = tmp_path / "pkg.tar"
    docker("save", "-o", str(archive), pkg)
    remove_images(pkg)
    data = archive.read_bytes()
    world.sim.client.set_package(DEVICE, "ctl", "2", data=data)
    wait_for(lambda: ("UPDATED", "2") in world.sw_states(), 120, what="UPDATED")
    assert [s for s, v in world.sw_states() if v == "2"] == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING",
                                                             "UPDATED"]
    assert world.sim.client.stats(DEVICE)["chunk_requests"] >= len(data) // 32768
    wait_for(lambda: world.version_file() == "pkg-two", 20, what="the packaged controller running")
    current = [r["values"] for r in world.sim.client.telemetry(DEVICE) if "current_sw_version" in r["values"]]
    assert current[-1]["current_sw_version"] == "2" and current[-1]["current_sw_title"] == "ctl"
    st = container_state(world.name)
    assert st is not None and st["status"] == "running"


def test_a_first_controller_that_fails_is_removed_and_the_next_one_runs(world: World) -> None:
    ref = f"{world.name}-imported"
    import_image(f"{ref}:bad", ["CMD [\"/bin/sh\", \"-c\", \"echo broken; exit 3\"]"])
    world.sim.client.set_shared_attributes(DEVICE, {"sw_title": ref, "sw_version": "bad"})
    wait_for(lambda: ("FAILED", "bad") in world.sw_states(), 60, what="FAILED")
    failed = [r["values"] for r in world.sim.client.telemetry(DEVICE) if r["values"].get("sw_state") == "FAILED"]
    assert "exited with code 3" in failed[-1]["sw_error"]
    # the error reached ThingsBoard as a forwarded log line too
    wait_for(lambda: [r for r in world.sim.client.telemetry(DEVICE)
                      if r["values"].get("gw_log_level") == "error" and r["values"]["gw_log_daemon"] == "supervisor"
                      and "software update: FAILED" in r["values"]["gw_log_message"]], 20, what="the forwarded error")
    # nothing to go back to: no container is left crash-looping
    wait_for(lambda: container_state(world.name) is None, 30, what="the failed container removed")
    wait_for(lambda: world.controller_state().get("state") == "waiting_for_image", 10, what="waiting again")
    import_image(f"{ref}:good", [f"CMD {json.dumps(['/bin/sh', '-c', LOOP.format(v='good')])}"])
    world.sim.client.set_shared_attributes(DEVICE, {"sw_version": "good"})
    wait_for(lambda: ("UPDATED", "good") in world.sw_states(), 90, what="UPDATED")
    wait_for(lambda: world.version_file() == "good", 20, what="the good controller running")
