"""What gatewayd's two HTTP servers (ingest, the /health and /metrics endpoint) share."""

from __future__ import annotations

import socket

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
