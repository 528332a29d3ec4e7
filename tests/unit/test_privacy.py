"""The privacy policy: globs, the rules against an independent model, and the real forwarder
(real SQLite files) over arbitrary keys, values and rules: every record ends in the outbox
(with exactly the model's values), in the dropped count with reason `privacy`, or in the dead
letters; the ledger adds up; nothing crashes."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gatewayd import privacy
from gatewayd.config import ConfigError, load
from gatewayd.forwarder.service import Forwarder
from gatewayd.records import DROPPED, Record, parse
from gatewayd.store import queues
from tests.helpers.controller_values import json_values
from tests.helpers.daemons import write_config

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = "unit-test-hash-key-0123"

# -- globs ----------------------------------------------------------------------------------

glob_chars = st.text(alphabet="ab*?[]!-^\\.z", max_size=8)


@SETTINGS
@given(glob_chars, st.text(alphabet="ab-^\\.z]![*?", max_size=6))
def test_a_glob_matches_what_fnmatchcase_matches(pattern: str, key: str) -> None:
    try:
        regex = privacy.glob_regex(pattern)
    except privacy.GlobError:
        assert "[" in pattern  # only brackets can be malformed
        return
    policy = privacy.Policy([{"match": pattern, "action": "redact"}], [], "")
    assert (policy.apply({key: 1}) == {key: "***"}) is fnmatch.fnmatchcase(key, pattern), regex


@pytest.mark.parametrize("pattern,key,matches", [
    ("gps_*", "gps_lat", True), ("gps_*", "GPS_lat", False), ("gps_*", "x.gps_lat", False),
    ("dev?.serial", "dev1.serial", True), ("dev?.serial", "dev10.serial", False),
    ("[!a-c]x", "dx", True), ("[!a-c]x", "bx", False), ("[]]", "]", True), ("a.b", "axb", False),
    ("*", "", True), ("line*", "line\nbreak", True),
])
def test_glob_examples(pattern: str, key: str, matches: bool) -> None:
    policy = privacy.Policy([{"match": pattern, "action": "drop"}], [], "")
    assert policy.apply({key: 1}) == (None if matches else {key: 1})


# -- an independent model of the rules -------------------------------------------------------

def model(values: dict[str, Any], rules: list[dict[str, Any]], drop_if: list[str]) -> dict[str, Any] | None:
    if any(fnmatch.fnmatchcase(k, p) for k in values for p in drop_if):
        return None
    out = {}
    for k, v in values.items():
        rule = next((r for r in rules if fnmatch.fnmatchcase(k, r["match"])), None)
        if rule is None:
            out[k] = v
        elif rule["action"] == "redact":
            out[k] = "***"
        elif rule["action"] == "hash":
            text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False,
                                                           sort_keys=True)
            out[k] = hmac.new(KEY.encode(), text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        elif rule["action"] == "round":
            out[k] = round(v, rule["digits"]) if type(v) in (int, float) else v
    return out or None


names = st.sampled_from(["gps_lat", "gps_lon", "serial", "name", "pin", "debug", "", "x1"])
keys = names | names | st.text(max_size=6)
numbers = st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
values_st = st.dictionaries(keys, numbers | json_values, min_size=1, max_size=6)


@st.composite
def rule_st(draw: st.DrawFn) -> dict[str, Any]:
    match = draw(st.sampled_from(["gps_*", "serial", "*", "?", "[a-m]*", "*[!0-9]", "pin", "na*e", ""])
                 | keys.filter(bool) | glob_chars)
    action = draw(st.sampled_from(privacy.ACTIONS))
    rule: dict[str, Any] = {"match": match, "action": action}
    if action == "round":
        rule["digits"] = draw(st.integers(-15, 15))
    return rule


policies = st.tuples(st.lists(rule_st(), max_size=4),
                     st.lists(st.sampled_from(["debug", "x*", "[", "?", "gps_[!l]*"]), max_size=2))


def valid(rules: list[dict[str, Any]], drop_if: list[str]) -> bool:
    return not privacy.problems({"rules": rules, "drop_record_if": drop_if, "hash_key": KEY})


@SETTINGS
@given(values_st, policies)
def test_the_policy_does_what_the_model_does(values: dict[str, Any], policy: tuple[list[Any], list[str]]) -> None:
    rules, drop_if = policy
    if not valid(rules, drop_if):
        with pytest.raises(ConfigError):
            load_policy(rules, drop_if)
        return
    compiled = privacy.Policy(rules, drop_if, KEY)
    before = json.dumps(values)
    result = compiled.apply(values)
    assert json.dumps(values) == before  # never changes its input
    assert result == model(values, rules, drop_if)
    patterns = [r["match"] for r in rules] + drop_if
    if not any(fnmatch.fnmatchcase(k, p) for k in values for p in patterns):
        assert result is values  # untouched records keep the controller's text


def load_policy(rules: list[dict[str, Any]], drop_if: list[str]) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load(write_config(Path(tmp), {"privacy": {"rules": rules, "drop_record_if": drop_if,
                                                          "hash_key": KEY}}), env={})


def test_no_rule_is_no_policy_and_the_text_is_forwarded_as_written() -> None:
    assert privacy.compile_policy({"rules": [], "drop_record_if": [], "hash_key": ""}) is None
    message = '{"ts": 1,  "values": {"gps_lat": 1.23456, "a": 1}}'
    policy = privacy.Policy([{"match": "serial", "action": "hash"}], [], KEY)
    rec = parse("telemetry", message, 65536, policy)
    assert isinstance(rec, Record) and rec.payload == message


@pytest.mark.parametrize("key", ["k" * 16, "k" * 64, "k" * 65, "ключ-" * 40])
def test_the_hash_is_hmac_sha256_for_keys_of_any_length(key: str) -> None:
    policy = privacy.Policy([{"match": "*", "action": "hash"}], [], key)
    values = {"s": "SN-4711", "n": 42, "o": {"b": [1, "x"], "a": None}, "u": "\ud800"}
    assert policy.apply(values) == {k: privacy.hash_value(key.encode(), v) for k, v in values.items()}
    assert privacy.hash_value(key.encode(), "SN-4711") == hmac.new(key.encode(), b"SN-4711", hashlib.sha256).hexdigest()
    assert privacy.hash_value(b"k", {"b": 1, "a": 2}) == hmac.new(b"k", b'{"a":2,"b":1}', hashlib.sha256).hexdigest()


def test_round_leaves_what_is_not_a_number() -> None:
    policy = privacy.Policy([{"match": "*", "action": "round", "digits": 1}], [], "")
    assert policy.apply({"a": 1.26, "b": True, "c": "1.26", "d": None, "e": [1.26], "f": 1234}) == {
        "a": 1.3, "b": True, "c": "1.26", "d": None, "e": [1.26], "f": 1234}
    assert privacy.Policy([{"match": "*", "action": "round", "digits": -2}], [], "").apply({"f": 1234}) == {"f": 1200}


def test_hashing_a_value_that_grew_past_the_packet_limit_dead_letters_it() -> None:
    policy = privacy.Policy([{"match": "*", "action": "hash"}], [], KEY)
    values = {f"k{i:04d}": 1 for i in range(1200)}   # 8 bytes each, 70 once hashed
    rec = parse("telemetry", json.dumps({"ts": 1, "values": values}), 65536, policy)
    assert isinstance(rec, str) and "MQTT packet" in rec
    assert parse("telemetry", '{"ts": 1, "values": {"debug": 1}}', 65536,
                 privacy.Policy([], ["debug"], "")) is DROPPED


# -- the real forwarder ----------------------------------------------------------------------

class Env:
    def __init__(self, base: Path):
        self.cfg = load(write_config(base), env={})
        self.fwd = Forwarder(self.cfg)
        self.fwd.start()
        self.fwd.step()  # opens the controller database and creates its tables
        self.ctrl = sqlite3.connect(self.cfg.controller_db, timeout=10)

    def queues(self) -> sqlite3.Connection:
        assert self.fwd.q.conn is not None
        return self.fwd.q.conn


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("privacy"))
    try:
        yield e
    finally:
        e.ctrl.close()
        e.fwd.stop()


rows_st = st.lists(st.tuples(st.sampled_from(["telemetry", "attributes", "device_log"]), values_st,
                             st.sampled_from(["ascii", "utf8"])), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(rows=rows_st, policy=policies)
def test_every_record_is_forwarded_as_the_model_says_dropped_with_its_reason_or_dead_lettered(
        env: Env, rows: list[tuple[str, dict[str, Any], str]], policy: tuple[list[Any], list[str]]) -> None:
    rules, drop_if = policy
    if not valid(rules, drop_if):
        event("invalid policy")
        return
    env.fwd.policy = privacy.Policy(rules, drop_if, KEY)
    q = env.queues()
    before = queues.counters(q)
    last_outbox = q.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0]
    last_dead = q.execute("SELECT coalesce(max(id), 0) FROM dead_letters").fetchone()[0]
    messages = [json.dumps({"ts": 1_767_225_600_000 + i, "values": v}, ensure_ascii=enc == "ascii")
                for i, (_, v, enc) in enumerate(rows)]
    with env.ctrl:
        ids = [env.ctrl.execute("INSERT INTO messages(type, message) VALUES (?, ?)", (t, m)).lastrowid
               for (t, _, _), m in zip(rows, messages, strict=True)]
    for _ in range(10):
        if not env.fwd.move_batch():
            break
    outbox = [(kind, json.loads(p)) for kind, p in q.execute(
        "SELECT kind, payload FROM outbox WHERE id > ? ORDER BY id", (last_outbox,))]
    dead = dict(q.execute("SELECT src_id, reason FROM dead_letters WHERE id > ?", (last_dead,)).fetchall())
    after = queues.counters(q)

    expected_out, dropped = [], 0
    for (type_, _, _), message, rid in zip(rows, messages, ids, strict=True):
        plain = parse(type_, message, env.fwd.max_packet)
        if isinstance(plain, str):
            assert rid in dead  # invalid whatever the policy
            continue
        kept = model(json.loads(message)["values"], rules, drop_if)
        if kept is None:
            dropped += 1
            assert rid not in dead
        elif rid in dead:
            assert "MQTT packet" in dead[rid]  # only a record the policy made too big
        else:
            expected_out.append(("attributes", kept) if type_ == "attributes" else ("telemetry", kept))
    event(f"forwarded {min(len(expected_out), 3)}+, dropped {min(dropped, 3)}+, dead {min(len(dead), 1)}+")
    assert [(k, p if k == "attributes" else p["values"]) for k, p in outbox] == expected_out
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("ingested", "queued", "dead_lettered", "dropped",
                                                               "dropped.privacy")}
    assert delta == {"ingested": len(rows), "queued": len(expected_out), "dead_lettered": len(dead),
                     "dropped": dropped, "dropped.privacy": dropped}
    assert after["ingested"] == after["delivered"] + after["queued"] + after["dead_lettered"] + after["dropped"]


def test_privacy_drops_are_exactly_once_across_a_replayed_batch(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch committed to queues.db but not yet deleted from the controller (a crash) is read
    again: its privacy drops are not counted twice."""
    cfg = load(write_config(tmp_path, {"privacy": {"drop_record_if": ["debug"]}}), env={})
    fwd = Forwarder(cfg)
    fwd.start()
    fwd.step()
    with contextlib.closing(sqlite3.connect(cfg.controller_db)) as c, c:
        c.executemany("INSERT INTO messages(type, message) VALUES ('telemetry', ?)",
                      [(json.dumps({"ts": i, "values": {"debug": 1} if i % 2 else {"a": i}}),) for i in range(10)])
    monkeypatch.setattr(fwd, "_delete_moved", lambda ranges: None)  # the crash before step 3
    assert fwd.move_batch() == 10
    fwd.stop()
    again = Forwarder(cfg)
    again.start()
    for _ in range(5):
        again.step()
    assert again.q.conn is not None
    c2 = queues.counters(again.q.conn)
    again.stop()
    assert c2["ingested"] == 10 and c2["dropped.privacy"] == c2["dropped"] == 5 and c2["queued"] == 5
