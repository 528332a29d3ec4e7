"""What gatewayd's two HTTP servers (ingest, the /health and /metrics endpoint) share."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable

log = logging.getLogger("gatewayd.http")

_BUSY_BODY = b'{"error": "too many connections"}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(_BUSY_BODY)).encode() + b"\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" + _BUSY_BODY)


def refuse_busy(request: socket.socket) -> None:
    """Answer a connection over the limit with a 503 without waiting on it (the answer fits
    in the socket's send buffer); the caller closes it."""
    try:
        request.setblocking(False)
        request.send(BUSY)
    except OSError:
        pass


def shut_late(connections: Iterable[socket.socket], timeout: float) -> None:
    """End connections whose request did not arrive within `timeout` (slow or silent clients):
    the thread reading from one sees the end of the stream at once."""
    for conn in connections:
        log.debug("http: closing a connection whose request took over %.0f s", timeout)
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
