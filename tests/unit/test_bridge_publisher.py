"""Batching, packet sizes, rate limits and the in-flight window of the bridge (pure logic)."""

from __future__ import annotations

import json

import pytest

from gatewayd.bridge.publisher import (
    Oversized,
    Publish,
    RateLimiter,
    TokenBucket,
    Window,
    datapoints,
    parse_rate_limits,
    plan,
)
from gatewayd.packet import packet_size, utf8_len
from gatewayd.store.queues import KIND_ATTRIBUTES, KIND_RAW, KIND_TELEMETRY
from gatewayd.topics import TOPIC_ATTRIBUTES, TOPIC_TELEMETRY

T = TOPIC_TELEMETRY


def tel(i: int, prio: int = 0, extra: str = "") -> tuple[int, int, str, str, str]:
    return (i, prio, KIND_TELEMETRY, T, f'{{"ts":{1000 + i},"values":{{"seq":{i}{extra}}}}}')


def test_utf8_len_counts_bytes() -> None:
    assert utf8_len("abc") == 3
    assert utf8_len("é") == 2
    assert utf8_len("€") == 3


def test_plan_joins_consecutive_telemetry_into_an_array() -> None:
    rows = [tel(i) for i in range(1, 11)]
    p = plan(rows, 0, 65536)
    assert isinstance(p, Publish)
    assert (p.first_id, p.last_id, p.count, p.telemetry) == (1, 10, 10, True)
    assert [r["values"]["seq"] for r in json.loads(p.payload)] == list(range(1, 11))
    assert p.size == packet_size(len(T), len(p.payload))


def test_single_record_goes_as_an_object() -> None:
    p = plan([tel(5)], 0, 65536)
    assert isinstance(p, Publish)
    assert json.loads(p.payload)["values"]["seq"] == 5 and p.count == 1


def test_batch_respects_the_packet_limit_exactly() -> None:
    rows = [tel(i, extra=',"pad":"' + "x" * 100 + '"') for i in range(1, 2000)]
    for limit in (1024, 4096, 65536):
        start = 0
        seen = 0
        while start < len(rows):
            p = plan(rows, start, limit)
            assert isinstance(p, Publish)
            assert packet_size(len(T), utf8_len(p.payload)) <= limit
            assert p.size <= limit
            # one more record would not have fitted
            if start + p.count < len(rows):
                bigger = "[" + ",".join(r[4] for r in rows[start:start + p.count + 1]) + "]"
                assert packet_size(len(T), utf8_len(bigger)) > limit
            seen += p.count
            start += p.count
        assert seen == len(rows)


def test_non_ascii_payloads_are_measured_in_bytes() -> None:
    rows = [(i, 0, KIND_TELEMETRY, T, '{"ts":1,"values":{"t":"%s"}}' % ("€" * 100)) for i in range(1, 100)]
    p = plan(rows, 0, 4096)
    assert isinstance(p, Publish)
    assert packet_size(len(T), len(p.payload.encode())) <= 4096


def test_batch_stops_at_other_kinds_topics_and_priorities() -> None:
    rows = [tel(1), tel(2), (3, 0, KIND_ATTRIBUTES, TOPIC_ATTRIBUTES, '{"a":1}'), tel(4),
            (5, 0, KIND_RAW, "v2/sw/request/7/chunk/0", "16384"), tel(6), tel(7, prio=5)]
    p = plan(rows, 0, 65536)
    assert isinstance(p, Publish) and (p.first_id, p.last_id) == (1, 2)
    p = plan(rows, 2, 65536)
    assert isinstance(p, Publish) and (p.topic, p.payload, p.count, p.telemetry) == (
        TOPIC_ATTRIBUTES, '{"a":1}', 1, False)
    p = plan(rows, 4, 65536)
    assert isinstance(p, Publish) and (p.topic, p.payload) == ("v2/sw/request/7/chunk/0", "16384")
    p = plan(rows, 5, 65536)
    assert isinstance(p, Publish) and (p.first_id, p.last_id) == (6, 6)


