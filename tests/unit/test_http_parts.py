"""Pieces of `gatewayd http`: the systemd generator, the metrics collector over a real store,
the inherited socket, and the status object it shares with gatewayctl."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gatewayd import ctl
from gatewayd.config import ConfigError, load
from gatewayd.forwarder.service import Forwarder
from gatewayd.http.main import inherited_socket
from gatewayd.http.metrics import registry
from tests.helpers.daemons import ROOT, write_config

GENERATOR = ROOT / "units" / "gatewayd-http-generator"


def run_generator(tmp_path: Path, http: dict[str, object] | None, raw: str | None = None) -> Path:
    conf = tmp_path / "etc" / "gatewayd.toml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        conf.write_text(raw)
    else:
        write_config(conf.parent, {"http": http} if http is not None else None)
    out = tmp_path / "gen"
    out.mkdir()
    env = {**os.environ, "GATEWAYD_CONFIG": str(conf), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(GENERATOR), str(out), str(out) + ".early", str(out) + ".late"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return out


def files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): (f"-> {os.readlink(p)}" if p.is_symlink() else p.read_text())
            for p in sorted(d.rglob("*")) if p.is_symlink() or p.is_file()}


def test_generator_default_address_only_joins_the_target(tmp_path: Path) -> None:
    assert files(run_generator(tmp_path, None)) == {
        "gatewayd.target.wants/gatewayd-http.socket": "-> /lib/systemd/system/gatewayd-http.socket"}


def test_generator_other_address_gets_a_dropin(tmp_path: Path) -> None:
    out = files(run_generator(tmp_path, {"listen": "[::1]:9200"}))
    assert out["gatewayd-http.socket.d/50-listen.conf"].endswith("[Socket]\nListenStream=\nListenStream=[::1]:9200\n")
    assert "gatewayd.target.wants/gatewayd-http.socket" in out


def test_generator_localhost_and_off(tmp_path: Path) -> None:
    out = files(run_generator(tmp_path / "a", {"listen": "localhost:9300"}))
    assert out["gatewayd-http.socket.d/50-listen.conf"].endswith("ListenStream=127.0.0.1:9300\n")
    assert files(run_generator(tmp_path / "b", {"listen": ""})) == {}


def test_generator_survives_a_broken_configuration(tmp_path: Path) -> None:
    out = run_generator(tmp_path, None, raw="[http\nlisten = 3\n")
    assert files(out) == {"gatewayd.target.wants/gatewayd-http.socket": "-> /lib/systemd/system/gatewayd-http.socket"}


@pytest.mark.parametrize("listen", ["example.com:9101", "127.0.0.1", "127.0.0.1:0", ":9101", "1.2.3.4:99999"])
def test_listen_must_be_an_address_systemd_takes(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"\[http\] listen"):
        load(write_config(tmp_path, {"http": {"listen": listen}}), env={})


def test_metrics_from_a_real_store(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), env={})
    fwd = Forwarder(cfg)
    fwd.start()
    try:
        assert fwd.ctrl is not None
        fwd.ctrl.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
                             [('{"ts": 1, "values": {"a": 1}}',), ("bad",)])
        fwd.move_batch()
        text = generate_latest(registry(lambda: ctl.status_report(cfg))).decode()
    finally:
        fwd.stop()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("gatewayd_ledger_records", (("kind", "ingested"),))] == 2
    assert samples[("gatewayd_ledger_records", (("kind", "dead_lettered"),))] == 1
    assert samples[("gatewayd_queue_depth", (("queue", "outbox"),))] == 1
    assert samples[("gatewayd_queue_depth", (("queue", "dead_letters"),))] == 1
    assert samples[("gatewayd_dead_letters_unacknowledged", ())] == 1
    assert samples[("gatewayd_mqtt_connected", ())] == 0
    assert samples[("gatewayd_publish_records_total", ())] == 0
    assert samples[("gatewayd_oldest_queued_age_seconds", ())] >= 0
    assert samples[("gatewayd_state_readable", ())] == 1 and samples[("gatewayd_healthy", ())] == 0


def test_metrics_when_the_state_is_unreadable(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), env={})
    text = generate_latest(registry(lambda: ctl.status_report(cfg))).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names == {"gatewayd_unit_up", "gatewayd_state_readable", "gatewayd_healthy"}


def test_status_report_is_the_status_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = write_config(tmp_path)
    cfg = load(cfg_path, env={})
    fwd = Forwarder(cfg)
    fwd.start()
    fwd.stop()
    code, st = ctl.status_report(cfg)
    assert ctl.main(["--config", str(cfg_path), "status", "--json"]) == code == 1
    printed = json.loads(capsys.readouterr().out)
    printed["queues"].pop("oldest_queued_age_s"), st["queues"].pop("oldest_queued_age_s")
    assert printed == st


def test_inherited_socket_only_for_this_process() -> None:
    assert inherited_socket({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) is None
    assert inherited_socket({}) is None
    listener = socket.create_server(("127.0.0.1", 0))
    saved = os.dup(3) if _fd_open(3) else None
    try:
        os.dup2(listener.fileno(), 3)
        sock = inherited_socket({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"})
        assert sock is not None and sock.getsockname() == listener.getsockname()
        assert not os.get_inheritable(3)
        sock.detach()
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)
        listener.close()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_failing_route_answers_500_and_the_server_goes_on() -> None:
    from gatewayd.http.server import EndpointServer

    def broken(accept: str) -> tuple[int, str, bytes]:
        raise KeyError("a bug")

    def fine(accept: str) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok"

    server = EndpointServer(socket.create_server(("127.0.0.1", 0)), {"/health": broken, "/metrics": fine}, 4, 5.0)
    port = server.server_address[1]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if select.select([server.socket], [], [], 0.1)[0]:
                server.handle_request()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        for path, expected in (("/health", b"HTTP/1.1 500 "), ("/metrics", b"HTTP/1.1 200 ")):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                reply = s.recv(4096)
            assert reply.startswith(expected), reply
            assert b"Traceback" not in reply
    finally:
        stop.set()
        t.join(5)
        server.server_close()
