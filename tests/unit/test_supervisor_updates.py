"""Software update logic: OTA chunk bookkeeping, checksums, requests, the health verdict, sequencing."""

from __future__ import annotations

import hashlib
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import load
from gatewayd.supervisor import gitsrc
from gatewayd.supervisor.docker_api import DockerError
from gatewayd.supervisor.jobs import Future, Jobs
from gatewayd.supervisor.ota import Download, OtaError, checksum_matches, file_checksum, normalize_algorithm
from gatewayd.supervisor.update_jobs import config_key, image_reference
from gatewayd.supervisor.updates import Phase, Request, UpdateManager, judge
from tests.helpers.daemons import write_config


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make_download(tmp_path: Path, data: bytes, chunk: int = 10, window: int = 3, clock: Clock | None = None,
                  next_chunk: int = 0) -> Download:
    return Download(tmp_path, "77", "ctl", "2", len(data), hashlib.sha256(data).hexdigest(), "SHA256", chunk,
                    window, 5.0, next_chunk=next_chunk, clock=clock or Clock())


def test_download_window_out_of_order_and_duplicates(tmp_path: Path) -> None:
    data = bytes(range(256)) * 2  # 512 bytes → 52 chunks of 10
    dl = make_download(tmp_path, data)
    assert dl.total == 52
    assert dl.to_request() == [0, 1, 2]
    assert dl.to_request() == []  # window full
    dl.on_chunk(2, data[20:30])
    dl.on_chunk(1, data[10:20])
    assert dl.next == 0
    dl.on_chunk(0, data[0:10])
    assert dl.next == 3
    dl.on_chunk(0, data[0:10])  # a duplicate is harmless
    while not dl.complete:
        for n in dl.to_request():
            dl.on_chunk(n, data[n * 10:(n + 1) * 10])
    path = dl.finish()
    assert path.read_bytes() == data
    assert checksum_matches(file_checksum(path, "sha256"), hashlib.sha256(data).hexdigest())


def test_download_refuses_wrong_sizes_and_empty_chunks(tmp_path: Path) -> None:
    dl = make_download(tmp_path, b"x" * 25)
    dl.to_request()
    with pytest.raises(OtaError, match="expected 10"):
        dl.on_chunk(0, b"x" * 9)
    with pytest.raises(OtaError, match="no such package"):
        dl.on_chunk(1, b"")
    with pytest.raises(OtaError, match="outside"):
        dl.on_chunk(3, b"x")
    dl.on_chunk(2, b"x" * 5)  # the last chunk is short


def test_download_timeout_requests_again_then_fails(tmp_path: Path) -> None:
    clock = Clock()
    dl = make_download(tmp_path, b"y" * 30, clock=clock)
    assert dl.to_request() == [0, 1, 2]
    for _ in range(3):
        clock.t += 6
        assert dl.to_request() == [0, 1, 2]
    clock.t += 6
    with pytest.raises(OtaError, match="no answer for chunk 0"):
        dl.to_request()


def test_download_resumes_from_saved_state(tmp_path: Path) -> None:
    data = b"abcdefghij" * 40
    dl = make_download(tmp_path, data)
    for n in range(35):
        dl.on_chunk(n, data[n * 10:(n + 1) * 10])
    st = dl.to_state()
    assert st["next"] >= 32  # persisted every 32 chunks
    dl.close()
    dl2 = Download.from_state(tmp_path, st, 4, 5.0)
    assert dl2.next == st["next"]
    while not dl2.complete:
        for n in dl2.to_request():
            dl2.on_chunk(n, data[n * 10:(n + 1) * 10])
    assert dl2.finish().read_bytes() == data


def test_checksums(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"hello")
    assert file_checksum(p, "MD5") == hashlib.md5(b"hello").hexdigest()
    assert file_checksum(p, "sha-512") == hashlib.sha512(b"hello").hexdigest()
    crc = zlib.crc32(b"hello")
    assert checksum_matches(file_checksum(p, "crc32"), str(crc))
    assert not checksum_matches(file_checksum(p, "sha256"), "00")
    with pytest.raises(OtaError):
        normalize_algorithm("MURMUR3_128")


