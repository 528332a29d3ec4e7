"""Software updates of the controller (`sw_title` / `sw_version` shared attributes), with rollback.

Sources, chosen per request:
1. a ThingsBoard OTA package (`sw_checksum` and `sw_size` present, no `sw_url`): fetched over
   MQTT in chunks (see ota.py), checked against `sw_checksum` (`sw_checksum_algorithm`),
   `docker load`ed (the package is a `docker save` archive);
2. `sw_url` naming an image (`docker://` prefix optional): used if present, else pulled;
3. `[controller] repository`: the tag or commit is resolved with git, built with docker build;
4. `[controller] image`: the same repository with the version as tag;
5. with no image nor repository configured (the first controller comes from ThingsBoard):
   `sw_version` as an image reference, or `sw_title` as the repository and `sw_version` as
   the tag (see `update_jobs.image_reference`).

Progress is reported as telemetry `sw_state` (DOWNLOADING, DOWNLOADED, VERIFIED, UPDATING,
UPDATED, FAILED), with `sw_error` on failure and `current_sw_title` / `current_sw_version`.
After the switch, the new version must become healthy within `update_grace_s` (HEALTHCHECK
`healthy`, or running for `update_stable_s` without one, and no failure); otherwise the last
good version is started again (none: the container is removed) and the update is reported
FAILED. A request that failed is not retried until the requested version changes; a request
naming the running version (also by another name of the same git commit) changes nothing.
After an update ends (UPDATED, or FAILED once the rollback is done), images earlier updates
built or loaded are removed (see images.py), keeping the running one, the last good one and
`keep_images` in all.

Builds, pulls, loads and checksums run as background jobs; this class itself runs in the
main loop and never blocks.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import asdict
from enum import StrEnum
from typing import Any, Protocol

from gatewayd import topics
from gatewayd.clock import now_ms
from gatewayd.config import Config
from gatewayd.supervisor.controller import Target
from gatewayd.supervisor.images import cleanup_job
from gatewayd.supervisor.jobs import Future, Job, Jobs
from gatewayd.supervisor.ota import Download, OtaError
from gatewayd.supervisor.update_jobs import (
    Request,
    bootstrap_job,
    config_key,
    install_package_job,
    ota_dir_cleanup,
    prepare_job,
)

log = logging.getLogger("gatewayd.supervisor")

SW_KEYS = ("sw_title", "sw_version", "sw_url", "sw_checksum", "sw_checksum_algorithm", "sw_size")
STATE_KEY = "supervisor.sw"
OWNED_MAX = 50  # OTA-loaded image ids remembered for the image cleanup
BOOTSTRAP_RETRY_S = 30.0

__all__ = ["SW_KEYS", "Phase", "Request", "UpdateManager", "judge"]


class Phase(StrEnum):
    """Where the update machine is; its value is what `status` and `gatewayctl` show."""

    BOOTSTRAP = "bootstrap"  # preparing the image to run at start-up
    BOOTSTRAP_WAIT = "bootstrap_wait"  # that failed; retrying later
    DISABLED = "disabled"  # no controller
    IDLE = "idle"
    PREPARE = "prepare"  # resolving, building or pulling the requested version
    OTA = "ota"  # downloading a package over MQTT
    INSTALL = "install"  # verifying and loading the package
    SWITCH = "switch"  # the controller thread is starting the new version
    GRACE = "grace"  # judging the new version's health
    CLEANUP = "cleanup"  # removing surplus images


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


class Controller(Protocol):
    """What updates ask of the controller's manager (`controller.ControllerManager`)."""

    def set_target(self, target: Target) -> Future: ...

    def clear_target(self) -> Future: ...

    def snapshot(self) -> dict[str, Any]: ...


