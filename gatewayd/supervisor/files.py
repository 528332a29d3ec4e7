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
- Every malformed entry of `FILES` (not an object, a key that is not printable text, a path
  that is not a string or not valid Unicode, with `..`, outside the roots, a `$` that is not a
  configured path variable, options of the wrong type) is refused on its own, with the reason
  in `FILE_ERROR_<key>` (or in `FILE_ERROR_FILES` for keys that cannot name an attribute);
  the other entries are processed.
- All disk access (fileio.py: confined, no links followed, regular files only, size limit)
  runs in one worker thread, in order; the main loop applies the results (`step()`), so a
  huge file or a FIFO at a managed path never stalls it.
- Change detection runs every `[files] check_interval_s` on the same confined path.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gatewayd.supervisor.fileio import FileRefused, Snapshot, Written, lexical_path, read_file, stat_file, write_file
from gatewayd.supervisor.jobs import Future, Inline

log = logging.getLogger("gatewayd.supervisor")

ENCODINGS = ("text", "json", "base64")
FILES_KEY = "FILES"
HASHES_KEY = "FILE_HASHES"
CONTENT_PREFIX = "FILE_CONTENT_"
READ_PREFIX = "FILE_READ_"
ERROR_PREFIX = "FILE_ERROR_"
MAX_KEY = 100
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024

__all__ = ["FileDef", "FileManager", "FileRefused", "decode_content", "encode_content", "md5", "parse_files"]


@dataclass(frozen=True)
class FileDef:
    key: str
    path: str
    encoding: str = "text"
    write_version: Any = None
    create_if_not_exist: bool = False
    restart_controller_on_change: bool = False


def _is_text(value: str) -> bool:
    return value.encode("utf-8", "backslashreplace").decode("utf-8") == value


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str):
        return "keys must be strings"
    if not key or len(key) > MAX_KEY:
        return f"keys must be 1 to {MAX_KEY} characters"
    if not _is_text(key) or not key.isprintable():
        return "keys must be printable Unicode text"
    return None


def _definition(d: Any) -> tuple[dict[str, Any] | None, str]:
    """The checked fields of one definition, or why it is refused."""
    if not isinstance(d, dict):
        return None, "definition must be an object with at least 'path'"
    path = d.get("path")
    if not isinstance(path, str) or not path.strip():
        return None, "'path' is missing or not a non-empty string"
    enc = d.get("encoding", "text")
    if not isinstance(enc, str) or enc not in ENCODINGS:
        return None, f"encoding must be one of {', '.join(ENCODINGS)}"
    wv = d.get("write_version")
    if wv is not None and (isinstance(wv, bool) or not isinstance(wv, (str, int, float))
                           or (isinstance(wv, float) and not math.isfinite(wv))
                           or (isinstance(wv, str) and not _is_text(wv))):
        return None, "write_version must be a finite number or a string"
    fields: dict[str, Any] = {"path": path, "encoding": enc, "write_version": wv}
    for flag in ("create_if_not_exist", "restart_controller_on_change"):
        v = d.get(flag, False)
        if not isinstance(v, bool):
            return None, f"{flag} must be true or false"
        fields[flag] = v
    return fields, ""


