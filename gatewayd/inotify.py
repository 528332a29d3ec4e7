"""A minimal Linux inotify watch (ctypes), so idle daemons sleep until a file really changes."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from pathlib import Path

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

CHANGES = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE


class DirectoryWatch:
    """Readable fd that becomes ready when anything in `directory` changes.

    The caller selects on `fd` and calls `drain()`; events are not parsed (a wake-up is a hint
    to look, never the data itself), so an overflowed event queue cannot lose anything.
    """

    def __init__(self, directory: Path, mask: int = CHANGES):
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = libc.inotify_add_watch(fd, os.fsencode(str(directory)), mask)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch({directory}) failed")
        self.fd: int = fd

    def drain(self) -> bool:
        """Consume pending events; True if there were any."""
        got = False
        while True:
            try:
                if not os.read(self.fd, 65536):
                    return got
                got = True
            except BlockingIOError:
                return got
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise

    def events(self) -> list[tuple[int, str]]:
        """Consume pending events as (mask, file name); IN_Q_OVERFLOW comes with an empty name."""
        out: list[tuple[int, str]] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not buf:
                return out
            pos = 0
            while pos + _EVENT.size <= len(buf):
                _wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                name = buf[pos + _EVENT.size:pos + _EVENT.size + length].split(b"\0", 1)[0]
                out.append((mask, os.fsdecode(name)))
                pos += _EVENT.size + length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
