"""Removal of old controller images: which images are gatewayd's, which go, and when the cleanup runs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from gatewayd.supervisor.images import (
    LABEL_COMMIT,
    LABEL_OWNER,
    OwnImage,
    archive_image_ids,
    freed_bytes,
    own_images,
    select_removals,
)
from gatewayd.supervisor.jobs import Future, Job
from tests.unit.test_supervisor_updates import CURRENT, V2, SyncJobs, make_manager

NAME = "gatewayd-controller"


def img(iid: str, tags: list[str], created: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"Id": f"sha256:{iid}", "RepoTags": tags, "Created": created, "Labels": labels, "Size": 1000}


BUILT = {LABEL_COMMIT: "c", LABEL_OWNER: NAME}


def summaries() -> list[dict[str, Any]]:
    return [
        img("a1", [f"{NAME}:v1"], 100, BUILT),
        img("a2", [f"{NAME}:v2"], 200, {LABEL_COMMIT: "c"}),  # built before the owner label existed
        img("a3", [f"{NAME}:v3"], 300, BUILT),
        img("a4", [f"{NAME}:v4"], 400, BUILT),
        img("a5", [f"{NAME}:v5", "backup:v5"], 500, BUILT),  # also tagged by someone else
        img("d1", ["<none>:<none>"], 50, BUILT),  # dangling: a version rebuilt under the same tag
        img("d2", [], 60, None),  # someone else's dangling image
        img("op", [f"{NAME}:1.0"], 700, None),  # the operator's image in the same repository
        img("pk", ["pkg:9", f"{NAME}:9"], 600, None),  # loaded from an OTA package by gatewayd
        img("pk2", ["pkg:8", f"{NAME}:8"], 650, None),  # the same, but it was on the device before
        img("x1", ["other/app:1"], 900, {LABEL_COMMIT: "c"}),  # another repository
        img("y1", ["gatewayd-controller2:v1"], 950, {LABEL_COMMIT: "c", LABEL_OWNER: "gatewayd-controller2"}),
        img("y2", [f"{NAME}:v9"], 960, {LABEL_COMMIT: "c", LABEL_OWNER: "gatewayd-controller2"}),
        img("base", ["gatewayd-test-base:latest"], 10, None),
    ]


OWNED = {"sha256:pk": ["pkg:9"]}


def test_own_images_only_what_gatewayd_created() -> None:
    own = {i.id: i for i in own_images(summaries(), NAME, OWNED)}
    assert sorted(own) == ["sha256:a1", "sha256:a2", "sha256:a3", "sha256:a4", "sha256:a5", "sha256:d1",
                           "sha256:pk"]
    assert own["sha256:a5"].refs == (f"{NAME}:v5",)  # only our tag is removed, "backup:v5" stays
    assert own["sha256:pk"].refs == (f"{NAME}:9", "pkg:9")  # the tag the load created goes too
    assert own["sha256:d1"].refs == ()


def test_select_keeps_running_last_good_and_newest() -> None:
    own = own_images(summaries(), NAME, OWNED)
    # running a3, last good a1 (a rolled-back-to old version): both kept, nothing else fits in keep=2
    gone = {i.id for i in select_removals(own, 2, ["sha256:a3", "sha256:a1"])}
    assert gone == {"sha256:a2", "sha256:a4", "sha256:a5", "sha256:pk", "sha256:d1"}
    # keep=3: the newest other image (the OTA one, created 600) is kept as well
    gone = {i.id for i in select_removals(own, 3, ["sha256:a3", "sha256:a1"])}
    assert gone == {"sha256:a2", "sha256:a4", "sha256:a5", "sha256:d1"}
    # keep=1 never removes the protected ones
    gone = {i.id for i in select_removals(own, 1, ["sha256:a4", "sha256:a3"])}
    assert gone == {"sha256:a1", "sha256:a2", "sha256:a5", "sha256:pk", "sha256:d1"}
    # keep=2, one protected: the newest unprotected one stays
    gone = {i.id for i in select_removals(own, 2, ["sha256:a1"])}
    assert "sha256:pk" not in gone and "sha256:a1" not in gone and len(gone) == 5
    # nothing of ours: nothing to do
    assert select_removals([], 2, ["sha256:a1"]) == []


def test_select_orders_by_created_time_not_by_listing() -> None:
    own = [OwnImage("sha256:n", ("c:n",), 300), OwnImage("sha256:o", ("c:o",), 100),
           OwnImage("sha256:m", ("c:m",), 200)]
    assert [i.id for i in select_removals(own, 2, ["sha256:o"])] == ["sha256:m"]


def test_freed_bytes() -> None:
    chain = [("i3", 300), ("i2", 250), ("base", 100)]
    assert freed_bytes(chain, {"i3", "i2"}) == 200  # down to the base that stays
    assert freed_bytes(chain, {"i3"}) == 50  # the parent is shared with another image
    assert freed_bytes(chain, set()) == 0  # only untagged
    assert freed_bytes([("l", 70)], {"l"}) == 70  # loaded images have no parent chain


def test_archive_image_ids(tmp_path: Path) -> None:
    p = tmp_path / "a.tar"
    manifest = json.dumps([{"Config": "blobs/sha256/" + "ab" * 32, "RepoTags": ["pkg:9"]},
                           {"Config": "cd" * 32 + ".json", "RepoTags": None}]).encode()
    with tarfile.open(p, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    assert archive_image_ids(p) == ["sha256:" + "ab" * 32, "sha256:" + "cd" * 32]
    (tmp_path / "b.tar").write_bytes(b"not a tar")
    assert archive_image_ids(tmp_path / "b.tar") == []


class PendingCleanupJobs(SyncJobs):
    """SyncJobs whose image cleanup stays running until `finish_cleanup()`."""

    def __init__(self, results: dict[str, Any]):
        super().__init__(results)
        self.cleanups: list[tuple[Job, tuple[Any, ...]]] = []

    def submit(self, name: str, fn: Any, *args: Any, pass_job: bool = False, **kwargs: Any) -> Any:
        if name.startswith("remove old controller images"):
            self.names.append(name)
            job = Job(name)
            self.cleanups.append((job, args))
            return job
        return super().submit(name, fn, *args, pass_job=pass_job, **kwargs)


def test_cleanup_after_update_protects_running_and_previous_and_delays_the_next(tmp_path: Path) -> None:
    um, ctl, tel, _, state = make_manager(tmp_path, {"prepare": CURRENT})
    jobs = PendingCleanupJobs({"prepare": CURRENT})
    um.jobs = jobs
    um.start()
    um.step()
    jobs.results["prepare"] = V2
    um.on_attributes({"sw_title": "t", "sw_version": "v2"})
    um.step()
    um.step()
    ctl.snap["started_ms"] = 1
    um.step()
    assert tel[-1]["sw_state"] == "UPDATED" and um.phase == "cleanup"
    job, args = jobs.cleanups[-1]
    assert args[1] == ["sha256:2", "sha256:1"]  # running (new) and last good (before it)
    assert state["supervisor.sw"]["previous"]["image_id"] == "sha256:1"
    # a request arriving meanwhile waits for the cleanup (it must not build what is being removed)
    jobs.results["prepare"] = {**V2, "image": "ctl:v3", "image_id": "sha256:3", "version": "v3", "commit": "c3"}
    um.on_attributes({"sw_title": "t", "sw_version": "v3"})
    um.step()
    assert jobs.names[-1] == "remove old controller images" and um.phase == "cleanup"
    job.finish(result={"removed": [], "kept_in_use": [], "freed": 0, "gone": []})
    um.step()
    assert jobs.names[-1] == "prepare version v3"


def test_cleanup_after_failure_waits_for_the_rollback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    um, ctl, tel, _, _ = make_manager(tmp_path, {"prepare": CURRENT})
    jobs = PendingCleanupJobs({"prepare": CURRENT})
    um.jobs = jobs
    rollback = Future()
    um.start()
    um.step()
    jobs.results["prepare"] = V2
    um.on_attributes({"sw_version": "v2"})
    um.step()
    um.step()

    def set_target(t: Any) -> Future:
        ctl.targets.append(t)
        return rollback

    monkeypatch.setattr(ctl, "set_target", set_target)
    ctl.snap.update(failures_total=1, last_failure="exited with code 3")
    um.step()
    assert tel[-1]["sw_state"] == "FAILED" and um.phase == "cleanup"
    um.step()
    assert not jobs.cleanups  # the failed version's container may still exist
    rollback.set({"failures_total_before": 1, "changed": True})
    um.step()
    assert len(jobs.cleanups) == 1 and jobs.cleanups[0][1][1] == ["sha256:1"]


def test_ota_images_are_remembered_and_forgotten_when_gone(tmp_path: Path) -> None:
    um, _, _, _, state = make_manager(tmp_path, {"prepare": CURRENT})
    um._remember_owned({"source": "ota", "image_id": "sha256:9", "owned_refs": ["pkg:9"]})
    um._remember_owned({"source": "ota", "image_id": "sha256:8", "owned_refs": None})  # was there before
    um._remember_owned({"source": "git", "image_id": "sha256:7"})
    assert um.owned == {"sha256:9": ["pkg:9"]}
    job = Job("remove old controller images")
    job.finish(result={"gone": ["sha256:9"]})
    um._cleanup_done(job)
    assert um.owned == {} and state["supervisor.sw"]["owned"] == {}
