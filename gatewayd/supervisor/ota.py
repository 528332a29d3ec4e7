"""ThingsBoard OTA package download over MQTT, in chunks, through the outbox and inbound tables.

For each chunk `n` the supervisor queues a publish of the chunk size (decimal string) to
`v2/sw/request/<requestId>/chunk/<n>`; the bridge stores the answer from
`v2/sw/response/<requestId>/chunk/<n>` in the inbound table. Up to `window` requests are
in flight. Chunk `n` is written at offset `n * chunk_size` of a part file, so receiving
one twice is harmless; progress (`next`: every chunk below it is on disk, fsync'd) is
saved in the state table, and a restarted supervisor resumes from there.
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

PERSIST_EVERY = 32
MAX_RETRIES = 3
ALGORITHMS = ("md5", "sha256", "sha384", "sha512", "crc32")


class OtaError(Exception):
    pass


def normalize_algorithm(name: str | None) -> str:
    algo = (name or "sha256").strip().lower().replace("-", "").replace("_", "")
    if algo not in ALGORITHMS:
        raise OtaError(f"checksum algorithm {name!r} is not supported (use one of {', '.join(ALGORITHMS)})")
    return algo


def file_checksum(path: Path, algorithm: str, progress: Callable[[int], None] | None = None) -> str:
    algo = normalize_algorithm(algorithm)
    crc = 0
    h = None if algo == "crc32" else hashlib.new(algo)
    done = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            if h is None:
                crc = zlib.crc32(block, crc)
            else:
                h.update(block)
            done += len(block)
            if progress:
                progress(done)
    return f"{crc & 0xFFFFFFFF:08x}" if h is None else h.hexdigest()


def checksum_matches(actual: str, expected: str) -> bool:
    exp = expected.strip().lower()
    act = actual.lower()
    if exp == act:
        return True
    # CRC32 is sometimes given as a decimal number
    if len(act) == 8 and exp.isdigit():
        try:
            return int(exp) == int(act, 16)
        except ValueError:
            return False
    return False


class Download:
    def __init__(self, directory: Path, request_id: str, title: str, version: str, size: int, checksum: str,
                 algorithm: str, chunk_size: int, window: int, timeout_s: float, next_chunk: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        if size <= 0:
            raise OtaError("sw_size must be a positive number of bytes")
        if not checksum:
            raise OtaError("sw_checksum is missing")
        self.directory = directory
        self.request_id = request_id
        self.title = title
        self.version = version
        self.size = size
        self.checksum = checksum
        self.algorithm = normalize_algorithm(algorithm)
        self.chunk_size = chunk_size
        self.window = window
        self.timeout_s = timeout_s
        self.clock = clock
        self.total = (size + chunk_size - 1) // chunk_size
        self.next = min(max(next_chunk, 0), self.total)
        self.received: set[int] = set()
        self.outstanding: dict[int, float] = {}
        self.retries = 0
        self.last_progress = clock()
        self._since_persist = 0
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"sw-{request_id}.part"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self.next == 0:
            os.ftruncate(self._fd, 0)

    # -- persistence -------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "title": self.title, "version": self.version, "size": self.size,
                "checksum": self.checksum, "algorithm": self.algorithm, "chunk_size": self.chunk_size,
                "next": self.next}

    @staticmethod
    def from_state(directory: Path, st: dict[str, Any], window: int, timeout_s: float) -> Download:
        return Download(directory, str(st["request_id"]), str(st["title"]), str(st["version"]), int(st["size"]),
                        str(st["checksum"]), str(st["algorithm"]), int(st["chunk_size"]), window, timeout_s,
                        next_chunk=int(st.get("next", 0)))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    # -- protocol ----------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.next >= self.total

    @property
    def percent(self) -> int:
        return int(100 * self.next / self.total)

    def expected_len(self, n: int) -> int:
        return min(self.chunk_size, self.size - n * self.chunk_size)

    def to_request(self) -> list[int]:
        """Chunk numbers to ask for now (new ones up to the window; all again after a timeout)."""
        now = self.clock()
        if self.outstanding and now - self.last_progress > self.timeout_s:
            self.retries += 1
            if self.retries > MAX_RETRIES:
                first = min(self.outstanding)
                raise OtaError(f"no answer for chunk {first} after {MAX_RETRIES + 1} requests "
                               f"({self.timeout_s:.0f} s each)")
            self.last_progress = now
            for n in self.outstanding:
                self.outstanding[n] = now
            return sorted(self.outstanding)
        out: list[int] = []
        n = self.next
        while len(self.outstanding) < self.window and n < self.total:
            if n not in self.received and n not in self.outstanding:
                self.outstanding[n] = now
                out.append(n)
            n += 1
        return out

    def on_chunk(self, n: int, data: bytes) -> bool:
        """Store chunk n; True when the state should be saved now."""
        if n < 0 or n >= self.total:
            raise OtaError(f"chunk {n} is outside the package ({self.total} chunks)")
        want = self.expected_len(n)
        if len(data) != want:
            raise OtaError(f"chunk {n} has {len(data)} bytes, expected {want}"
                           + (" (the server has no such package or chunk)" if not data else ""))
        self.outstanding.pop(n, None)
        if n < self.next or n in self.received:
            return False
        os.pwrite(self._fd, data, n * self.chunk_size)
        self.received.add(n)
        self.last_progress = self.clock()
        self.retries = 0
        while self.next in self.received:
            self.received.discard(self.next)
            self.next += 1
            self._since_persist += 1
        if self.complete or self._since_persist >= PERSIST_EVERY:
            os.fsync(self._fd)
            self._since_persist = 0
            return True
        return False

    def finish(self) -> Path:
        """Truncate to the announced size, sync and close; the file is ready to verify."""
        os.ftruncate(self._fd, self.size)
        os.fsync(self._fd)
        self.close()
        return self.path
