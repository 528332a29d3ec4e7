"""Disk side of remote file management: confined paths, safe reads and atomic writes.

A path from ThingsBoard is first made absolute and checked lexically (`lexical_path`: no
`..`, inside `[files] allowed_roots`, `${NAME}` only from `[files] path_variables`, never from
the environment). Every access then goes through the file's directory opened with
`O_DIRECTORY|O_NOFOLLOW`, checked again through `/proc/self/fd` (so a directory swapped for a
symbolic link between the check and the use leads nowhere), and the file itself is opened
relative to that descriptor with `O_NOFOLLOW|O_NONBLOCK`: a symbolic link is refused, a FIFO
cannot block the open, and `fstat` must say "regular file" before a byte is read. Files over
`max_file_bytes` are refused without being read.

These functions block on the disk; the supervisor runs them in its file worker thread
(`jobs.Serial`), never in its main loop. They return results and never raise for a refused
or unreadable file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

BLOCK = 1 << 20
MAX_PATH = 4096
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class FileRefused(Exception):
    pass


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _show(raw: str) -> str:
    """A server-supplied string as it may appear in a report (escaped, bounded)."""
    return ascii(raw[:300])


def lexical_path(raw: str, roots: list[Path], variables: Mapping[str, str] | None = None) -> Path:
    """The absolute path a definition names, checked without touching the disk; FileRefused why not."""
    if not roots:
        raise FileRefused("no allowed roots are configured")
    if raw.encode("utf-8", "backslashreplace").decode("utf-8") != raw:
        raise FileRefused(f"path {_show(raw)} is not valid Unicode text")
    if "\0" in raw:
        raise FileRefused(f"path {_show(raw)} contains a NUL character")
    if len(raw) > MAX_PATH:
        raise FileRefused(f"path is longer than {MAX_PATH} characters")
    names = dict(variables or {})

    def substitute(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in names:
            raise FileRefused(f"path {_show(raw)}: ${{{name}}} is not one of [files] path_variables "
                              f"({', '.join(sorted(names)) or 'none'}); the environment is never used")
        return names[name]

    expanded = _VAR.sub(substitute, raw.strip())
    if "$" in expanded:
        raise FileRefused(f"path {_show(raw)}: '$' is only allowed as ${{NAME}} of [files] path_variables")
    if expanded.startswith("~"):
        raise FileRefused(f"path {_show(raw)}: '~' is not expanded; give the path inside an allowed root")
    if ".." in PurePosixPath(expanded).parts:
        raise FileRefused(f"path {_show(raw)}: '..' is not allowed")
    lexical = Path(os.path.normpath(expanded if os.path.isabs(expanded) else roots[0] / expanded))
    for root in roots:
        norm = os.path.normpath(root)
        if _inside(str(lexical), norm):
            if str(lexical) == norm:
                raise FileRefused(f"path {_show(raw)} is an allowed root itself, not a file in it")
            return lexical
    raise FileRefused(f"path {_show(raw)} is outside the allowed roots ({', '.join(str(r) for r in roots)})")


def open_dir(parent: Path, roots: list[Path], create: bool = False) -> int:
    """A descriptor of `parent`, proven (through the descriptor) to lie inside the roots.

    FileNotFoundError when it does not exist (and `create` is false).
    """
    real_roots = [os.path.realpath(r) for r in roots]
    real = os.path.realpath(parent)
    if not any(_inside(real, r) for r in real_roots):
        raise FileRefused(f"{parent} leads outside the allowed roots through a symbolic link (to {real})")
    if create:
        os.makedirs(real, exist_ok=True)
    try:
        dfd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise FileRefused(f"directory {parent} is not a directory (or was swapped for a link)") from e
        raise
    try:
        opened = os.readlink(f"/proc/self/fd/{dfd}")
    except OSError:
        opened = ""
    if not any(_inside(opened, r) for r in real_roots):
        os.close(dfd)
        raise FileRefused(f"directory {parent} resolves outside the allowed roots ({opened})")
    return dfd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(dfd: int, name: str, path: Path, max_bytes: int) -> tuple[int, os.stat_result]:
    """The file opened for reading, once fstat proved it a regular file within the size limit."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileRefused(f"{path} is a symbolic link; managed files must be regular files") from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{path} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise FileRefused(f"{path} is {st.st_size} bytes, larger than [files] max_file_bytes ({max_bytes})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


