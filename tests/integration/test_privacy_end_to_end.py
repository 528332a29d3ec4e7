"""The privacy policy end to end: a controller and `gatewayd ingest` hand records to the real
forwarder, the real bridge publishes them to the ThingsBoard simulator (in front of mosquitto).
The simulator must never see a dropped or redacted value; it sees HMAC hex and rounded numbers;
the ledger adds up with the privacy drops, and `gatewayctl status` names their reason."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.brokers import free_port, start_mosquitto, start_simulator
from tests.helpers.daemons import ROOT, Daemon, wait_for, write_config
from tests.helpers.datapath import balanced, controller_db, counters, ctl, ro, status_json
from tests.helpers.ingest import ingest_config

pytestmark = pytest.mark.integration

DEVICE, TOKEN = "privacy-dev", "privacy-token-1"
HASH_KEY = "e2e-hash-key-0123456789"
POLICY = {
    "rules": [
        {"match": "gps_*", "action": "round", "digits": 3},
        {"match": "serial", "action": "hash"},
        {"match": "owner_name", "action": "redact"},
        {"match": "pin_*", "action": "drop"},
    ],
    "drop_record_if": ["debug_dump"],
    "hash_key": HASH_KEY,
}
# Values that must never leave the device (nor reach the archive) in clear.
SECRETS = ["Erika Mustermann", "8642-SECRET", "PRIVATE-DUMP-99", "PIN-ONLY-77", "SN-4711-XYZ", "SN-HTTP-1",
           "PIN-HTTP-5", "48.1372954"]


def hmac_hex(text: str) -> str:
    return hmac.new(HASH_KEY.encode(), text.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[dict[str, Any]]:
    broker = start_mosquitto(tmp_path)
    sim = None
    daemons: list[Daemon] = []
    try:
        sim = start_simulator(tmp_path, broker.port, devices={DEVICE: TOKEN}, capture=tmp_path / "capture.jsonl")
        base = tmp_path / "gw"
        http_port = free_port()
        cfg = ingest_config(base, http_port=http_port, tb_port=sim.port, token=TOKEN, privacy=POLICY,
                            thingsboard={"device_name": DEVICE})
        for name in ("forwarder", "bridge", "ingest"):
            daemons.append(Daemon(name, cfg).start())
        yield {"base": base, "cfg": cfg, "sim": sim, "http_port": http_port}
    finally:
        for d in reversed(daemons):
            d.stop()
        if sim is not None:
            sim.stop()
        broker.stop()


def insert(base: Path, rows: list[tuple[str, dict[str, Any]]]) -> None:
    db = controller_db(base)
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as c:
        c.executemany("INSERT INTO messages(type, message) VALUES (?, ?)", [(t, json.dumps(m)) for t, m in rows])
        c.commit()


def post(port: int, body: dict[str, Any]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/api/v1/telemetry", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_each_action_end_to_end_the_simulator_never_sees_a_protected_value(gateway: dict[str, Any]) -> None:
    base, sim = gateway["base"], gateway["sim"]
    ts = 1_767_225_600_000  # 2026-01-01
    insert(base, [
        ("telemetry", {"ts": ts + 1, "values": {"gps_lat": 48.1372954, "gps_lon": 11.5755821, "serial": "SN-4711-XYZ",
                                                "owner_name": "Erika Mustermann", "pin_code": "8642-SECRET",
                                                "temp": 21.5, "seq": 1}}),
        ("telemetry", {"ts": ts + 2, "values": {"debug_dump": "PRIVATE-DUMP-99", "seq": 2}}),   # dropped whole
        ("telemetry", {"ts": ts + 3, "values": {"pin_only": "PIN-ONLY-77"}}),                  # nothing left
        ("attributes", {"ts": ts + 4, "values": {"serial": "SN-4711-XYZ", "owner_name": "Erika Mustermann",
                                                 "fw": "1.2"}}),
        ("controller_log", {"ts": ts + 5, "values": {"owner_name": "Erika Mustermann", "msg": "hello", "seq": 5}}),
        ("telemetry", {"ts": ts + 6, "values": {"temp": 20.0, "count": 7, "seq": 6}}),          # untouched
    ])
    # gatewayd ingest writes into the controller queue, so the forwarder's policy applies to it too
    assert post(gateway["http_port"], {"ts": ts + 7, "values": {"serial": "SN-HTTP-1", "gps_lat": 1.23456789,
                                                               "pin_x": "PIN-HTTP-5", "seq": 7}}) == 200

    def seen() -> dict[int, dict[str, Any]]:
        return {r["values"]["seq"]: r for r in sim.client.telemetry(DEVICE) if "seq" in r["values"]}

    got = wait_for(lambda: (s := seen()) and {1, 5, 6, 7} <= set(s) and s, 30, what="records at the simulator")
    attrs = wait_for(lambda: (a := sim.client.attributes(DEVICE)["client"]).get("fw") and a, 30,
                     what="client attributes at the simulator")

    assert got[1]["ts"] == ts + 1
    assert got[1]["values"] == {"gps_lat": 48.137, "gps_lon": 11.576, "serial": hmac_hex("SN-4711-XYZ"),
                                "owner_name": "***", "temp": 21.5, "seq": 1}
    assert got[5]["values"] == {"owner_name": "***", "msg": "hello", "seq": 5}
    assert got[6]["values"] == {"temp": 20.0, "count": 7, "seq": 6}
    assert got[7]["values"] == {"serial": hmac_hex("SN-HTTP-1"), "gps_lat": 1.235, "seq": 7}
    assert {k: attrs[k] for k in ("serial", "owner_name", "fw")} == {
        "serial": hmac_hex("SN-4711-XYZ"), "owner_name": "***", "fw": "1.2"}
    assert 2 not in seen() and not any("pin_only" in r["values"] for r in sim.client.telemetry(DEVICE))

    # nothing protected ever reached the simulator, nor the archive
    capture = Path(sim.capture_path).read_text()
    with contextlib.closing(ro(base / "state" / "archive.db")) as a:
        archived = "\n".join(m for (m,) in a.execute("SELECT message FROM archive"))
    for secret in SECRETS:
        assert secret not in capture and secret not in archived, secret

    # the ledger adds up with the privacy drops, and says why
    wait_for(lambda: counters(base)["queued"] == 0, 30, what="the outbox to drain")
    c = counters(base)
    assert c["ingested"] == 7 and c["dropped"] == c["dropped.privacy"] == 2 and c["delivered"] == 5
    assert c["dead_lettered"] == 0 and balanced(c)
    _, st = status_json(gateway["cfg"])
    assert st["ledger"]["dropped"] == 2 and st["ledger"]["dropped_by_reason"] == {"privacy": 2}
    assert st["ledger"]["balanced"]
    text = ctl(gateway["cfg"], "status").stdout
    assert "dropped 2 (privacy 2)" in text


def test_the_hash_key_is_a_secret_everywhere(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"privacy": POLICY})
    out = subprocess.run([sys.executable, "-m", "gatewayd", "--check-config", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert HASH_KEY not in out.stdout and 'hash_key = "********"' in out.stdout
    bundle = tmp_path / "bundle.tar.gz"
    r = ctl(cfg, "support-bundle", "-o", str(bundle))
    assert r.returncode == 0, r.stderr
    import tarfile

    with tarfile.open(bundle) as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member)
            assert f is None or HASH_KEY.encode() not in f.read(), member.name


@pytest.mark.parametrize("policy,expected", [
    ({"rules": [{"match": "a", "action": "explode"}]},
     ["[[privacy.rules]] #1: action = 'explode': must be one of drop, redact, hash, round"]),
    ({"rules": [{"match": "a", "action": "round"}]},
     ["[[privacy.rules]] #1: action round needs digits (decimals to keep, -15 to 15)"]),
    ({"rules": [{"match": "a", "action": "hash"}]},
     ["[privacy] hash_key: must be set for a hash rule (a short key lets anyone recompute the hashes)"]),
    ({"rules": [{"match": "gps_[z-a]", "action": "drop"}, {"match": "x[", "action": "drop"}]},
     ["[[privacy.rules]] #1 match = 'gps_[z-a]': not a valid glob: range z-a is reversed",
      "[[privacy.rules]] #2 match = 'x[': not a valid glob: '[' at position 1 is never closed"]),
    ({"rules": [{"match": 5, "action": "round", "digits": "2"}], "drop_record_if": "debug"},
     ["[privacy] drop_record_if = 'debug': must be a list",
      "[[privacy.rules]] #1 match: must be a non-empty string (a key name or a glob)",
      "[[privacy.rules]] #1: digits = '2': must be an integer from -15 to 15"]),
    ({"rules": "drop everything"}, ["[privacy] rules = 'drop everything': must be a list"]),
])
def test_a_bad_policy_exits_78_with_one_line_per_problem(tmp_path: Path, policy: dict[str, Any],
                                                          expected: list[str]) -> None:
    cfg = write_config(tmp_path, {"privacy": policy})
    out = subprocess.run([sys.executable, "-m", "gatewayd", "--check-config", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 78
    lines = [line.split("config: ", 1)[1] for line in out.stderr.splitlines() if "config: " in line]
    assert lines == expected
    # the daemon refuses it the same way
    fwd = subprocess.run([sys.executable, "-m", "gatewayd", "forwarder", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert fwd.returncode == 78