def test_oversized_single_record() -> None:
    big = (9, 0, KIND_TELEMETRY, T, '{"ts":1,"values":{"x":"%s"}}' % ("y" * 5000))
    r = plan([big, tel(10)], 0, 4096)
    assert isinstance(r, Oversized) and r.row[0] == 9 and r.size > 4096
    assert "4096" in r.reason
    # a batch never includes an oversized follower: it stops before it
    p = plan([tel(1), big], 0, 4096)
    assert isinstance(p, Publish) and p.count == 1


def test_a_record_above_the_batch_limit_goes_alone_up_to_alone_max() -> None:
    big = (9, 0, KIND_TELEMETRY, T, '{"ts":1,"values":{"x":"%s"}}' % ("y" * 5000))
    size = packet_size(len(T), len(big[4]))
    p = plan([big, tel(10)], 0, 4096, alone_max=8192)
    assert isinstance(p, Publish) and (p.first_id, p.last_id, p.count, p.size) == (9, 9, 1, size)
    assert p.payload == big[4] and p.telemetry
    # the records around it are still batched within the batch limit
    p = plan([tel(1), tel(2), big], 0, 4096, alone_max=8192)
    assert isinstance(p, Publish) and p.count == 2
    r = plan([big], 0, 4096, alone_max=size - 1)
    assert isinstance(r, Oversized) and r.limit == size - 1
    attr = (11, 50, KIND_ATTRIBUTES, TOPIC_ATTRIBUTES, '{"a":"%s"}' % ("z" * 5000))
    p = plan([attr], 0, 4096, alone_max=8192)
    assert isinstance(p, Publish) and p.count == 1 and not p.telemetry


def test_max_records_and_points() -> None:
    rows = [tel(i, extra=',"a":1,"b":2') for i in range(1, 50)]
    assert datapoints(rows[0][4]) == 3
    p = plan(rows, 0, 65536, max_records=1)
    assert isinstance(p, Publish) and p.count == 1
    p = plan(rows, 0, 65536, max_points=10)
    assert isinstance(p, Publish) and p.count == 3 and p.points == 9


def test_parse_rate_limits() -> None:
    assert parse_rate_limits("200:1,6000:60") == [(200.0, 1.0), (6000.0, 60.0)]
    assert parse_rate_limits(" 10:1 , bad, 5:x, 0:1") == [(10.0, 1.0)]
    assert parse_rate_limits(None) == []


def test_token_bucket() -> None:
    b = TokenBucket(capacity=2, rate=1)
    assert b.wait_for(1, 0.0) == 0
    b.take(1, 0.0)
    b.take(1, 0.0)
    assert b.wait_for(1, 0.0) == pytest.approx(1.0)
    assert b.wait_for(1, 0.5) == pytest.approx(0.5)
    assert b.wait_for(1, 1.0) == 0
    assert b.wait_for(100, 1.0) == pytest.approx(1.0)  # asks more than the capacity: a full bucket


def test_rate_limiter_from_config_and_server() -> None:
    assert not RateLimiter.build(0).active
    rl = RateLimiter.build(5)
    pub = Publish(T, "[]", 0, 1, 1, 1, 10, True, 3)
    now = 100.0
    sent = 0
    while rl.wait_for(pub, now) == 0:
        rl.take(pub, now)
        sent += 1
    assert sent == 5
    rl = RateLimiter.build(0, {"messages": "100:1", "telemetryMessages": "10:1", "telemetryDataPoints": "20:1"})
    assert rl.active and rl.max_points == 18  # 90 % of the server's figure
    assert rl.wait_for(pub, now) == 0
    for _ in range(6):
        rl.take(pub, now)
    assert rl.wait_for(pub, now) > 0  # data points exhausted (18 / 3 = 6 publishes)


def test_window() -> None:
    w = Window(2)
    p = Publish(T, "x", 0, 1, 3, 3, 10, True)
    w.add(7, p, now=100.0)
    assert w.records == 3 and not w.full
    w.add(8, Publish(T, "y", 0, 4, 4, 1, 10, True), now=101.0)
    assert w.full
    assert w.ack(7) is p and w.records == 1
    assert w.ack(7) is None
    assert w.oldest_sent() == 101.0
    assert len(w.clear()) == 1 and len(w) == 0 and w.records == 0
