"""Every inbound row, whatever its bytes, gets exactly one reply (RPC) or is consumed, with a dead
letter and a reason when it cannot be used; the supervisor survives all of it.

The real `Supervisor` (controller disabled, power commands harmless) runs in this process on
real SQLite files; hypothesis writes rows as the bridge would.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.config import load
from gatewayd.store import queues
from gatewayd.supervisor.commands import METHODS
from gatewayd.supervisor.service import Supervisor
from tests.helpers.daemons import write_config

SURROGATES = st.text(alphabet=st.integers(0xD800, 0xDFFF).map(chr), min_size=1, max_size=3)
ANY_TEXT = st.one_of(st.text(max_size=20), SURROGATES, st.tuples(st.text(max_size=5), SURROGATES).map("".join))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=15)
SAFE_METHODS = sorted(m for m in METHODS if m not in ("run_command",))


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()


def deep(n: int, wrap: bool) -> bytes:
    inner = b"[" * n + b"]" * n
    return b'{"method": "ping", "params": ' + inner + b"}" if wrap else inner


PAYLOADS = st.one_of(
    st.binary(max_size=64),
    JSON.map(encode),
    st.builds(lambda m, p: encode({"method": m, "params": p}),
              st.one_of(st.sampled_from(SAFE_METHODS), ANY_TEXT), JSON),
    st.builds(deep, st.integers(1, 100_000), st.booleans()),
    st.sampled_from([b'{"method": "\\ud800"}', b'{"method": "ping", "params": NaN}', b"\xff" * 3, b"", b"null"]),
)
TOPICS = st.sampled_from(["rpc", "rpc", "rpc", "v1/devices/me/attributes", "v1/devices/me/attributes/response/1",
                          "v1/devices/me/rpc/response/9", "some/other/topic"])


def settle(sup: Supervisor, conn: Any) -> None:
    for _ in range(400):
        sup.step()
        if not queues.depth(conn, "inbound") and not sup.rpc.pending:
            return
        time.sleep(0.01)
    raise AssertionError("the supervisor did not consume its inbound rows")


def test_every_inbound_row_is_answered_or_dead_lettered(tmp_path: Path) -> None:
    harmless = ["/bin/true"]
    cfg = load(write_config(tmp_path, {
        "supervisor": {"udev": False, "telemetry_interval_s": 3600, "reboot_command": harmless,
                       "shutdown_command": harmless, "restart_gateway_command": harmless,
                       "power_action_delay_s": 0},
        "files": {"check_interval_s": 3600}}), env={})
    sup = Supervisor(cfg)
    sup.start()
    conn = queues.open_queues(cfg.queues_db, check=False)
    ids = itertools.count(1000)
    examples: list[int] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(TOPICS, PAYLOADS), min_size=1, max_size=6))
    def batch(rows: list[tuple[str, bytes]]) -> None:
        examples.append(len(rows))
        sent: list[tuple[int, str, bytes]] = []
        for kind, payload in rows:
            topic = f"v1/devices/me/rpc/request/{next(ids)}" if kind == "rpc" else kind
            queues.put_inbound(conn, topic, payload)
            sent.append((int(conn.execute("SELECT max(id) FROM inbound").fetchone()[0]), topic, payload))
        settle(sup, conn)
        dead = {src for (src,) in conn.execute("SELECT src_id FROM dead_letters")}
        for rid, topic, payload in sent:
            if topic.startswith("v1/devices/me/rpc/request/"):
                replies = [json.loads(p) for (p,) in conn.execute(
                    "SELECT payload FROM outbox WHERE topic = ?", (topic.replace("request", "response"),))]
                assert len(replies) == 1, (payload[:80], replies)
                assert isinstance(replies[0], dict) and rid not in dead
                try:
                    req = json.loads(payload)
                    ok = isinstance(req, dict) and req.get("method") in METHODS
                except (ValueError, RecursionError):
                    ok = False
                if not ok:
                    assert set(replies[0]) == {"error"}, (payload[:80], replies[0])
            elif topic == "some/other/topic":
                assert rid in dead
            elif topic.startswith("v1/devices/me/attributes"):
                try:
                    usable = isinstance(json.loads(payload), dict)
                except (ValueError, RecursionError):
                    usable = False
                assert (rid in dead) != usable, payload[:80]

    try:
        batch()
        assert len(examples) >= 100
        queues.put_inbound(conn, "v1/devices/me/rpc/request/1", b'{"method": "ping"}')
        settle(sup, conn)
        (reply,) = conn.execute("SELECT payload FROM outbox WHERE topic = 'v1/devices/me/rpc/response/1'").fetchone()
        assert json.loads(reply)["pong"] is True
        for (payload,) in conn.execute("SELECT payload FROM outbox"):
            json.loads(payload)  # everything queued for ThingsBoard is JSON
    finally:
        conn.close()
        sup.stop()
