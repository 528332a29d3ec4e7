"""The supervisor as a real process against a real Docker engine (offline images built by `docker import`).

Every test uses its own container and image names and removes them afterwards; the engine is
started by the `docker_engine` fixture if it is not running (and stopped again only then).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.store import controller as controller_store
from tests.helpers.daemons import ROOT, wait_for
from tests.helpers.docker_env import (
    BridgeSide,
    NotifySocket,
    build_image,
    container_state,
    docker,
    remove_images,
)
from tests.helpers.supervisor_env import (
    SupervisorEnv,
    controller_name,
    controller_section,
    dockerfile,
    merge_sections,
)

pytestmark = [pytest.mark.integration, pytest.mark.docker]


class Sup(SupervisorEnv):
    """A supervisor running the controller container `controller["container_name"]`."""

    def __init__(self, base: Path, controller: dict[str, Any], supervisor: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None):
        self.name = controller["container_name"]
        defaults: dict[str, dict[str, Any]] = {
            "controller": controller_section(self.name, build_network_mode="none", restart_backoff_initial_s=1,
                                             restart_backoff_max_s=4),
            "supervisor": {"telemetry_interval_s": 1, "udev": False, "rpc_reply_deadline_s": 8},
        }
        super().__init__(base, merge_sections(defaults, {"controller": controller, "supervisor": supervisor or {}}),
                         env=env)

    def state(self) -> dict[str, Any]:
        return container_state(self.name) or {}

    def wait_running(self, timeout: float = 30.0, other_than: str | None = None) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            st = self.state()
            if st.get("status") == "running" and st.get("started_at") != other_than:
                return st
            return None

        st: dict[str, Any] = wait_for(ok, timeout, interval=0.1, what=f"container {self.name} running")
        return st

    def controller_state(self) -> dict[str, Any]:
        from gatewayd.store import queues

        doc: dict[str, Any] = queues.get_state(self.b.conn, "supervisor.controller") or {}
        return doc


@pytest.fixture
def names(docker_engine: Any) -> Iterator[str]:
    with controller_name() as name:
        yield name


@pytest.fixture
def cleanup() -> Iterator[list[Sup]]:
    sups: list[Sup] = []
    try:
        yield sups
    finally:
        for s in sups:
            s.stop()


def test_container_started_kept_running_and_commands(names: str, tmp_path: Path, cleanup: list[Sup]) -> None:
    build_image(f"{names}:1", dockerfile("one"))
    sup = Sup(tmp_path, {"container_name": names, "image": f"{names}:1"})
    cleanup.append(sup)
    sup.start()
    st = sup.wait_running()
    data = sup.cfg.controller_data_dir
    wait_for(lambda: (data / "version").exists(), 10, what="the controller writing into its data directory")
    assert (data / "version").read_text().strip() == "one"
    wait_for(lambda: sup.controller_state().get("state") == "running", 10, what="state for gatewayctl")
    out = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(sup.config), "status", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    ctl = json.loads(out.stdout)["controller"]
    assert ctl["state"] == "running" and ctl["image"] == f"{names}:1" and ctl["restarts"] == 0
    # the supervisor restarting does not restart the controller
    sup.daemon.stop()
    sup.daemon.start()
    time.sleep(2)
    assert sup.state()["started_at"] == st["started_at"] and sup.state()["id"] == st["id"]
    # telemetry about the controller
    values = wait_for(lambda: next((v for v in reversed(sup.b.telemetry()) if "ms_since_controller_startup" in v),
                                   None), 10, what="controller telemetry")
    assert values["controller_state"] == "running" and values["ms_since_controller_startup"] > 0
    # RPCs that act on the container
    b = sup.b
    b.rpc(1, "restart_controller")
    r = b.reply(1, timeout=10)
    assert r["restarted"] is True and r["restarts"] == 1
    st2 = sup.wait_running(other_than=st["started_at"])
    b.rpc(2, "controller_logs", {"lines": 5})
    logs = b.reply(2)
    assert any("started one" in line for line in logs["lines"])
    b.rpc(3, "stop_controller")
    assert b.reply(3)["stopped"] is True
    assert sup.state()["status"] == "exited"
    time.sleep(1.5)
    assert sup.state()["status"] == "exited"  # an operator's stop is not undone
    b.rpc(4, "start_controller")
    assert b.reply(4)["started"] is True
    sup.wait_running(other_than=st2["started_at"])
    b.rpc(5, "status")
    assert b.reply(5)["controller"]["state"] in ("running", "starting")
    b.rpc(6, "controller_logs", {"lines": "many"})
    assert "integer" in b.reply(6)["error"]


def test_crashing_container_restarted_with_growing_delays(names: str, tmp_path: Path, cleanup: list[Sup]) -> None:
    build_image(f"{names}:crash", dockerfile("crash", cmd="echo crashing; exit 1"))
    sup = Sup(tmp_path, {"container_name": names, "image": f"{names}:crash", "crash_loop_threshold": 3,
                         "poll_interval_s": 0.1})
    cleanup.append(sup)
    sup.start()
    starts: list[str] = []

    def five_starts() -> bool:
        st = sup.state()
        if st.get("started_at") and (not starts or starts[-1] != st["started_at"]):
            starts.append(st["started_at"])
        return len(starts) >= 5

    wait_for(five_starts, 30, interval=0.05, what="five starts")
    from gatewayd.supervisor.docker_api import parse_time_ms

    times = [parse_time_ms(s) or 0 for s in starts]
    gaps = [(b - a) / 1000 for a, b in zip(times, times[1:], strict=False)]
    # backoff 1, 2, 4, 4 s (plus the time to notice the exit and start)
    assert 0.9 <= gaps[0] < 2.5, gaps
    assert 1.9 <= gaps[1] < 3.5, gaps
    assert 3.9 <= gaps[2] < 5.5, gaps
    assert 3.9 <= gaps[3] < 5.5, gaps  # the cap
    assert gaps[0] < gaps[1] < gaps[2], gaps
    st = wait_for(lambda: (s := sup.controller_state()).get("restarts", 0) >= 4 and s, 5, what="state")
    assert st["state"] in ("crash_loop", "running", "starting") and st["failures_in_row"] >= 4
    from gatewayd.store import queues

    err = queues.get_state(sup.b.conn, "supervisor.last_error")
    assert "crash-looping" in err["message"] and "exited with code 1" in err["message"]


def test_unhealthy_healthcheck_causes_a_restart(names: str, tmp_path: Path, cleanup: list[Sup]) -> None:
    hc = "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"/bin/sh\", \"-c\", \"test ! -e /data/sick\"]"
    build_image(f"{names}:hc", dockerfile("hc", extra=hc))
    sup = Sup(tmp_path, {"container_name": names, "image": f"{names}:hc"})
    cleanup.append(sup)
    sup.start()
    st = sup.wait_running()
    wait_for(lambda: sup.state().get("health") == "healthy", 15, what="healthy")
    (sup.cfg.controller_data_dir / "sick").write_text("x")
    st2 = sup.wait_running(timeout=20, other_than=st["started_at"])
    (sup.cfg.controller_data_dir / "sick").unlink()
    assert "HEALTHCHECK" in (sup.controller_state().get("last_failure") or "")
    wait_for(lambda: sup.state().get("health") == "healthy", 15, what="healthy again")
    time.sleep(2)
    assert sup.state()["started_at"] == st2["started_at"]


def test_stale_health_check_causes_a_restart(names: str, tmp_path: Path, cleanup: list[Sup]) -> None:
    build_image(f"{names}:1", dockerfile("one"))
    sup = Sup(tmp_path, {"container_name": names, "image": f"{names}:1", "health_check_max_age_s": 3})
    cleanup.append(sup)
    sup.start()
    st = sup.wait_running()
    conn = controller_store.open_controller(sup.cfg.controller_db)
    try:
        t_end = time.monotonic() + 5
        while time.monotonic() < t_end:  # a controller saying it is alive: no restart
            controller_store.touch_health(conn)
            time.sleep(0.3)
        assert sup.state()["started_at"] == st["started_at"]
        t0 = time.monotonic()
        sup.wait_running(timeout=15, other_than=st["started_at"])  # silence: restarted after ~3 s
        assert 2.5 <= time.monotonic() - t0 < 10
    finally:
        conn.close()
    assert "no health_check" in (sup.controller_state().get("last_failure") or "")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(repo), *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_git_updates_slow_build_keeps_answering_then_rollback(names: str, tmp_path: Path,
                                                               cleanup: list[Sup]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "Dockerfile").write_text(dockerfile("v1"))
    _git(repo, "add", "Dockerfile")
    _git(repo, "commit", "-q", "-m", "v1")
    _git(repo, "tag", "v1")
    nonce = uuid.uuid4().hex  # never in the build cache: the 60 s really run
    (repo / "Dockerfile").write_text(dockerfile("v2", extra=f"RUN echo {nonce} && /bin/sleep 60"))
    _git(repo, "commit", "-q", "-am", "v2")
    _git(repo, "tag", "v2")
    v2_commit = _git(repo, "rev-parse", "v2")
    (repo / "Dockerfile").write_text(dockerfile("v3", cmd="echo v3 starts and dies; exit 3"))
    _git(repo, "commit", "-q", "-am", "v3")
    _git(repo, "tag", "v3")
    _git(repo, "checkout", "-q", "v1")

    notify = NotifySocket(tmp_path)
    sup = Sup(tmp_path, {"container_name": names, "repository": str(repo)},
              env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"})
    cleanup.append(sup)
    try:
        sup.start()
        sup.wait_running(timeout=60)
        data = sup.cfg.controller_data_dir
        wait_for(lambda: (data / "version").exists() and (data / "version").read_text().strip() == "v1", 10,
                 what="v1 running")
        b = sup.b
        b.shared({"sw_title": "ctl", "sw_version": "v2"})
        wait_for(lambda: ("DOWNLOADING", "v2") in b.sw_states(), 15, what="the build to start")
        t_build = time.monotonic()
        latencies = []
        i = 0
        while ("DOWNLOADED", "v2") not in b.sw_states():
            assert time.monotonic() - t_build < 150, "the build took far too long"
            i += 1
            t0 = time.monotonic()
            b.rpc(f"p{i}", "ping")
            b.reply(f"p{i}", timeout=10)
            latencies.append(time.monotonic() - t0)
            time.sleep(2)
        build_s = time.monotonic() - t_build
        assert build_s >= 55, build_s
        assert len(latencies) >= 20 and max(latencies) < 2.0, latencies
        pings = [t for t in notify.watchdog_times() if t_build <= t <= t_build + build_s]
        gaps = [b2 - a for a, b2 in zip(pings, pings[1:], strict=False)]
        assert len(pings) >= build_s / 1.5 and max(gaps) < 3.0, (len(pings), max(gaps))
        # the new version runs and is reported
        wait_for(lambda: ("UPDATED", "v2") in b.sw_states(), 40, what="UPDATED")
        assert (data / "version").read_text().strip() == "v2"
        assert [s for s, v in b.sw_states() if v == "v2"] == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING",
                                                              "UPDATED"]
        updated = next(v for v in reversed(b.telemetry()) if v.get("sw_state") == "UPDATED")
        assert updated["current_sw_version"] == "v2" and updated["current_sw_title"] == "ctl"
        st_v2 = sup.state()
        # the same version again, also by its (short) commit hash: nothing happens
        n = len(b.sw_states())
        b.shared({"sw_title": "ctl", "sw_version": "v2"})
        b.inbound("v1/devices/me/attributes/response/1",
                  json.dumps({"shared": {"sw_title": "ctl", "sw_version": v2_commit[:10]}}))
        b.shared({"sw_title": "ctl", "sw_version": v2_commit})
        time.sleep(3)
        assert len(b.sw_states()) == n and sup.state()["started_at"] == st_v2["started_at"]
        # a version that exits at once: FAILED and rolled back to v2
        b.shared({"sw_title": "ctl", "sw_version": "v3"})
        wait_for(lambda: ("FAILED", "v3") in b.sw_states(), 40, what="FAILED")
        failed = next(v for v in reversed(b.telemetry()) if v.get("sw_state") == "FAILED")
        assert "exited with code 3" in failed["sw_error"]
        wait_for(lambda: sup.state().get("image") == st_v2["image"] and sup.state().get("status") == "running"
                 and sup.state().get("started_at") != st_v2["started_at"], 20, what="rollback to v2")
        assert (data / "version").read_text().strip() == "v2"
        # asking again for the failed version does not try again
        n = len(b.sw_states())
        b.shared({"sw_title": "ctl", "sw_version": "v3"})
        time.sleep(2)
        assert len(b.sw_states()) == n
        b.rpc("sw", "sw_status")
        sw = b.reply("sw")
        assert sw["current"]["version"] == "v2" and sw["sw_state"] == "FAILED"
    finally:
        notify.close()


def _serve_chunks(b: BridgeSide, data: bytes, until: Any, timeout: float = 60.0,
                  max_chunks: int | None = None) -> list[int]:
    """Answer chunk requests the way ThingsBoard does, until `until()`; returns the chunk numbers sent."""
    sent: list[int] = []
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "OTA download did not finish"
        rows = b.raw("v2/sw/request/")
        for _row_id, topic, payload in rows:
            parts = topic.split("/")
            req, n, size = parts[3], int(parts[5]), int(payload)
            b.inbound(f"v2/sw/response/{req}/chunk/{n}", data[n * size:(n + 1) * size])
            sent.append(n)
            if max_chunks is not None and len(sent) >= max_chunks:
                return sent
        if rows:
            b.deliver([r[0] for r in rows])
        time.sleep(0.02)
    return sent


def test_ota_package_in_chunks_verified_and_loaded(names: str, tmp_path: Path, cleanup: list[Sup]) -> None:
    build_image(f"{names}:1", dockerfile("one"))
    pkg_ref = f"{names}-pkg:9"
    build_image(pkg_ref, dockerfile("ota9"))
    archive = tmp_path / "pkg.tar"
    docker("save", "-o", str(archive), pkg_ref)
    remove_images(pkg_ref)  # it must come from the package
    data = archive.read_bytes()
    sup = Sup(tmp_path, {"container_name": names, "image": f"{names}:1", "ota_chunk_size": 16384})
    cleanup.append(sup)
    sup.start()
    st1 = sup.wait_running()
    b = sup.b
    # a wrong checksum is refused; the controller is left alone
    b.shared({"sw_title": "ctl", "sw_version": "8", "sw_size": len(data), "sw_checksum": "0" * 64,
              "sw_checksum_algorithm": "SHA256"})
    _serve_chunks(b, data, lambda: ("FAILED", "8") in b.sw_states())
    failed = next(v for v in reversed(b.telemetry()) if v.get("sw_state") == "FAILED")
    assert "checksum mismatch" in failed["sw_error"]
    assert sup.state()["started_at"] == st1["started_at"]
    # the right one is loaded and run, even with a supervisor crash in the middle of the download
    b.shared({"sw_title": "ctl", "sw_version": "9", "sw_size": len(data),
              "sw_checksum": hashlib.sha256(data).hexdigest(), "sw_checksum_algorithm": "SHA256"})
    total = (len(data) + 16383) // 16384
    assert total > 80
    first = _serve_chunks(b, data, lambda: False, max_chunks=70)
    time.sleep(0.5)
    sup.daemon.kill9()
    b.deliver([r[0] for r in b.raw("v2/sw/request/")])  # requests of the dead process: lost
    sup.daemon.start()
    rest = _serve_chunks(b, data, lambda: ("UPDATED", "9") in b.sw_states() or ("FAILED", "9") in b.sw_states())
    seq = [s for s, v in b.sw_states() if v == "9"]
    assert [s for i, s in enumerate(seq) if i == 0 or seq[i - 1] != s] == [  # DOWNLOADING again after the restart
        "DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]
    assert min(rest) >= 32, "resumed from the saved progress, not from chunk 0"
    assert set(first) | set(rest) == set(range(total))
    data_dir = sup.cfg.controller_data_dir
    wait_for(lambda: (data_dir / "version").read_text().strip() == "ota9", 10, what="the OTA version running")
    assert docker("image", "inspect", pkg_ref, check=False).returncode == 0
    assert not list((sup.cfg.state_dir / "ota").glob("*.part"))
    # the same package announced again (attribute refresh): nothing happens
    st9 = sup.state()
    n = len(b.sw_states())
    b.shared({"sw_title": "ctl", "sw_version": "9", "sw_size": len(data),
              "sw_checksum": hashlib.sha256(data).hexdigest(), "sw_checksum_algorithm": "SHA256"})
    time.sleep(2)
    assert len(b.sw_states()) == n and not b.raw("v2/sw/request/")
    assert sup.state()["started_at"] == st9["started_at"]


def test_image_reference_updates_and_a_crash_during_the_update(names: str, tmp_path: Path,
                                                               cleanup: list[Sup]) -> None:
    ids = {v: build_image(f"{names}:{v}", dockerfile(f"img{v}")) for v in ("1", "2", "3")}
    sup = Sup(tmp_path, {"container_name": names, "image": f"{names}:1", "update_stable_s": 3})
    cleanup.append(sup)
    sup.start()
    sup.wait_running()
    b = sup.b
    data = sup.cfg.controller_data_dir
    # the version names a tag of the configured image's repository
    b.shared({"sw_title": "ctl", "sw_version": "2"})
    wait_for(lambda: ("UPDATING", "2") in b.sw_states(), 20, what="UPDATING")
    st2 = wait_for(lambda: (st := sup.state()).get("image") == ids["2"] and st.get("status") == "running" and st,
                   20, what="the new version started")
    sup.daemon.kill9()  # killed while judging the new version
    sup.daemon.start()
    wait_for(lambda: ("UPDATED", "2") in b.sw_states(), 30, what="UPDATED after the restart")
    assert sup.state()["started_at"] == st2["started_at"]  # judged again, not restarted
    assert (data / "version").read_text().strip() == "img2"
    # sw_url names an image
    b.shared({"sw_title": "ctl", "sw_version": "3", "sw_url": f"docker://{names}:3"})
    wait_for(lambda: ("UPDATED", "3") in b.sw_states(), 30, what="UPDATED to 3")
    wait_for(lambda: (data / "version").read_text().strip() == "img3", 10, what="img3 running")
    b.rpc(1, "sw_status")
    assert b.reply(1)["current"]["image"] == f"{names}:3"


def _image_tags(repo_name: str) -> dict[str, str]:
    """tag → image id of the images in repository `repo_name`."""
    out = docker("images", "--no-trunc", "--format", "{{.Repository}} {{.Tag}} {{.ID}}", repo_name).stdout
    return {tag: iid for r, tag, iid in (line.split() for line in out.splitlines()) if r == repo_name}


def test_old_images_of_updates_are_removed(names: str, tmp_path: Path, cleanup: list[Sup]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for v in ("v1", "v2", "v3", "v4"):
        (repo / "Dockerfile").write_text(dockerfile(v))
        _git(repo, "add", "Dockerfile")
        _git(repo, "commit", "-q", "-m", v)
        _git(repo, "tag", v)
    _git(repo, "checkout", "-q", "v1")
    # images gatewayd did not create: one in its own repository, one elsewhere
    mine = build_image(f"{names}:manual", dockerfile("manual"))
    other = build_image(f"{names}-other:1", dockerfile("other"))
    sup = Sup(tmp_path, {"container_name": names, "repository": str(repo), "keep_images": 2})
    cleanup.append(sup)
    sup.start()
    sup.wait_running(timeout=60)
    b = sup.b
    data = sup.cfg.controller_data_dir
    ids: dict[str, str] = {}
    for v in ("v2", "v3", "v4"):
        b.shared({"sw_title": "ctl", "sw_version": v})
        wait_for(lambda: ("UPDATED", v) in b.sw_states(), 60, what=f"UPDATED to {v}")  # noqa: B023 - waited here
        assert (data / "version").read_text().strip() == v
        ids[v] = _image_tags(names)[v]
    # v1 and v2 go; v4 (running) and v3 (the last good one) stay, and what gatewayd did not build
    wait_for(lambda: set(_image_tags(names)) == {"v3", "v4", "manual"}, 30, what="old images removed")
    tags = _image_tags(names)
    assert sup.state()["image"] == tags["v4"] == ids["v4"] and tags["v3"] == ids["v3"]
    assert tags["manual"] == mine
    assert docker("image", "inspect", "--format", "{{.Id}}", f"{names}-other:1").stdout.strip() == other
    assert docker("image", "inspect", ids["v2"], check=False).returncode != 0  # deleted, not just untagged
    b.rpc("sw", "sw_status")
    sw = b.reply("sw")
    assert sw["current"]["version"] == "v4"
    log = sup.daemon.log()
    assert f"removed controller image {names}:v1" in log and "bytes freed" in log
