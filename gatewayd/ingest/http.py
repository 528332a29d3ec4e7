"""HTTP ingest: `POST /api/v1/telemetry` and `/api/v1/attributes`, 200 only after the commit.

The standard library's `http.server` parses HTTP; each connection gets a thread that reads
and checks the request, hands its rows to the daemon's loop and waits for the group commit
they join. The loop itself never reads a socket: it accepts connections (the listening
socket is one of its fds) and enforces a deadline per request, so a slow or stalled client
costs one thread until `request_timeout_s` and nothing else; `max_connections` bounds the
threads.

Answers (JSON bodies): 200 `{"accepted": n}` once committed; 400 `{"error": reason}` for a
body that is not valid records (nothing of it is queued); 401 without the configured bearer
token; 404 another path; 405 another method; 411 without Content-Length (chunked bodies are
not taken); 413 over `max_body_bytes` (refused before reading it); 415 a content type other
than `application/json` (charset utf-8, if given); 503 with Retry-After when the controller
queue is over its cap, the commit failed or the daemon stops.
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gatewayd.clock import now_ms
from gatewayd.config import Config
from gatewayd.httputil import refuse_busy, shut_late
from gatewayd.ingest import formats
from gatewayd.ingest.batch import Batch, Host
from gatewayd.records import parse
from gatewayd.store.ingest import Row

log = logging.getLogger("gatewayd.ingest")

PATHS = {"/api/v1/telemetry": formats.TELEMETRY, "/api/v1/attributes": formats.ATTRIBUTES}
COMMIT_WAIT_S = 30.0
RETRY_AFTER_S = "1"
MAX_ACCEPTS_PER_STEP = 64


class Submission:
    """Rows of one request on their way to a commit; the handler waits on `done`."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.done = threading.Event()
        self.error: str | None = None
        self._lock = threading.Lock()
        self._state = "pending"

    def _leave_pending(self, state: str) -> bool:
        with self._lock:
            if self._state != "pending":
                return False
            self._state = state
            return True

    def claim(self) -> bool:
        """The loop takes it into a batch, unless the handler gave up waiting."""
        return self._leave_pending("claimed")

    def abandon(self) -> bool:
        """The handler gives up, unless it is already part of a commit."""
        return self._leave_pending("abandoned")

    def finish(self, error: str | None) -> None:
        self.error = error
        self.done.set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave in two writes; no delayed-ACK stall
    server_version = "gatewayd-ingest"
    sys_version = ""
    server: IngestServer

    def handle_one_request(self) -> None:
        self.server.adapter.arm(self.connection)  # the next request has request_timeout_s to arrive
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)

    def _reply(self, code: int, obj: dict[str, Any], close: bool = False, headers: tuple[tuple[str, str], ...] = ()
               ) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _not_allowed(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path not in PATHS:
            self._reply(404, {"error": f"no such endpoint: {path[:200]}"}, close=self._has_body())
        else:
            self._reply(405, {"error": f"{self.command} not allowed; use POST"}, close=self._has_body(),
                        headers=(("Allow", "POST"),))

    def _has_body(self) -> bool:
        return bool(self.headers.get("Content-Length", "0").strip() not in ("", "0")
                    or self.headers.get("Transfer-Encoding"))

    do_GET = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def do_HEAD(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "POST")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        adapter = self.server.adapter
        path = urllib.parse.urlsplit(self.path).path
        type_ = PATHS.get(path)
        if type_ is None:
            self._reply(404, {"error": f"no such endpoint: {path[:200]}"}, close=True)
            return
        if adapter.token and not adapter.authorized(self.headers.get("Authorization", "")):
            self._reply(401, {"error": "missing or wrong bearer token"}, close=True,
                        headers=(("WWW-Authenticate", 'Bearer realm="gatewayd"'),))
            return
        ctype = self.headers.get("Content-Type")
        charset = self.headers.get_content_charset()
        if ctype is None or self.headers.get_content_type() != "application/json" \
                or charset not in (None, "utf-8", "utf8"):
            self._reply(415, {"error": "Content-Type must be application/json (UTF-8)"}, close=True)
            return
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length") is None:
            self._reply(411, {"error": "a Content-Length is required (chunked bodies are not accepted)"},
                        close=True)
            return
        text = self.headers["Content-Length"].strip()
        if not text.isdigit():
            self._reply(400, {"error": "Content-Length is not a number"}, close=True)
            return
        length = int(text)
        if length > adapter.max_body:
            self._reply(413, {"error": f"body of {length} bytes is over the limit of {adapter.max_body}"},
                        close=True)
            return
        if adapter.service.over_cap:
            self._reply(503, {"error": "controller queue is full; retry later"}, close=True,
                        headers=(("Retry-After", RETRY_AFTER_S),))
            return
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True  # the client went away, or its time was up
            return
        self._accept(body, type_)

    def _accept(self, body: bytes, type_: str) -> None:
        adapter = self.server.adapter
        rows = formats.device_rows(body, type_, now_ms())
        for i, (t, message) in enumerate(rows):
            rec = parse(t, message, adapter.max_packet)
            if isinstance(rec, str):
                where = f"record {i}: " if len(rows) > 1 else ""
                self._reply(400, {"error": where + rec})
                return
        if not rows:
            self._reply(200, {"accepted": 0})
            return
        sub = Submission(rows)
        adapter.disarm(self.connection)
        adapter.submit(sub)
        if not sub.done.wait(adapter.commit_wait) and sub.abandon():
            self._reply(503, {"error": "not committed in time; retry"}, headers=(("Retry-After", RETRY_AFTER_S),))
            return
        sub.done.wait(COMMIT_WAIT_S)  # claimed: part of a commit that is under way
        if sub.error is None and sub.done.is_set():
            self._reply(200, {"accepted": len(rows)})
        else:
            self._reply(503, {"error": sub.error or "not committed in time; retry"},
                        headers=(("Retry-After", RETRY_AFTER_S),))


class IngestServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    timeout = 0  # handle_request() never waits: the daemon's loop selects on the socket

    def __init__(self, address: tuple[str, int], family: int, adapter: HttpAdapter):
        self.address_family = family
        self.adapter = adapter
        super().__init__(address, Handler)
        self.socket.setblocking(False)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.adapter.admit(request):
            refuse_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.adapter.release(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http %s: request failed", client_address, exc_info=True)


def _address(listen: str) -> tuple[tuple[str, int], int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (host, int(port)), family


class HttpAdapter:
    name = "http"

    def __init__(self, cfg: Config, service: Host):
        c = cfg["ingest.http"]
        self.listen: str = c["listen"]
        self.max_body: int = c["max_body_bytes"]
        self.token: str = c["bearer_token"]
        self.max_connections: int = c["max_connections"]
        self.request_timeout: float = c["request_timeout_s"]
        self.commit_wait: float = max(self.request_timeout, 1.0)
        self.max_packet: int = cfg["thingsboard"]["max_packet_bytes"]
        self.service = service
        self.queue: deque[Submission] = deque()
        self._conns: dict[Any, float] = {}
        self._lock = threading.Lock()
        self.server: IngestServer | None = None
        self.requests = 0

    def start(self) -> None:
        address, family = _address(self.listen)
        self.server = IngestServer(address, family, self)

    # -- called from the handler threads ---------------------------------------------------
    def authorized(self, header: str) -> bool:
        scheme, _, value = header.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def submit(self, sub: Submission) -> None:
        self.queue.append(sub)
        self.service.wake()

    def admit(self, sock: Any) -> bool:
        with self._lock:
            if len(self._conns) >= self.max_connections:
                return False
            self._conns[sock] = time.monotonic() + self.request_timeout
            return True

    def release(self, sock: Any) -> None:
        with self._lock:
            self._conns.pop(sock, None)

    def arm(self, sock: Any) -> None:
        with self._lock:
            if sock in self._conns:
                self._conns[sock] = time.monotonic() + self.request_timeout

    def disarm(self, sock: Any) -> None:
        with self._lock:
            if sock in self._conns:
                self._conns[sock] = float("inf")

    # -- the adapter interface (the daemon's loop) -----------------------------------------
    def fds(self) -> list[int]:
        return [self.server.fileno()] if self.server is not None else []

    def poll(self, now: float) -> None:
        assert self.server is not None
        for _ in range(MAX_ACCEPTS_PER_STEP):
            if not select.select([self.server.socket], [], [], 0)[0]:
                break
            self.server.handle_request()
        with self._lock:
            late = [s for s, deadline in self._conns.items() if deadline < now]
            for s in late:
                self._conns[s] = float("inf")
        shut_late(late, self.request_timeout)

    def fill(self, batch: Batch, room: int) -> None:
        taken: list[Submission] = []
        while self.queue:
            sub = self.queue.popleft()
            if not sub.claim():
                continue
            if room - len(batch.rows) <= 0:
                sub.finish("controller queue is full; retry later")
                continue
            batch.rows.extend(sub.rows)
            taken.append(sub)
        if not taken:
            return
        self.requests += len(taken)

        def committed() -> None:
            for sub in taken:
                sub.finish(None)

        def failed(why: str) -> None:
            for sub in taken:
                sub.finish(f"not committed: {why}")

        batch.on_commit.append(committed)
        batch.on_fail.append(failed)

    def wait(self, now: float) -> float:
        with self._lock:
            deadlines = [d for d in self._conns.values() if d != float("inf")]
        return max(0.0, min(deadlines) - now) + 0.01 if deadlines else 3600.0

    def has_work(self) -> bool:
        return bool(self.queue)

    def status(self) -> str:
        return f"http on {self.listen} ({self.requests} requests)"

    def stop(self) -> None:
        while self.queue:
            sub = self.queue.popleft()
            if sub.claim():
                sub.finish("gatewayd ingest is stopping")
        if self.server is not None:
            self.server.server_close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
