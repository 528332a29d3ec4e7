"""Remote file management (shared attributes `FILES` and `FILE_CONTENT_<key>`, as the seed gateway).

- `FILES` = `{key: {path, encoding: text|json|base64, write_version?, create_if_not_exist?,
  restart_controller_on_change?}}` defines the managed files.
- gatewayd reports client attributes `FILE_HASHES` = `{key: {hash, write_version}}` (md5 of
  the bytes on disk, the content version last written) and `FILE_READ_<key>` (the content on
  disk), and `FILE_ERROR_<key>` with the reason when a file is refused or cannot be written
  ("" once it is fine again).
- When a definition's `write_version` differs from the one written last, gatewayd asks the
  server for `FILE_CONTENT_<key>` and writes it. A pushed `FILE_CONTENT_<key>` is written
  at once.
- Writes are atomic: a temporary file in the same directory, fsync, rename, fsync of the
  directory. Paths (after `~`/`$VAR` expansion) must stay inside `[files] allowed_roots`:
  `..` is refused, and so is anything whose real path (symlinks resolved) leaves the roots.
- Change detection runs on the expanded, resolved path every `[files] check_interval_s`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger("gatewayd.supervisor")

ENCODINGS = ("text", "json", "base64")
FILES_KEY = "FILES"
HASHES_KEY = "FILE_HASHES"
CONTENT_PREFIX = "FILE_CONTENT_"
READ_PREFIX = "FILE_READ_"
ERROR_PREFIX = "FILE_ERROR_"


class FileRefused(Exception):
    pass


@dataclass(frozen=True)
class FileDef:
    key: str
    path: str
    encoding: str = "text"
    write_version: Any = None
    create_if_not_exist: bool = False
    restart_controller_on_change: bool = False


def parse_files(value: Any) -> tuple[dict[str, FileDef], dict[str, str]]:
    """Definitions from a `FILES` value (an object, or a JSON string of one); problems per key."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as e:
            raise FileRefused(f"FILES is not valid JSON: {e}") from e
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise FileRefused("FILES must be a JSON object {key: {path, encoding, ...}}")
    defs: dict[str, FileDef] = {}
    errors: dict[str, str] = {}
    for key, d in value.items():
        if not isinstance(key, str) or not key or len(key) > 100:
            continue
        if not isinstance(d, dict):
            errors[key] = "definition must be an object with at least 'path'"
            continue
        path = d.get("path")
        if not isinstance(path, str) or not path.strip():
            errors[key] = "'path' is missing or not a string"
            continue
        enc = d.get("encoding", "text")
        if enc not in ENCODINGS:
            errors[key] = f"encoding {enc!r} is not one of {', '.join(ENCODINGS)}"
            continue
        wv = d.get("write_version")
        if wv is not None and not isinstance(wv, (str, int, float)):
            errors[key] = "write_version must be a number or a string"
            continue
        defs[key] = FileDef(key=key, path=path, encoding=enc, write_version=wv,
                            create_if_not_exist=bool(d.get("create_if_not_exist", False)),
                            restart_controller_on_change=bool(d.get("restart_controller_on_change", False)))
    return defs, errors


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def confine(raw: str, roots: list[Path]) -> Path:
    """The real path a definition names, if it stays inside an allowed root; FileRefused otherwise."""
    if not roots:
        raise FileRefused("no allowed roots are configured")
    expanded = os.path.expanduser(os.path.expandvars(raw.strip()))
    if "\0" in expanded:
        raise FileRefused("path contains a NUL byte")
    if ".." in PurePosixPath(expanded).parts:
        raise FileRefused(f"path {raw!r}: '..' is not allowed")
    if "$" in expanded:
        raise FileRefused(f"path {raw!r}: unknown environment variable")
    lexical = Path(expanded) if os.path.isabs(expanded) else roots[0] / expanded
    lexical = Path(os.path.normpath(lexical))
    real = os.path.realpath(lexical)
    real_roots = [os.path.realpath(r) for r in roots]
    for root in real_roots:
        if _inside(real, root):
            if real == root:
                raise FileRefused(f"path {raw!r} is an allowed root itself, not a file in it")
            return Path(real)
    if any(_inside(str(lexical), str(r)) or _inside(str(lexical), rr) for r, rr in zip(roots, real_roots,
                                                                                        strict=True)):
        raise FileRefused(f"path {raw!r} leads outside the allowed roots through a symbolic link (to {real})")
    raise FileRefused(f"path {raw!r} is outside the allowed roots ({', '.join(str(r) for r in roots)})")


