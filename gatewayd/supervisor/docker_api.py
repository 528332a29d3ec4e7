"""The one place that talks to Docker, through the Docker SDK for Python.

Works with docker-py 5.0.3 (Debian bookworm's python3-docker) and 7.x (PyPI): only APIs
present in both are used, the API version is negotiated (`version="auto"`), and container
state is read from the raw inspect document rather than from newer model properties.

A `Docker` object is not shared between threads: the controller thread has its own, and
every background job creates one. Short calls use `timeout_s`; builds, loads and pulls a
long one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

log = logging.getLogger("gatewayd.supervisor")

LABEL_MANAGED = "io.gatewayd.managed"
LABEL_SPEC = "io.gatewayd.spec"
LABEL_VERSION = "io.gatewayd.version"


class DockerError(Exception):
    """Anything Docker could not do, with the engine's own words."""


class ImageMissing(DockerError):
    pass


class ImageInUse(DockerError):
    """The engine refused to remove an image (409 conflict: a container or a child image uses it)."""


_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def parse_time_ms(text: str | None) -> int | None:
    """Docker's RFC 3339 times (nanoseconds, 'Z') as epoch ms; None for the zero time."""
    if not text or text.startswith("0001-"):
        return None
    m = _TS.match(text.strip())
    if not m:
        return None
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    tz = m.group(3) or "Z"
    tz = "+00:00" if tz == "Z" else tz
    try:
        dt = datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}")
    except ValueError:
        return None
    return int(dt.timestamp() * 1000)


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    image_id: str
    status: str  # created, running, paused, restarting, removing, exited, dead
    exit_code: int | None
    started_ms: int | None
    finished_ms: int | None
    health: str | None  # None (no HEALTHCHECK), starting, healthy, unhealthy
    labels: dict[str, str] = field(default_factory=dict)
    error: str = ""
    oom_killed: bool = False

    @property
    def running(self) -> bool:
        return self.status in ("running", "paused", "restarting")

    @staticmethod
    def from_attrs(attrs: dict[str, Any]) -> ContainerInfo:
        st = attrs.get("State") or {}
        health = (st.get("Health") or {}).get("Status") or None
        if health == "none":
            health = None
        return ContainerInfo(
            id=str(attrs.get("Id", "")),
            name=str(attrs.get("Name", "")).lstrip("/"),
            image_id=str(attrs.get("Image", "")),
            status=str(st.get("Status", "unknown")),
            exit_code=st.get("ExitCode"),
            started_ms=parse_time_ms(st.get("StartedAt")),
            finished_ms=parse_time_ms(st.get("FinishedAt")),
            health=health,
            labels=dict((attrs.get("Config") or {}).get("Labels") or {}),
            error=str(st.get("Error") or ""),
            oom_killed=bool(st.get("OOMKilled")),
        )