def test_request_sources() -> None:
    assert Request.from_attributes({"sw_title": "t"}) is None
    r = Request.from_attributes({"sw_title": "t", "sw_version": "1", "sw_checksum": "ab", "sw_size": 10})
    assert r is not None and r.source == "ota"
    r = Request.from_attributes({"sw_version": "2", "sw_url": "docker://reg/ctl:2"})
    assert r is not None and r.source == "image"
    r = Request.from_attributes({"sw_version": " v3 "})
    assert r is not None and r.source == "local" and r.version == "v3"


def test_judge() -> None:
    base = {"failures_total": 2, "state": "running", "health": None, "started_ms": 1000}
    assert judge(base, 2, 0, 1, 2000, 60, 5)[0] == "wait"
    assert judge(base, 2, 0, 1, 7000, 60, 5)[0] == "ok"
    assert judge({**base, "health": "starting", "state": "starting"}, 2, 0, 1, 99000, 60, 5)[0] == "wait"
    assert judge({**base, "health": "healthy"}, 2, 0, 1, 1001, 60, 5)[0] == "ok"
    assert judge({**base, "failures_total": 3, "last_failure": "exited with code 1"}, 2, 0, 1, 7000, 60, 5) == (
        "fail", "the new version failed: exited with code 1")
    verdict, why = judge({**base, "state": "backoff"}, 2, 0, 61, 99000, 60, 5)
    assert verdict == "fail" and "within 60 s" in why


def test_version_names_are_checked() -> None:
    for bad in ("--upload-pack=x", "a..b", "x y", "a~1", ""):
        with pytest.raises(gitsrc.GitError):
            gitsrc.check_version_name(bad)
    gitsrc.check_version_name("v1.2.3")
    gitsrc.check_version_name("0123abcd")


def test_git_resolves_tags_and_hashes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "one")
    git("tag", "v1")
    commit = git("rev-parse", "HEAD")
    assert gitsrc.resolve(repo, "v1", fetch=False) == commit
    assert gitsrc.resolve(repo, commit[:7], fetch=False) == commit
    assert gitsrc.describe(repo, commit) == "v1"
    with pytest.raises(gitsrc.GitError, match="not a tag or commit"):
        gitsrc.resolve(repo, "v9", fetch=True)


class FakeController:
    def __init__(self) -> None:
        self.targets: list[Any] = []
        self.snap: dict[str, Any] = {"failures_total": 0, "state": "running", "health": None, "started_ms": 0}

    def set_target(self, t: Any) -> Future:
        self.targets.append(t)
        f = Future()
        f.set({"failures_total_before": self.snap["failures_total"], "changed": True})
        return f

    def clear_target(self) -> Future:
        return self.set_target(None)

    def snapshot(self) -> dict[str, Any]:
        return dict(self.snap)


class SyncJobs(Jobs):
    """Runs jobs at once (but still through Job objects)."""

    def __init__(self, results: dict[str, Any]):
        super().__init__()
        self.results = results
        self.names: list[str] = []

    def submit(self, name: str, fn: Any, *args: Any, pass_job: bool = False, **kwargs: Any) -> Any:
        from gatewayd.supervisor.jobs import Job

        self.names.append(name)
        job = Job(name)
        key = name.split()[0]
        r = self.results.get(key)
        if isinstance(r, Exception):
            job.finish(error=str(r))
        else:
            if key == "prepare" and name.startswith("prepare version"):
                emit = args[3]
                for s in ("DOWNLOADING", "DOWNLOADED", "VERIFIED"):
                    if not (r or {}).get("same"):
                        emit(s)
            job.finish(result=r)
        return job


def make_manager(tmp_path: Path, results: dict[str, Any], **controller: Any
                 ) -> tuple[UpdateManager, FakeController, list[Any], SyncJobs, dict[str, Any]]:
    keys = {"enabled": True, "repository": str(tmp_path), "update_grace_s": 10, "update_stable_s": 2, **controller}
    cfg = load(write_config(tmp_path, {"controller": keys}), env={})
    ctl = FakeController()
    telemetry: list[Any] = []
    state: dict[str, Any] = {}
    jobs = SyncJobs(results)
    um = UpdateManager(cfg, ctl, jobs, state.get, state.__setitem__, telemetry.append,
                       lambda t, p: None)
    return um, ctl, telemetry, jobs, state