def parse_files(value: Any) -> tuple[dict[str, FileDef], dict[str, str], list[str]]:
    """Definitions from a `FILES` value (an object, or a JSON string of one).

    Returns the good definitions, the refused ones by key (why), and problems with entries
    whose key cannot name an attribute. FileRefused when the value as a whole is unusable.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except RecursionError as e:
            raise FileRefused("FILES is nested too deeply") from e
        except ValueError as e:
            raise FileRefused(f"FILES is not valid JSON: {e}") from e
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise FileRefused("FILES must be a JSON object {key: {path, encoding, ...}}")
    defs: dict[str, FileDef] = {}
    errors: dict[str, str] = {}
    general: list[str] = []
    for key, d in value.items():
        problem = _key_problem(key)
        if problem is not None:
            general.append(f"entry {ascii(key)[:120]} refused: {problem}")
            continue
        fields, why = _definition(d)
        if fields is None:
            errors[key] = why
            continue
        defs[key] = FileDef(key=key, **fields)
    return defs, errors, general


def encode_content(value: Any, encoding: str) -> bytes:
    """The bytes to write for a FILE_CONTENT value."""
    try:
        return _encode(value, encoding)
    except UnicodeEncodeError as e:
        raise FileRefused("content is not valid Unicode text (a lone surrogate)") from e
    except (RecursionError, ValueError, TypeError) as e:
        raise FileRefused(f"content cannot be encoded as {encoding}: {e}") from e


def _encode(value: Any, encoding: str) -> bytes:
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
    return (json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def decode_content(data: bytes, encoding: str) -> Any:
    """The FILE_READ value for the bytes on disk."""
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    text = data.decode("utf-8")  # UnicodeDecodeError is the caller's to report
    if encoding == "json":
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return text
    return text


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class Runner(Protocol):
    """Where disk work runs: `jobs.Serial` (a worker thread) in the daemon, `jobs.Inline` at once."""

    def submit(self, fn: Callable[..., Any], *args: Any, done: Callable[[Any], None]) -> None: ...

    def drain(self, limit: int = 1000) -> int: ...

    def idle(self) -> bool: ...

    def stop(self) -> None: ...


class FileManager:
    """Keeps managed files in step with ThingsBoard; all callbacks queue outbox messages."""

    def __init__(self, roots: list[Path], max_value_bytes: int,
                 publish: Callable[[dict[str, Any]], None],
                 request_shared: Callable[[list[str]], None],
                 restart_controller: Callable[[str], None],
                 save: Callable[[dict[str, Any]], None], *,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 variables: Mapping[str, str] | None = None,
                 runner: Runner | None = None):
        self.roots = roots
        self.max_value_bytes = max_value_bytes
        self.max_file_bytes = max_file_bytes
        self.variables = dict(variables or {})
        self.publish = publish
        self.request_shared = request_shared
        self.restart_controller = restart_controller
        self.save = save
        self.runner: Runner = runner if runner is not None else Inline()
        self.raw_defs: Any = {}
        self.defs: dict[str, FileDef] = {}
        self.paths: dict[str, Path] = {}
        self.applied: dict[str, Any] = {}
        self.hashes: dict[str, str | None] = {}
        self.stats: dict[str, tuple[int, int, int] | None] = {}
        self.errors: dict[str, str] = {}
        self.wanted: set[str] = set()
        self._general_error = ""
        self._hashes_dirty = False

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

    def step(self) -> None:
        """Apply finished disk work (main loop); report hashes once all of it is in."""
        self.runner.drain()
        self._flush()

    def stop(self) -> None:
        self.runner.stop()

    def _flush(self) -> None:
        if self._hashes_dirty and self.runner.idle():
            self._hashes_dirty = False
            self.publish_hashes()

    # -- helpers -------------------------------------------------------------------------
    def _error(self, key: str, text: str) -> None:
        if self.errors.get(key) != text:
            log.warning("remote file %s: %s", key, text)
        self.errors[key] = text
        self.publish({ERROR_PREFIX + key: text})

    def _clear_error(self, key: str) -> None:
        if self.errors.pop(key, None):
            self.publish({ERROR_PREFIX + key: ""})

    def _read(self, key: str, announce: bool | None, clear: bool) -> None:
        """Hash the file in the worker; report FILE_READ_<key> with announce (None: only if it changed)."""
        d = self.defs[key]
        path = self.paths.get(key)
        if path is None:
            return
        self.runner.submit(read_file, path, self.roots, self.max_file_bytes, self.max_value_bytes * 2,
                           done=lambda snap: self._on_read(d, snap, announce, clear))

    def _on_read(self, d: FileDef, snap: Snapshot, announce: bool | None, clear: bool) -> None:
        key = d.key
        if self.defs.get(key) != d:
            return  # redefined meanwhile; its own read follows
        before = self.hashes.get(key)
        self.hashes[key] = snap.md5
        self.stats[key] = snap.stat
        self._hashes_dirty = True
        if announce is None:
            announce = snap.md5 != before
            if announce and snap.exists:
                log.info("remote file %s changed on disk (%s)", key, self.paths.get(key))
        if snap.error is not None:
            self._error(key, snap.error)
            return
        if clear:
            self._clear_error(key)
        if not announce or not snap.exists:
            return
        path = self.paths[key]
        if snap.data is None:
            self._error(key, f"{path} is too large to report as {READ_PREFIX}{key} ({snap.size} bytes)")
            return
        try:
            value = decode_content(snap.data, d.encoding)
        except UnicodeDecodeError:
            self._error(key, f"{path} is not UTF-8 text (use encoding base64)")
            return
        size = len(json.dumps({READ_PREFIX + key: value}))
        if size > self.max_value_bytes:
            self._error(key, f"{path} is too large to report ({size} bytes as {READ_PREFIX}{key})")
            return
        self.publish({READ_PREFIX + key: value})

    def hashes_value(self) -> dict[str, Any]:
        return {k: {"hash": self.hashes.get(k), "write_version": self.applied.get(k)} for k in sorted(self.defs)}

    def publish_hashes(self) -> None:
        self.publish({HASHES_KEY: self.hashes_value()})

    # -- attribute events ----------------------------------------------------------------
    def _set_defs(self, raw: Any, announce: bool, request: bool) -> None:
        defs, errors, general = parse_files(raw)
        old = self.defs
        self.raw_defs = raw
        self.defs = defs
        for key in set(self.hashes) | set(self.errors) | set(self.paths):
            if key not in defs and key not in errors:
                self.hashes.pop(key, None)
                self.stats.pop(key, None)
                self.applied.pop(key, None)
                self.paths.pop(key, None)
                self.wanted.discard(key)
                self._clear_error(key)
        for key, text in errors.items():
            self.paths.pop(key, None)
            self._error(key, f"bad definition: {text}")
        text = "; ".join(general)
        if text != self._general_error:
            self._general_error = text
            self.publish({ERROR_PREFIX + FILES_KEY: text})
        need: list[str] = []
        for key, d in defs.items():
            try:
                self.paths[key] = lexical_path(d.path, self.roots, self.variables)
            except FileRefused as e:
                self.paths.pop(key, None)
                self.hashes[key] = None
                self.stats[key] = None
                self._error(key, str(e))
                continue
            self._read(key, announce, clear=True)
            if d.write_version is not None:
                if d.write_version != self.applied.get(key):
                    need.append(key)
            elif old.get(key) != d and request:
                need.append(key)
        self.wanted.update(need)
        if request and need:
            self.request_shared([CONTENT_PREFIX + k for k in need])
        self._hashes_dirty = True
        self._flush()
        self._persist()

    def on_files(self, raw: Any) -> None:
        try:
            self._set_defs(raw, announce=True, request=True)
        except FileRefused as e:
            log.warning("FILES refused: %s", e)
            self._general_error = str(e)
            self.publish({ERROR_PREFIX + FILES_KEY: str(e)})

    def on_files_deleted(self) -> None:
        self._set_defs({}, announce=False, request=False)

    def on_content(self, key: str, value: Any, pushed: bool) -> None:
        """Write FILE_CONTENT_<key> (in the worker); reported once written."""
        d = self.defs.get(key)
        if d is None:
            log.info("FILE_CONTENT_%s arrived but no file %s is defined in FILES; ignored", ascii(key)[:120],
                     ascii(key)[:120])
            return
        if not pushed and key not in self.wanted:
            return
        self.wanted.discard(key)
        path = self.paths.get(key)
        if path is None:
            self._error(key, self.errors.get(key) or "the path of this file is refused")
            return
        try:
            data = encode_content(value, d.encoding)
        except FileRefused as e:
            self._error(key, str(e))
            return
        self.runner.submit(write_file, path, data, self.roots, self.max_file_bytes, d.create_if_not_exist,
                           done=lambda w: self._on_written(d, data, w))

    def _on_written(self, d: FileDef, data: bytes, w: Written) -> None:
        key = d.key
        if w.error is not None:
            self._error(key, w.error)
            return
        if w.changed:
            log.info("remote file %s written to %s (%d bytes, md5 %s)", key, self.paths.get(key), len(data), md5(data))
        if self.defs.get(key) == d:
            if d.write_version is not None:
                self.applied[key] = d.write_version
            self._clear_error(key)
            self._read(key, announce=True, clear=False)
            self._hashes_dirty = True
            self._flush()
            self._persist()
        if w.changed and d.restart_controller_on_change:
            self.restart_controller(f"remote file {key} changed")

    def on_server_hashes(self, value: Any) -> None:
        """FILE_HASHES as the server has it (attribute response): report ours if they differ."""
        if self.defs and value != self.hashes_value():
            self.publish_hashes()

    # -- periodic ------------------------------------------------------------------------
    def check_changes(self) -> None:
        """Re-hash (in the worker) files whose stat changed; report those whose content changed.

        Skipped while earlier disk work is unfinished, so a stuck disk never grows the queue.
        """
        if not self.runner.idle():
            return
        for key, path in self.paths.items():
            self.runner.submit(stat_file, path, self.roots, done=functools.partial(self._on_stat, self.defs[key]))

    def _on_stat(self, d: FileDef, st: tuple[int, int, int] | None) -> None:
        if self.defs.get(d.key) != d or st == self.stats.get(d.key):
            return
        self.stats[d.key] = st
        self._read(d.key, announce=None, clear=False)
        self._flush()

    def init_files(self) -> Future:
        """Report every file again and ask for every content whose version is not written yet.

        The result (a report of every file) is ready once the worker has read them all.
        """
        self.hashes.clear()
        self.stats.clear()
        self._set_defs(self.raw_defs, announce=True, request=True)
        self.request_shared([FILES_KEY])
        fut = Future()
        self.runner.submit(lambda: True, done=lambda _: fut.set(self._report()))
        return fut

    def _report(self) -> dict[str, Any]:
        return {"files": {k: {"path": self.defs[k].path, "hash": self.hashes.get(k),
                              "write_version": self.applied.get(k), "error": self.errors.get(k)}
                          for k in sorted(self.defs)},
                "errors": {k: v for k, v in self.errors.items() if k not in self.defs}}
