"""Pure publishing logic of the bridge: packet sizing, batching, the in-flight window, rate limits.

Nothing here touches MQTT or SQLite, so it is unit tested on its own.

Outbox rows reach the batcher as tuples `(id, priority, kind, topic, payload)` in send order
(one priority per run). Consecutive telemetry rows are joined into one JSON array:
payloads are ready JSON objects, so the batch is `"[" + ",".join(payloads) + "]"`, with no
JSON parsing per record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from gatewayd.packet import packet_size, utf8_len
from gatewayd.store.queues import KIND_TELEMETRY
from gatewayd.topics import TOPIC_TELEMETRY

Row = tuple[int, int, str, str, str]  # id, priority, kind, topic, payload


def datapoints(payload: str) -> int:
    """Cheap upper estimate of the data points in one telemetry record `{"ts":..,"values":{..}}`.

    Every key is followed by `":`; `ts` and `values` are two of them. A string value that
    itself contains `":` makes the estimate larger, never smaller (safe for rate limits).
    """
    return max(1, payload.count('":') - 2)


@dataclass
class Publish:
    """One planned PUBLISH carrying rows[start:end] of the buffer."""

    topic: str
    payload: str
    priority: int
    first_id: int
    last_id: int
    count: int
    size: int  # packet bytes (upper bound)
    telemetry: bool
    points: int = 0


@dataclass
class Oversized:
    """A single row that can never fit in one packet."""

    row: Row
    size: int
    limit: int

    @property
    def reason(self) -> str:
        return (f"record needs a {self.size}-byte MQTT packet, more than the server's maximum of "
                f"{self.limit} bytes")


def plan(rows: Sequence[Row], start: int, max_packet: int,
         max_records: int = 0, max_points: int = 0, alone_max: int = 0) -> Publish | Oversized:
    """The next PUBLISH from rows[start:] (start < len(rows)).

    Telemetry rows to the telemetry topic are joined while the packet stays within
    `max_packet` (and `max_records` / `max_points` when > 0); any other row goes alone.
    A row larger than `max_packet` but within `alone_max` (when that is larger) goes alone;
    a row that does not fit even then is returned as Oversized.
    """
    first = rows[start]
    rid, prio, kind, topic, payload = first
    topic_b = utf8_len(topic)
    first_b = utf8_len(payload)
    single = packet_size(topic_b, first_b)
    if single > max_packet:
        if single > alone_max:
            return Oversized(first, single, max(max_packet, alone_max))
        return Publish(topic, payload, prio, rid, rid, 1, single,
                       kind == KIND_TELEMETRY and topic == TOPIC_TELEMETRY,
                       datapoints(payload) if max_points > 0 else 0)
    if kind != KIND_TELEMETRY or topic != TOPIC_TELEMETRY:
        return Publish(topic, payload, prio, rid, rid, 1, single, False, 0)

    want_points = max_points > 0
    points = datapoints(payload) if want_points else 0
    base = packet_size(topic_b, 2)  # the brackets
    total = base + first_b
    end = start + 1
    n = len(rows)
    limit_records = max_records if max_records > 0 else n
    while end < n and end - start < limit_records:
        r = rows[end]
        if r[2] != KIND_TELEMETRY or r[3] != TOPIC_TELEMETRY or r[1] != prio:
            break
        p = r[4]
        size = total + 1 + (len(p) if p.isascii() else len(p.encode("utf-8")))
        if size > max_packet:
            break
        if want_points:
            dp = datapoints(p)
            if points + dp > max_points:
                break
            points += dp
        total = size
        end += 1
    count = end - start
    if count == 1:
        return Publish(topic, payload, prio, rid, rid, 1, single, True, points)
    body = "[" + ",".join([r[4] for r in rows[start:end]]) + "]"
    return Publish(topic, body, prio, rid, rows[end - 1][0], count, total, True, points)


# -- rate limits ---------------------------------------------------------------------------

@dataclass
class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second."""

    capacity: float
    rate: float
    tokens: float = -1.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until `n` tokens are there (0 = now); more than the capacity waits for a full bucket."""
        self._refill(now)
        n = min(n, self.capacity)
        if self.tokens >= n:
            return 0.0
        return (n - self.tokens) / self.rate if self.rate > 0 else math.inf

    def take(self, n: float, now: float) -> None:
        self._refill(now)
        self.tokens -= min(n, self.capacity)


def parse_rate_limits(text: object) -> list[tuple[float, float]]:
    """ThingsBoard's "capacity:seconds,capacity:seconds" -> [(capacity, seconds)]; bad parts ignored."""
    out: list[tuple[float, float]] = []
    if not isinstance(text, str):
        return out
    for part in text.split(","):
        cap, _, secs = part.strip().partition(":")
        try:
            c, s = float(cap), float(secs)
        except ValueError:
            continue
        if c > 0 and s > 0:
            out.append((c, s))
    return out


