"""The packet limit the bridge learns from a server that closes the session on a too-large PUBLISH
instead of announcing its limit (pure logic: `PacketLimit`, with `plan` in a model of sessions)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from gatewayd.bridge.limits import ServerLimits
from gatewayd.bridge.publisher import (
    DEAD_LETTER,
    DISTRUST_AFTER_LOSSES,
    DISTRUST_AFTER_S,
    ISOLATE,
    LOSSES_TO_TRIM,
    MIN_PACKET,
    NOTHING,
    PROBE,
    REPROBE_AFTER_S,
    SHRINK,
    Oversized,
    PacketLimit,
    Publish,
    Row,
    plan,
)
from gatewayd.packet import packet_size
from gatewayd.store import queues
from gatewayd.store.queues import KIND_TELEMETRY
from gatewayd.topics import TOPIC_TELEMETRY

T = TOPIC_TELEMETRY
HARD = 65536


def pub(size: int, first: int = 1, count: int = 10, prio: int = 0) -> Publish:
    return Publish(T, "x", prio, first, first + count - 1, count, size, True)


def alone(size: int, rid: int) -> Publish:
    return pub(size, rid, 1)


# -- PacketLimit -------------------------------------------------------------------------------

def test_nothing_learned_means_the_hard_limit() -> None:
    pl = PacketLimit()
    assert not pl.active and pl.limit(HARD) == HARD and pl.alone_limit(HARD) == HARD
    assert pl.limit(4096) == 4096


def test_one_lost_session_proves_nothing_two_in_a_row_halve_the_limit() -> None:
    pl = PacketLimit()
    v = pl.lost([pub(65000), pub(64000, 11)], HARD, 0.0)
    assert v.action == NOTHING and pl.learned is None
    v = pl.lost([pub(65000), pub(64000, 11)], HARD, 1.0)
    assert v.action == SHRINK and v.limit == 65000 // 2 == pl.learned and v.size == 65000 and v.losses == 2
    assert pl.limit(HARD) == 65000 // 2 and pl.alone_limit(HARD) == HARD  # one record alone may be larger
    # the next loss in the same streak (still no PUBACK) halves again at once
    v = pl.lost([pub(32400)], pl.limit(HARD), 2.0)
    assert v.action == SHRINK and pl.learned == 32400 // 2
    # a getSessionLimits answer below the learned limit still wins
    assert pl.limit(8000) == 8000


def test_a_puback_in_between_restarts_the_count() -> None:
    pl = PacketLimit()
    pl.lost([pub(65000)], HARD, 0.0)
    assert pl.acked(20000) is False  # nothing learned yet: nothing to save
    assert pl.lost([pub(65000)], HARD, 1.0).action == NOTHING
    assert pl.lost([pub(65000)], HARD, 2.0).action == SHRINK
    assert pl.learned == 32500


def test_a_suspect_close_to_the_acknowledged_size_only_trims_and_needs_more_losses() -> None:
    """Never below what was acknowledged, even when half the suspect would be less; and since
    that is weak evidence (two server restarts in a row with a slightly larger batch in flight)
    it takes LOSSES_TO_TRIM losses in a row."""
    pl = PacketLimit()
    pl.restore(32500, None)
    pl.acked(30000)
    for t in range(LOSSES_TO_TRIM - 1):
        assert pl.lost([pub(32500)], pl.limit(HARD), float(t)).action == NOTHING
    v = pl.lost([pub(32500)], pl.limit(HARD), 10.0)
    assert v.action == SHRINK and v.limit == 30000 == pl.learned
    # twice the acknowledged size or more: the usual two losses
    pl = PacketLimit()
    pl.acked(10000)
    assert pl.lost([pub(20000)], HARD, 0.0).action == NOTHING
    v = pl.lost([pub(20000)], HARD, 1.0)
    assert v.action == SHRINK and v.limit == 10000


def test_losses_with_nothing_larger_than_acknowledged_in_flight_never_shrink() -> None:
    """A broker restart or a network drop mid-stream: the batches in flight were all of sizes the
    server already acknowledged."""
    pl = PacketLimit()
    pl.acked(65530)
    for t in range(DISTRUST_AFTER_LOSSES + 10):
        assert pl.lost([pub(65530), pub(65000, 11), pub(1200, 21)], HARD, float(t)).action == NOTHING
    assert pl.learned is None and pl.ceiling is None


def test_two_restarts_in_a_row_with_a_slightly_larger_batch_in_flight_do_not_shrink() -> None:
    pl = PacketLimit()
    pl.acked(65530)
    assert pl.lost([pub(65533), pub(65500, 11)], HARD, 0.0).action == NOTHING
    assert pl.lost([pub(65533), pub(65500, 11)], HARD, 1.0).action == NOTHING
    assert pl.learned is None
    pl.acked(65533)
    assert pl.losses == 0


def test_ordinary_losses_interleaved_with_pubacks_never_shrink() -> None:
    pl = PacketLimit()
    pl.acked(4000)
    for t in range(50):
        # every restart sends a batch a little larger than any acknowledged so far; it then goes through
        assert pl.lost([pub(4000 + t + 1)], HARD, float(t)).action == NOTHING
        pl.acked(4000 + t + 1)
    assert pl.learned is None


def test_a_larger_acknowledged_packet_raises_the_learned_limit() -> None:
    pl = PacketLimit()
    pl.restore(4096, None)
    assert pl.acked(4000) is False and pl.learned == 4096
    assert pl.acked(6000) is True and pl.learned == 6000 and pl.limit(HARD) == 6000


def test_a_record_sent_alone_and_lost_twice_is_dead_lettered_and_sets_the_ceiling() -> None:
    pl = PacketLimit()
    pl.restore(4096, None)
    pl.acked(4090)
    # the record is larger than the limit: it goes alone, between batches of proven sizes
    flight = [pub(4090, 1), alone(20082, 11), pub(4000, 12)]
    v = pl.lost(flight, 4096, 0.0)
    assert v.action == NOTHING and v.pub.first_id == 11
    v = pl.lost(flight, 4096, 1.0)
    assert v.action == DEAD_LETTER and v.pub.first_id == 11 and v.size == 20082
    assert pl.ceiling == 20081 and pl.alone_limit(HARD) == 20081 and pl.learned == 4096
    # a smaller record alone that the server accepts lifts the ceiling's neighbour, not the ceiling
    assert pl.acked(9000) is True and pl.learned == 9000 and pl.ceiling == 20081
    assert pl.acked(30000) is True and pl.ceiling is None


def test_a_different_record_alone_starts_its_own_count() -> None:
    pl = PacketLimit()
    pl.restore(4096, None)
    pl.acked(4090)
    assert pl.lost([alone(20000, 5)], 4096, 0.0).action == NOTHING
    assert pl.lost([alone(21000, 6)], 4096, 1.0).action == NOTHING
    assert pl.lost([alone(21000, 6)], 4096, 2.0).action == DEAD_LETTER


def test_dead_letter_when_the_limit_was_never_lowered() -> None:
    pl = PacketLimit()
    v1 = pl.lost([alone(20000, 7), pub(40000, 8)], HARD, 0.0)
    assert v1.action == NOTHING and v1.pub.first_id == 8  # the largest in flight is the suspect
    pl = PacketLimit()
    pl.lost([alone(50000, 7)], HARD, 0.0)
    v = pl.lost([alone(50000, 7)], HARD, 1.0)
    assert v.action == DEAD_LETTER and pl.ceiling == 49999 and pl.learned == 49999


def test_small_records_are_never_blamed_a_batch_at_the_floor_is_split() -> None:
    pl = PacketLimit()
    pl.restore(MIN_PACKET, None)
    v = pl.lost([pub(MIN_PACKET, 1, 20)], MIN_PACKET, 0.0)
    assert v.action == NOTHING
    v = pl.lost([pub(MIN_PACKET, 1, 20)], MIN_PACKET, 1.0)
    assert v.action == ISOLATE and v.pub.first_id == 1 and pl.learned == MIN_PACKET
    for t in range(10):
        assert pl.lost([alone(300, 1), alone(300, 2)], MIN_PACKET, 2.0 + t).action == NOTHING
    assert pl.ceiling is None


def test_acknowledged_sizes_are_distrusted_after_a_long_time_without_any_puback() -> None:
    """The server's limit was lowered while we ran: without this, a disconnect loop for ever."""
    pl = PacketLimit()
    pl.acked(60000)
    flight = [pub(59000)]
    t = 0.0
    for _ in range(DISTRUST_AFTER_LOSSES + 3):
        assert pl.lost(flight, HARD, t).action == NOTHING  # not long enough yet
        t += 5.0
    t = DISTRUST_AFTER_S + 1
    v = pl.lost(flight, HARD, t)
    assert v.distrusted == 60000 and pl.acked_max == 0 and v.action == NOTHING
    v = pl.lost(flight, HARD, t + 1)
    assert v.action == SHRINK and pl.learned == 29500


