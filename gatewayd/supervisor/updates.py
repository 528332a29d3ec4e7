"""Software updates of the controller (`sw_title` / `sw_version` shared attributes), with rollback.

Sources, chosen per request:
1. a ThingsBoard OTA package (`sw_checksum` and `sw_size` present, no `sw_url`): fetched over
   MQTT in chunks (see ota.py), checked against `sw_checksum` (`sw_checksum_algorithm`),
   `docker load`ed (the package is a `docker save` archive);
2. `sw_url` naming an image (`docker://` prefix optional): used if present, else pulled;
3. `[controller] repository`: the tag or commit is resolved with git, built with docker build;
4. `[controller] image`: the same repository with the version as tag.

Progress is reported as telemetry `sw_state` (DOWNLOADING, DOWNLOADED, VERIFIED, UPDATING,
UPDATED, FAILED), with `sw_error` on failure and `current_sw_title` / `current_sw_version`.
After the switch, the new version must become healthy within `update_grace_s` (HEALTHCHECK
`healthy`, or running for `update_stable_s` without one, and no failure); otherwise the last
good version is started again and the update is reported FAILED. A request that failed is
not retried until the requested version changes; a request naming the running version
(also by another name of the same git commit) changes nothing. After an update ends
(UPDATED, or FAILED once the rollback is done), images earlier updates built or loaded are
removed (see images.py), keeping the running one, the last good one and `keep_images` in all.

Builds, pulls, loads and checksums run as background jobs; this class itself runs in the
main loop and never blocks.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gatewayd.config import Config
from gatewayd.supervisor import gitsrc
from gatewayd.supervisor.controller import ControllerManager, Target
from gatewayd.supervisor.docker_api import Docker, DockerError, safe_tag, split_image_ref
from gatewayd.supervisor.images import LABEL_COMMIT, LABEL_OWNER, archive_image_ids, cleanup_job
from gatewayd.supervisor.jobs import Future, Job, Jobs
from gatewayd.supervisor.ota import Download, OtaError, checksum_matches, file_checksum, normalize_algorithm

log = logging.getLogger("gatewayd.supervisor")

SW_KEYS = ("sw_title", "sw_version", "sw_url", "sw_checksum", "sw_checksum_algorithm", "sw_size")
STATE_KEY = "supervisor.sw"
OWNED_MAX = 50  # OTA-loaded image ids remembered for the image cleanup
BOOTSTRAP_RETRY_S = 30.0


@dataclass(frozen=True)
class Request:
    title: str
    version: str
    url: str = ""
    checksum: str = ""
    algorithm: str = ""
    size: int = 0

    @staticmethod
    def from_attributes(a: dict[str, Any]) -> Request | None:
        version = a.get("sw_version")
        if version is None or (isinstance(version, str) and not version.strip()):
            return None
        size = a.get("sw_size") or 0
        try:
            size = int(size)
        except (TypeError, ValueError):
            size = -1
        return Request(title=str(a.get("sw_title") or ""), version=str(version).strip(),
                       url=str(a.get("sw_url") or ""), checksum=str(a.get("sw_checksum") or ""),
                       algorithm=str(a.get("sw_checksum_algorithm") or ""), size=size)

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def source(self) -> str:
        if self.url:
            return "image"
        if self.checksum or self.size:
            return "ota"
        return "local"


def config_key(cfg: Config) -> str:
    c = cfg["controller"]
    return json.dumps([c["image"], c["repository"], c["dockerfile"], c["version"]])


# -- work done in background jobs (own Docker connection each) ---------------------------

def _docker(cfg: Config) -> Docker:
    return Docker(long_timeout_s=cfg["controller"]["build_timeout_s"])


def build_commit(cfg: Config, d: Docker, repo: Path, commit: str, version: str,
                 progress: Callable[[str], None] | None = None) -> tuple[str, str]:
    """(image ref, image id) of the image for this commit, built if not built before."""
    c = cfg["controller"]
    name = c["image_name"] or c["container_name"]
    ref = f"{name}:{safe_tag(version)}"
    doc = d.image_inspect(ref)
    if doc and ((doc.get("Config") or {}).get("Labels") or {}).get(LABEL_COMMIT) == commit:
        return ref, str(doc["Id"])
    tmpdir = cfg.state_dir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=tmpdir) as ctx:
        gitsrc.archive(repo, commit, ctx)
        ctx.seek(0)
        image_id = d.build(ctx, ref, dockerfile=c["dockerfile"],
                           labels={LABEL_COMMIT: commit, "io.gatewayd.version": version, LABEL_OWNER: name},
                           network_mode=c["build_network_mode"], progress=progress)
    return ref, image_id


def bootstrap_job(cfg: Config, current: dict[str, Any] | None) -> dict[str, Any]:
    """The image to run at start-up: the saved good version, else what the config names."""
    c = cfg["controller"]
    d = _docker(cfg)
    try:
        ckey = config_key(cfg)
        if current and current.get("config_key") == ckey and current.get("image_id"):
            if d.image_id(current["image_id"]):
                return current
            log.warning("image %s of version %s is gone; starting from the configuration",
                        current.get("image"), current.get("version"))
        if c["image"]:
            image_id = d.image_id(c["image"])
            if not image_id:
                log.info("pulling %s", c["image"])
                image_id = d.pull(c["image"])
            tag = split_image_ref(c["image"])[1]
            version = c["version"] or tag or image_id.split(":")[-1][:12]
            return {"source": "config", "image": c["image"], "image_id": image_id, "version": version,
                    "title": "", "config_key": ckey}
        if c["repository"]:
            repo = Path(c["repository"])
            commit = gitsrc.resolve(repo, "HEAD", fetch=False)
            version = c["version"] or gitsrc.describe(repo, commit)
            ref, image_id = build_commit(cfg, d, repo, commit, version)
            return {"source": "git", "image": ref, "image_id": image_id, "version": version, "commit": commit,
                    "title": "", "config_key": ckey, "aliases": [version]}
        raise DockerError("no controller image: set [controller] image or repository")
    finally:
        d.close()


def prepare_job(cfg: Config, req: Request, current: dict[str, Any] | None,
                emit: Callable[[str], None], *, job: Job) -> dict[str, Any]:
    """Resolve, fetch/build/pull the requested version; {"same": True} if it is the running one."""
    c = cfg["controller"]
    d = _docker(cfg)

    def progress(text: str) -> None:
        job.progress = text[-200:]

    try:
        if req.source == "image" or (not c["repository"] and req.source == "local"):
            if req.url:
                ref = req.url.split("://", 1)[1] if req.url.startswith(("docker://", "docker-image://")) else req.url
                if "://" in ref:
                    raise DockerError(f"sw_url {req.url!r} is not an image reference (downloads over HTTP are "
                                      "not supported; attach the package to ThingsBoard instead)")
            elif c["image"]:
                ref = f"{split_image_ref(c['image'])[0]}:{safe_tag(req.version)}"
            else:
                raise DockerError("no update source: set [controller] repository or image, or attach a package")
            image_id = d.image_id(ref)
            if image_id and current and current.get("image_id") == image_id:
                return {"same": True}
            emit("DOWNLOADING")
            if not image_id:
                image_id = d.pull(ref, progress)
            emit("DOWNLOADED")
            emit("VERIFIED")
            return {"source": "image", "image": ref, "image_id": image_id, "version": req.version,
                    "title": req.title}
        repo = Path(c["repository"])
        commit = gitsrc.resolve(repo, req.version, fetch=c["git_fetch"])
        if current and current.get("commit") == commit:
            return {"same": True, "commit": commit}
        emit("DOWNLOADING")
        ref, image_id = build_commit(cfg, d, repo, commit, req.version, progress)
        emit("DOWNLOADED")
        emit("VERIFIED")
        return {"source": "git", "image": ref, "image_id": image_id, "version": req.version, "title": req.title,
                "commit": commit, "aliases": [req.version]}
    finally:
        d.close()


def install_package_job(cfg: Config, path: Path, req: Request, emit: Callable[[str], None]) -> dict[str, Any]:
    """Verify an OTA package against its checksum and `docker load` it."""
    c = cfg["controller"]
    try:
        algo = normalize_algorithm(req.algorithm)
        actual = file_checksum(path, algo)
        if not checksum_matches(actual, req.checksum):
            raise OtaError(f"checksum mismatch: {algo} of the package is {actual}, expected {req.checksum}")
        emit("VERIFIED")
        d = _docker(cfg)
        try:
            # An image already on the device is not gatewayd's to remove later, whatever the package says.
            existed = any(d.image_id(i) for i in archive_image_ids(path))
            with open(path, "rb") as f:
                loaded = d.load(f)
            ref = next((x for x in loaded if not x.startswith("sha256:")), loaded[0])
            image_id = d.image_id(ref)
            if not image_id:
                raise DockerError(f"loaded {ref} but cannot find it")
            name = c["image_name"] or c["container_name"]
            own = f"{name}:{safe_tag(req.version)}"
            d.tag(image_id, own)
        finally:
            d.close()
        return {"source": "ota", "image": own, "image_id": image_id, "version": req.version, "title": req.title,
                "checksum": req.checksum, "loaded": loaded,
                "owned_refs": None if existed else [x for x in loaded if not x.startswith("sha256:")]}
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def judge(snap: dict[str, Any], baseline_failures: int, grace_started: float, now: float, now_ms: int,
          grace_s: float, stable_s: float) -> tuple[str, str]:
    """("wait"|"ok"|"fail", why) for a new version after the switch."""
    if snap.get("failures_total", 0) > baseline_failures:
        return "fail", f"the new version failed: {snap.get('last_failure') or 'stopped'}"
    if snap.get("state") in ("running", "starting"):
        health = snap.get("health")
        started = snap.get("started_ms")
        if health == "healthy":
            return "ok", "HEALTHCHECK healthy"
        if health is None and snap.get("state") == "running" and started and now_ms - started >= stable_s * 1000:
            return "ok", f"running for {stable_s:.0f} s"
    if now - grace_started > grace_s:
        return "fail", (f"the new version did not become healthy within {grace_s:.0f} s "
                        f"(state {snap.get('state')}, health {snap.get('health') or 'n/a'})")
    return "wait", ""


class UpdateManager:
    def __init__(self, cfg: Config, controller: ControllerManager | None, jobs: Jobs,
                 get_state: Callable[[str], Any], set_state: Callable[[str, Any], None],
                 publish_telemetry: Callable[[dict[str, Any]], None],
                 enqueue_raw: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic):
        c = cfg["controller"]
        self.cfg = cfg
        self.controller = controller
        self.jobs = jobs
        self.get_state = get_state
        self.set_state = set_state
        self.publish_telemetry = publish_telemetry
        self.enqueue_raw = enqueue_raw
        self.clock = clock
        self.grace_s: float = c["update_grace_s"]
        self.stable_s: float = min(c["update_stable_s"], c["update_grace_s"] / 2)
        self.ota_dir = cfg.state_dir / "ota"

        st = get_state(STATE_KEY) or {}
        self.current: dict[str, Any] | None = st.get("current")
        self.failed_key: str | None = st.get("failed_key")
        self.target: dict[str, Any] | None = st.get("target")  # {"request": {...}, "prepared": {...}|None}
        self.ota_state: dict[str, Any] | None = st.get("ota")
        self.sw_state: str | None = st.get("sw_state")
        self.sw_error: str | None = st.get("sw_error")
        self.previous: dict[str, Any] | None = st.get("previous")  # the good version before `current`
        self.owned: dict[str, list[str]] = dict(st.get("owned") or {})  # OTA-loaded image id → tags it made

        self.requested: dict[str, Any] = {}
        self.phase = "bootstrap"
        self.job: Job | None = None
        self.future: Future | None = None
        self.download: Download | None = None
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.baseline = 0
        self.grace_started = 0.0
        self.bootstrap_retry_at = 0.0
        self._ignored_key: str | None = None
        self.last_error: str | None = None

    # -- persistence / reporting -------------------------------------------------------
    def _save(self) -> None:
        self.set_state(STATE_KEY, {"current": self.current, "failed_key": self.failed_key, "target": self.target,
                                   "ota": self.download.to_state() if self.download else None,
                                   "sw_state": self.sw_state, "sw_error": self.sw_error,
                                   "previous": self.previous, "owned": self.owned})

    def _report(self, state: str, error: str | None = None, extra: dict[str, Any] | None = None) -> None:
        self.sw_state = state
        self.sw_error = error
        values: dict[str, Any] = {"sw_state": state}
        req = self._target_request()
        if req is not None:
            values["sw_title"] = req.title
            values["sw_version"] = req.version
        if error is not None:
            values["sw_error"] = error[:1000]
        if extra:
            values.update(extra)
        (log.error if state == "FAILED" else log.info)("software update: %s%s", state,
                                                       f": {error}" if error else "")
        self.publish_telemetry(values)
        self._save()

    def _report_current(self) -> None:
        if self.current:
            self.publish_telemetry({"current_sw_title": self.current.get("title") or "",
                                    "current_sw_version": self.current.get("version") or ""})

    def _target_request(self) -> Request | None:
        if not self.target:
            return None
        r = self.target["request"]
        return Request(**r)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase, "sw_state": self.sw_state, "sw_error": self.sw_error,
                               "current": self.current}
        req = self._target_request()
        if req is not None:
            out["target"] = {"title": req.title, "version": req.version, "source": req.source}
        if self.download is not None:
            out["download"] = {"percent": self.download.percent, "chunks": self.download.total,
                               "next": self.download.next}
        if self.job is not None and not self.job.done():
            out["job"] = self.job.summary()
        return out

    # -- start-up ----------------------------------------------------------------------
    def start(self) -> None:
        if self.controller is None:
            self.phase = "disabled"
            return
        keep = {f"sw-{self.ota_state['request_id']}.part"} if self.ota_state and self.target else set()
        ota_dir_cleanup(self.ota_dir, keep)
        self._start_bootstrap()

    def _start_bootstrap(self) -> None:
        self.phase = "bootstrap"
        self.job = self.jobs.submit("prepare controller image", bootstrap_job, self.cfg, self.current)

    def _bootstrap_done(self, job: Job) -> None:
        if job.error is not None:
            log.error("cannot prepare the controller image: %s (retrying in %.0f s)", job.error, BOOTSTRAP_RETRY_S)
            self.bootstrap_retry_at = self.clock() + BOOTSTRAP_RETRY_S
            self.phase = "bootstrap_wait"
            self.last_error = job.error
            return
        cur = dict(job.result)
        if self.current is None or self.current.get("image_id") != cur.get("image_id"):
            self.current = cur
            self._save()
        self._report_current()
        self.phase = "idle"
        req = self._target_request()
        prepared = self.target.get("prepared") if self.target else None
        if req is not None and prepared:
            # Interrupted after the switch began: judge the new version again (the container may
            # already run it; starting the old one first would restart the controller twice).
            log.info("resuming the interrupted update to %s", req.version)
            self._switch(prepared)
            return
        self._set_controller(self.current)
        if req is not None:
            log.info("resuming the interrupted update to %s", req.version)
            self._begin(req, resume=True)
        else:
            self._consider()

    def _set_controller(self, info: dict[str, Any]) -> Future:
        assert self.controller is not None
        return self.controller.set_target(Target(image=info["image"], image_id=info["image_id"],
                                                 version=str(info.get("version") or ""),
                                                 title=str(info.get("title") or "")))

    # -- requests ----------------------------------------------------------------------
    def on_attributes(self, attrs: dict[str, Any]) -> None:
        if not any(k in attrs for k in SW_KEYS):
            return
        for k in SW_KEYS:
            if k in attrs:
                self.requested[k] = attrs[k]
        self._consider()

    def on_deleted(self, keys: list[str]) -> None:
        for k in keys:
            self.requested.pop(k, None)

    def _is_current(self, req: Request) -> bool:
        cur = self.current
        if not cur:
            return False
        if req.source == "ota" and cur.get("checksum"):
            return bool(req.checksum.lower() == str(cur.get("checksum")).lower())
        return req.version == cur.get("version") or req.version in (cur.get("aliases") or [])

    def _consider(self) -> None:
        req = Request.from_attributes(self.requested)
        if req is None or self.phase in ("bootstrap", "bootstrap_wait", "disabled"):
            if req is not None and self.phase == "disabled" and req.key != self._ignored_key:
                self._ignored_key = req.key
                log.warning("sw_version %s requested but the controller is disabled; ignored", req.version)
            return
        if self.target and self._target_request() == req:
            return
        if req.key == self.failed_key:
            if self._ignored_key != req.key:
                self._ignored_key = req.key
                log.info("sw_version %s failed before; not retried until another version is requested",
                         req.version)
            return
        if self._is_current(req):
            if self.target is None and self._ignored_key != req.key:
                self._ignored_key = req.key
                log.info("sw_version %s is the running version; nothing to do", req.version)
            return
        if self.phase != "idle":
            if self.phase == "ota" and self.download is not None:
                log.info("a new version was requested during a download; abandoning the download")
                self.download.discard()
                self.download = None
                self.target = None
                self.phase = "idle"
            else:
                return  # picked up when the running update ends
        self._begin(req)

    def _begin(self, req: Request, resume: bool = False) -> None:
        self.target = {"request": asdict(req), "prepared": None}
        self.sw_error = None
        if req.size < 0:
            self._fail("sw_size is not a number", rollback=False)
            return
        if req.source == "ota":
            self._start_ota(req, resume)
            return
        self.phase = "prepare"
        self._save()
        self.job = self.jobs.submit(f"prepare version {req.version}", prepare_job, self.cfg, req,
                                    dict(self.current) if self.current else None, self.events.put, pass_job=True)

    # -- OTA -------------------------------------------------------------------------------
    def _start_ota(self, req: Request, resume: bool) -> None:
        c = self.cfg["controller"]
        try:
            st = self.ota_state if resume else None
            if st and st.get("checksum") == req.checksum and st.get("version") == req.version:
                self.download = Download.from_state(self.ota_dir, st, c["ota_window"], c["ota_chunk_timeout_s"])
                log.info("resuming the download of %s %s at chunk %d", req.title, req.version, self.download.next)
            else:
                self.download = Download(self.ota_dir, str(time.time_ns() // 1_000_000), req.title, req.version,
                                         req.size, req.checksum, req.algorithm or "sha256", c["ota_chunk_size"],
                                         c["ota_window"], c["ota_chunk_timeout_s"])
        except (OtaError, OSError) as e:
            self._fail(str(e), rollback=False)
            return
        self.phase = "ota"
        self._report("DOWNLOADING")
        self._request_chunks()

    def _request_chunks(self) -> None:
        assert self.download is not None
        try:
            wanted = self.download.to_request()
        except OtaError as e:
            self._ota_failed(str(e))
            return
        for n in wanted:
            self.enqueue_raw(f"v2/sw/request/{self.download.request_id}/chunk/{n}", str(self.download.chunk_size))

    def _ota_failed(self, text: str) -> None:
        if self.download is not None:
            self.download.discard()
            self.download = None
        self._fail(text, rollback=False)

    def on_chunk(self, request_id: str, n: int, data: bytes) -> None:
        dl = self.download
        if dl is None or self.phase != "ota" or request_id != dl.request_id:
            log.debug("OTA chunk %s/%d for no active download; dropped", request_id, n)
            return
        try:
            persist = dl.on_chunk(n, data)
        except OtaError as e:
            self._ota_failed(str(e))
            return
        except OSError as e:
            self._ota_failed(f"cannot store the package: {e}")
            return
        if persist:
            self._save()
        if dl.complete:
            path = dl.finish()
            self.download = None
            req = self._target_request()
            assert req is not None
            self._report("DOWNLOADED")
            self.phase = "install"
            self.job = self.jobs.submit(f"install package {req.version}", install_package_job, self.cfg, path, req,
                                        self.events.put)
        else:
            self._request_chunks()

    def on_ota_error(self, text: str) -> None:
        if self.download is not None and self.phase == "ota":
            self._ota_failed(f"ThingsBoard refused the package download: {text}")

    # -- switching and judging ---------------------------------------------------------
    def _switch(self, prepared: dict[str, Any]) -> None:
        assert self.target is not None
        self.target["prepared"] = prepared
        self.phase = "switch"
        self._report("UPDATING")
        self.future = self._set_controller(prepared)

    def _fail(self, error: str, rollback: bool) -> None:
        req = self._target_request()
        if req is not None:
            self.failed_key = req.key
        self._report("FAILED", error)
        rolled_back: Future | None = None
        if rollback and self.current and self.controller is not None:
            log.warning("rolling back to version %s (%s)", self.current.get("version"), self.current.get("image"))
            rolled_back = self._set_controller(self.current)
        self.target = None
        self.phase = "idle"
        self.job = None
        self._save()
        if rolled_back is not None:
            self._start_cleanup(rolled_back)  # once the failed version's container is gone
        self._consider()

    def _succeed(self, prepared: dict[str, Any], why: str) -> None:
        new = dict(prepared)
        new["config_key"] = config_key(self.cfg)
        new["updated_ms"] = time.time_ns() // 1_000_000
        if self.current and self.current.get("image_id") != new.get("image_id"):
            self.previous = self.current
        self.current = new
        self.failed_key = None
        self._report("UPDATED", extra={"current_sw_title": new.get("title") or "",
                                       "current_sw_version": new.get("version") or ""})
        log.info("controller updated to version %s (%s)", new.get("version"), why)
        self.target = None
        self.phase = "idle"
        self.job = None
        self._save()
        self._start_cleanup(None)
        self._consider()

    # -- removal of old images -----------------------------------------------------------
    def _start_cleanup(self, after: Future | None) -> None:
        """Remove surplus images in a job (after `after`, the rollback, is done); a new update waits."""
        self.phase = "cleanup"
        self.future = after
        self.job = None
        if after is None:
            self._submit_cleanup()

    def _submit_cleanup(self) -> None:
        protected = [str(x.get("image_id") or "") for x in (self.current, self.previous) if x]
        self.job = self.jobs.submit("remove old controller images", cleanup_job, self.cfg, protected,
                                    {k: list(v) for k, v in self.owned.items()})

    def _cleanup_done(self, job: Job) -> None:
        if job.error is not None:
            log.warning("cannot remove old controller images: %s", job.error)
        else:
            gone = set((job.result or {}).get("gone") or [])
            if gone & set(self.owned):
                self.owned = {k: v for k, v in self.owned.items() if k not in gone}
                self._save()
        self.phase = "idle"
        self._consider()

    def _remember_owned(self, prepared: dict[str, Any]) -> None:
        refs = prepared.get("owned_refs")
        if prepared.get("source") != "ota" or refs is None or not prepared.get("image_id"):
            return
        self.owned.pop(prepared["image_id"], None)
        self.owned[prepared["image_id"]] = list(refs)
        while len(self.owned) > OWNED_MAX:
            self.owned.pop(next(iter(self.owned)))

    def step(self) -> None:
        while True:
            try:
                state = self.events.get_nowait()
            except queue.Empty:
                break
            if self.target is not None:
                self._report(state)
        if self.phase in ("bootstrap", "prepare", "install") and self.job is not None and self.job.done():
            job, self.job = self.job, None
            if self.phase == "bootstrap":
                self._bootstrap_done(job)
            elif job.error is not None:
                self._fail(job.error, rollback=False)
            elif job.result.get("same"):
                req = self._target_request()
                if req is not None and self.current is not None:
                    aliases = list(self.current.get("aliases") or [])
                    if req.version not in aliases:
                        aliases.append(req.version)
                        self.current["aliases"] = aliases[-20:]
                    log.info("sw_version %s names the running version; nothing to do", req.version)
                self.target = None
                self.phase = "idle"
                self._save()
                self._consider()
            else:
                self._remember_owned(job.result)
                self._switch(job.result)
        elif self.phase == "cleanup":
            if self.job is None:
                if self.future is None or self.future.done():
                    self.future = None
                    self._submit_cleanup()
            elif self.job.done():
                job, self.job = self.job, None
                self._cleanup_done(job)
        elif self.phase == "bootstrap_wait" and self.clock() >= self.bootstrap_retry_at:
            self._start_bootstrap()
        elif self.phase == "ota" and self.download is not None:
            self._request_chunks()
        elif self.phase == "switch" and self.future is not None and self.future.done():
            fut, self.future = self.future, None
            if fut.error is not None:
                self._fail(f"cannot start the new version: {fut.error}", rollback=True)
                return
            self.baseline = int(fut.result["failures_total_before"])
            self.grace_started = self.clock()
            self.phase = "grace"
        elif self.phase == "grace" and self.controller is not None and self.target is not None:
            verdict, why = judge(self.controller.snapshot(), self.baseline, self.grace_started, self.clock(),
                                 time.time_ns() // 1_000_000, self.grace_s, self.stable_s)
            if verdict == "ok":
                self._succeed(self.target["prepared"], why)
            elif verdict == "fail":
                self._fail(why, rollback=True)

    def stop(self) -> None:
        if self.download is not None:
            if self.phase == "ota":
                self._save()
            self.download.close()


def ota_dir_cleanup(directory: Path, keep: set[str]) -> None:
    """Remove part files of downloads nobody resumes."""
    try:
        for p in directory.glob("sw-*.part"):
            if p.name not in keep:
                os.unlink(p)
    except OSError:
        pass
