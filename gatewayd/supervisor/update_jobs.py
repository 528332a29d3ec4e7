"""The slow parts of a software update, run as background jobs (each with its own Docker connection).

`updates.UpdateManager` decides what to do in the main loop; these functions do it: resolve
and build a git commit, pull an image, verify and load an OTA package.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gatewayd.config import Config
from gatewayd.supervisor import gitsrc
from gatewayd.supervisor.docker_api import Docker, DockerError, safe_tag, split_image_ref
from gatewayd.supervisor.images import LABEL_COMMIT, LABEL_OWNER, archive_image_ids
from gatewayd.supervisor.jobs import Job
from gatewayd.supervisor.ota import OtaError, checksum_matches, file_checksum, normalize_algorithm

log = logging.getLogger("gatewayd.supervisor")


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


def image_reference(cfg: Config, req: Request) -> str:
    """The image an image-reference request names.

    `sw_url` names it (`docker://` optional); else the version is a tag of `[controller]
    image`'s repository; else, on a device with no controller configured, `sw_version` is a
    whole reference (`name:tag`, `name@sha256:...`) or `sw_title` is the repository name and
    `sw_version` its tag.
    """
    c = cfg["controller"]
    if req.url:
        ref = req.url.split("://", 1)[1] if req.url.startswith(("docker://", "docker-image://")) else req.url
        if "://" in ref:
            raise DockerError(f"sw_url {req.url!r} is not an image reference (downloads over HTTP are "
                              "not supported; attach the package to ThingsBoard instead)")
        return ref
    if c["image"]:
        return f"{split_image_ref(c['image'])[0]}:{safe_tag(req.version)}"
    if not c["repository"]:
        if split_image_ref(req.version)[1] is not None or "@" in req.version:
            return req.version
        if req.title.strip():
            return f"{req.title.strip()}:{safe_tag(req.version)}"
        raise DockerError("no controller is configured: name the image with sw_title (repository) and "
                          "sw_version (tag), or sw_url, or attach a package")
    raise DockerError("no update source: set [controller] repository or image, or attach a package")


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


def bootstrap_job(cfg: Config, current: dict[str, Any] | None) -> dict[str, Any] | None:
    """The image to run at start-up: the saved good version, else what the config names, else
    None (no image nor repository configured: the device waits for ThingsBoard to name one)."""
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
        return None  # nothing configured: the first controller comes from ThingsBoard
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
            ref = image_reference(cfg, req)
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


def ota_dir_cleanup(directory: Path, keep: set[str]) -> None:
    """Remove part files of downloads nobody resumes."""
    try:
        for p in directory.glob("sw-*.part"):
            if p.name not in keep:
                os.unlink(p)
    except OSError:
        pass
