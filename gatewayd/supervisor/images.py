"""Removal of the controller images software updates left behind (run as a background job).

Every git update builds an image and every OTA package `docker load`s one; without this,
a device nobody can reach fills its disk. After an update ends (UPDATED, or FAILED after the
rollback), images gatewayd itself created are removed, except the running one and the last
good one, so that at most `[controller] keep_images` of them remain (newest first).

Only images gatewayd created are touched:
- tagged in gatewayd's repository (`[controller] image_name`, default `container_name`), and
- built by gatewayd (label `io.gatewayd.commit`, and `io.gatewayd.image-name` naming this
  repository when present) or loaded from an OTA package that was not on the device before
  (their ids are remembered in the update state, see `UpdateManager.owned`).
The image `[controller] image` names is never removed, nor anything only other tags name:
removal is by tag, never forced, so an image still tagged elsewhere or used by a container
stays (a conflict is logged and skipped). Dangling images gatewayd built (a version rebuilt
under the same tag) are removed by id; there is no global `docker image prune`.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd.config import Config
from gatewayd.supervisor.docker_api import Docker, DockerError, ImageInUse, split_image_ref

log = logging.getLogger("gatewayd.supervisor")

LABEL_COMMIT = "io.gatewayd.commit"
LABEL_OWNER = "io.gatewayd.image-name"


def repo_name(cfg: Config) -> str:
    c = cfg["controller"]
    return str(c["image_name"] or c["container_name"])


@dataclass(frozen=True)
class OwnImage:
    """An image gatewayd created; `refs` are the tags to remove (empty: dangling, removed by id)."""

    id: str
    refs: tuple[str, ...]
    created: int
    size: int = 0


def _tags(summary: Mapping[str, Any]) -> list[str]:
    return [str(t) for t in (summary.get("RepoTags") or []) if t and t != "<none>:<none>"]


def own_images(summaries: Iterable[Mapping[str, Any]], name: str,
               owned: Mapping[str, Sequence[str]]) -> list[OwnImage]:
    """The images (from `Docker.images()`) gatewayd created for repository `name`.

    `owned` maps ids of images gatewayd loaded from OTA packages to the tags the load created.
    """
    out: list[OwnImage] = []
    for s in summaries:
        iid = str(s.get("Id") or "")
        if not iid:
            continue
        tags = _tags(s)
        labels = s.get("Labels") or {}
        built = LABEL_COMMIT in labels and labels.get(LABEL_OWNER, name) == name
        loaded = iid in owned
        if not (built or loaded):
            continue
        ours = [t for t in tags if split_image_ref(t)[0] == name]
        if tags and not ours:
            continue  # only other names (the operator's, or a package's) refer to it
        if loaded:
            ours += [t for t in owned[iid] if t in tags and t not in ours]
        try:
            created = int(s.get("Created") or 0)
        except (TypeError, ValueError):
            created = 0
        out.append(OwnImage(id=iid, refs=tuple(ours), created=created, size=int(s.get("Size") or 0)))
    return out


def select_removals(images: Sequence[OwnImage], keep: int, protected: Iterable[str]) -> list[OwnImage]:
    """Which of gatewayd's images to remove: all but the protected (running, last good) ones and the
    newest others, `keep` in all (protected ones always stay, even beyond `keep`); dangling ones go."""
    prot = {p for p in protected if p}
    tagged = sorted((i for i in images if i.refs), key=lambda i: (i.created, i.id), reverse=True)
    slots = max(0, max(1, keep) - sum(1 for i in tagged if i.id in prot))
    out: list[OwnImage] = []
    for img in tagged:
        if img.id in prot:
            continue
        if slots > 0:
            slots -= 1
            continue
        out.append(img)
    out += [i for i in images if not i.refs and i.id not in prot]
    return out


def archive_image_ids(path: Path) -> list[str]:
    """Image ids in a `docker save` archive (from manifest.json's Config digests); [] if unknown."""
    try:
        with tarfile.open(path) as tar:
            f = tar.extractfile("manifest.json")
            doc = json.load(io.TextIOWrapper(f, "utf-8")) if f is not None else []
    except (OSError, tarfile.TarError, KeyError, ValueError):
        return []
    ids = []
    for entry in doc if isinstance(doc, list) else []:
        cfg = str((entry or {}).get("Config") or "") if isinstance(entry, dict) else ""
        digest = cfg.rsplit("/", 1)[-1].removesuffix(".json")
        if len(digest) == 64:
            ids.append(f"sha256:{digest}")
    return ids


def _ancestry(d: Docker, image_id: str) -> list[tuple[str, int]]:
    """(id, size) of the image and its parents (the classic builder's intermediate images)."""
    chain: list[tuple[str, int]] = []
    ref = image_id
    while ref and len(chain) < 200:
        doc = d.image_inspect(ref)
        if not doc:
            break
        chain.append((str(doc.get("Id")), int(doc.get("Size") or 0)))
        ref = str(doc.get("Parent") or "")
    return chain


def freed_bytes(chain: Sequence[tuple[str, int]], deleted: set[str]) -> int:
    """Bytes freed by deleting an image: its size less that of its nearest ancestor still there."""
    if not chain or chain[0][0] not in deleted:
        return 0
    for iid, size in chain[1:]:
        if iid not in deleted:
            return max(0, chain[0][1] - size)
    return chain[0][1]


def cleanup_job(cfg: Config, protected: list[str], owned: dict[str, list[str]]) -> dict[str, Any]:
    """Remove gatewayd's surplus controller images; {"removed": [...], "kept_in_use": [...], "freed": n,
    "gone": ids no longer present}."""
    c = cfg["controller"]
    name = repo_name(cfg)
    d = Docker(long_timeout_s=c["build_timeout_s"])
    removed: list[str] = []
    in_use: list[str] = []
    gone: list[str] = []
    freed_total = 0
    try:
        prot = {p for p in protected if p}
        if c["image"]:
            configured = d.image_id(c["image"])
            if configured:
                prot.add(configured)
        summaries = d.images()
        present = {str(s.get("Id") or "") for s in summaries}
        gone += [i for i in owned if i not in present]
        for img in select_removals(own_images(summaries, name, owned), c["keep_images"], prot):
            label = ", ".join(img.refs) or img.id[:19]
            chain = _ancestry(d, img.id)
            deleted: set[str] = set()
            try:
                for ref in img.refs or (img.id,):
                    for item in d.delete_image(ref):
                        if item.get("Deleted"):
                            deleted.add(str(item["Deleted"]))
            except ImageInUse as e:
                log.info("controller image %s kept: %s", label, e)
                in_use.append(label)
                continue
            except DockerError as e:
                log.warning("cannot remove controller image %s: %s", label, e)
                continue
            freed = freed_bytes(chain, deleted)
            freed_total += freed
            if img.id in deleted or not chain:
                gone.append(img.id)
            removed.append(label)
            log.info("removed controller image %s (%s): %d bytes freed", label, img.id[:19], freed)
    finally:
        d.close()
    if removed:
        log.info("old controller images removed: %d, %d bytes freed (%d kept at most)", len(removed),
                 freed_total, c["keep_images"])
    return {"removed": removed, "kept_in_use": in_use, "freed": freed_total, "gone": gone}
