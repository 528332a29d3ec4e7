"""`gatewayd http`: `/health` and `/metrics` for monitoring, read-only.

Under systemd it is socket-activated (gatewayd-http.socket): it serves the listening socket
systemd hands over (`LISTEN_FDS`) and exits after `[http] idle_exit_s` without a request;
systemd keeps listening and starts it again at the next connection, so an endpoint nobody
scrapes costs nothing. Without systemd it binds `[http] listen` itself and never exits idle.

It reads the stores exactly as `gatewayctl status` does (the same function builds the same
object), through read-only connections that never create a file, and has no code path that
writes anything.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from gatewayd.config import Config
from gatewayd.notify import Notifier
from gatewayd.schema import listen_address

log = logging.getLogger("gatewayd.http")

SD_LISTEN_FDS_START = 3
REPORT_CACHE_S = 1.0  # scrapes arriving together share one reading of the stores
LOOP_WAIT_S = 5.0


def inherited_socket(env: Mapping[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed (sd_listen_fds), or None. The LISTEN_* variables
    are removed so that no child takes them for its own."""
    env = os.environ if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = env.get("LISTEN_FDS", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    if not count.isdigit() or int(count) < 1:
        return None
    if int(count) > 1:
        log.warning("systemd passed %s sockets; serving the first", count)
    os.set_inheritable(SD_LISTEN_FDS_START, False)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise RuntimeError("the socket systemd passed is not a listening stream socket (check gatewayd-http.socket)")
    return sock


class Reports:
    """The status object and its exit code, read at most once per REPORT_CACHE_S."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._value: tuple[int, dict[str, Any]] = (2, {})

    def __call__(self) -> tuple[int, dict[str, Any]]:
        from gatewayd.ctl import status_report

        with self._lock:
            now = time.monotonic()
            if now - self._at >= REPORT_CACHE_S:
                self._value = status_report(self.cfg)
                self._at = time.monotonic()
            return self._value


def routes(reports: Reports) -> dict[str, Any]:
    from prometheus_client.exposition import choose_encoder

    from gatewayd.http.metrics import registry

    reg = registry(reports)

    def health(accept: str) -> tuple[int, str, bytes]:
        code, st = reports()
        return (200 if code == 0 else 503), "application/json", (json.dumps(st, indent=2) + "\n").encode()

    def metrics(accept: str) -> tuple[int, str, bytes]:
        encoder, ctype = choose_encoder(accept)
        return 200, ctype, encoder(reg)

    return {"/health": health, "/metrics": metrics}


def run(cfg: Config) -> int:
    from gatewayd.http.server import EndpointServer, listen

    c = cfg["http"]
    sock = inherited_socket()
    activated = sock is not None
    if sock is None:
        if not c["listen"]:
            log.info("the HTTP endpoint is off ([http] listen is empty)")
            return 0
        sock = listen(*listen_address(c["listen"]))
    else:
        _compare(sock, c["listen"])
    where = _address(sock)
    server = EndpointServer(sock, routes(Reports(cfg)), c["max_connections"], c["request_timeout_s"])
    idle_exit = float(c["idle_exit_s"]) if activated else 0.0
    notifier = Notifier()
    stop = threading.Event()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        try:
            os.write(wake_w, b"x")
        except OSError:
            pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ping_every = min(notifier.watchdog_interval or LOOP_WAIT_S, LOOP_WAIT_S)
    notifier.ready(f"serving /health and /metrics on {where}")
    log.info("http ready: /health and /metrics on %s%s", where,
             f" (socket-activated; exits after {idle_exit:.0f} s without requests)" if idle_exit else "")
    served = -1
    try:
        while not stop.is_set():
            wait = ping_every
            if idle_exit:
                idle = server.idle_for()
                if idle >= idle_exit:
                    log.info("no request for %.0f s; exiting (systemd starts it again at the next connection)",
                             idle)
                    break
                wait = min(wait, idle_exit - idle + 0.05)
            deadline = server.next_deadline()
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic() + 0.01))
            listening = server.socket.fileno()
            ready, _, _ = select.select([listening, wake_r], [], [], wait)
            if listening in ready:
                server.handle_request()
            server.reap()
            notifier.watchdog()
            if server.served != served:
                served = server.served
                notifier.status(f"serving /health and /metrics on {where}; {served} connections served")
    finally:
        notifier.stopping("stopping")
        server.server_close()
        os.close(wake_r)
        os.close(wake_w)
    return 0


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _compare(sock: socket.socket, listen: str) -> None:
    """Warn when systemd listens elsewhere than the configuration says (a configuration
    changed without `systemctl daemon-reload`, or a drop-in of the socket unit)."""
    if not listen:
        log.warning("[http] listen is empty (off), but systemd passed a socket: serving it; "
                    "run `systemctl daemon-reload` and stop gatewayd-http.socket to turn the endpoint off")
        return
    want_host, want_port = listen_address(listen)
    host, port = sock.getsockname()[:2]
    try:
        other_host = ipaddress.ip_address(want_host) != ipaddress.ip_address(host)
    except ValueError:  # a host name: only the port can be compared
        other_host = False
    if port != want_port or other_host:
        log.warning("systemd listens on %s, the configuration says %s ([http] listen); "
                    "`systemctl daemon-reload && systemctl restart gatewayd-http.socket` applies it",
                    _address(sock), listen)