class UpdateManager:
    def __init__(self, cfg: Config, controller: Controller | None, jobs: Jobs,
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

        # Saved state (`STATE_KEY`), read by `start()`.
        self.current: dict[str, Any] | None = None
        self.failed_key: str | None = None
        self.target: dict[str, Any] | None = None  # {"request": {...}, "prepared": {...}|None}
        self.ota_state: dict[str, Any] | None = None
        self.sw_state: str | None = None
        self.sw_error: str | None = None
        self.previous: dict[str, Any] | None = None  # the good version before `current`
        self.owned: dict[str, list[str]] = {}  # OTA-loaded image id → tags it made

        self.requested: dict[str, Any] = {}
        self.phase = Phase.BOOTSTRAP
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
    def _load(self) -> None:
        st = self.get_state(STATE_KEY) or {}
        self.current = st.get("current")
        self.failed_key = st.get("failed_key")
        self.target = st.get("target")
        self.ota_state = st.get("ota")
        self.sw_state = st.get("sw_state")
        self.sw_error = st.get("sw_error")
        self.previous = st.get("previous")
        self.owned = dict(st.get("owned") or {})

    def start(self) -> None:
        """Read the saved state, then prepare the image to run (a background job)."""
        self._load()
        if self.controller is None:
            self.phase = Phase.DISABLED
            return
        keep = {f"sw-{self.ota_state['request_id']}.part"} if self.ota_state and self.target else set()
        ota_dir_cleanup(self.ota_dir, keep)
        self._start_bootstrap()

    def _start_bootstrap(self) -> None:
        self.phase = Phase.BOOTSTRAP
        self.job = self.jobs.submit("prepare controller image", bootstrap_job, self.cfg, self.current)

    def _bootstrap_done(self, job: Job) -> None:
        if job.error is not None:
            log.error("cannot prepare the controller image: %s (retrying in %.0f s)", job.error, BOOTSTRAP_RETRY_S)
            self.bootstrap_retry_at = self.clock() + BOOTSTRAP_RETRY_S
            self.phase = Phase.BOOTSTRAP_WAIT
            self.last_error = job.error
            return
        cur = dict(job.result) if job.result else None
        if cur is None:
            log.info("no controller configured ([controller] image and repository are empty): waiting for "
                     "sw_title / sw_version from ThingsBoard")
            if self.current is not None:
                self.current = None
                self._save()
        elif self.current is None or self.current.get("image_id") != cur.get("image_id"):
            self.current = cur
            self._save()
        self._report_current()
        self.phase = Phase.IDLE
        req = self._target_request()
        prepared = self.target.get("prepared") if self.target else None
        if req is not None and prepared:
            # Interrupted after the switch began: judge the new version again (the container may
            # already run it; starting the old one first would restart the controller twice).
            log.info("resuming the interrupted update to %s", req.version)
            self._switch(prepared)
            return
        if self.current is not None:
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
        if req is None or self.phase in (Phase.BOOTSTRAP, Phase.BOOTSTRAP_WAIT, Phase.DISABLED):
            if req is not None and self.phase == Phase.DISABLED and req.key != self._ignored_key:
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
        if self.phase != Phase.IDLE:
            if self.phase == Phase.OTA and self.download is not None:
                log.info("a new version was requested during a download; abandoning the download")
                self.download.discard()
                self.download = None
                self.target = None
                self.phase = Phase.IDLE
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
        self.phase = Phase.PREPARE
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
                self.download = Download(self.ota_dir, str(now_ms()), req.title, req.version,
                                         req.size, req.checksum, req.algorithm or "sha256", c["ota_chunk_size"],
                                         c["ota_window"], c["ota_chunk_timeout_s"])
        except (OtaError, OSError) as e:
            self._fail(str(e), rollback=False)
            return
        self.phase = Phase.OTA
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
            self.enqueue_raw(topics.sw_chunk_request(self.download.request_id, n), str(self.download.chunk_size))

    def _ota_failed(self, text: str) -> None:
        if self.download is not None:
            self.download.discard()
            self.download = None
        self._fail(text, rollback=False)

    def on_chunk(self, request_id: str, n: int, data: bytes) -> None:
        dl = self.download
        if dl is None or self.phase != Phase.OTA or request_id != dl.request_id:
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
            self.phase = Phase.INSTALL
            self.job = self.jobs.submit(f"install package {req.version}", install_package_job, self.cfg, path, req,
                                        self.events.put)
        else:
            self._request_chunks()

    def on_ota_error(self, text: str) -> None:
        if self.download is not None and self.phase == Phase.OTA:
            self._ota_failed(f"ThingsBoard refused the package download: {text}")

    # -- switching and judging ---------------------------------------------------------
    def _switch(self, prepared: dict[str, Any]) -> None:
        assert self.target is not None
        self.target["prepared"] = prepared
        self.phase = Phase.SWITCH
        self._report("UPDATING")
        self.future = self._set_controller(prepared)

    def _fail(self, error: str, rollback: bool) -> None:
        req = self._target_request()
        if req is not None:
            self.failed_key = req.key
        self._report("FAILED", error)
        rolled_back: Future | None = None
        if rollback and self.controller is not None:
            if self.current:
                log.warning("rolling back to version %s (%s)", self.current.get("version"),
                            self.current.get("image"))
                rolled_back = self._set_controller(self.current)
            else:
                log.warning("no earlier version to go back to: removing the controller container")
                rolled_back = self.controller.clear_target()
        self.target = None
        self.phase = Phase.IDLE
        self.job = None
        self._save()
        if rolled_back is not None:
            self._start_cleanup(rolled_back)  # once the failed version's container is gone
        self._consider()

    def _succeed(self, prepared: dict[str, Any], why: str) -> None:
        new = dict(prepared)
        new["config_key"] = config_key(self.cfg)
        new["updated_ms"] = now_ms()
        if self.current and self.current.get("image_id") != new.get("image_id"):
            self.previous = self.current
        self.current = new
        self.failed_key = None
        self._report("UPDATED", extra={"current_sw_title": new.get("title") or "",
                                       "current_sw_version": new.get("version") or ""})
        log.info("controller updated to version %s (%s)", new.get("version"), why)
        self.target = None
        self.phase = Phase.IDLE
        self.job = None
        self._save()
        self._start_cleanup(None)
        self._consider()

    # -- removal of old images -----------------------------------------------------------
    def _start_cleanup(self, after: Future | None) -> None:
        """Remove surplus images in a job (after `after`, the rollback, is done); a new update waits."""
        self.phase = Phase.CLEANUP
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
        self.phase = Phase.IDLE
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
        if self.phase in (Phase.BOOTSTRAP, Phase.PREPARE, Phase.INSTALL) and self.job is not None and self.job.done():
            job, self.job = self.job, None
            if self.phase == Phase.BOOTSTRAP:
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
                self.phase = Phase.IDLE
                self._save()
                self._consider()
            else:
                self._remember_owned(job.result)
                self._switch(job.result)
        elif self.phase == Phase.CLEANUP:
            if self.job is None:
                if self.future is None or self.future.done():
                    self.future = None
                    self._submit_cleanup()
            elif self.job.done():
                job, self.job = self.job, None
                self._cleanup_done(job)
        elif self.phase == Phase.BOOTSTRAP_WAIT and self.clock() >= self.bootstrap_retry_at:
            self._start_bootstrap()
        elif self.phase == Phase.OTA and self.download is not None:
            self._request_chunks()
        elif self.phase == Phase.SWITCH and self.future is not None and self.future.done():
            fut, self.future = self.future, None
            if fut.error is not None:
                self._fail(f"cannot start the new version: {fut.error}", rollback=True)
                return
            self.baseline = int(fut.result["failures_total_before"])
            self.grace_started = self.clock()
            self.phase = Phase.GRACE
        elif self.phase == Phase.GRACE and self.controller is not None and self.target is not None:
            verdict, why = judge(self.controller.snapshot(), self.baseline, self.grace_started, self.clock(),
                                 now_ms(), self.grace_s, self.stable_s)
            if verdict == "ok":
                self._succeed(self.target["prepared"], why)
            elif verdict == "fail":
                self._fail(why, rollback=True)

    def stop(self) -> None:
        if self.download is not None:
            if self.phase == Phase.OTA:
                self._save()
            self.download.close()