@dataclass(frozen=True)
class ContainerSpec:
    """What the controller container must look like (from config plus the chosen image)."""

    name: str
    image: str
    command: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    binds: tuple[tuple[str, str, str], ...] = ()  # (host path, container path, "rw"|"ro")
    network_mode: str = "host"
    devices: tuple[str, ...] = ()
    version: str = ""

    def digest(self, image_id: str) -> str:
        """Identifies the container's configuration; a running container with another is recreated."""
        doc = {"image_id": image_id, "command": list(self.command), "env": sorted(self.environment),
               "binds": sorted(self.binds), "network": self.network_mode, "devices": sorted(self.devices)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def parse_mount(text: str) -> tuple[str, str, str]:
    """'host:container[:ro|rw]' → (host, container, mode); ValueError with the reason."""
    parts = text.split(":")
    if len(parts) == 2:
        parts.append("rw")
    if len(parts) != 3 or parts[2] not in ("ro", "rw"):
        raise ValueError(f"mount {text!r}: expected 'host_path:container_path[:ro|rw]'")
    if not parts[0].startswith("/") or not parts[1].startswith("/"):
        raise ValueError(f"mount {text!r}: both paths must be absolute")
    return parts[0], parts[1], parts[2]


def split_image_ref(ref: str) -> tuple[str, str | None]:
    """'repo/name:tag' → ('repo/name', 'tag'); a registry port is not a tag; digests keep no tag."""
    if "@" in ref:
        return ref.split("@", 1)[0], None
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, None


_TAG_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def safe_tag(version: str) -> str:
    """A Docker tag made from a version string (tags allow [A-Za-z0-9_.-], 128 chars, no leading . or -)."""
    tag = _TAG_BAD.sub("_", version)[:128]
    if not tag or tag[0] in ".-":
        tag = ("v" + tag)[:128]
    return tag


def _err(e: Exception) -> DockerError:
    explanation = getattr(e, "explanation", None)
    text = explanation.decode() if isinstance(explanation, bytes) else (explanation or str(e))
    if type(e).__name__ == "ImageNotFound":
        return ImageMissing(str(text))
    return DockerError(str(text))


class Docker:
    def __init__(self, timeout_s: float = 30.0, long_timeout_s: float = 3600.0):
        self.timeout_s = timeout_s
        self.long_timeout_s = long_timeout_s
        self._client: Any = None
        self._api_long: Any = None

    # -- connections -------------------------------------------------------------------
    def client(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = docker.from_env(version="auto", timeout=int(self.timeout_s))
            except Exception as e:
                raise DockerError(f"cannot reach the Docker engine: {e}") from e
        return self._client

    def api_long(self) -> Any:
        if self._api_long is None:
            import docker
            from docker.utils import kwargs_from_env

            try:
                self._api_long = docker.APIClient(version="auto", timeout=int(self.long_timeout_s),
                                                  **kwargs_from_env())
            except Exception as e:
                raise DockerError(f"cannot reach the Docker engine: {e}") from e
        return self._api_long

    def reset(self) -> None:
        """Forget connections (after an engine restart or a timeout)."""
        for c in (self._client, self._api_long):
            try:
                if c is not None:
                    c.close()
            except Exception:  # noqa: BLE001 - forgetting a client that may be broken
                pass
        self._client = self._api_long = None

    def close(self) -> None:
        self.reset()

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except DockerError:
            raise
        except Exception as e:
            if type(e).__name__ in ("ConnectionError", "ReadTimeout", "Timeout", "ConnectTimeout",
                                    "ProtocolError", "FileNotFoundError", "ConnectionRefusedError"):
                self.reset()
            raise _err(e) from e

    def ping(self) -> bool:
        return bool(self._call(lambda: self.client().ping()))

    # -- containers --------------------------------------------------------------------
    def inspect(self, name: str) -> ContainerInfo | None:
        def do() -> ContainerInfo | None:
            try:
                attrs = self.client().api.inspect_container(name)
            except Exception as e:
                if type(e).__name__ == "NotFound":
                    return None
                raise
            return ContainerInfo.from_attrs(attrs)

        result: ContainerInfo | None = self._call(do)
        return result

    def create_and_start(self, spec: ContainerSpec, image_id: str, extra_labels: dict[str, str] | None = None
                         ) -> ContainerInfo:
        labels = {LABEL_MANAGED: "1", LABEL_SPEC: spec.digest(image_id), LABEL_VERSION: spec.version}
        labels.update(extra_labels or {})

        def do() -> ContainerInfo:
            c = self.client()
            kwargs: dict[str, Any] = {
                "name": spec.name,
                "detach": True,
                "environment": {k: v for k, v in spec.environment},
                "volumes": {h: {"bind": t, "mode": m} for h, t, m in spec.binds},
                "labels": labels,
                "restart_policy": {"Name": "no"},
                "log_config": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
            }
            if spec.network_mode:
                kwargs["network_mode"] = spec.network_mode
            if spec.devices:
                kwargs["devices"] = [d if ":" in d else f"{d}:{d}:rwm" for d in spec.devices]
            if spec.command:
                kwargs["command"] = list(spec.command)
            container = c.containers.create(image_id, **kwargs)
            try:
                container.start()
            except Exception:
                # A container that cannot start is removed, so the next attempt starts clean.
                try:
                    container.remove(force=True)
                except Exception:  # noqa: BLE001 - the start's own error is the one raised
                    pass
                raise
            return ContainerInfo.from_attrs(c.api.inspect_container(container.id))

        info: ContainerInfo = self._call(do)
        return info

    def start(self, name: str) -> None:
        self._call(lambda: self.client().api.start(name))

    def stop(self, name: str, timeout_s: float) -> None:
        """Stop (SIGTERM, then SIGKILL after timeout_s); the HTTP wait is longer than the stop timeout."""

        def do() -> None:
            import docker
            from docker.utils import kwargs_from_env

            api = docker.APIClient(version="auto", timeout=int(timeout_s + self.timeout_s), **kwargs_from_env())
            try:
                api.stop(name, timeout=int(timeout_s))
            finally:
                api.close()

        self._call(do)

    def remove(self, name: str) -> None:
        def do() -> None:
            try:
                self.client().api.remove_container(name, force=True)
            except Exception as e:
                if type(e).__name__ != "NotFound":
                    raise

        self._call(do)

    def logs(self, name: str, lines: int) -> list[str]:
        def do() -> list[str]:
            raw = self.client().api.logs(name, stdout=True, stderr=True, timestamps=True, tail=int(lines))
            return raw.decode("utf-8", "replace").splitlines()

        result: list[str] = self._call(do)
        return result

    # -- images ------------------------------------------------------------------------
    def image_inspect(self, ref: str) -> dict[str, Any] | None:
        def do() -> dict[str, Any] | None:
            try:
                doc: dict[str, Any] = self.client().api.inspect_image(ref)
                return doc
            except Exception as e:
                if type(e).__name__ in ("ImageNotFound", "NotFound"):
                    return None
                raise

        result: dict[str, Any] | None = self._call(do)
        return result

    def image_id(self, ref: str) -> str | None:
        doc = self.image_inspect(ref)
        return str(doc["Id"]) if doc else None

    def tag(self, image: str, ref: str) -> None:
        repo, tag = split_image_ref(ref)
        self._call(lambda: self.client().api.tag(image, repo, tag or "latest", force=True))

    def remove_image(self, ref: str) -> None:
        def do() -> None:
            try:
                self.client().api.remove_image(ref, force=False, noprune=False)
            except Exception as e:
                if type(e).__name__ not in ("ImageNotFound", "NotFound"):
                    raise

        self._call(do)

    def images(self) -> list[dict[str, Any]]:
        """Summaries of all tagged and dangling images (Id, RepoTags, Labels, Created, Size)."""
        result: list[dict[str, Any]] = self._call(lambda: list(self.client().api.images() or []))
        return result

    def delete_image(self, ref: str) -> list[dict[str, Any]]:
        """Untag `ref` (a tag) or remove an image by id, never forced; the engine's
        [{"Untagged": …}, {"Deleted": …}] entries ([] if it is gone). ImageInUse on a conflict."""

        def do() -> list[dict[str, Any]]:
            try:
                res = self.client().api.remove_image(ref, force=False, noprune=False)
            except Exception as e:
                if type(e).__name__ in ("ImageNotFound", "NotFound"):
                    return []
                if getattr(e, "status_code", None) == 409 or "conflict" in str(e).lower():
                    raise ImageInUse(str(_err(e))) from e
                raise
            return [x for x in (res or []) if isinstance(x, dict)]

        result: list[dict[str, Any]] = self._call(do)
        return result

    @staticmethod
    def _consume(stream: Iterable[Any], progress: Callable[[str], None] | None) -> list[dict[str, Any]]:
        """Read a decoded JSON progress stream; raise on its error entries."""
        items: list[dict[str, Any]] = []
        for item in stream:
            if not isinstance(item, dict):
                continue
            items.append(item)
            if item.get("error") or item.get("errorDetail"):
                detail = item.get("error") or (item.get("errorDetail") or {}).get("message")
                raise DockerError(str(detail).strip())
            text = item.get("stream") or item.get("status")
            if progress and isinstance(text, str) and text.strip():
                progress(text.strip())
        return items

    def build(self, context: IO[bytes], tag: str, dockerfile: str = "Dockerfile",
              labels: dict[str, str] | None = None, network_mode: str = "",
              progress: Callable[[str], None] | None = None) -> str:
        """Build from a tar context; returns the image id."""

        def do() -> str:
            kwargs: dict[str, Any] = {"fileobj": context, "custom_context": True, "tag": tag,
                                      "dockerfile": dockerfile, "rm": True, "forcerm": True, "decode": True,
                                      "labels": labels or {}, "timeout": int(self.long_timeout_s)}
            if network_mode:
                kwargs["network_mode"] = network_mode
            items = self._consume(self.api_long().build(**kwargs), progress)
            for item in reversed(items):
                aux = item.get("aux")
                if isinstance(aux, dict) and aux.get("ID"):
                    return str(aux["ID"])
            image_id = self.image_id(tag)
            if not image_id:
                raise DockerError(f"docker build finished but image {tag} is missing")
            return image_id

        result: str = self._call(do)
        return result

    def load(self, archive: IO[bytes], progress: Callable[[str], None] | None = None) -> list[str]:
        """`docker load` a `docker save` archive; returns what it loaded ('repo:tag' or image ids)."""

        def do() -> list[str]:
            items = self._consume(self.api_long().load_image(archive), progress)
            loaded: list[str] = []
            for item in items:
                text = str(item.get("stream") or "")
                for prefix in ("Loaded image: ", "Loaded image ID: "):
                    if text.startswith(prefix):
                        loaded.append(text[len(prefix):].strip())
            if not loaded:
                raise DockerError("docker load reported no image (is the package a `docker save` archive?)")
            return loaded

        result: list[str] = self._call(do)
        return result

    def pull(self, ref: str, progress: Callable[[str], None] | None = None) -> str:
        def do() -> str:
            repo, tag = split_image_ref(ref)
            if "@" in ref:
                stream = self.api_long().pull(ref, stream=True, decode=True)
            else:
                stream = self.api_long().pull(repo, tag=tag or "latest", stream=True, decode=True)
            self._consume(stream, progress)
            image_id = self.image_id(ref)
            if not image_id:
                raise DockerError(f"pulled {ref} but it is not there")
            return image_id

        result: str = self._call(do)
        return result