CURRENT = {"source": "git", "image": "ctl:v1", "image_id": "sha256:1", "version": "v1", "commit": "c1",
           "aliases": ["v1"]}
V2 = {"source": "git", "image": "ctl:v2", "image_id": "sha256:2", "version": "v2", "commit": "c2", "title": "t"}


def states(telemetry: list[dict[str, Any]]) -> list[str]:
    return [t["sw_state"] for t in telemetry if "sw_state" in t]


def test_update_success_and_same_version_again(tmp_path: Path) -> None:
    um, ctl, tel, jobs, state = make_manager(tmp_path, {"prepare": CURRENT})
    um.start()
    um.step()
    assert um.phase == Phase.IDLE and ctl.targets[-1].image_id == "sha256:1"
    jobs.results["prepare"] = V2
    um.on_attributes({"sw_title": "t", "sw_version": "v2"})
    um.step()  # switch done → grace
    um.step()
    assert um.phase == Phase.GRACE
    ctl.snap["started_ms"] = 1  # running long enough
    um.step()
    assert states(tel) == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]
    assert tel[-1]["current_sw_version"] == "v2"
    assert state["supervisor.sw"]["current"]["version"] == "v2"
    # the same attributes again (reconnect): no job, no switch
    n_jobs, n_targets = len(jobs.names), len(ctl.targets)
    um.on_attributes({"sw_title": "t", "sw_version": "v2"})
    um.step()
    assert (len(jobs.names), len(ctl.targets)) == (n_jobs, n_targets)


def test_alias_of_the_running_commit_changes_nothing(tmp_path: Path) -> None:
    um, ctl, tel, jobs, _ = make_manager(tmp_path, {"prepare": CURRENT})
    um.start()
    um.step()
    jobs.results["prepare"] = {"same": True, "commit": "c1"}
    um.on_attributes({"sw_version": "c1abcdef"})
    um.step()
    assert states(tel) == [] and len(ctl.targets) == 1
    assert "c1abcdef" in (um.current or {})["aliases"]
    n = len(jobs.names)
    um.on_attributes({"sw_version": "c1abcdef"})
    assert len(jobs.names) == n  # known alias: not even resolved again


def test_failed_version_is_rolled_back_and_not_retried(tmp_path: Path) -> None:
    um, ctl, tel, jobs, state = make_manager(tmp_path, {"prepare": CURRENT})
    um.start()
    um.step()
    jobs.results["prepare"] = V2
    um.on_attributes({"sw_version": "v2"})
    um.step()
    um.step()
    ctl.snap.update(failures_total=1, last_failure="exited with code 3")
    um.step()
    assert states(tel)[-1] == "FAILED" and "exited with code 3" in tel[-1]["sw_error"]
    assert ctl.targets[-1].image_id == "sha256:1"  # rolled back
    assert state["supervisor.sw"]["current"]["version"] == "v1"
    um.step()
    assert jobs.names[-1] == "remove old controller images"  # once the rollback is done
    n = len(jobs.names)
    um.on_attributes({"sw_version": "v2"})
    um.step()
    assert len(jobs.names) == n


def test_prepare_failure_reports_failed(tmp_path: Path) -> None:
    um, ctl, tel, jobs, _ = make_manager(tmp_path, {"prepare": CURRENT})
    um.start()
    um.step()
    jobs.results["prepare"] = RuntimeError("version 'v9' is not a tag or commit")
    um.on_attributes({"sw_version": "v9"})
    um.step()
    assert states(tel) == ["FAILED"] and "v9" in tel[-1]["sw_error"]
    assert len(ctl.targets) == 1


