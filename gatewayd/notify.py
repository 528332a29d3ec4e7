"""systemd's notification protocol (sd_notify), sent through Debian's python3-sdnotify; a no-op
when `NOTIFY_SOCKET` is unset. When to send what (READY after the databases are open, WATCHDOG
only while the loop makes progress, STATUS, STOPPING) is decided by the Runner (`daemon.py`).

sdnotify reads `NOTIFY_SOCKET` (abstract names `@...` included) and sends one datagram per call.
Two things it does not do, added here (README, "systemd notifications"):

- It encodes text as Latin-1, and with `debug=False` drops a line it cannot encode without a
  word; systemd reads UTF-8. A line is handed to it as its UTF-8 bytes spelled in Latin-1, so
  every `STATUS=` arrives as written, whatever its characters.
- It connects once, when created, and with `debug=False` stays silent forever after a failure
  (no socket yet, systemd re-executed and bound a new one). It runs with `debug=True` here: a
  failed send drops that notifier and is tried once more on a fresh connection.
"""

from __future__ import annotations

import os

import sdnotify

from gatewayd.redact import redact


class Notifier:
    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") or None
        self.watchdog_usec = 0
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._sd: sdnotify.SystemdNotifier | None = None
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as systemd recommends."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        # STATUS= is readable by every local user (systemctl status): never a secret in it.
        text = "\n".join(redact(x) if x.startswith("STATUS=") else x for x in lines)
        data = text.encode("utf-8", "replace").decode("latin-1")
        for _ in range(2):  # a notifier connected to a socket systemd replaced fails once
            try:
                if self._sd is None:
                    self._sd = sdnotify.SystemdNotifier(debug=True)
                self._sd.notify(data)
                return
            except OSError:
                self._sd = None

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")
