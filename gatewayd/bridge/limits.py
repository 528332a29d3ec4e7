"""What the server accepts: its announced session limits, the packet limit learned from sessions it
closed, and the rate limits that follow from both.

ThingsBoard 3.8+ answers the client-side RPC `getSessionLimits` with `maxPayloadSize`,
`maxInflightMessages` and `rateLimits`; the answer is remembered in state
`bridge.session_limits` per server. An announced packet limit wins: nothing is learned while one
is known. A server that does not announce its packet limit and closes the session on a
too-large PUBLISH teaches it through lost sessions (`PacketLimit`); what was learned (limit,
ceiling, the largest acknowledged packet, when it changed) is remembered in state
`bridge.packet_limit` per server and configured maximum.

No MQTT here: the bridge hands in answers and lost sessions, and asks for the limits to use.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

from gatewayd import topics
from gatewayd.bridge.publisher import (
    DEAD_LETTER,
    ISOLATE,
    NOTHING,
    PROBE,
    SHRINK,
    LossVerdict,
    Oversized,
    PacketLimit,
    Publish,
    RateLimiter,
)
from gatewayd.clock import now_ms
from gatewayd.log import Throttle
from gatewayd.store import queues

log = logging.getLogger("gatewayd.bridge")

SESSION_LIMITS_KEY = "bridge.session_limits"
PACKET_LIMIT_KEY = "bridge.packet_limit"  # the limit learned from lost sessions, per server
LIMITS_TIMEOUT_S = 10.0
REQUEST_PAYLOAD = '{"method":"getSessionLimits","params":{}}'
MIN_OVERRIDE = 1024


def positive_int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


class ServerLimits:
    """The limits the sender works with, and how they were learned."""

    def __init__(self, server: str, max_packet: int, inflight: int, rate_per_s: float) -> None:
        self.server = server
        self.cfg_max_packet = max_packet
        self.cfg_inflight = inflight
        self.cfg_rate = rate_per_s
        self.announced_packet: int | None = None
        self.announced_inflight: int | None = None
        self.announced_rates: dict[str, Any] | None = None
        self.limiter = RateLimiter.build(rate_per_s)
        self.packet = PacketLimit()
        self.override: int | None = None           # what an MQTT 5 "packet too large" taught
        self.request_id: str | None = None
        self.deadline = 0.0
        self.answer: bytes | None = None
        self.throttle = Throttle(log)

    # -- persistence ---------------------------------------------------------------------
    def restore(self, db: sqlite3.Connection) -> None:
        saved = queues.get_state(db, SESSION_LIMITS_KEY)
        if isinstance(saved, dict) and saved.get("server") == self.server:
            self._apply(saved.get("limits") or {}, None)
        saved = queues.get_state(db, PACKET_LIMIT_KEY)
        if not isinstance(saved, dict) or saved.get("server") != self.server:
            return
        if saved.get("configured") != self.cfg_max_packet:
            log.info("thingsboard.max_packet_bytes changed: forgetting the packet limit learned from %s",
                     self.server)
            return
        self.packet.restore(positive_int(saved.get("limit")), positive_int(saved.get("ceiling")),
                            positive_int(saved.get("acked")), positive_int(saved.get("changed_ms")))
        if self.packet.active and self.learning:
            log.info("using the packet limit learned from %s: %s bytes per packet, a single record up to %s bytes",
                     self.server, self.max_packet(), self.alone_max())

    def save_packet_limit(self, db: sqlite3.Connection) -> None:
        p = self.packet
        queues.save_state(db, PACKET_LIMIT_KEY, {
            "server": self.server, "configured": self.cfg_max_packet, "limit": p.learned, "ceiling": p.ceiling,
            "acked": p.acked_max, "changed_ms": p.changed_ms or None})
        p.dirty = False

    def save_if_changed(self, db: sqlite3.Connection) -> None:
        """Persist what was learned when it changed (the largest acknowledged packet grows often)."""
        if self.packet.dirty:
            self.save_packet_limit(db)

    @property
    def learning(self) -> bool:
        """The packet limit is learned only from a server that does not announce it."""
        return self.announced_packet is None

    # -- getSessionLimits ----------------------------------------------------------------
    def request(self, request_id: int, now: float) -> tuple[str, str]:
        """(topic, payload) of the getSessionLimits request to publish now."""
        self.request_id = str(request_id)
        self.answer = None
        self.deadline = now + LIMITS_TIMEOUT_S
        return topics.rpc_request(self.request_id), REQUEST_PAYLOAD

    def is_answer(self, topic: str) -> bool:
        return self.request_id is not None and topic == topics.rpc_response(self.request_id)

    def forget_request(self) -> None:
        self.request_id = None
        self.answer = None

    def poll(self, now: float, db: sqlite3.Connection) -> bool:
        """Take an answer that arrived; True when the window size may have changed."""
        if self.answer is not None:
            answer = self.answer
            self.forget_request()
            return self._take(answer, db)
        if self.request_id is not None and now > self.deadline:
            self.throttle.log("nolimits", logging.INFO, "no answer to getSessionLimits within %.0f s; using max "
                              "packet %d bytes, in-flight window %d", LIMITS_TIMEOUT_S, self.max_packet(),
                              self.inflight())
            self.request_id = None
        return False

    def _take(self, payload: bytes, db: sqlite3.Connection) -> bool:
        try:
            data = json.loads(payload)
        except ValueError:
            log.warning("getSessionLimits answer is not JSON: %r", payload[:200])
            return False
        if not isinstance(data, dict) or "error" in data:
            log.info("the server does not support getSessionLimits (%r); using the configured limits",
                     payload[:200])
            if self.announced_packet or self.announced_inflight or self.announced_rates:
                self._apply({}, None)  # what an older version of the server announced no longer holds
                queues.save_state(db, SESSION_LIMITS_KEY, None)
                return True
            return False
        self._apply(data, db)
        return True

    def _apply(self, data: dict[str, Any], db: sqlite3.Connection | None) -> None:
        """Use an answer; `db` given: a live answer, logged and remembered."""
        mps, mim, rates = data.get("maxPayloadSize"), data.get("maxInflightMessages"), data.get("rateLimits")
        self.announced_packet = positive_int(mps)
        if db is not None and self.packet.active and self.announced_packet is not None:
            # the server says what it accepts: that beats what we guessed from closed sessions
            log.info("%s announced its session limits: forgetting the packet limit learned from closed "
                     "sessions (%s bytes)", self.server, self.packet.learned)
            self.packet.forget()
            self.save_packet_limit(db)
        self.announced_inflight = positive_int(mim)
        self.announced_rates = rates if isinstance(rates, dict) else None
        self.limiter = RateLimiter.build(self.cfg_rate, self.announced_rates)
        if db is not None:
            log.info("session limits from %s: max payload %s bytes, max in flight %s, rate limits %s",
                     self.server, mps, mim, json.dumps(rates))
            queues.save_state(db, SESSION_LIMITS_KEY, {"server": self.server, "limits": {
                "maxPayloadSize": self.announced_packet, "maxInflightMessages": self.announced_inflight,
                "rateLimits": self.announced_rates}})

    # -- the limits to use ---------------------------------------------------------------
    def hard_max_packet(self) -> int:
        """The announced (or configured) maximum, and what MQTT 5 "packet too large" taught us."""
        limit = self.announced_packet or self.cfg_max_packet
        if self.override:
            limit = min(limit, self.override)
        return limit

    def max_packet(self) -> int:
        """Largest packet to build from several records."""
        hard = self.hard_max_packet()
        return self.packet.limit(hard) if self.learning else hard

    def alone_max(self) -> int:
        """Largest packet to try for a single record on its own."""
        hard = self.hard_max_packet()
        return self.packet.alone_limit(hard) if self.learning else hard

    def inflight(self) -> int:
        """Publishes in flight at most: the configured window, or the server's when smaller."""
        if self.announced_inflight:
            return min(self.cfg_inflight, self.announced_inflight)
        return self.cfg_inflight

    def client_inflight(self) -> int:
        """What the MQTT client must allow in flight (never the one holding messages back)."""
        return max(self.cfg_inflight, self.announced_inflight or 0)

    def oversized_reason(self, p: Oversized) -> str:
        if self.packet.ceiling is None or p.limit >= self.hard_max_packet() or not self.learning:
            return p.reason
        return (f"record needs a {p.size}-byte MQTT packet; {self.server} closed the connection on every "
                f"attempt to publish a {self.packet.ceiling + 1}-byte record (its limit appears to be below "
                f"{self.packet.ceiling + 1} bytes)")

    def refused_too_large(self, size: int) -> None:
        """An MQTT 5 PUBACK 0x95 (packet too large) for a batch of `size` bytes."""
        self.override = max(MIN_OVERRIDE, size // 2)
        log.warning("the server refused a %d-byte publish as too large; using at most %d bytes per packet",
                    size, self.override)

    # -- learning from acknowledged and lost publishes -------------------------------------
    def acked(self, sizes: list[int], db: sqlite3.Connection) -> None:
        """PUBACKs for packets of these sizes arrived."""
        learned = 0
        stamp = now_ms()
        for size in sizes:
            if self.packet.acked(size, stamp):
                learned = max(learned, size)
        if learned and self.learning:
            log.info("%s acknowledged a %d-byte publish: publishing up to %d bytes per packet, a single "
                     "record up to %d bytes", self.server, learned, self.max_packet(), self.alone_max())

    def judge_loss(self, inflight: list[Publish], reason: str, now: float,
                   db: sqlite3.Connection) -> LossVerdict:
        """The server ended the session with `inflight` unacknowledged: was one of them too large?"""
        limit = self.max_packet()
        if not self.learning:  # it announced its limit: a lost session is not about size
            return LossVerdict(NOTHING, inflight[0], 0)
        v = self.packet.lost(inflight, limit, now, now_ms())
        log.debug("session lost with %d publishes unacknowledged (largest %d bytes, %d records; largest "
                  "acknowledged %d bytes; %d lost in a row): %s", len(inflight), v.size, v.pub.count,
                  self.packet.acked_max, v.losses, v.action)
        if v.distrusted:
            log.warning("no PUBACK from %s across %d lost sessions: packets of %d bytes it accepted before "
                        "may no longer be accepted; learning its packet limit again", self.server,
                        v.losses, v.distrusted)
        if v.action == SHRINK:
            log.warning("%s closed the session %d times in a row with a %d-byte publish in flight and no "
                        "PUBACK (last: %s); the largest publish it acknowledged is %d bytes, so its maximum "
                        "packet appears to be below %d bytes (it does not answer getSessionLimits): publishing "
                        "at most %d bytes per packet from now on", self.server, v.losses, v.size, reason,
                        self.packet.acked_max, limit, v.limit)
        elif v.action == PROBE:
            log.info("%s closed the session with a %d-byte %s row in flight, larger than any it acknowledged: "
                     "sending one publish at a time until the next PUBACK", self.server, v.size,
                     "RPC reply" if topics.is_rpc_response(v.pub.topic) else "urgent")
        elif v.action == ISOLATE:
            log.warning("%s closed the session %d times in a row with a %d-byte publish of %d records in "
                        "flight and no PUBACK, and the packet limit is at its floor (%d bytes): sending "
                        "those records one by one", self.server, v.losses, v.size, v.pub.count, limit)
        if v.action in (SHRINK, DEAD_LETTER):
            try:
                self.save_packet_limit(db)
            except sqlite3.Error as e:  # the verdict is kept in memory; it is saved with the next one
                log.warning("cannot save the learned packet limit: %s", e)
        return v

    def lost_reason(self, v: LossVerdict) -> str:
        """Why a record sent alone that lost every session is dead-lettered."""
        if v.pub.priority > 0:
            return (f"{self.server} closed the connection without PUBACK each time this {v.size}-byte MQTT packet "
                    f"was the only publish in flight ({v.losses} times in a row)")
        return (f"{self.server} closed the connection without PUBACK on every attempt to publish this record "
                f"alone ({v.size}-byte MQTT packet); its packet limit appears to be below {v.size} bytes")

    def reprobe(self) -> None:
        """Relax a limit learned long ago (see `PacketLimit.reprobe`)."""
        before = (self.max_packet(), self.alone_max())
        if self.learning and self.packet.reprobe(self.hard_max_packet(), now_ms()):
            log.info("the packet limit learned from %s is old: trying up to %d bytes per packet again "
                     "(was %d), a single record up to %d bytes (was %d)", self.server, self.max_packet(),
                     before[0], self.alone_max(), before[1])