# Use a little less than the server allows: its windows and ours are not aligned.
SERVER_LIMIT_MARGIN = 0.9


@dataclass
class RateLimiter:
    """Token buckets for all publishes, telemetry publishes and telemetry data points."""

    messages: list[TokenBucket] = field(default_factory=list)
    telemetry: list[TokenBucket] = field(default_factory=list)
    points: list[TokenBucket] = field(default_factory=list)

    @classmethod
    def build(cls, per_second: float, server: dict[str, object] | None = None) -> RateLimiter:
        rl = cls()
        if per_second > 0:
            rl.messages.append(TokenBucket(max(1.0, per_second), per_second))
        limits = server if isinstance(server, dict) else {}
        for name, target in (("messages", rl.messages), ("telemetryMessages", rl.telemetry),
                             ("telemetryDataPoints", rl.points)):
            for cap, secs in parse_rate_limits(limits.get(name)):
                c = max(1.0, math.floor(cap * SERVER_LIMIT_MARGIN))
                target.append(TokenBucket(c, c / secs))
        return rl

    @property
    def active(self) -> bool:
        return bool(self.messages or self.telemetry or self.points)

    @property
    def max_points(self) -> int:
        """Largest data-point count one publish may carry (0 = unlimited)."""
        return int(min(b.capacity for b in self.points)) if self.points else 0

    def wait_for(self, pub: Publish, now: float) -> float:
        wait = 0.0
        for b in self.messages:
            wait = max(wait, b.wait_for(1, now))
        if pub.telemetry:
            for b in self.telemetry:
                wait = max(wait, b.wait_for(1, now))
            for b in self.points:
                wait = max(wait, b.wait_for(pub.points, now))
        return wait

    def take(self, pub: Publish, now: float) -> None:
        for b in self.messages:
            b.take(1, now)
        if pub.telemetry:
            for b in self.telemetry:
                b.take(1, now)
            for b in self.points:
                b.take(pub.points, now)


# -- the in-flight window ------------------------------------------------------------------

@dataclass
class InFlight:
    pub: Publish
    sent_at: float


