"""Disk headroom for the state directory.

Two mechanisms keep the small, important commits possible when the disk fills up (the
ledger, acknowledged-row deletions, RPC replies, a daemon restarting and creating its -shm):

- a free-space floor: below `min_free_bytes` the forwarder stops copying bulk records out of
  the controller queue (they wait there, counted in its depth, nothing is lost), so gatewayd
  itself never eats the last megabytes;
- a reserve file (`<state_dir>/.gatewayd-reserve`), pre-allocated while space is plentiful and
  deleted the moment the disk is found full, whoever filled it: the space it frees lets the
  daemons commit and restart. It is allocated again once free space is back above the floor.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("gatewayd.store")

RESERVE_NAME = ".gatewayd-reserve"


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use in the file system holding `directory`."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def reserve_path(state_dir: Path) -> Path:
    return state_dir / RESERVE_NAME


def release_reserve(state_dir: Path) -> int:
    """Delete the reserve file (any daemon may call this on SQLITE_FULL); returns the bytes freed."""
    path = reserve_path(state_dir)
    try:
        size = path.stat().st_blocks * 512
        path.unlink()
    except FileNotFoundError:
        return 0
    log.warning("disk full under %s: released the %d-byte reserve so that small commits can go on", state_dir, size)
    return size


class Headroom:
    """The forwarder's view of the state directory's free space (one `statvfs` per call)."""

    def __init__(self, state_dir: Path, min_free_bytes: int, reserve_bytes: int):
        self.state_dir = state_dir
        self.min_free = min_free_bytes
        self.reserve = reserve_bytes

    def free(self) -> int:
        return free_bytes(self.state_dir)

    def low(self) -> bool:
        """True while bulk records must wait; keeps the reserve in step with the free space."""
        try:
            free = self.free()
        except OSError:
            return False
        if free < max(self.reserve // 2, 1 << 20):
            release_reserve(self.state_dir)
        elif free >= self.min_free + self.reserve:
            self._allocate()
        return free < self.min_free

    def _allocate(self) -> None:
        path = reserve_path(self.state_dir)
        if self.reserve <= 0 or path.exists():
            return
        tmp = path.with_name(RESERVE_NAME + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.debug("cannot allocate the disk reserve %s: %s", path, e)
