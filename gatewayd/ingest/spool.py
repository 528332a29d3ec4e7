"""Spool ingest: `*.json` / `*.jsonl` files dropped into a directory, removed once committed.

Writers should write under another name (a leading dot, or any suffix other than `.json` /
`.jsonl`) and rename the file in; such names are never looked at. A file that appears under
its final name and is written in place is taken only once the writer closed it (inotify
`IN_CLOSE_WRITE`), so it is never read half-written. A file found without having seen its
events (present at start, or after the event queue overflowed) is taken once it has been
unchanged for `settle_s`.

`.jsonl`: one record per line, in chunks of lines, each chunk committed together with how far
the file has been read (`gatewayd_ingest_spool`), so a crash neither loses nor repeats a
line. `.json`: the whole document in one commit. Both take the ThingsBoard device format; a
record without `ts` gets the file's modification time. `<name>.attributes.json[l]` holds
client attributes. A bad line is queued as it is and dead-lettered by the forwarder with the
reason; the lines around it flow. The file is removed after its last commit (then the
directory is fsync'd, then its mark deleted). A `.json` file over `max_file_bytes` is renamed
`<name>.rejected` and reported.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from gatewayd.config import Config
from gatewayd.ingest import formats
from gatewayd.ingest.batch import Batch, Host
from gatewayd.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    DirectoryWatch,
)
from gatewayd.store import ingest as ingest_store
from gatewayd.store.ingest import Row

log = logging.getLogger("gatewayd.ingest")

SUFFIXES = (".json", ".jsonl")
CHUNK_LINES = 5000
CHUNK_BYTES = 4 * 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024
RESCAN_S = 30.0
WATCH_MASK = IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE
WRITING, CLOSED = "writing", "closed"


def is_candidate(name: str) -> bool:
    return name.endswith(SUFFIXES) and not name.startswith(".")


def identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


@dataclass
class Current:
    """The file being read: its handle, identity and the offset committed so far."""

    name: str
    fh: io.BufferedReader[io.FileIO]
    ident: str
    offset: int
    mtime_ms: int
    type_: str
    skipping: bool = False  # inside a line over MAX_LINE_BYTES, whose start was queued cut short


class SpoolAdapter:
    name = "spool"

    def __init__(self, cfg: Config, service: Host):
        c = cfg["ingest.spool"]
        self.dir = Path(c["directory"])
        self.settle_s: float = c["settle_s"]
        self.max_file: int = c["max_file_bytes"]
        self.service = service
        self.watch: DirectoryWatch | None = None
        self.seen: dict[str, str] = {}          # name -> WRITING | CLOSED, from inotify events
        self.resume: dict[str, tuple[str, int]] = {}  # name -> (identity, offset) from the marks
        self.ready: list[str] = []
        self.current: Current | None = None
        self.stale_marks: set[str] = set()
        self.next_scan = 0.0
        self.files_done = 0
        self._refused: set[str] = set()

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.watch = DirectoryWatch(self.dir, WATCH_MASK)
        except OSError as e:
            log.warning("spool: inotify unavailable (%s); files are taken once unchanged for %.1f s, "
                        "looking every %.0f s", e, self.settle_s, RESCAN_S)
        self._reconcile()

    def _reconcile(self) -> None:
        """Finish what a crash interrupted: files fully committed are removed, others resume."""
        assert self.service.ctrl is not None
        for name, (ident, offset, done) in ingest_store.spool_marks(self.service.ctrl).items():
            try:
                st = os.lstat(self.dir / name)
            except FileNotFoundError:
                self.stale_marks.add(name)
                continue
            if identity(st) != ident:
                self.stale_marks.add(name)
            elif done:
                log.info("spool: %s was committed before a restart; removing it", name)
                self._remove(name)
            else:
                self.resume[name] = (ident, offset)
        self._forget_marks()

    # -- the adapter interface -------------------------------------------------------------
    def fds(self) -> list[int]:
        return [self.watch.fd] if self.watch is not None else []

    def poll(self, now: float) -> None:
        dirty = False
        if self.watch is not None:
            for mask, name in self.watch.events():
                dirty = True
                if mask & IN_Q_OVERFLOW:
                    self.seen.clear()
                elif not is_candidate(name):
                    continue
                elif mask & (IN_DELETE | IN_MOVED_FROM):
                    self.seen.pop(name, None)
                elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
                    self.seen[name] = CLOSED
                elif mask & (IN_CREATE | IN_MODIFY):
                    self.seen[name] = WRITING
        if dirty or now >= self.next_scan:
            self._scan(now)

    def _scan(self, now: float) -> None:
        """Which files may be read now, oldest first; when to look again for the others."""
        self.next_scan = now + RESCAN_S
        try:
            entries = [e for e in os.scandir(self.dir) if is_candidate(e.name)]
        except OSError as e:
            log.warning("spool: cannot list %s: %s", self.dir, e)
            return
        wall = time.time()
        ready: list[tuple[int, str]] = []
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                if entry.name not in self._refused:
                    self._refused.add(entry.name)
                    log.warning("spool: %s is not a regular file; ignored", entry.name)
                continue
            state = self.seen.get(entry.name)
            if state == WRITING:
                continue
            if state is None:
                quiet = wall - st.st_mtime
                if quiet < self.settle_s:
                    self.next_scan = min(self.next_scan, now + self.settle_s - quiet + 0.05)
                    continue
            ready.append((st.st_mtime_ns, entry.name))
        self.ready = [name for _, name in sorted(ready)]

    def fill(self, batch: Batch, room: int) -> None:
        if room - len(batch.rows) <= 0:
            return
        cur = self.current or self._open_next()
        if cur is None:
            return
        try:
            rows, offset, done = self._read(cur)
        except OSError as e:
            log.warning("spool: cannot read %s: %s; trying again later", cur.name, e)
            self._put_back(cur)
            return
        if rows is None:
            return
        batch.rows.extend(rows)
        batch.marks.append((cur.name, cur.ident, offset, done))

        def committed() -> None:
            cur.offset = offset
            if done:
                self._close_current()
                self._remove(cur.name)
                self._forget_marks()
                self.files_done += 1

        def failed(_why: str) -> None:
            self._put_back(cur)
            self.ready.insert(0, cur.name)  # read again from the committed offset

        batch.on_commit.append(committed)
        batch.on_fail.append(failed)

    def _open_next(self) -> Current | None:
        while self.ready:
            name = self.ready.pop(0)
            path = self.dir / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("spool: cannot open %s: %s", name, e)
                continue
            fh = io.BufferedReader(io.FileIO(fd, "rb"))
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or self.seen.get(name) == WRITING:
                fh.close()
                continue
            ident = identity(st)
            offset = 0
            if name in self.resume:
                mark_ident, mark_offset = self.resume.pop(name)
                if mark_ident == ident:
                    offset = mark_offset
                    log.info("spool: resuming %s at byte %d", name, offset)
            if name.endswith(".json") and st.st_size > self.max_file:
                fh.close()
                self._reject(name, f"{st.st_size} bytes, over max_file_bytes ({self.max_file})")
                continue
            fh.seek(offset)
            self.current = Current(name, fh, ident, offset, st.st_mtime_ns // 1_000_000, formats.spool_type(name))
            # Lines are committed whole, except the start of one too long: resuming elsewhere
            # than after a newline is resuming inside such a line, whose rest is skipped.
            self.current.skipping = offset > 0 and name.endswith(".jsonl") and os.pread(fd, 1, offset - 1) != b"\n"
            return self.current
        return None

    def _read(self, cur: Current) -> tuple[list[Row] | None, int, bool]:
        """The next rows of the file, the offset after them, and whether the file is finished."""
        if cur.name.endswith(".json"):
            data = cur.fh.read(self.max_file + 1)
            if len(data) > self.max_file:
                self._close_current()
                self._reject(cur.name, f"grew over max_file_bytes ({self.max_file})")
                return None, 0, False
            whole = formats.device_rows(data, cur.type_, cur.mtime_ms) if data.strip() else []
            return whole, cur.offset + len(data), True
        rows: list[Row] = []
        size = 0
        fh = cur.fh
        while len(rows) < CHUNK_LINES and size < CHUNK_BYTES:
            if cur.skipping:   # at most CHUNK_BYTES per round: a line of gigabytes never stops the loop
                rest = fh.readline(MAX_LINE_BYTES)
                if not rest:
                    return rows, fh.tell(), True
                size += len(rest)
                cur.skipping = not rest.endswith(b"\n")
                continue
            line = fh.readline(MAX_LINE_BYTES + 1)
            if not line:
                return rows, fh.tell(), True
            size += len(line)
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                log.warning("spool: %s: a line over %d bytes at byte %d is queued cut short (it will be "
                            "dead-lettered)", cur.name, MAX_LINE_BYTES, fh.tell() - len(line))
                rows.append((cur.type_, line))
                cur.skipping = True
                continue
            line = line.strip()
            if line:
                rows.extend(formats.device_rows(line, cur.type_, cur.mtime_ms))
        at = fh.tell()
        done = not fh.peek(1)
        return rows, at, done

    def _put_back(self, cur: Current) -> None:
        self.resume[cur.name] = (cur.ident, cur.offset)
        self._close_current()

    def _close_current(self) -> None:
        if self.current is not None:
            try:
                self.current.fh.close()
            except OSError:
                pass
            self.current = None

    def _remove(self, name: str) -> None:
        try:
            os.unlink(self.dir / name)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("spool: cannot remove %s after committing it: %s (it will not be read again "
                      "while its mark is kept)", name, e)
            return
        self._fsync_dir()
        self.stale_marks.add(name)

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("spool: cannot fsync %s: %s", self.dir, e)

    def _forget_marks(self) -> None:
        if not self.stale_marks or self.service.ctrl is None:
            return
        try:
            ingest_store.delete_spool_marks(self.service.ctrl, self.stale_marks)
        except Exception as e:  # noqa: BLE001 - a mark left behind is only cleaned up later
            log.warning("spool: cannot delete marks of removed files: %s", e)
            return
        self.stale_marks.clear()

    def _reject(self, name: str, why: str) -> None:
        target = f"{name}.rejected"
        try:
            os.replace(self.dir / name, self.dir / target)
        except OSError as e:
            log.error("spool: %s refused (%s) and cannot be renamed: %s", name, why, e)
            return
        text = f"spool: {name} refused ({why}); renamed {target}"
        log.error("%s", text)
        self.service.report_error(text)

    def wait(self, now: float) -> float:
        return max(0.0, self.next_scan - now)

    def has_work(self) -> bool:
        return self.current is not None or bool(self.ready)

    def status(self) -> str:
        return f"spool {self.dir} ({self.files_done} files done)"

    def stop(self) -> None:
        self._close_current()
        if self.watch is not None:
            self.watch.close()
