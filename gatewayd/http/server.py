"""The HTTP side of `gatewayd http`: GET/HEAD of `/health` and `/metrics`, nothing else.

The standard library parses HTTP/1.1 (keep-alive, HTTP/1.0 and /0.9 clients); this module
bounds what a client can make it do: a request head of at most MAX_HEAD_BYTES (431 past it,
414 for a longer request line), `request_timeout_s` for it to arrive, `max_connections`
served at once (a 503 to the next), and every answer is a clean status — 400 for a malformed
request, 404 for another path, 405 for another method — never a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from gatewayd.httputil import refuse_busy, shut_late

log = logging.getLogger("gatewayd.http")

MAX_LINE = 8192
MAX_HEAD_BYTES = 32768
LINGER_S = 1.0
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
METHODS = ("GET", "HEAD")

# A route answers (status, content type, body) for the request's Accept header.
Route = Callable[[str], tuple[int, str, bytes]]


class HeadTooLarge(Exception):
    pass


class HeadLimit(io.BufferedIOBase):
    """The connection's read side, refusing more than `limit` bytes of one request head."""

    def __init__(self, raw: io.BufferedIOBase, limit: int):
        super().__init__()
        self.raw = raw
        self.limit = limit
        self.used = 0

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1, /) -> bytes:
        room = self.limit - self.used
        if room <= 0:
            raise HeadTooLarge
        line = self.raw.readline(room if size is None or size < 0 else min(size, room))
        self.used += len(line)
        if self.used >= self.limit and not line.endswith(b"\n"):
            raise HeadTooLarge
        return line

    def read(self, size: int | None = -1, /) -> bytes:
        return self.raw.read(size)

    def close(self) -> None:
        self.raw.close()
        super().close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Answers carry a status line even before the request line was understood (see _no_http09).
    default_request_version = "HTTP/1.0"
    server_version = "gatewayd-http"
    sys_version = ""
    server: EndpointServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)
        self.head = HeadLimit(self.rfile, MAX_HEAD_BYTES)
        self.rfile = self.head
        self.linger = False

    def handle_one_request(self) -> None:
        self.head.used = 0
        self.command = self.requestline = ""
        self.request_version = self.default_request_version
        self.server.arm(self.connection)
        try:
            self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
            if self.raw_requestline in (b"\r\n", b"\n"):  # one empty line before a request is tolerated
                self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
            if len(self.raw_requestline) > MAX_LINE:
                self.send_error(414, "request line too long")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                if not self.raw_requestline.strip():
                    self.send_error(400, "empty request line")
                return
            self.server.disarm(self.connection)
            self._no_http09()
            self._dispatch()
            self.wfile.flush()
        except HeadTooLarge:
            self.send_error(431, f"request head over {MAX_HEAD_BYTES} bytes")
        except OSError:  # timeouts, resets, a connection shut down past its deadline
            self.close_connection = True

    def finish(self) -> None:
        """After refusing a request whose rest is still arriving, read and drop some of it
        before closing: closing with unread input resets the connection, and the client
        could lose the answer."""
        try:
            super().finish()
            if self.linger:
                self.connection.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + LINGER_S
                for _ in range(1024):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.connection.settimeout(left)
                    if not self.connection.recv(65536):
                        break
        except OSError:
            pass

    def _dispatch(self) -> None:
        if not TOKEN.fullmatch(self.command):
            self.send_error(400, "malformed method")
            return
        try:
            path = urllib.parse.urlsplit(self.path).path
        except ValueError:
            self.send_error(400, "malformed request target")
            return
        route = self.server.routes.get(path)
        if route is None:
            self.send_error(404, "no such path (there are /health and /metrics)")
            return
        if self.command not in METHODS:
            self.send_error(405, f"{self.command} is not allowed here (GET or HEAD)", allow=", ".join(METHODS))
            return
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a body we do not read: this connection cannot go on
        try:
            code, ctype, body = route(self.headers.get("Accept", ""))
        except Exception as e:
            log.error("http %s %s failed: %s: %s", self.command, path, type(e).__name__, e, exc_info=True)
            self.send_error(500, "internal error (see the journal of gatewayd-http)")
            return
        self._reply(code, ctype, body)

    def _reply(self, code: int, ctype: str, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in extra:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None,
                   allow: str | None = None) -> None:
        """Every refusal: a JSON body, and the connection closed (its state is unknown)."""
        self.close_connection = True
        self.linger = True
        self._no_http09()
        text = message or self.responses.get(code, ("error",))[0]
        log.debug("http %s: %d %s", self.address_string(), code, text)
        try:
            self._reply(code, "application/json", json.dumps({"error": text}).encode(),
                        (("Allow", allow),) if allow else ())
        except OSError:
            pass

    def _no_http09(self) -> None:
        """Answer with a status line and headers even to "HTTP/0.9" (the standard library
        would send a bare body, which no monitoring client reads)."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"

    def handle_expect_100(self) -> bool:
        return True  # no body is ever read: the final answer comes at once, without 100 Continue

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


class EndpointServer(socketserver.ThreadingMixIn, HTTPServer):
    """Serves on a socket made elsewhere (systemd's, or one bound by `listen()`)."""

    daemon_threads = True
    block_on_close = False
    timeout = 0  # handle_request() never waits: the caller selects on the socket

    def __init__(self, sock: socket.socket, routes: dict[str, Route], max_connections: int,
                 request_timeout: float):
        self.routes = routes
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.active = 0
        self.served = 0
        self.last_activity = time.monotonic()
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        # Not TCPServer.__init__: it makes a socket of its own, which the sandbox forbids
        # (RestrictAddressFamilies=AF_UNIX; accepting on the socket systemd passed is allowed).
        socketserver.BaseServer.__init__(self, sock.getsockname(), Handler)
        self.socket = sock
        self.socket.setblocking(False)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            busy = self.active >= self.max_connections
            if not busy:
                self.active += 1
            self.last_activity = time.monotonic()
        if busy:
            refuse_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.active -= 1
                self.served += 1
                self.last_activity = time.monotonic()

    def arm(self, conn: socket.socket) -> None:
        """The next request on `conn` has request_timeout to arrive (head complete)."""
        with self._lock:
            self._deadlines[conn] = time.monotonic() + self.request_timeout

    def disarm(self, conn: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def reap(self) -> None:
        """Shut down connections whose request did not arrive in time (slow or silent clients)."""
        now = time.monotonic()
        with self._lock:
            late = [c for c, t in self._deadlines.items() if t < now]
            for c in late:
                del self._deadlines[c]
        shut_late(late, self.request_timeout)

    def next_deadline(self) -> float | None:
        with self._lock:
            return min(self._deadlines.values(), default=None)

    def shutdown_request(self, request: Any) -> None:
        self.disarm(request)
        super().shutdown_request(request)

    def idle_for(self) -> float:
        """Seconds since the last connection ended, 0 while one is open."""
        with self._lock:
            return 0.0 if self.active else time.monotonic() - self.last_activity

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http %s: request failed", client_address, exc_info=True)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket of our own (no systemd)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=64)
