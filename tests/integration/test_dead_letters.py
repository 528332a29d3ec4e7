"""Dead letters as an operator works them, on a real gateway (mosquitto, the ThingsBoard
simulator, the daemons as processes): `gatewayctl dead-letters …` and the RPC methods, with
the ledger adding up after every step."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemons import wait_for
from tests.helpers.gateway import DEVICE, Gateway, gateway, wait_healthy

pytestmark = pytest.mark.integration

SMALL_PACKET = 2048


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    with gateway(tmp_path, {"thingsboard": {"max_packet_bytes": SMALL_PACKET}}) as g:
        wait_healthy(g)
        yield g


def insert_raw(gw: Gateway, *messages: str) -> None:
    """Rows as a careless controller writes them."""
    with sqlite3.connect(gw.base / "controller" / "communication_queue.db", timeout=10) as c:
        c.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)", [(m,) for m in messages])


def dl_list(gw: Gateway) -> dict[str, Any]:
    r = gw.ctl("dead-letters", "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_dead(gw: Gateway, n: int) -> dict[str, Any]:
    return wait_for(lambda: (lambda d: d if d["total"] == n else None)(dl_list(gw)), 20,
                    what=f"{n} dead letters")


def assert_balanced(gw: Gateway) -> dict[str, Any]:
    led = gw.ledger()
    assert led["balanced"], led
    return led


def test_list_requeue_purge_ack_with_gatewayctl(gw: Gateway) -> None:
    big = json.dumps({"blob": "x" * 3000, "tag": "big"})
    assert gw.ctl("send", json.dumps({"tag": "fine"})).returncode == 0
    assert gw.ctl("send", big).returncode == 0
    insert_raw(gw, "not json")
    listing = wait_dead(gw, 2)
    assert listing["unacknowledged"] == 2
    by_reason = {("packet" in r["reason"]): r for r in listing["dead_letters"]}
    oversized, invalid = by_reason[True], by_reason[False]
    assert "more than the maximum of 2048 bytes" in oversized["reason"] and invalid["message"] == "not json"
    assert_balanced(gw)
    code, st = gw.status()
    assert code == 1 and "2 unacknowledged dead letters" in "; ".join(st["degraded_reasons"])
    assert gw.health()[0] == 503
    shown = json.loads(gw.ctl("dead-letters", "show", str(oversized["id"]), "--json").stdout)
    assert json.loads(shown["message"])["values"]["blob"] == "x" * 3000 and shown["ledger_record"] is True
    text = gw.ctl("dead-letters", "list").stdout
    assert "not json" in text and "2 unacknowledged" in text

    # requeue what is still invalid: back through the forwarder, back in the dead letters
    before = assert_balanced(gw)
    r = gw.ctl("dead-letters", "requeue", str(invalid["id"]))
    assert r.returncode == 0 and "requeued 1 dead letter" in r.stdout and "ledger: " in r.stdout
    wait_for(lambda: any(d["message"] == "not json" and d["id"] > invalid["id"]
                         for d in dl_list(gw)["dead_letters"]), 20, what="the invalid row dead-lettered again")
    after = assert_balanced(gw)
    assert after["ingested"] == before["ingested"] and after["dead_lettered"] == 2  # counted once
    assert gw.ctl("dead-letters", "requeue", "999999").returncode == 1  # no such dead letter

    # the operator raises the packet limit; the oversized record now goes through
    cfg = gw.config.read_text().replace(f"max_packet_bytes = {SMALL_PACKET}", "max_packet_bytes = 65536")
    gw.config.write_text(cfg)
    for name in ("forwarder", "bridge"):
        gw.daemons[name].stop()
        gw.daemons[name].start()
    assert gw.ctl("dead-letters", "requeue", str(oversized["id"])).returncode == 0
    wait_for(lambda: any(v.get("tag") == "big" for v in gw.delivered()), 30, what="the big record delivered")
    wait_for(lambda: gw.ledger()["queued"] == 0, 15, what="outbox drained")
    led = assert_balanced(gw)
    assert (led["delivered"], led["dead_lettered"]) == (2, 1)

    # purge: dropped, and gone
    tomorrow = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    r = gw.ctl("dead-letters", "purge", "--before", tomorrow)
    assert r.returncode == 0 and "purged 1 dead letter" in r.stdout
    led = assert_balanced(gw)
    assert (led["dead_lettered"], led["dropped"]) == (0, 1) and dl_list(gw)["total"] == 0
    assert gw.ctl("dead-letters", "purge").returncode == 2  # nothing chosen: refused
    assert gw.ctl("dead-letters", "purge", "--before", "yesterday").returncode == 2

    # ack: not degraded any more, nothing deleted
    insert_raw(gw, '{"ts": 1}')
    wait_dead(gw, 1)
    assert gw.status()[0] == 1
    r = gw.ctl("dead-letters", "ack")
    assert r.returncode == 0 and "0 unacknowledged" in r.stdout
    assert gw.status()[0] == 0 and gw.health()[0] == 200
    assert dl_list(gw)["total"] == 1
    assert_balanced(gw)


def rpc(gw: Gateway, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    reply = gw.sim.client.rpc(DEVICE, method, params or {}, timeout=20)
    assert isinstance(reply, dict)
    if "ledger" in reply:
        assert reply["ledger"]["balanced"], reply
    assert_balanced(gw)
    return reply


def test_the_same_through_rpc(gw: Gateway) -> None:
    insert_raw(gw, "bad 1", "bad 2", "bad 3", "bad 4")
    wait_dead(gw, 4)
    listed = rpc(gw, "dead_letters_list", {"limit": 3})
    assert listed["total"] == 4 and listed["unacknowledged"] == 4
    assert [d["message"] for d in listed["dead_letters"]] == ["bad 2", "bad 3", "bad 4"]  # the newest three
    ids = {d["message"]: d["id"] for d in rpc(gw, "dead_letters_list")["dead_letters"]}

    out = rpc(gw, "dead_letters_requeue", {"id": ids["bad 1"]})
    assert (out["requeued"], out["to_controller_queue"]) == (1, 1)
    wait_for(lambda: {d["message"] for d in rpc(gw, "dead_letters_list")["dead_letters"]} >= {"bad 1"}
             and rpc(gw, "dead_letters_list")["total"] == 4, 20, what="bad 1 dead-lettered again")

    out = rpc(gw, "dead_letters_purge", {"ids": [ids["bad 2"], ids["bad 3"], 987654]})
    assert out["purged"] == 2 and out["not_found"] == [987654] and out["ledger"]["dropped"] == 2
    out = rpc(gw, "dead_letters_ack")
    assert (out["total"], out["unacknowledged"]) == (2, 0)
    wait_for(lambda: gw.status()[0] == 0, 15, what="healthy after the ack")
    out = rpc(gw, "dead_letters_purge", {"all": True})
    assert out["purged"] == 2 and out["ledger"]["dead_lettered"] == 0

    for method, params in (("dead_letters_purge", {}), ("dead_letters_requeue", {"all": False}),
                           ("dead_letters_requeue", {"ids": "1"}), ("dead_letters_purge", {"before": "soon"}),
                           ("dead_letters_list", {"limit": 0})):
        assert "error" in rpc(gw, method, params), (method, params)


def test_requeue_reaches_the_server_after_a_server_side_refusal(tmp_path: Path) -> None:
    """The bridge dead-letters a record over the server's packet limit; once the server's
    limit is raised and the bridge has asked for it again, requeue sends the record."""
    with gateway(tmp_path) as gw:
        wait_healthy(gw)
        gw.sim.client.set_faults(max_packet_bytes=1500)
        gw.daemons["bridge"].stop()
        gw.daemons["bridge"].start()  # learns the server's limit at connect (getSessionLimits)
        assert gw.ctl("send", json.dumps({"blob": "y" * 2000, "tag": "refused"})).returncode == 0
        listing = wait_for(lambda: (lambda d: d if d["total"] == 1 else None)(dl_list(gw)), 120,
                           what="the bridge dead-letters the record")
        (dead,) = listing["dead_letters"]
        assert dead["stage"] == "bridge"
        assert_balanced(gw)
        gw.sim.client.set_faults(max_packet_bytes=65536)
        gw.daemons["bridge"].stop()
        gw.daemons["bridge"].start()  # asks the server's limits again (getSessionLimits)
        r = gw.ctl("dead-letters", "requeue", "--all")
        assert r.returncode == 0 and "1 into the outbox" in r.stdout
        wait_for(lambda: any(v.get("tag") == "refused" for v in gw.delivered()), 30, what="delivered at last")
        wait_for(lambda: gw.ledger()["queued"] == 0, 15, what="outbox drained")
        led = assert_balanced(gw)
        assert led["dead_lettered"] == 0 and led["delivered"] == 1