def test_ota_request_goes_to_chunks(tmp_path: Path) -> None:
    um, ctl, tel, jobs, state = make_manager(tmp_path, {"prepare": CURRENT})
    sent: list[tuple[str, str]] = []
    um.enqueue_raw = lambda t, p: sent.append((t, p))
    um.start()
    um.step()
    data = b"z" * 100000
    um.on_attributes({"sw_title": "t", "sw_version": "9", "sw_size": len(data),
                      "sw_checksum": hashlib.sha256(data).hexdigest(), "sw_checksum_algorithm": "SHA256"})
    assert um.phase == Phase.OTA and states(tel) == ["DOWNLOADING"]
    assert um.download is not None
    rid = um.download.request_id
    assert [t for t, _ in sent] == [f"v2/sw/request/{rid}/chunk/{n}" for n in range(4)]
    assert sent[0][1] == "32768"
    um.on_chunk("other-request", 0, b"x")  # not ours: ignored
    assert um.phase == Phase.OTA
    um.on_ota_error("no firmware")
    assert states(tel)[-1] == "FAILED" and "no firmware" in tel[-1]["sw_error"]


# -- the first controller from ThingsBoard (nothing configured) ---------------------------

IMAGE_V1 = {"source": "image", "image": "ctl:1", "image_id": "sha256:a1", "version": "1", "title": "ctl"}


def test_nothing_configured_waits_then_runs_the_version_thingsboard_names(tmp_path: Path) -> None:
    um, ctl, tel, jobs, state = make_manager(tmp_path, {"prepare": None}, repository="")
    um.start()
    um.on_attributes({"sw_title": "ctl", "sw_version": "1"})  # arrives while the bootstrap job runs
    jobs.results["prepare"] = IMAGE_V1
    um.step()
    assert um.current is None and um.phase == Phase.PREPARE and ctl.targets == []
    assert jobs.names == ["prepare controller image", "prepare version 1"]
    um.step()
    assert um.phase == Phase.SWITCH and ctl.targets[-1].image_id == "sha256:a1"
    um.step()
    assert um.phase == Phase.GRACE
    ctl.snap["started_ms"] = 1  # running long enough
    um.step()
    assert states(tel) == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]
    saved = state["supervisor.sw"]["current"]
    assert saved["image_id"] == "sha256:a1" and saved["config_key"] == config_key(um.cfg)


def test_nothing_configured_and_idle_until_asked(tmp_path: Path) -> None:
    um, ctl, tel, jobs, _ = make_manager(tmp_path, {"prepare": None}, repository="")
    um.start()
    um.step()
    assert um.phase == Phase.IDLE and um.current is None and ctl.targets == [] and tel == []


def test_a_failed_first_version_leaves_no_container(tmp_path: Path) -> None:
    um, ctl, tel, jobs, state = make_manager(tmp_path, {"prepare": None}, repository="")
    um.start()
    um.step()
    jobs.results["prepare"] = IMAGE_V1
    um.on_attributes({"sw_title": "ctl", "sw_version": "1"})
    um.step()
    um.step()
    assert um.phase == Phase.GRACE
    ctl.snap.update(failures_total=1, last_failure="exited with code 1")
    um.step()
    assert states(tel)[-1] == "FAILED" and ctl.targets[-1] is None  # the container is removed
    assert state["supervisor.sw"]["current"] is None and um.phase == Phase.CLEANUP


def test_image_reference_of_a_request(tmp_path: Path) -> None:
    def ref(attrs: dict[str, Any], **controller: Any) -> str:
        cfg = load(write_config(tmp_path, {"controller": {"enabled": True, **controller}}), env={})
        req = Request.from_attributes(attrs)
        assert req is not None
        return image_reference(cfg, req)

    assert ref({"sw_title": "ctl", "sw_version": "1.2"}) == "ctl:1.2"
    assert ref({"sw_title": "reg.local:5000/ctl", "sw_version": "1 beta"}) == "reg.local:5000/ctl:1_beta"
    assert ref({"sw_title": "x", "sw_version": "reg.local:5000/ctl:7"}) == "reg.local:5000/ctl:7"
    assert ref({"sw_version": "ctl@sha256:" + "a" * 64}) == "ctl@sha256:" + "a" * 64
    assert ref({"sw_title": "x", "sw_version": "2", "sw_url": "docker://other:3"}) == "other:3"
    assert ref({"sw_title": "x", "sw_version": "2"}, image="mine:1") == "mine:2"
    with pytest.raises(DockerError, match="no controller is configured"):
        ref({"sw_version": "2"})
    with pytest.raises(DockerError, match="not an image reference"):
        ref({"sw_version": "2", "sw_url": "https://example.com/x.tar"})
