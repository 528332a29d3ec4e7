"""`gatewayd http` against a real gateway: mosquitto, the ThingsBoard simulator, the three
daemons as processes; scraped with real HTTP clients and parsed with prometheus_client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.brokers import free_port
from tests.helpers.daemons import ROOT, Daemon, wait_for, write_config
from tests.helpers.gateway import Gateway, gateway, http_request, wait_healthy

pytestmark = pytest.mark.integration

STATUSES = {200, 400, 404, 405, 414, 431, 503, 505}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with gateway(tmp_path_factory.mktemp("http")) as g:
        yield g


def metrics(gw: Gateway) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    code, headers, body = gw.get("/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_match_the_status_and_parse(gw: Gateway) -> None:
    wait_healthy(gw)
    for i in range(5):
        assert gw.ctl("send", json.dumps({"seq": i, "tag": "metrics"})).returncode == 0
    wait_for(lambda: len([v for v in gw.delivered() if v.get("tag") == "metrics"]) == 5, 30, what="5 delivered")
    wait_for(lambda: gw.status()[1]["queues"]["outbox"] == 0, 15, what="outbox drained")
    m = metrics(gw)
    _, st = gw.status()
    for kind in ("ingested", "delivered", "queued", "dead_lettered", "dropped"):
        assert m["gatewayd_ledger_records"][(("kind", kind),)] == st["ledger"][kind]
    assert m["gatewayd_ledger_records"][(("kind", "delivered"),)] >= 5
    for queue in ("controller", "outbox", "inbound", "dead_letters"):
        assert (("queue", queue),) in m["gatewayd_queue_depth"]
    assert m["gatewayd_queue_depth"][(("queue", "outbox"),)] == 0
    assert m["gatewayd_oldest_queued_age_seconds"][()] == 0
    assert m["gatewayd_mqtt_connected"][()] == 1
    # gatewayd-ingest is left out while no adapter is configured (inactive on purpose)
    assert m["gatewayd_unit_up"] == {(("unit", d),): 1.0 for d in ("bridge", "forwarder", "supervisor")}
    assert m["gatewayd_publish_records_total"][()] >= 5
    assert m["gatewayd_healthy"][()] == 1 and m["gatewayd_ledger_balanced"][()] == 1
    # HEAD: the headers only; OpenMetrics for a client that asks for it
    code, headers, body = gw.get("/metrics", method="HEAD")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0
    code, headers, body = gw.get("/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert code == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_health_follows_the_bridge(gw: Gateway) -> None:
    wait_healthy(gw)
    code, st = gw.health()
    assert code == 200 and st["healthy"] is True
    _, status = gw.status()
    assert set(st) == set(status)  # the same object as `gatewayctl status --json`
    # each daemon's STATUS= line, as stored by the runner (at most every 5 s)
    expected = {"bridge": "connected to", "forwarder": "idle", "supervisor": "controller disabled"}

    def doing(d: str, start: str) -> bool:
        return (gw.health()[1]["daemons"][d]["doing"] or "").startswith(start)

    for d, start in expected.items():
        wait_for(partial(doing, d, start), 20, what=f"{d}'s STATUS= line stored")
    daemons = gw.health()[1]["daemons"]
    assert all(daemons[d]["up"] and daemons[d]["last_error"] is None for d in expected)

    gw.daemons["bridge"].stop()
    try:
        code, st = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(gw.health()), 15, what="/health 503")
        assert st["healthy"] is False and "bridge is inactive" in st["degraded_reasons"]
        assert st["daemons"]["bridge"]["up"] is False
        assert st["daemons"]["bridge"]["doing"] == "bridge stopping"
        m = metrics(gw)
        assert m["gatewayd_unit_up"][(("unit", "bridge"),)] == 0
        assert m["gatewayd_healthy"][()] == 0
    finally:
        gw.daemons["bridge"].start()
    wait_for(lambda: gw.health()[0] == 200, 30, what="/health 200 again")


def _exchange(port: int, data: bytes, timeout: float = 15) -> bytes:
    """Send raw bytes, read one response (head and Content-Length body) or up to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused part-way (a huge head): the answer was sent before
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                lines = head.split(b"\r\n")
                length = next((int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                               if k.strip().lower() == b"content-length"), None)
                if data.upper().startswith(b"HEAD "):
                    length = 0
                if length is not None and len(body) >= length:
                    return head + sep + body[:length]
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
        return buf


def _status_of(reply: bytes) -> int:
    line = reply.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1.1 "), reply[:200]
    return int(line.split()[1])


def test_huge_and_malformed_requests_answered_cleanly(gw: Gateway) -> None:
    port = gw.http_port
    cases = {
        b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n": 431,
        b"GET /metrics HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(2000)) + b"\r\n": 431,
        b"GET /" + b"x" * 20_000 + b" HTTP/1.1\r\n\r\n": 414,
        b"DELETE /metrics HTTP/1.1\r\n\r\n": 405,
        b"POST /health HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc": 405,
        b"GET /../etc/passwd HTTP/1.1\r\n\r\n": 404,
        b"GET /health HTTP/2.0\r\n\r\n": 505,
        b"BREW /coffee HTCPCP/1.0\r\n\r\n": 400,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n": 400,  # a TLS hello
        b"\r\n\r\n": 400,
    }
    for request, expected in cases.items():
        reply = _exchange(port, request)
        assert _status_of(reply) == expected, (request[:60], reply[:300])
        assert b"Traceback" not in reply
    allow = _exchange(port, b"PUT /metrics HTTP/1.1\r\n\r\n")
    assert b"\r\nAllow: GET, HEAD\r\n" in allow
    assert gw.get("/health")[0] in (200, 503)  # still serving


_TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~" + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                 min_size=1, max_size=12)
_FIELD = st.binary(max_size=300).filter(lambda b: b"\r" not in b and b"\n" not in b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS", "TRACE", "get"]), _TOKEN,
                        _FIELD.filter(lambda b: b" " not in b and b != b"").map(lambda b: b.decode("latin-1"))),
       path=st.one_of(st.sampled_from(["/health", "/metrics", "/metrics?x=1", "*", "/", "//metrics",
                                       "http://x/metrics"]), _FIELD.map(lambda b: b.decode("latin-1"))),
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/1.x", "HTTP/3.0", "http/1.1", "HTTP/11"]),
       headers=st.lists(st.tuples(_FIELD, _FIELD), max_size=20),
       big=st.integers(0, 40_000))
def test_any_request_line_and_headers_get_a_clean_answer(gw: Gateway, method: str, path: str, version: str,
                                                         headers: list[tuple[bytes, bytes]], big: int) -> None:
    line = f"{method} {path} {version}".encode("latin-1")
    head = line + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    if big:
        head += b"X-Filler: " + b"f" * big + b"\r\n"
    reply = _exchange(gw.http_port, head + b"\r\n")
    code = _status_of(reply)
    assert code in STATUSES, reply[:300]
    assert b"Traceback" not in reply
    if code not in (200, 503) and method != "HEAD":
        body = reply.split(b"\r\n\r\n", 1)[1]
        assert "error" in json.loads(body)


def test_no_traceback_in_the_log(gw: Gateway) -> None:
    log = gw.daemons["http"].log()
    assert "Traceback" not in log and "<3>" not in log and "<2>" not in log, log[-3000:]
    assert gw.daemons["http"].proc is not None and gw.daemons["http"].proc.poll() is None


def test_slow_and_surplus_connections(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"http": {"listen": f"127.0.0.1:{port}", "max_connections": 2,
                                           "request_timeout_s": 1.0}})
    http = Daemon("http", cfg).start()
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        idle[0].sendall(b"GET /heal")  # a request that never completes
        time.sleep(0.3)
        assert _status_of(_exchange(port, b"GET /health HTTP/1.1\r\n\r\n")) == 503  # both slots taken
        # the request deadline frees them: a silent or slow client does not hold a slot
        for s in idle:
            s.settimeout(10)
            assert s.recv(100) == b""
            s.close()
        assert _status_of(_exchange(port, b"GET /health HTTP/1.1\r\n\r\n")) == 503  # no state yet
    finally:
        http.stop()


def test_reads_without_creating_or_changing_files(tmp_path: Path) -> None:
    """No state yet: 503 and nothing created. Then with databases whose daemons are gone
    (no -wal files): still nothing created or modified, whatever it is asked."""
    port = free_port()
    cfg = write_config(tmp_path, {"http": {"listen": f"127.0.0.1:{port}"}})
    http = Daemon("http", cfg).start()
    try:
        code, _, body = http_request(port, "/health")
        assert code == 503 and "does not exist" in json.loads(body)["error"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gatewayd.toml", "http.log"]
        fwd = Daemon("forwarder", cfg).start()
        fwd.stop()
        state = tmp_path / "state"
        before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in state.iterdir()}
        assert not any(n.endswith(("-wal", "-shm")) for n in before)
        for _ in range(3):
            assert http_request(port, "/health")[0] == 503
            assert http_request(port, "/metrics")[0] == 200
            time.sleep(1.1)  # past the report cache
        after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in state.iterdir()}
        assert after == before
    finally:
        http.stop()


def _activated(cfg: Path, sock: socket.socket, log: Path) -> subprocess.Popen[bytes]:
    """Start `gatewayd http` the way systemd does: the listening socket as fd 3, LISTEN_FDS=1,
    LISTEN_PID = its own pid (the shell execs into python, keeping the pid)."""
    fd = sock.fileno()

    def as_fd3() -> None:
        os.dup2(fd, 3)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    with open(log, "ab") as out:
        return subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", sys.executable, "-m",
                                 "gatewayd", "http", "--config", str(cfg)],
                                preexec_fn=as_fd3, pass_fds=(3,), env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=str(ROOT))


def test_socket_activation_and_exit_when_idle(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"http": {"listen": "127.0.0.1:1", "idle_exit_s": 2.0}})
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    log = tmp_path / "activated.log"
    proc = _activated(cfg, sock, log)
    try:
        # the connection waits in the socket's backlog until the process serves it
        assert _status_of(_exchange(port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200
        assert proc.wait(timeout=20) == 0  # idle for 2 s: gone
        text = log.read_text()
        assert "socket-activated" in text and "no request for" in text
        assert f"systemd listens on 127.0.0.1:{port}, the configuration says 127.0.0.1:1" in text
        # systemd would start it again for the next connection, which waits meanwhile
        waiting = socket.create_connection(("127.0.0.1", port), timeout=20)
        waiting.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        proc = _activated(cfg, sock, log)
        assert waiting.recv(12).startswith(b"HTTP/1.1 503")  # no state in this directory
        waiting.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        sock.close()
