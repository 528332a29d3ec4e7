"""`gatewayd ingest` over HTTP as a real process: status codes, commit-before-200, abuse."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.store import queues
from gatewayd.store.space import reserve_path
from tests.helpers.brokers import free_port
from tests.helpers.daemons import Daemon
from tests.helpers.datapath import can_mount, fill, status_json, tmpfs
from tests.helpers.ingest import controller_rows, ingest_config, queued_seqs, wait_for
from tests.integration.test_bridge_support import NotifySocket

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
JSON = {"Content-Type": "application/json"}


class Gateway:
    def __init__(self, base: Path, ingest: dict[str, Any] | None = None, paths: dict[str, str] | None = None,
                 env: dict[str, str] | None = None, **http: Any):
        self.base = base
        self.port = free_port()
        self.cfg = ingest_config(base, http_port=self.port, ingest__http={"request_timeout_s": 2.0, **http},
                                 ingest=ingest or {}, paths=paths or {})
        self.daemon = Daemon("ingest", self.cfg, env=env).start()

    def post(self, body: bytes | str, path: str = "/api/v1/telemetry", headers: dict[str, str] | None = None,
             method: str = "POST", timeout: float = 10) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=JSON if headers is None else headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, json.loads(data) if data else {}
        finally:
            conn.close()

    def rows(self) -> list[tuple[str, Any]]:
        return controller_rows(self.base)


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    g = Gateway(tmp_path / "gw")
    try:
        yield g
    finally:
        g.daemon.stop()


def test_telemetry_and_attributes_are_queued_before_200(gw: Gateway) -> None:
    assert gw.post('{"temp": 20.5}') == (200, {"accepted": 1})
    assert gw.post('[{"ts": 1000, "values": {"a": 1}}, {"ts": 1001, "values": {"a": 2}}]') == (200, {"accepted": 2})
    assert gw.post('{"fw": "2.1"}', "/api/v1/attributes") == (200, {"accepted": 1})
    assert gw.post("[]") == (200, {"accepted": 0})
    rows = gw.rows()
    assert [t for t, _ in rows] == ["telemetry"] * 3 + ["attributes"]
    assert json.loads(rows[1][1]) == {"ts": 1000, "values": {"a": 1}}
    assert json.loads(rows[3][1])["values"] == {"fw": "2.1"}


@pytest.mark.parametrize("body,reason", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"ts": "noon", "values": {"a": 1}}', "'ts' must be an integer"),
    (b'{"ts": 1, "values": {}}', "'values' is empty"),
    (b'[{"ts": 1, "values": {"a": 1}}, 5]', "record 1: message is not a JSON object"),
    (b'{"a": NaN}', "not valid JSON"),
    (b'"text"', "not a JSON object"),
])
def test_an_invalid_body_is_400_with_the_reason_and_nothing_is_queued(gw: Gateway, body: bytes, reason: str) -> None:
    code, answer = gw.post(body)
    assert code == 400 and reason in answer["error"], answer
    assert gw.rows() == []


def test_status_codes_for_paths_methods_types_and_lengths(gw: Gateway) -> None:
    assert gw.post("{}", "/api/v1/nothing")[0] == 404
    assert gw.post("", "/api/v1/telemetry", method="GET", headers={})[0] == 405
    assert gw.post('{"a": 1}', headers={"Content-Type": "text/plain"})[0] == 415
    assert gw.post('{"a": 1}', headers={})[0] == 415
    assert gw.post('{"a": 1}', headers={"Content-Type": "application/json; charset=latin-1"})[0] == 415
    assert gw.post('{"a": 1}', headers={"Content-Type": "application/json; charset=utf-8"})[0] == 200
    # chunked (no Content-Length): 411, with http.client's own chunked encoding
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("POST", "/api/v1/telemetry", body=iter([b'{"a": 1}']), headers=JSON, encode_chunked=True)
    assert conn.getresponse().status == 411
    conn.close()
    # over the size limit: refused from the header, the body is never read
    code, answer = gw.post(b"x" * (1024 * 1024 + 1))
    assert code == 413 and "over the limit" in answer["error"]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /api/v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 99999999999\r\n\r\n")
        assert s.recv(200).startswith(b"HTTP/1.1 413")
    assert len(gw.rows()) == 1


def test_bearer_token(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "gw", bearer_token=TOKEN)
    try:
        assert g.post('{"a": 1}')[0] == 401
        assert g.post('{"a": 1}', headers={**JSON, "Authorization": "Bearer wrong"})[0] == 401
        assert g.post('{"a": 1}', headers={**JSON, "Authorization": f"Basic {TOKEN}"})[0] == 401
        assert g.post('{"a": 1}', headers={**JSON, "Authorization": f"bearer {TOKEN}"}) == (200, {"accepted": 1})
        assert TOKEN not in g.daemon.log()
    finally:
        g.daemon.stop()


def test_503_over_the_queue_cap(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "gw", ingest={"max_queue_rows": 10})
    try:
        codes = [g.post('[{"a": 1}, {"a": 2}, {"a": 3}]')[0] for _ in range(8)]
        assert codes[:4] == [200] * 4 and codes[-1] == 503, codes
        assert len(g.rows()) == 3 * codes.count(200)
    finally:
        g.daemon.stop()


def test_a_200_is_never_lost_to_kill9(gw: Gateway) -> None:
    for i in range(5):
        code, _ = gw.post(json.dumps({"ts": 1000 + i, "values": {"seq": i}}))
        assert code == 200
        gw.daemon.kill9()
        assert queued_seqs(gw.base) == list(range(i + 1))
        gw.daemon.start()


def test_slow_and_stalled_clients_block_no_one(gw: Gateway) -> None:
    """request_timeout_s = 2: trickling headers or bodies hold one thread until then, nothing else."""
    slow: list[socket.socket] = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            s.sendall(b"POST /api/v1/telemetry HTTP/1.1\r\nHost: x\r\n")  # headers never finish
            slow.append(s)
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        s.sendall(b"POST /api/v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000\r\n\r\n[")  # the body stalls
        slow.append(s)
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set():
                try:
                    slow[0].send(b"X")
                except OSError:
                    return
                time.sleep(0.3)

        t = threading.Thread(target=trickle)
        t.start()
        t0 = time.monotonic()
        for i in range(20):
            assert gw.post(json.dumps({"seq": i}), timeout=5)[0] == 200
        assert time.monotonic() - t0 < 10, "others were served while the slow clients waited"
        for s in slow:  # the server closes them once their time is up
            s.settimeout(10)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass  # closed, not timed out (socket.timeout fails the test)
        stop.set()
        t.join(5)
        assert gw.daemon.proc is not None and gw.daemon.proc.poll() is None
        assert len(gw.rows()) == 20
    finally:
        for s in slow:
            s.close()


def test_connections_over_the_limit_get_503(tmp_path: Path) -> None:
    g = Gateway(tmp_path / "gw", max_connections=2)
    idle = [socket.create_connection(("127.0.0.1", g.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
            s.sendall(b"POST /api/v1/telemetry HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(200).startswith(b"HTTP/1.1 503")

        def accepted() -> bool:
            try:
                return g.post('{"a": 1}', timeout=5)[0] == 200
            except (BrokenPipeError, ConnectionResetError):
                return False  # refused and closed before the request was written: still full

        wait_for(accepted, 10, interval=0.5, what="a free slot once the idle connections timed out")
    finally:
        for s in idle:
            s.close()
        g.daemon.stop()


@pytest.fixture(scope="module")
def shared_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("hyp") / "gw", max_body_bytes=4096)
    try:
        yield g
    finally:
        g.daemon.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
bodies = st.one_of(
    st.binary(max_size=5000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(st.fixed_dictionaries({"ts": st.integers(), "values": st.dictionaries(st.text(max_size=8), json_values,
                                                                                   max_size=3)}),
             max_size=5).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, attributes=st.booleans())
def test_any_body_gets_an_answer_and_200_means_queued(shared_gw: Gateway, body: bytes, attributes: bool) -> None:
    before = len(shared_gw.rows())
    code, answer = shared_gw.post(body, "/api/v1/attributes" if attributes else "/api/v1/telemetry")
    assert code in (200, 400, 413), (code, answer)
    after = len(shared_gw.rows())
    if code == 200:
        assert after - before == answer["accepted"]
    else:
        assert after == before and answer["error"]
    assert shared_gw.daemon.proc is not None and shared_gw.daemon.proc.poll() is None


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs")
def test_a_full_disk_and_a_replaced_queues_db(tmp_path: Path) -> None:
    """The controller queue on a full disk: 503 (nothing queued, nothing lost), the reserve released so
    that commits go on, the fault once in the journal and in `gatewayctl status`, the watchdog fed while
    it lasts; a queues.db replaced under ingest is followed, and its errors land in the new file."""
    base = tmp_path / "gw"
    state = base / "state"
    notify = NotifySocket(tmp_path / "notify.sock")
    with tmpfs(state, 8 << 20):
        gw = Gateway(base, ingest={"stall_timeout_s": 1}, paths={"controller_data_dir": str(state / "controller")},
                     env=notify.env(1_000_000))
        g, cfg, post = gw.daemon, gw.cfg, gw.post
        try:
            assert post('{"n": 0}')[0] == 200
            queues_db = state / "queues.db"
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{queues_db}{suffix}").exists():
                    os.replace(f"{queues_db}{suffix}", f"{state / 'old-queues.db'}{suffix}")
            queues.open_queues(queues_db).close()           # another daemon started a new one
            g.wait_log("was replaced under the ingest")
            wait_for(lambda: status_json(cfg)[1]["stale_queues_db"] == [], 10, what="no stale queues.db")
            reserve = reserve_path(state)
            reserve.write_bytes(b"\0" * (2 << 20))
            fill(state)
            body = json.dumps([{"n": i, "pad": "x" * 1000} for i in range(200)])
            code, answer = post(body)
            assert code == 503 and "full" in answer.get("error", ""), answer
            assert not reserve.exists()                        # released for the commits that matter
            assert "full" in (status_json(cfg)[1]["faults"]["ingest"] or "")
            fill(state, "filler2")                             # and full again: the fault lasts
            assert post(body)[0] == 503
            pings = [t for t, m in notify.drain(4.0) if m == "WATCHDOG=1"]
            assert len(pings) >= 4 and pings[-1] - pings[0] > 2.0, pings  # past stall_timeout_s, still fed
            (state / "filler2").unlink()
            assert post(body)[0] == 200                        # the room is back
            wait_for(lambda: "recovered: cannot commit" in g.log(), 10, what="the recovery logged")
            faults = [line.split(" ", 3)[-1] for line in g.log().splitlines() if line.endswith("; will retry")]
            assert faults and len(faults) == len(set(faults)), faults   # each said once (a new reason again)
            with contextlib.closing(queues.open_queues(queues_db, check=False)) as q:
                assert "full" in (queues.last_error(queues.all_state(q), "ingest") or "")
            n = sum(len(json.loads(m)) if m.startswith("[") else 1 for _, m in controller_rows(state))
            assert n == 201
        finally:
            g.stop()
            notify.close()