@dataclass(frozen=True)
class Snapshot:
    """What is on disk at a managed path."""

    exists: bool = False
    md5: str | None = None
    data: bytes | None = None  # the content, when it is at most `keep_bytes`
    size: int = 0
    stat: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) for change detection
    error: str | None = None


def _hash_fd(fd: int, path: Path, max_bytes: int, keep_bytes: int) -> tuple[str, bytes | None, int]:
    h = hashlib.md5(usedforsecurity=False)
    head = bytearray()
    total = 0
    for _ in range(max_bytes // BLOCK + 2):
        block = os.read(fd, BLOCK)
        if not block:
            break
        total += len(block)
        if total > max_bytes:
            raise FileRefused(f"{path} grew past [files] max_file_bytes ({max_bytes}) while being read")
        h.update(block)
        if len(head) <= keep_bytes:
            head += block[:keep_bytes + 1 - len(head)]
    return h.hexdigest(), (bytes(head) if total <= keep_bytes else None), total


def read_file(path: Path, roots: list[Path], max_bytes: int, keep_bytes: int) -> Snapshot:
    """Hash (and keep up to `keep_bytes` of) the file at `path`; never follows a link, never blocks on a FIFO."""
    try:
        dfd = open_dir(path.parent, roots)
    except FileNotFoundError:
        return Snapshot()
    except FileRefused as e:
        return Snapshot(error=str(e))
    except OSError as e:
        return Snapshot(error=f"cannot open {path.parent}: {e.strerror or e}")
    try:
        fd, st = _open_regular(dfd, path.name, path, max_bytes)
        try:
            digest, data, size = _hash_fd(fd, path, max_bytes, keep_bytes)
        finally:
            os.close(fd)
        return Snapshot(True, digest, data, size, (st.st_mtime_ns, st.st_size, st.st_ino))
    except FileNotFoundError:
        return Snapshot()
    except FileRefused as e:
        return Snapshot(exists=True, error=str(e))
    except OSError as e:
        return Snapshot(exists=True, error=f"cannot read {path}: {e.strerror or e}")
    finally:
        os.close(dfd)


def stat_file(path: Path, roots: list[Path]) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of the entry itself (a link is not followed); None when unreadable."""
    try:
        dfd = open_dir(path.parent, roots)
    except (OSError, FileRefused):
        return None
    try:
        st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(dfd)
    return st.st_mtime_ns, st.st_size, st.st_ino


def _replace_in(dfd: int, name: str, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    tmp = f".{name}.gatewayd-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        view = memoryview(data)
        for _ in range(len(data) + 1):
            if not view:
                break
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        if owner is not None and os.geteuid() == 0:
            try:
                os.fchown(fd, *owner)
            except OSError:
                pass
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    os.fsync(dfd)


def atomic_write(target: Path, data: bytes, roots: list[Path], create_dirs: bool = False) -> None:
    """Replace `target` with `data`: temp file, fsync, rename, fsync of the directory, all through its fd.

    Mode and owner of the file replaced are kept; anything but a regular file there is refused.
    """
    try:
        dfd = open_dir(target.parent, roots, create=create_dirs)
    except FileNotFoundError as e:
        raise FileRefused(f"directory {target.parent} does not exist") from e
    try:
        mode, owner = 0o644, None
        try:
            st = os.stat(target.name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(st.st_mode):
                raise FileRefused(f"{target} is {_kind(st.st_mode)}, not a regular file")
            mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
        _replace_in(dfd, target.name, data, mode, owner)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class Written:
    changed: bool = False
    error: str | None = None


def write_file(path: Path, data: bytes, roots: list[Path], max_bytes: int, create: bool) -> Written:
    """Write `data` unless the file already holds it; refusals and failures come back as `error`."""
    try:
        current = read_file(path, roots, max_bytes, 0)
        if current.error is not None and "larger than" not in current.error:
            return Written(error=current.error)
        new = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if current.exists and current.md5 == new:
            return Written(changed=False)
        if not current.exists and not create:
            return Written(error=f"{path} does not exist and create_if_not_exist is false")
        atomic_write(path, data, roots, create_dirs=create)
        return Written(changed=True)
    except FileRefused as e:
        return Written(error=str(e))
    except OSError as e:
        return Written(error=f"cannot write {path}: {e.strerror or e}")