def encode_content(value: Any, encoding: str) -> bytes:
    """The bytes to write for a FILE_CONTENT value."""
    if encoding == "text":
        if not isinstance(value, str):
            raise FileRefused("text content must be a string")
        return value.encode("utf-8")
    if encoding == "base64":
        if not isinstance(value, str):
            raise FileRefused("base64 content must be a string")
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise FileRefused(f"content is not valid base64: {e}") from e
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError as e:
            raise FileRefused(f"content is not valid JSON: {e}") from e
        return value.encode("utf-8")
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def decode_content(data: bytes, encoding: str) -> Any:
    """The FILE_READ value for the bytes on disk."""
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    text = data.decode("utf-8")  # UnicodeDecodeError is the caller's to report
    if encoding == "json":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def atomic_write(target: Path, data: bytes, roots: list[Path], create_dirs: bool = False) -> None:
    """Replace `target` (an already confined real path) with `data`: temp file, fsync, rename, fsync dir.

    The directory is opened without following symlinks and checked again through the open
    descriptor, so a directory swapped for a symlink between the check and the write does not
    redirect the write outside the roots.
    """
    parent = target.parent
    real_roots = [os.path.realpath(r) for r in roots]
    if not parent.is_dir():
        if not create_dirs:
            raise FileRefused(f"directory {parent} does not exist")
        if not any(_inside(str(parent), r) for r in real_roots):
            raise FileRefused(f"directory {parent} is outside the allowed roots")
        parent.mkdir(parents=True, exist_ok=True)
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        opened = _fd_path(dfd)
        if not any(_inside(opened, r) for r in real_roots):
            raise FileRefused(f"directory {parent} resolves outside the allowed roots ({opened})")
        mode = 0o644
        owner: tuple[int, int] | None = None
        try:
            st = os.stat(target.name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                raise FileRefused(f"{target} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            owner = (st.st_uid, st.st_gid)
        except FileNotFoundError:
            pass
        tmp = f".{target.name}.gatewayd-{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fchmod(fd, mode)
            if owner is not None and os.geteuid() == 0:
                try:
                    os.fchown(fd, *owner)
                except OSError:
                    pass
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, target.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)


class FileManager:
    """Keeps managed files in step with ThingsBoard; all callbacks queue outbox messages."""

    def __init__(self, roots: list[Path], max_value_bytes: int,
                 publish: Callable[[dict[str, Any]], None],
                 request_shared: Callable[[list[str]], None],
                 restart_controller: Callable[[str], None],
                 save: Callable[[dict[str, Any]], None]):
        self.roots = roots
        self.max_value_bytes = max_value_bytes
        self.publish = publish
        self.request_shared = request_shared
        self.restart_controller = restart_controller
        self.save = save
        self.raw_defs: Any = {}
        self.defs: dict[str, FileDef] = {}
        self.applied: dict[str, Any] = {}
        self.hashes: dict[str, str | None] = {}
        self.stats: dict[str, tuple[int, int, int] | None] = {}
        self.errors: dict[str, str] = {}
        self.wanted: set[str] = set()

    # -- state ---------------------------------------------------------------------------
    def load(self, st: dict[str, Any] | None) -> None:
        st = st or {}
        self.applied = dict(st.get("applied") or {})
        raw = st.get("defs")
        if raw:
            try:
                self._set_defs(raw, announce=True, request=False)
            except FileRefused as e:
                log.warning("saved FILES definitions are unusable: %s", e)

    def _persist(self) -> None:
        self.save({"defs": self.raw_defs, "applied": self.applied})

    # -- helpers -------------------------------------------------------------------------
    def _error(self, key: str, text: str) -> None:
        if self.errors.get(key) != text:
            log.warning("remote file %s: %s", key, text)
        self.errors[key] = text
        self.publish({ERROR_PREFIX + key: text})

    def _clear_error(self, key: str) -> None:
        if self.errors.pop(key, None):
            self.publish({ERROR_PREFIX + key: ""})

    def _stat(self, path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self, key: str, announce: bool) -> None:
        """Hash (and with announce, report FILE_READ_<key>) the file on disk."""
        d = self.defs[key]
        try:
            path = confine(d.path, self.roots)
        except FileRefused as e:
            self.hashes[key] = None
            self.stats[key] = None
            self._error(key, str(e))
            return
        self.stats[key] = self._stat(path)
        try:
            with open(path, "rb") as f:
                data = f.read(self.max_value_bytes * 2 + 1)
        except FileNotFoundError:
            self.hashes[key] = None
            return
        except OSError as e:
            self.hashes[key] = None
            self._error(key, f"cannot read {path}: {e.strerror}")
            return
        if len(data) > self.max_value_bytes * 2:
            self.hashes[key] = self._hash_file(path)
            if announce:
                self._error(key, f"{path} is too large to report as {READ_PREFIX}{key}")
            return
        self.hashes[key] = md5(data)
        if announce:
            try:
                value = decode_content(data, d.encoding)
            except UnicodeDecodeError:
                self._error(key, f"{path} is not UTF-8 text (use encoding base64)")
                return
            size = len(json.dumps({READ_PREFIX + key: value}))
            if size > self.max_value_bytes:
                self._error(key, f"{path} is too large to report ({size} bytes as {READ_PREFIX}{key})")
                return
            self.publish({READ_PREFIX + key: value})

    @staticmethod
    def _hash_file(path: Path) -> str | None:
        h = hashlib.md5(usedforsecurity=False)
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            return None
        return h.hexdigest()

    def hashes_value(self) -> dict[str, Any]:
        return {k: {"hash": self.hashes.get(k), "write_version": self.applied.get(k)} for k in sorted(self.defs)}

    def publish_hashes(self) -> None:
        self.publish({HASHES_KEY: self.hashes_value()})

    # -- attribute events ----------------------------------------------------------------
    def _set_defs(self, raw: Any, announce: bool, request: bool) -> None:
        defs, errors = parse_files(raw)
        old = self.defs
        self.raw_defs = raw
        self.defs = defs
        for key in list(self.hashes):
            if key not in defs:
                self.hashes.pop(key, None)
                self.stats.pop(key, None)
                self.applied.pop(key, None)
                self.wanted.discard(key)
                self._clear_error(key)
        for key, text in errors.items():
            self._error(key, f"bad definition: {text}")
        need: list[str] = []
        for key, d in defs.items():
            self._clear_error(key)
            self._read(key, announce)
            new_def = old.get(key) != d
            if d.write_version is not None:
                if d.write_version != self.applied.get(key):
                    need.append(key)
            elif new_def and request:
                need.append(key)
        self.wanted.update(need)
        if request and need:
            self.request_shared([CONTENT_PREFIX + k for k in need])
        self.publish_hashes()
        self._persist()

    def on_files(self, raw: Any) -> None:
        try:
            self._set_defs(raw, announce=True, request=True)
        except FileRefused as e:
            log.warning("FILES refused: %s", e)
            self.publish({ERROR_PREFIX + "FILES": str(e)})

    def on_files_deleted(self) -> None:
        self._set_defs({}, announce=False, request=False)

    def on_content(self, key: str, value: Any, pushed: bool) -> bool:
        """Write FILE_CONTENT_<key>; True when the file changed."""
        d = self.defs.get(key)
        if d is None:
            log.info("FILE_CONTENT_%s arrived but no file %r is defined in FILES; ignored", key, key)
            return False
        if not pushed and key not in self.wanted:
            return False
        self.wanted.discard(key)
        try:
            data = encode_content(value, d.encoding)
            path = confine(d.path, self.roots)
            exists = path.exists()
            if exists and not path.is_file():
                raise FileRefused(f"{path} is not a regular file")
            current = self._hash_file(path) if exists else None
            changed = current != md5(data)
            if changed:
                if not exists and not d.create_if_not_exist:
                    raise FileRefused(f"{path} does not exist and create_if_not_exist is false")
                atomic_write(path, data, self.roots, create_dirs=d.create_if_not_exist)
                log.info("remote file %s written to %s (%d bytes, md5 %s)", key, path, len(data), md5(data))
        except FileRefused as e:
            self._error(key, str(e))
            return False
        except OSError as e:
            self._error(key, f"cannot write: {e.strerror or e}")
            return False
        if d.write_version is not None:
            self.applied[key] = d.write_version
        self._clear_error(key)
        self._read(key, announce=True)
        self.publish_hashes()
        self._persist()
        if changed and d.restart_controller_on_change:
            self.restart_controller(f"remote file {key} changed")
        return changed

    def on_server_hashes(self, value: Any) -> None:
        """FILE_HASHES as the server has it (attribute response): report ours if they differ."""
        if self.defs and value != self.hashes_value():
            self.publish_hashes()

    # -- periodic ------------------------------------------------------------------------
    def check_changes(self) -> list[str]:
        """Re-hash files whose stat changed; report those whose content changed."""
        changed: list[str] = []
        for key, d in self.defs.items():
            try:
                path = confine(d.path, self.roots)
            except FileRefused:
                continue
            st = self._stat(path)
            if st == self.stats.get(key):
                continue
            before = self.hashes.get(key)
            self._read(key, announce=False)
            if self.hashes.get(key) != before:
                changed.append(key)
                log.info("remote file %s changed on disk (%s)", key, path)
                self._read(key, announce=True)
        if changed:
            self.publish_hashes()
        return changed

    def init_files(self) -> dict[str, Any]:
        """Report every file again and ask for every content whose version is not written yet."""
        self.hashes.clear()
        self.stats.clear()
        self._set_defs(self.raw_defs, announce=True, request=True)
        self.request_shared([FILES_KEY])
        return {"files": {k: {"path": self.defs[k].path, "hash": self.hashes.get(k),
                              "write_version": self.applied.get(k), "error": self.errors.get(k)}
                          for k in sorted(self.defs)},
                "errors": {k: v for k, v in self.errors.items() if k not in self.defs}}
