"""End to end: ThingsBoard simulator + mosquitto + bridge + supervisor + a real Docker engine.

ThingsBoard's side (RPC, shared attributes, an OTA package served in chunks) comes from
the simulator (tests/tbsim); gatewayd's bridge carries it to the supervisor through queues.db.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import MOSQUITTO_BIN, start_mosquitto, start_simulator
from tests.helpers.daemons import Daemon, wait_for, write_config
from tests.helpers.docker_env import (
    build_image,
    container_state,
    docker,
    remove_images,
)
from tests.helpers.supervisor_env import controller_name, controller_section, dockerfile

pytestmark = [pytest.mark.integration, pytest.mark.docker]

DEVICE = "supervisor-e2e"
TOKEN = "supervisor-e2e-token"


@pytest.fixture
def world(tmp_path: Path, docker_engine: Any) -> Iterator[dict[str, Any]]:
    if not os.path.exists(MOSQUITTO_BIN):
        pytest.skip("mosquitto is not installed")
    with controller_name() as name:
        broker = start_mosquitto(tmp_path)
        daemons: list[Daemon] = []
        sim = None
        try:
            sim = start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN})
            build_image(f"{name}:1", dockerfile("one"))
            cfg = write_config(tmp_path / "gw", {
                "thingsboard": {"host": "127.0.0.1", "port": sim.port, "access_token": TOKEN, "device_name": DEVICE,
                                "reconnect_max_s": 1.0},
                "controller": controller_section(name, image=f"{name}:1"),
                "supervisor": {"telemetry_interval_s": 2, "udev": False},
            })
            for which in ("bridge", "supervisor"):
                daemons.append(Daemon(which, cfg).start())
            yield {"sim": sim, "name": name, "base": tmp_path / "gw", "daemons": daemons}
        finally:
            for d in daemons:
                d.stop()
            if sim is not None:
                sim.stop()
            broker.stop()


def sw_states(sim: Any) -> list[tuple[str, str | None]]:
    return [(r["values"]["sw_state"], r["values"].get("sw_version")) for r in sim.client.telemetry(DEVICE)
            if "sw_state" in r["values"]]


def test_rpc_and_ota_package_through_bridge_and_simulator(world: dict[str, Any], tmp_path: Path) -> None:
    sim, name = world["sim"], world["name"]
    wait_for(lambda: (container_state(name) or {}).get("status") == "running", 30, what="controller running")
    # a server-side RPC answered through the whole chain
    assert sim.client.rpc(DEVICE, "ping", {}, timeout=10)["pong"] is True
    assert "unknown method" in sim.client.rpc(DEVICE, "nope", {}, timeout=10)["error"]
    # device telemetry arrives at "ThingsBoard"
    wait_for(lambda: any("controller_state" in r["values"] for r in sim.client.telemetry(DEVICE)), 15,
             what="supervisor telemetry at the server")
    # an OTA package: the image of version 2 as a `docker save` archive
    ref = f"{name}-pkg:2"
    build_image(ref, dockerfile("two"))
    archive = tmp_path / "pkg.tar"
    docker("save", "-o", str(archive), ref)
    remove_images(ref)
    data = archive.read_bytes()
    # first served corrupted: the checksum refuses it
    sim.client.set_package(DEVICE, "ctl", "2", data=data, corrupt=True)
    wait_for(lambda: ("FAILED", "2") in sw_states(sim), 60, what="FAILED for the corrupt package")
    failed = [r["values"] for r in sim.client.telemetry(DEVICE) if r["values"].get("sw_state") == "FAILED"][-1]
    assert "checksum mismatch" in failed["sw_error"]
    # then intact (a new version number, since a failed request is not retried)
    sim.client.set_package(DEVICE, "ctl", "2.0.1", data=data)
    wait_for(lambda: ("UPDATED", "2.0.1") in sw_states(sim), 90, what="UPDATED")
    assert [s for s, v in sw_states(sim) if v == "2.0.1"] == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING",
                                                              "UPDATED"]
    data_dir = world["base"] / "controller"
    wait_for(lambda: (data_dir / "version").read_text().strip() == "two", 10, what="version two running")
    assert sim.client.stats(DEVICE)["chunk_requests"] >= len(data) // 32768
    current = [r["values"] for r in sim.client.telemetry(DEVICE) if "current_sw_version" in r["values"]][-1]
    assert current["current_sw_version"] == "2.0.1"