def test_restore_clamps() -> None:
    pl = PacketLimit()
    pl.restore(10, None)
    assert pl.learned == MIN_PACKET
    pl.restore(30000, 20000)
    assert (pl.learned, pl.ceiling) == (20000, 20000)
    pl.restore(None, None)
    assert not pl.active
    pl.restore(5000, None)
    pl.forget()
    assert not pl.active


# -- a model of sessions against a server that closes on too-large packets ------------------------

def rec(i: int, pad: int = 0) -> Row:
    extra = ',"pad":"' + "x" * pad + '"' if pad else ""
    return (i, 0, KIND_TELEMETRY, T, f'{{"ts":{1_700_000_000_000 + i},"values":{{"seq":{i}{extra}}}}}')


@dataclass
class Model:
    """The bridge's send loop against a server that reads publishes in order and closes the session
    at the first whose topic + payload exceeds `server_limit` (the PUBACKs of the ones before are
    lost with it, the worst case). `drop_every`: also lose every n-th session for no reason (a
    broker restart or network drop, with the window in flight)."""

    rows: list[Row]
    server_limit: int
    hard: int = HARD
    window: int = 20
    drop_every: int = 0
    pl: PacketLimit = field(default_factory=PacketLimit)
    sessions: int = 0
    closes: int = 0
    delivered: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    shrinks: int = 0

    def run(self, max_sessions: int = 200) -> Model:
        outbox = list(self.rows)
        isolate = 0
        now = 0.0
        flights = 0
        while outbox and self.sessions < max_sessions:
            self.sessions += 1
            now += 1.0
            while outbox:
                flight: list[Publish] = []
                j = 0
                while j < len(outbox) and len(flight) < self.window:
                    p = plan(outbox, j, self.pl.limit(self.hard), max_records=1 if outbox[j][0] <= isolate else 0,
                             alone_max=self.pl.alone_limit(self.hard))
                    if isinstance(p, Oversized):
                        self.dead.append(outbox.pop(j)[0])
                        continue
                    flight.append(p)
                    j += p.count
                if not flight:
                    break
                flights += 1
                if any(len(T) + len(p.payload) > self.server_limit for p in flight) or (
                        self.drop_every and flights % self.drop_every == 0):
                    self.closes += 1
                    v = self.pl.lost(flight, self.pl.limit(self.hard), now)
                    if v.action == SHRINK:
                        self.shrinks += 1
                    elif v.action == ISOLATE:
                        isolate = max(isolate, v.pub.last_id)
                    elif v.action == DEAD_LETTER:
                        self.dead.append(v.pub.first_id)
                        outbox = [r for r in outbox if r[0] != v.pub.first_id]
                    break
                for p in flight:
                    self.pl.acked(p.size)
                sent = outbox[:j]
                self.delivered.extend(r[0] for r in sent)
                outbox = outbox[j:]
        return self