class Window:
    """Publishes sent and not yet acknowledged, by MQTT packet id."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self.items: dict[int, InFlight] = {}
        self.records = 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.size

    def add(self, mid: int, pub: Publish, now: float) -> None:
        self.items[mid] = InFlight(pub, now)
        self.records += pub.count

    def ack(self, mid: int) -> Publish | None:
        item = self.items.pop(mid, None)
        if item is None:
            return None
        self.records -= item.pub.count
        return item.pub

    def oldest_sent(self) -> float | None:
        # dicts keep insertion order: the first item is the oldest still unacknowledged
        for item in self.items.values():
            return item.sent_at
        return None

    def clear(self) -> list[Publish]:
        pubs = [i.pub for i in self.items.values()]
        self.items.clear()
        self.records = 0
        return pubs


# -- the packet limit of a server that closes the session instead of announcing it -----------

MIN_PACKET = 1024          # never learn a limit below this; a record this small is never blamed
LOSSES_TO_SHRINK = 2       # suspect sessions lost in a row (no PUBACK in between) before shrinking
LOSSES_TO_TRIM = 4         # ... when the suspect is less than twice the largest acknowledged packet
LOSSES_TO_DEAD_LETTER = 2  # ... with the same record sent alone as the largest packet in flight
URGENT_LOSSES_TO_DEAD_LETTER = 3  # ... with the same urgent row the only publish in flight
DISTRUST_AFTER_LOSSES = 5  # no PUBACK across this many lost sessions with publishes in flight ...
DISTRUST_AFTER_S = 600.0   # ... and this long: sizes acknowledged before may no longer be accepted
REPROBE_AFTER_S = 3600.0   # a learned limit unchanged this long is relaxed (doubled, ceiling lifted)

NOTHING, SHRINK, ISOLATE, DEAD_LETTER, PROBE = "nothing", "shrink", "isolate", "dead-letter", "probe"


@dataclass
class LossVerdict:
    """What to do about a session lost with publishes in flight (see `PacketLimit.lost`)."""

    action: str          # NOTHING, SHRINK, ISOLATE, DEAD_LETTER or PROBE
    pub: Publish         # the suspect: the largest publish in flight that can be blamed
    losses: int          # sessions lost in a row without a PUBACK
    limit: int = 0       # SHRINK: the new packet limit
    distrusted: int = 0  # > 0: the largest acknowledged size, forgotten because the server now refuses it

    @property
    def size(self) -> int:
        return self.pub.size


class PacketLimit:
    """The packet limit learned from a server that closes the session on a too-large PUBLISH.

    ThingsBoard closes the connection without PUBACK when a PUBLISH exceeds its maximum, and
    before 3.8 it does not announce that maximum; under MQTT 3.1.1 there is no reason code
    either. It reads the packets in order and closes at the first one that is too large, so
    PUBACKs of earlier ones may be lost with the session; if a size caused the close, the
    *largest* publish in flight (the suspect) is too large. Evidence, not guesses:

    - a PUBACK for a packet of S bytes proves S is accepted (`acked_max`): the limit never
      goes below it, and a session lost with no packet larger than that in flight proves
      nothing (broker restart, network drop, rate limit);
    - `LOSSES_TO_SHRINK` sessions lost in a row with a larger suspect and no PUBACK in
      between halve the limit (never below `MIN_PACKET` nor `acked_max`, and only when that
      leaves the suspect out). A suspect less than twice `acked_max` is weaker evidence (a
      server restart while a batch a little larger than any acknowledged one is in flight,
      twice in a row, is not that unlikely) and the shrink would only trim the limit to
      `acked_max`: that takes `LOSSES_TO_TRIM` losses in a row;
    - a suspect that is a single telemetry record sent alone (larger than the limit, or
      nothing else fitted with it) lost `LOSSES_TO_DEAD_LETTER` times in a row is too large
      for this server: DEAD_LETTER, and `ceiling` keeps records at least that large from being
      tried again. Records of `MIN_PACKET` bytes or less are never blamed;
    - urgent rows (attributes, RPC replies: priority > 0) always travel alone, first after a
      reconnect, so they are in flight at many an unrelated loss: their size alone proves
      nothing, and they never shrink the limit. A loss with one in flight that is larger than
      anything acknowledged is ambiguous: PROBE (send one publish at a time until the next
      PUBACK). Only an urgent row that was the *only* publish in flight at
      `URGENT_LOSSES_TO_DEAD_LETTER` losses in a row is dead-lettered (no ceiling is set);
    - a suspect batch at the floor: ISOLATE (send its records one by one);
    - when no PUBACK at all has come for `DISTRUST_AFTER_S` across `DISTRUST_AFTER_LOSSES`
      lost sessions, `acked_max` is forgotten: the server's limit may have been lowered;
    - a learned limit unchanged for `REPROBE_AFTER_S` is relaxed (`reprobe`): the server may
      have been reconfigured, and evidence against the larger size costs two lost sessions.

    `learned`, `ceiling`, `acked_max` and `changed_ms` are what the bridge persists (`dirty`
    says they changed).
    """

    def __init__(self, floor: int = MIN_PACKET) -> None:
        self.floor = floor
        self.learned: int | None = None   # largest packet to build from several records
        self.ceiling: int | None = None   # largest packet to try at all (one byte more was refused)
        self.acked_max = 0
        self.changed_ms = 0               # wall clock of the last change of learned / ceiling
        self.dirty = False
        self.losses = 0                   # suspect sessions lost since the last PUBACK
        self.streak = 0                   # sessions lost with publishes in flight since the last PUBACK
        self.streak_since = 0.0
        self.alone: tuple[int, int] | None = None  # (priority, id) of the record lost while sent alone
        self.alone_losses = 0

    def restore(self, learned: int | None, ceiling: int | None, acked: int | None = None,
                changed_ms: int | None = None) -> None:
        self.ceiling = max(self.floor, ceiling) if ceiling else None
        self.learned = max(self.floor, learned) if learned else None
        if self.learned is not None and self.ceiling is not None:
            self.learned = min(self.learned, self.ceiling)
        self.acked_max = acked or 0
        self.changed_ms = changed_ms or 0

    def forget(self) -> None:
        if self.active:
            self.dirty = True
        self.learned = self.ceiling = None

    @property
    def active(self) -> bool:
        return self.learned is not None or self.ceiling is not None

    def limit(self, hard: int) -> int:
        """Largest packet to build (`hard`: the announced or configured maximum)."""
        return min(hard, self.learned) if self.learned is not None else hard

    def alone_limit(self, hard: int) -> int:
        """Largest packet to try for one record on its own."""
        return min(hard, self.ceiling) if self.ceiling is not None else hard

    def _changed(self, now_ms: int) -> None:
        self.changed_ms = now_ms
        self.dirty = True

    def acked(self, size: int, now_ms: int = 0) -> bool:
        """A PUBACK for a `size`-byte packet; True when `learned` / `ceiling` changed."""
        self.losses = self.streak = self.alone_losses = 0
        self.alone = None
        if size <= self.acked_max:
            return False
        self.acked_max = size
        self.dirty = True
        changed = False
        if self.learned is not None and size > self.learned:
            self.learned = size
            changed = True
        if self.ceiling is not None and size > self.ceiling:
            self.ceiling = None
            changed = True
        if changed:
            self._changed(now_ms)
        return changed

    def reprobe(self, hard: int, now_ms: int) -> bool:
        """Relax a limit learned long ago: double it (forget it at `hard`) and lift the ceiling."""
        if not self.active or now_ms - self.changed_ms < REPROBE_AFTER_S * 1000:
            return False
        if self.learned is not None:
            self.learned = None if self.learned * 2 >= hard else self.learned * 2
        self.ceiling = None
        self._changed(now_ms)
        return True

    def lost(self, inflight: Sequence[Publish], limit: int, now: float, now_ms: int = 0) -> LossVerdict:
        """The session ended with `inflight` (send order, not empty) unacknowledged; they were
        built with the packet limit `limit`. Updates the limits and says what else to do."""
        if self.streak == 0:
            self.streak_since = now
        self.streak += 1
        urgent = [p for p in inflight if p.priority > 0 and p.size > max(self.acked_max, self.floor)]
        if urgent:
            return self._urgent_lost(max(urgent, key=lambda p: p.size), len(inflight) == 1)
        bulk = [p for p in inflight if p.priority <= 0]
        if not bulk:
            return LossVerdict(NOTHING, inflight[0], self.streak)
        suspect = bulk[0]
        for p in bulk:
            if p.size > suspect.size:
                suspect = p
        size = suspect.size
        distrusted = 0
        if size <= self.acked_max:
            if self.streak < DISTRUST_AFTER_LOSSES or now - self.streak_since < DISTRUST_AFTER_S:
                return LossVerdict(NOTHING, suspect, self.streak)
            distrusted, self.acked_max = self.acked_max, 0
            self.dirty = True
        self.losses += 1
        if suspect.count == 1 and size > self.floor:
            if self._lost_alone(suspect, LOSSES_TO_DEAD_LETTER):
                self.ceiling = size - 1 if self.ceiling is None else min(self.ceiling, size - 1)
                if limit > self.ceiling:
                    self.learned = self.ceiling if self.learned is None else min(self.learned, self.ceiling)
                self._changed(now_ms)
                return LossVerdict(DEAD_LETTER, suspect, self.streak, distrusted=distrusted)
            if size > limit:  # sent alone beyond the limit: only its own fate is in question
                return LossVerdict(NOTHING, suspect, self.streak, distrusted=distrusted)
        if self.losses < (LOSSES_TO_SHRINK if size >= 2 * self.acked_max else LOSSES_TO_TRIM):
            return LossVerdict(NOTHING, suspect, self.streak, distrusted=distrusted)
        target = max(self.floor, self.acked_max, min(limit, size) // 2)
        if target < limit and target < size:
            self.learned = target
            self._changed(now_ms)
            return LossVerdict(SHRINK, suspect, self.streak, limit=target, distrusted=distrusted)
        if suspect.count > 1:
            return LossVerdict(ISOLATE, suspect, self.streak, distrusted=distrusted)
        return LossVerdict(NOTHING, suspect, self.streak, distrusted=distrusted)

    def _urgent_lost(self, pub: Publish, alone: bool) -> LossVerdict:
        """A loss with an urgent row larger than anything acknowledged in flight."""
        if alone and self._lost_alone(pub, URGENT_LOSSES_TO_DEAD_LETTER):
            return LossVerdict(DEAD_LETTER, pub, self.streak)
        return LossVerdict(PROBE, pub, self.streak)

    def _lost_alone(self, pub: Publish, enough: int) -> bool:
        """Count a loss of this single-record publish; True (and the count restarts) at `enough` in a row."""
        key = (pub.priority, pub.first_id)
        if key != self.alone:
            self.alone, self.alone_losses = key, 0
        self.alone_losses += 1
        if self.alone_losses < enough:
            return False
        self.alone, self.alone_losses = None, 0
        return True
