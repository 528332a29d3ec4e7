"""Opening the transport without blocking: a lookup that hangs, a refused port, a TLS handshake that
never answers, a certificate for another name, and a real handshake (loopback peers only)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.bridge.connector import TCP, ConnectError, Connector, Resolver, tls_context
from tests.helpers.brokers import free_port
from tests.helpers.netfaults import StalledListener, make_tls_files


def poll_in_thread(c: Connector, now: float | None = None) -> Any:
    """poll() from another thread, so that a call that blocks fails the test instead of hanging it."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["sock"] = c.poll(now)
        except ConnectError as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "Connector.poll() blocked"
    return out


class SlowLookup:
    """A getaddrinfo that waits until released, and counts its calls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        self.calls += 1
        self.release.wait(30)
        return socket.getaddrinfo("127.0.0.1", port, **kw)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def stalled() -> Iterator[StalledListener]:
    s = StalledListener()
    yield s
    s.close()


def test_a_hanging_lookup_never_blocks_and_at_most_one_runs() -> None:
    lookup = SlowLookup()
    resolver = Resolver(lookup)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        c = Connector("tb.example.invalid", port, None, 2.0, resolver, now=100.0)
        assert poll_in_thread(c, 100.5) == {"sock": None}
        assert c.wait_fds() == ([], [])
        out = poll_in_thread(c, 102.5)
        assert "DNS lookup of tb.example.invalid did not finish within 2 s" in str(out["error"])
        # the next attempts wait for the lookup still running instead of starting more threads
        for t in (200.0, 300.0):
            c = Connector("tb.example.invalid", port, None, 2.0, resolver, now=t)
            assert "error" in poll_in_thread(c, t + 3)
        assert lookup.calls == 1
        c = Connector("tb.example.invalid", port, None, 2.0, resolver, now=400.0)
        lookup.release.set()
        for _ in range(100):
            out = poll_in_thread(c, 400.1)
            if out.get("sock") is not None or c.phase != "resolving":
                break
            threading.Event().wait(0.02)
        assert c.phase != "resolving" and lookup.calls == 1
    finally:
        lookup.release.set()
        listener.close()


def test_an_ip_address_needs_no_lookup() -> None:
    lookup = SlowLookup()
    c = Connector("127.0.0.1", free_port(), None, 2.0, Resolver(lookup))
    assert c.phase == TCP and lookup.calls == 0
    c.close()


def test_a_refused_port_is_a_connect_error() -> None:
    c = Connector("127.0.0.1", free_port(), None, 2.0, Resolver())
    for _ in range(100):
        out = poll_in_thread(c)
        if out:
            break
        threading.Event().wait(0.02)
    assert "Connection refused" in str(out.get("error"))


def test_a_handshake_that_never_answers_times_out_without_blocking(tls: dict[str, Path],
                                                                  stalled: StalledListener) -> None:
    c = Connector("127.0.0.1", stalled.port, tls_context(str(tls["ca"]), "", ""), 3.0, Resolver(), now=0.0)
    for _ in range(100):
        if c.phase == "TLS handshake":
            break
        assert poll_in_thread(c, 0.1) == {"sock": None}
        threading.Event().wait(0.02)
    assert c.phase == "TLS handshake" and c.wait_fds()[0]
    assert poll_in_thread(c, 1.0) == {"sock": None}
    out = poll_in_thread(c, 10.0)
    assert "TLS handshake with 127.0.0.1" in str(out["error"]) and "within 3 s" in str(out["error"])


def _tls_server(tls: dict[str, Path]) -> tuple[socket.socket, threading.Thread]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls["cert"]), str(tls["key"]))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"hello")
                s.recv(10)
        except (OSError, ssl.SSLError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_real_handshake_gives_a_verified_socket(tls: dict[str, Path], host: str) -> None:
    srv, t = _tls_server(tls)
    try:
        c = Connector(host, srv.getsockname()[1], tls_context(str(tls["ca"]), "", ""), 5.0, Resolver())
        sock = None
        for _ in range(250):
            out = poll_in_thread(c)
            assert "error" not in out, out
            sock = out["sock"]
            if sock is not None:
                break
            threading.Event().wait(0.02)
        assert isinstance(sock, ssl.SSLSocket) and sock.version()
        sock.setblocking(True)
        assert sock.recv(5) == b"hello"
        sock.close()
    finally:
        srv.close()
        t.join(5)


def test_a_certificate_for_another_name_is_refused(tls: dict[str, Path], tmp_path: Path) -> None:
    srv, t = _tls_server(tls)
    try:
        other = make_tls_files(tmp_path / "other")  # another CA: the server's certificate does not verify
        c = Connector("127.0.0.1", srv.getsockname()[1], tls_context(str(other["ca"]), "", ""), 5.0, Resolver())
        out: dict[str, Any] = {}
        for _ in range(250):
            out = poll_in_thread(c)
            if out.get("error") or out.get("sock"):
                break
            threading.Event().wait(0.02)
        assert "TLS failure" in str(out.get("error")) and "certificate verify failed" in str(out.get("error"))
    finally:
        srv.close()
        t.join(5)