def test_model_small_records_learn_the_limit_in_a_handful_of_sessions() -> None:
    m = Model([rec(i) for i in range(1, 5001)], server_limit=8000).run()
    assert m.delivered == list(range(1, 5001)) and not m.dead
    assert m.sessions <= 6 and m.shrinks == 4
    assert m.pl.learned is not None and m.pl.learned <= 8000 and m.pl.ceiling is None


def test_model_a_record_too_large_is_dead_lettered_others_arrive_in_order() -> None:
    rows = [rec(i) for i in range(1, 301)] + [rec(301, 20000)] + [rec(i) for i in range(302, 601)]
    m = Model(rows, server_limit=8000).run()
    assert m.dead == [301]
    assert m.delivered == [i for i in range(1, 601) if i != 301]
    assert m.sessions <= 10
    assert m.pl.ceiling == packet_size(len(T), len(rec(301, 20000)[4])) - 1
    # the next such record is refused without a session
    m2 = Model([rec(i) for i in range(601, 700)] + [rec(700, 30000)] + [rec(701)], server_limit=8000, pl=m.pl).run()
    assert m2.dead == [700] and m2.closes == 0 and m2.sessions == 1


def test_model_a_record_the_server_accepts_alone_is_delivered_and_raises_the_limit() -> None:
    rows = [rec(i) for i in range(1, 2001)] + [rec(2001, 6000)] + [rec(i) for i in range(2002, 3001)]
    m = Model(rows, server_limit=8000).run()
    assert m.delivered == list(range(1, 3001)) and not m.dead
    assert m.pl.learned is not None and m.pl.learned >= 6000


