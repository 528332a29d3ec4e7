"""A supervisor under test as a real process, with the test playing its bridge.

- `SupervisorEnv` writes a config under a directory (the test's sections over
  `write_config`'s defaults), runs `python -m gatewayd supervisor` on it, and once the daemon
  is up opens queues.db the way the bridge does (`.b`, a `docker_env.BridgeSide`).
- `merge_sections()` lays config sections over each other, one section at a time.
- For tests with a real Docker engine: `controller_name()` gives a container name whose
  containers and images are removed afterwards, `controller_section()` the `[controller]`
  keys those tests share, and `dockerfile()` a controller image that stops cleanly on
  SIGTERM and writes its version into /data/version.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

from gatewayd.config import Config, load
from tests.helpers.daemons import Daemon, write_config
from tests.helpers.docker_env import BASE_IMAGE, BridgeSide, images_with_prefix, remove_containers, remove_images

# A controller that stops cleanly on SIGTERM and says which version it is.
LOOP = "trap 'exit 0' TERM; echo {v} > /data/version; echo started {v}; while true; do /bin/sleep 0.2; done"


def merge_sections(*layers: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The sections of every layer, later layers' keys over earlier ones' (section by section)."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, keys in (layer or {}).items():
            merged.setdefault(name, {}).update(keys)
    return merged


class SupervisorEnv:
    """One supervisor daemon on its own config, and the bridge's side of its queues.db."""

    def __init__(self, base: Path, sections: Mapping[str, Mapping[str, Any]] | None = None,
                 env: dict[str, str] | None = None):
        self.base = base
        self.config = write_config(base, merge_sections(sections))
        self.cfg: Config = load(self.config, env={})
        self.daemon = Daemon("supervisor", self.config, env=env)
        self.bridge: BridgeSide | None = None

    def start(self) -> Self:
        self.daemon.start()
        if self.bridge is None:
            self.bridge = BridgeSide(self.cfg.state_dir)
        return self

    @property
    def b(self) -> BridgeSide:
        assert self.bridge is not None
        return self.bridge

    def stop(self) -> None:
        self.daemon.stop()
        if self.bridge is not None:
            self.bridge.close()


@contextlib.contextmanager
def controller_name(prefix: str = "gwtest") -> Iterator[str]:
    """A fresh container name; its containers and the images named after it are removed afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        remove_containers(name)
        remove_images(*images_with_prefix(name))


def controller_section(name: str, **keys: Any) -> dict[str, Any]:
    """`[controller]` for a container `name` with quick polling and short timeouts; `keys` add or override."""
    return {"enabled": True, "container_name": name, "network_mode": "none", "poll_interval_s": 0.3,
            "stop_timeout_s": 2, "update_stable_s": 2, "update_grace_s": 20, **keys}


def dockerfile(version: str, extra: str = "", cmd: str | None = None) -> str:
    """A controller image FROM the test base image: `LOOP` for `version`, or the shell command `cmd`."""
    script = cmd if cmd is not None else LOOP.format(v=version)
    return f"FROM {BASE_IMAGE}\n{extra}\nCMD {json.dumps(['/bin/sh', '-c', script])}\n"
