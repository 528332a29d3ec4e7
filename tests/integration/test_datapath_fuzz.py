"""Every byte a controller can store is survivable: fuzzed rows written by a separate controller
process into a real SQLite file, moved by the real `gatewayd forwarder` process.

Each fuzzed row must end in the dead letters (with its reason and its exact bytes) or in the
outbox; a good row written after them must always flow; the ledger must add up.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.controller_values import messages, types
from tests.helpers.daemons import Daemon, wait_for, write_config
from tests.helpers.datapath import (
    UNTYPED_SCHEMA,
    Writer,
    balanced,
    big_message,
    controller_db,
    counters,
    outbox_seqs,
    record,
    ro,
    spec,
    status_json,
    writer,
)

pytestmark = pytest.mark.integration

RAW_KEEP = 1 << 20  # what a dead letter keeps of an oversized value (forwarder.RAW_KEEP_BYTES)
_seq = itertools.count(1_000_000)


class Env:
    def __init__(self, base: Path, fwd: Daemon, w: Writer):
        self.base, self.fwd, self.w = base, fwd, w

    def dead_letters(self, ids: list[int]) -> dict[int, tuple[Any, ...]]:
        with contextlib.closing(ro(self.base / "state" / "queues.db")) as c:
            rows = c.execute("SELECT src_id, message, reason, raw, raw_size FROM dead_letters WHERE stage = "
                             "'forwarder' AND src_id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))
            return {r[0]: r[1:] for r in rows}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("fuzz")
    fwd = Daemon("forwarder", write_config(base))
    with writer(controller_db(base), schema=UNTYPED_SCHEMA) as w:
        fwd.start()
        try:
            yield Env(base, fwd, w)
        finally:
            fwd.stop()


def kept_bytes(message: Any, raw: bytes | None) -> bytes | None:
    return raw if raw is not None else (message.encode() if message is not None else None)


def check_dead_letter(original: Any, stored: tuple[Any, ...]) -> None:
    message, reason, raw, raw_size = stored
    assert reason
    if isinstance(original, bytes):
        if len(original) > RAW_KEEP:
            assert message is None and raw == original[:RAW_KEEP] and raw_size == len(original)
        else:
            assert kept_bytes(message, raw) == original
    elif original is None:
        assert message is None and raw is None
    else:
        assert message == repr(original)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                           HealthCheck.large_base_example])
@given(st.lists(st.tuples(types, messages), min_size=1, max_size=6))
def test_fuzzed_rows_dead_lettered_or_delivered(env: Env, rows: list[tuple[Any, Any]]) -> None:
    before = counters(env.base)
    ids = env.w.insert([(t[0], m[0]) for t, m in rows])
    sentinel = next(_seq)
    env.w.insert([(spec("text", "telemetry"), record(sentinel))])
    n = len(rows) + 1
    wait_for(lambda: counters(env.base)["ingested"] == before["ingested"] + n, 60, what="the rows ingested")
    after = counters(env.base)
    assert balanced(after)
    dead = env.dead_letters(ids)
    assert after["dead_lettered"] - before["dead_lettered"] == len(dead)
    assert after["queued"] - before["queued"] == n - len(dead)  # every other row is in the outbox
    assert sentinel in outbox_seqs(env.base)                      # a good row behind them flows
    for row_id, (_, (_, original)) in zip(ids, rows, strict=True):
        if row_id in dead:
            check_dead_letter(original, dead[row_id])


NASTY: list[tuple[str, dict[str, Any], bytes | None, str | None]] = [
    # (what, message spec, exact stored bytes, reason expected or None when it must be delivered)
    ("Latin-1 text", spec("textbytes", '{"ts": 1, "values": {"t": "caf\xe9"}}'.encode("latin-1")),
     '{"ts": 1, "values": {"t": "caf\xe9"}}'.encode("latin-1"), "not UTF-8"),
    ("JSON 3000 levels deep", spec("text", '{"ts": 1, "values": {"a": ' + "[" * 3000 + "]" * 3000 + "}}"),
     None, "nested deeper"),
    ("objects 5000 deep", spec("text", '{"ts": 1, "values": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}"),
     None, "nested deeper"),
    ("huge integer", spec("text", '{"ts": 1, "values": {"a": 123456789012345678901234567890}}'),
     None, "64 bits"),
    ("huge ts", spec("text", '{"ts": 99999999999999999999, "values": {"a": 1}}'), None, "64 bits"),
    ("float overflow", spec("text", '{"ts": 1, "values": {"a": 1e400}}'), None, "64-bit float"),
    ("BLOB of bytes", spec("blob", b"\x00\xff\xfe"), b"\x00\xff\xfe", "not UTF-8"),
    ("INTEGER", spec("int", 42), None, "not text (int)"),
    ("REAL", spec("real", 2.5), None, "not text (float)"),
    ("3 MB of text", spec("big", 3_000_000), None, "more than the"),
    ("JSON in a BLOB", spec("blob", b'{"ts": 7, "values": {"blob": 1}}'), None, None),
    ("escaped lone surrogate", spec("text", '{"ts": 8, "values": {"s": "\\udc80"}, "x": 1}'), None, None),
]


def test_nasty_rows_each_get_their_outcome_and_the_queue_flows(env: Env) -> None:
    before = counters(env.base)
    ids = env.w.insert([(spec("text", "telemetry"), m) for _, m, _, _ in NASTY])
    sentinel = next(_seq)
    env.w.insert([(spec("text", "telemetry"), record(sentinel))])
    wait_for(lambda: counters(env.base)["ingested"] == before["ingested"] + len(NASTY) + 1, 60, what="ingested")
    dead = env.dead_letters(ids)
    for row_id, (what, message, exact, reason) in zip(ids, NASTY, strict=True):
        if reason is None:
            assert row_id not in dead, (what, dead.get(row_id))
            continue
        assert row_id in dead, what
        stored_message, stored_reason, raw, raw_size = dead[row_id]
        assert reason in stored_reason, (what, stored_reason)
        if exact is not None:
            assert kept_bytes(stored_message, raw) == exact, what
        if message["t"] == "big":
            assert raw == big_message(3_000_000).encode()[:RAW_KEEP] and raw_size == len(big_message(3_000_000))
    assert sentinel in outbox_seqs(env.base)
    c = counters(env.base)
    assert balanced(c) and c["dead_lettered"] - before["dead_lettered"] == sum(1 for *_, r in NASTY if r)
    code, st_ = status_json(env.base / "gatewayd.toml")
    assert st_["ledger"]["balanced"] and st_["queues"]["dead_letters"] >= len(dead)
    assert "not UTF-8" in env.fwd.log() and "nested deeper" in env.fwd.log()