def test_model_no_learning_when_the_server_takes_what_is_configured() -> None:
    m = Model([rec(i) for i in range(1, 20001)], server_limit=4096, hard=4096, window=2, drop_every=3).run(1000)
    assert m.delivered == list(range(1, 20001)) and m.closes > 20
    assert m.pl.learned is None and m.shrinks == 0 and not m.dead


def test_model_random_transport_losses_after_learning_do_not_lower_the_limit() -> None:
    m = Model([rec(i) for i in range(1, 3001)], server_limit=8000).run()
    learned = m.pl.learned
    rng = random.Random(5)
    rows = [rec(i, rng.randrange(0, 200)) for i in range(3001, 30001)]
    m2 = Model(rows, server_limit=8000, window=2, drop_every=4, pl=m.pl).run(max_sessions=5000)
    assert m2.delivered == list(range(3001, 30001)) and not m2.dead
    assert m2.closes > 50 and m2.shrinks == 0 and m2.pl.learned == learned


# -- urgent rows, small suspects, persistence, re-probing, announced limits -----------------------

def urgent(size: int, rid: int, prio: int = 100) -> Publish:
    return Publish("v1/devices/me/rpc/response/1", "x", prio, rid, rid, 1, size, False)


def test_urgent_rows_in_flight_are_never_blamed_for_their_size_alone() -> None:
    pl = PacketLimit()
    for t in range(10):  # an RPC reply larger than anything acknowledged, beside small telemetry
        v = pl.lost([urgent(2200, 7), pub(300, 1, 3)], HARD, float(t))
        assert v.action == PROBE and v.pub.first_id == 7
    assert not pl.active and pl.learned is None and pl.ceiling is None


