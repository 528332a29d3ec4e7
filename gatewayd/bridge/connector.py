"""Opening the transport to the server without ever blocking the bridge's loop.

paho's `connect()` resolves the name, connects and does the TLS handshake in one blocking call
(paho 1.6.1 waits up to `keepalive` for a handshake, and a DNS lookup has no bound at all), so
a server that accepts TCP and never answers would stop the loop, and with it the watchdog.
Here the DNS lookup runs in a worker thread and TCP connect and TLS handshake are
non-blocking, each with its own deadline; the loop polls `Connector.poll()` between waits on
`Connector.wait_fds()`. The finished socket is then handed to paho (`mqtt_compat`), which
only sends CONNECT on it.

A lookup that outlives its deadline cannot be cancelled: its thread is left to finish, and the
next attempt for the same name waits for that lookup instead of starting another, so at most
one lookup thread ever runs.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

AddrInfo = list[tuple[Any, ...]]
Lookup = Callable[..., AddrInfo]

RESOLVE, TCP, TLS, DONE = "resolving", "connecting", "TLS handshake", "done"


class ConnectError(Exception):
    """The transport could not be opened; the message says why (for the journal and STATUS=)."""


def tls_context(ca_cert: str, client_cert: str, client_key: str) -> ssl.SSLContext:
    """Verify the server against ca_cert (or the system CAs) and its host name; never plain text."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_cert or None)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if client_cert:
        ctx.load_cert_chain(client_cert, client_key or None)
    return ctx


class Resolver:
    """getaddrinfo in a worker thread, one lookup at a time."""

    def __init__(self, lookup: Lookup = socket.getaddrinfo) -> None:
        self._lookup = lookup
        self._lock = threading.Lock()
        self._key: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._result: AddrInfo | BaseException | None = None

    def begin(self, host: str, port: int) -> None:
        """Start a lookup, unless one for this name is still running (then its answer is used)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return  # that lookup's answer is used (or, for another name, awaited first)
            self._key, self._result = (host, port), None
            self._thread = threading.Thread(target=self._run, args=(host, port), name="gatewayd-dns", daemon=True)
            self._thread.start()

    def _run(self, host: str, port: int) -> None:
        try:
            result: AddrInfo | BaseException = self._lookup(host, port, type=socket.SOCK_STREAM)
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which reports it
            result = e
        with self._lock:
            if self._key == (host, port):
                self._result = result

    def result(self, host: str, port: int) -> AddrInfo | BaseException | None:
        """The finished lookup for this name (taken: the next attempt looks again), or None."""
        with self._lock:
            if self._key != (host, port) or self._result is None:
                return None
            result, self._result, self._key = self._result, None, None
            return result

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def numeric_address(host: str, port: int) -> AddrInfo | None:
    """The address of an IP literal without any lookup, None for a name."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None


class Connector:
    """One attempt: DNS (worker thread) → TCP (non-blocking) → TLS (non-blocking), each phase bounded."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, timeout: float,
                 resolver: Resolver, now: float | None = None) -> None:
        self.host, self.port, self.context, self.timeout = host, port, context, timeout
        self.server = f"{host}:{port}"
        self.resolver = resolver
        self.sock: socket.socket | None = None
        self.addresses: AddrInfo = []
        self.last_error = ""
        self.want_write = False
        start = time.monotonic() if now is None else now
        self.deadline = start + timeout
        found = numeric_address(host, port)
        if found is not None:
            self.phase = TCP
            self.addresses = list(found)
            self._next_address(start)
        else:
            self.phase = RESOLVE
            resolver.begin(host, port)

    def wait_fds(self) -> tuple[list[socket.socket], list[socket.socket]]:
        """Sockets to wait on (readable, writable); none while the lookup runs."""
        if self.sock is None or self.phase == RESOLVE:
            return [], []
        if self.want_write:
            return [], [self.sock]
        return [self.sock], []

    def poll(self, now: float | None = None) -> socket.socket | None:
        """Advance as far as possible without blocking: the connected socket when done, else None.

        Raises ConnectError with the reason when this attempt failed or ran out of time."""
        now = time.monotonic() if now is None else now
        if self.phase == RESOLVE:
            self._poll_resolve(now)
        if self.phase == TCP:
            self._poll_tcp(now)
        if self.phase == TLS:
            self._poll_tls(now)
        if self.phase == DONE:
            sock, self.sock = self.sock, None
            return sock
        if now > self.deadline:
            self.close()
            raise ConnectError(self._timeout_text())
        return None

    def _timeout_text(self) -> str:
        if self.phase == RESOLVE:
            return f"DNS lookup of {self.host} did not finish within {self.timeout:g} s"
        if self.phase == TCP:
            return f"TCP connect to {self.server} did not finish within {self.timeout:g} s"
        return f"TLS handshake with {self.server} did not finish within {self.timeout:g} s"

    def _poll_resolve(self, now: float) -> None:
        result = self.resolver.result(self.host, self.port)
        if result is None:
            if not self.resolver.busy:  # a lookup for another name just ended: start ours
                self.resolver.begin(self.host, self.port)
            return
        if isinstance(result, BaseException):
            why = result.strerror if isinstance(result, OSError) and result.strerror else str(result)
            raise ConnectError(f"cannot resolve {self.host}: {why}")
        if not result:
            raise ConnectError(f"cannot resolve {self.host}: no address")
        self.addresses = list(result)
        self.phase = TCP
        self.deadline = now + self.timeout
        self._next_address(now)

    def _next_address(self, now: float) -> None:
        """Start a non-blocking connect to the next address; ConnectError when none is left."""
        while self.addresses:
            family, kind, proto, _name, sockaddr = self.addresses.pop(0)[:5]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
            if err in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
                self.sock, self.want_write = sock, True
                return
            sock.close()
            self.last_error = os.strerror(err)
        raise ConnectError(f"cannot connect to {self.server}: {self.last_error or 'no address'}")

    def _poll_tcp(self, now: float) -> None:
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            try:
                self.sock.getpeername()
            except OSError:
                return  # still connecting
            self.want_write = False
            if self.context is None:
                self.phase = DONE
                return
            self.phase = TLS
            self.deadline = now + self.timeout
            self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host,
                                                 do_handshake_on_connect=False)
            return
        self.sock.close()
        self.sock = None
        self.last_error = os.strerror(err)
        self._next_address(now)

    def _poll_tls(self, now: float) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.want_write = False
            return
        except ssl.SSLWantWriteError:
            self.want_write = True
            return
        except (ssl.SSLError, ssl.CertificateError) as e:
            self.close()
            raise ConnectError(f"TLS failure with {self.server}: {e}") from None
        except OSError as e:
            self.close()
            raise ConnectError(f"TLS failure with {self.server}: {e.strerror or e}") from None
        self.want_write = False
        self.phase = DONE

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