def test_an_urgent_row_alone_at_three_losses_in_a_row_is_dead_lettered_without_a_ceiling() -> None:
    pl = PacketLimit()
    assert pl.lost([urgent(30000, 7)], HARD, 0.0).action == PROBE
    assert pl.lost([urgent(30000, 7)], HARD, 1.0).action == PROBE
    v = pl.lost([urgent(30000, 7)], HARD, 2.0)
    assert v.action == DEAD_LETTER and v.pub.first_id == 7 and not pl.active
    # a PUBACK in between starts the count again
    pl.lost([urgent(30000, 8)], HARD, 3.0)
    pl.lost([urgent(30000, 8)], HARD, 4.0)
    pl.acked(500)
    assert pl.lost([urgent(30000, 8)], HARD, 5.0).action == PROBE


def test_urgent_rows_no_larger_than_acknowledged_ones_leave_the_judgment_to_the_telemetry() -> None:
    pl = PacketLimit()
    pl.acked(3000)
    for t in (0.0, 1.0):
        v = pl.lost([urgent(2200, 7), pub(65000, 1)], HARD, t)
    assert v.action == SHRINK and v.pub.first_id == 1 and pl.learned == 32500


def test_a_suspect_no_larger_than_the_floor_never_shrinks_the_limit() -> None:
    pl = PacketLimit()
    for t in range(6):
        assert pl.lost([pub(300, 1, 3)], HARD, float(t)).action in (NOTHING, ISOLATE)
    assert pl.learned is None and pl.limit(HARD) == HARD


def test_the_whole_learning_state_is_restored() -> None:
    pl = PacketLimit()
    pl.restore(8000, 20000, acked=7900, changed_ms=123)
    assert (pl.learned, pl.ceiling, pl.acked_max, pl.changed_ms) == (8000, 20000, 7900, 123)
    # the restored evidence protects: a batch of a proven size in flight at a loss proves nothing
    for t in range(3):
        assert pl.lost([pub(7900)], 8000, float(t)).action == NOTHING
    assert pl.learned == 8000


def test_a_learned_limit_is_reprobed_after_a_while() -> None:
    pl = PacketLimit()
    pl.lost([pub(65000)], HARD, 0.0, now_ms=1000)
    assert pl.lost([pub(65000)], HARD, 1.0, now_ms=1000).action == SHRINK
    pl.ceiling = 40000
    assert not pl.reprobe(HARD, 1000 + int(REPROBE_AFTER_S * 1000) - 1)
    assert pl.reprobe(HARD, 1000 + int(REPROBE_AFTER_S * 1000))
    assert pl.learned == 65000 and pl.ceiling is None and pl.dirty
    assert pl.reprobe(HARD, 1000 + int(REPROBE_AFTER_S * 2000))
    assert pl.learned is None and not pl.active  # doubling reached the hard limit: nothing left to learn
    pl.restore(4000, None, changed_ms=0)
    assert pl.reprobe(HARD, int(REPROBE_AFTER_S * 1000)) and pl.learned == 8000


def test_an_announced_limit_disables_learning(tmp_path: Path) -> None:
    db = queues.open_queues(tmp_path / "q.db")
    try:
        limits = ServerLimits("tb:1883", HARD, 20, 0.0)
        limits.packet.restore(4096, None)
        assert limits.max_packet() == 4096
        limits.answer = json.dumps({"maxPayloadSize": 16384, "maxInflightMessages": 10}).encode()
        limits.request_id = "1"
        assert limits.poll(0.0, db)
        assert limits.max_packet() == 16384 and not limits.packet.active and limits.inflight() == 10
        for t in range(5):
            assert limits.judge_loss([pub(16000)], "lost", float(t), db).action == NOTHING
        assert limits.max_packet() == 16384
        saved = queues.get_state(db, "bridge.packet_limit")
        assert saved["limit"] is None and saved["ceiling"] is None
        # an upgraded server that stops answering brings learning back
        limits.answer, limits.request_id = b'{"error":"unsupported"}', "2"
        assert limits.poll(1.0, db) and limits.learning and limits.max_packet() == HARD
        assert queues.get_state(db, "bridge.session_limits") is None
    finally:
        db.close()
