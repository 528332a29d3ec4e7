"""The outbox sender: which rows go out next, the in-flight window, PUBACKs and refusals.

Rows leave the outbox highest priority first, then oldest; consecutive telemetry rows travel as
one JSON array as large as the packet limit allows (`publisher.plan`); QoS 1; a row is deleted
only after its PUBACK (MQTT 5: reason code < 0x80), as id ranges in one transaction per pass.
After a reconnect everything not yet acknowledged is sent again from the head of the outbox, so
duplicates are limited to what was in flight.

No MQTT here: the session hands in a `publish(topic, payload) -> (rc, mid)` callable and the
PUBACKs it received, so the sender is tested with a real store and no broker.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

from gatewayd.bridge.limits import ServerLimits
from gatewayd.bridge.provisioning import Backoff
from gatewayd.bridge.publisher import (
    LossVerdict,
    Oversized,
    Publish,
    Row,
    Window,
    plan,
)
from gatewayd.bridge.refusals import DEAD_LETTER, PERMANENT, SHRINK, SPLIT, Refusals, rc_name
from gatewayd.clock import now_ms
from gatewayd.log import Throttle
from gatewayd.store import queues
from gatewayd.store.db import data_version

log = logging.getLogger("gatewayd.bridge")

POLL_S = 0.025     # how often an idle, connected bridge looks for new outbox rows without inotify
IDLE_WAIT_S = 1.0  # longest wait when inotify wakes us for new rows (state_dir changes)
WAIT_S = 0.25      # loop timeout while waiting for acks
OUTBOX_LOOK_S = 0.5  # how often the stall check reads the outbox depth
FETCH_ROWS = 8192

Publisher = Callable[[str, str], tuple[int, int]]


class Sender:
    """Moves outbox rows onto one MQTT session and deletes them once acknowledged."""

    def __init__(self, db: sqlite3.Connection, limits: ServerLimits, report: Callable[[str], None]) -> None:
        self.db = db
        self.limits = limits
        self.report = report           # a problem worth `gatewayctl status`
        self.publish: Publisher | None = None
        self.window = Window(limits.inflight())
        self.acks: list[tuple[int, int]] = []
        self.buf: list[Row] = []
        self.buf_i = 0
        self.buf_class: int | None = None        # urgent priority of the buffer, None = bulk rows
        self.cursor: dict[int | None, int] = {}  # class -> last id sent in this session
        self.maybe_more = True
        self.seen_version = -1
        self.paused_until = 0.0
        self.rate_wait_until = 0.0
        self.needs_reset = False
        self.caps: dict[int, tuple[int, int]] = {}  # priority -> (last id, records per publish up to it)
        self.refusals = Refusals()
        self.accepted_any = False               # the server accepted a publish in this session
        self.probe = False                      # one publish at a time until the next PUBACK
        self.retry_backoff = Backoff(0.5, 10.0)
        self.failure = ""                       # why the session cannot go on (publish refused locally)
        self.progress_at = 0.0                  # session start or the last PUBACK that delivered rows
        self.last_ack_ms: int | None = None
        self.outbox_rows = 0
        self.owed = 0.0                         # the last `stalled()` answer, for STATUS=
        self.nonempty_since: float | None = None
        self.looked_at = float("-inf")
        self.delivered = 0
        self.changed = False                    # something `gatewayctl status` shows changed
        self.throttle = Throttle(log)

    # -- sessions ---------------------------------------------------------------------------
    def begin(self, publish: Publisher, now: float) -> None:
        """A new session is up: send from the head of the outbox."""
        self.publish = publish
        self.progress_at = now
        self.owed = 0.0
        self.accepted_any = False
        self.nonempty_since = None
        self.looked_at = float("-inf")
        self.failure = ""
        self._reset()
        self.window = Window(self.limits.inflight())

    def end(self, flush: bool = True) -> list[Publish]:
        """The session is gone: delete what it acknowledged (`flush`), forget the rest (returned, oldest
        first). What is not deleted is sent again in the next session."""
        try:
            if flush:
                self.flush_acks(time.monotonic())
        except sqlite3.Error as e:
            log.warning("cannot record the last deliveries of the session (they will be sent again): %s", e)
        self.publish = None
        lost = self.window.clear()
        self.acks.clear()
        self._reset()
        self.needs_reset = False
        self.paused_until = 0.0
        return lost

    def resize(self) -> None:
        self.window.size = self.limits.inflight()

    def stalled(self, now: float, timeout: float) -> float:
        """Seconds without a PUBACK beyond `timeout` while the outbox holds rows (0 = not stalled).

        The clock starts at the latest of the session's start, the last PUBACK that delivered rows
        and the moment the outbox was seen holding rows: waiting for data is never a stall, and
        whether anything is in flight does not matter (a sender that stopped sending is stuck too).
        A refusal (MQTT 5 reason code >= 0x80) is not a PUBACK in this sense."""
        self.look(now)
        waited = 0.0 if self.nonempty_since is None else now - max(self.progress_at, self.nonempty_since)
        self.owed = waited if waited > timeout else 0.0
        return self.owed

    def look(self, now: float) -> int:
        """The outbox depth, read at most every OUTBOX_LOOK_S."""
        if now - self.looked_at >= OUTBOX_LOOK_S:
            self.looked_at = now
            self.outbox_rows = queues.counters(self.db).get("outbox_rows", 0)
            if not self.outbox_rows:
                self.nonempty_since = None
            elif self.nonempty_since is None:
                self.nonempty_since = now
        return self.outbox_rows

    def wait_timeout(self, now: float, inotify: bool) -> float:
        """How long the loop may sleep on the socket before the sender has work again."""
        if self.window.full or (self.probe and len(self.window)):
            return WAIT_S
        if now < self.paused_until:
            return min(WAIT_S, self.paused_until - now)
        if now < self.rate_wait_until:
            return min(POLL_S, self.rate_wait_until - now)
        if self.buf_i < len(self.buf) or self.maybe_more:
            return 0.0
        return IDLE_WAIT_S if inotify else POLL_S

    # -- sending ----------------------------------------------------------------------------
    def fill(self, now: float) -> None:
        """Publish until the window is full, the outbox is drained or a limit says wait."""
        if self.needs_reset:
            if len(self.window) or now < self.paused_until:
                return
            self.needs_reset = False
            self._reset()
        if now < self.rate_wait_until or now < self.paused_until or self.publish is None:
            return
        limit = self.limits.max_packet()
        limiter = self.limits.limiter
        max_points = limiter.max_points
        while not self.window.full and not (self.probe and len(self.window)):
            pub = self._next(limit, max_points)
            if pub is None:
                return
            if limiter.active:
                wait = limiter.wait_for(pub, now)
                if wait > 0:
                    self.rate_wait_until = now + wait
                    return
                limiter.take(pub, now)
            rc, mid = self.publish(pub.topic, pub.payload)
            if rc != 0:
                self.failure = self.failure or f"publish failed ({rc})"
                return
            self.window.add(mid, pub, now)
            self.buf_i += pub.count
            self.cursor[self.buf_class] = pub.last_id

    def _next(self, limit: int, max_points: int) -> Publish | None:
        while True:
            if self.buf_i < len(self.buf):
                version = data_version(self.db)
                if version != self.seen_version:
                    self.seen_version = version
                    self.maybe_more = True
                    if self._unsent_above(self.buf_class):
                        self.buf, self.buf_i = [], 0
            if self.buf_i >= len(self.buf) and not self._refill():
                return None
            head = self.buf[self.buf_i]
            cap = self.caps.get(head[1])
            p = plan(self.buf, self.buf_i, limit, cap[1] if cap and head[0] <= cap[0] else 0,
                     max_points, self.limits.alone_max())
            if isinstance(p, Oversized):
                self.dead_letter(p.row, self.limits.oversized_reason(p))
                self.buf_i += 1
                self.cursor[self.buf_class] = p.row[0]
                continue
            return p

    def _refill(self) -> bool:
        self.buf, self.buf_i = [], 0
        version = data_version(self.db)
        if not self.maybe_more and version == self.seen_version:
            return False
        self.seen_version = version
        # urgent priorities (> 0) from the highest down, then the bulk rows (<= 0) in id order
        prio: int | None = None
        while True:
            prio = queues.next_urgent_priority(self.db, prio)
            rows = queues.peek_after(self.db, prio, self.cursor.get(prio, 0), FETCH_ROWS)
            if rows:
                self.buf, self.buf_class = rows, prio
                self.maybe_more = True
                return True
            if prio is None:
                self.maybe_more = False
                return False

    def _unsent_above(self, cls: int | None) -> bool:
        """Are there urgent rows, more urgent than class `cls`, not sent yet in this session?"""
        p: int | None = None
        while True:
            p = queues.next_urgent_priority(self.db, p)
            if p is None or (cls is not None and p <= cls):
                return False
            if queues.max_urgent_id(self.db, p) > self.cursor.get(p, 0):
                return True

    def _reset(self) -> None:
        """Forget what was sent in this session: the next publish starts at the outbox head."""
        self.buf, self.buf_i = [], 0
        self.cursor.clear()
        self.maybe_more = True
        self.rate_wait_until = 0.0

    def dead_letter(self, row: Row, reason: str) -> None:
        rid, prio, kind, topic, payload = row
        log.error("outbox row %d (%s to %s, %d bytes) dead-lettered: %s", rid, kind, topic, len(payload),
                  reason)
        queues.dead_letter_outbox(self.db, queues.OutboxRow(rid, prio, kind, topic, payload, 0), reason,
                                  "bridge")

    def _row_of(self, pub: Publish) -> Row | None:
        """The outbox row a single-record publish carries, None when it is gone."""
        kind = queues.outbox_kind(self.db, pub.first_id)
        if kind is None:
            return None
        return (pub.first_id, pub.priority, kind, pub.topic, pub.payload)

    # -- lost sessions ---------------------------------------------------------------------
    def isolate(self, pub: Publish, records: int = 1) -> None:
        """Send the records of `pub` (and any before them of its priority) at most `records` at a time."""
        last, most = self.caps.get(pub.priority, (0, records))
        if last < pub.first_id:  # the earlier cap was passed already
            last, most = 0, records
        self.caps[pub.priority] = (max(last, pub.last_id), min(most, records))

    def dead_letter_lost(self, v: LossVerdict) -> None:
        row = self._row_of(v.pub)
        if row is not None:
            self.dead_letter(row, self.limits.lost_reason(v))

    # -- acknowledgements ------------------------------------------------------------------
    def on_puback(self, mid: int, reason: int) -> None:
        self.acks.append((mid, reason))

    def handle_acks(self, now: float) -> None:
        if self.acks and self.flush_acks(now):
            self.progress_at = now
            self.last_ack_ms = now_ms()

    def flush_acks(self, now: float) -> bool:
        """Delete what the PUBACKs delivered; True when they delivered rows."""
        if not self.acks:
            return False
        ranges: list[tuple[int, int, int]] = []
        delivered = 0
        failed: list[tuple[Publish, int]] = []
        sizes: list[int] = []
        for mid, reason in self.acks:
            if reason < 0x80:
                self.accepted_any = True
            pub = self.window.ack(mid)
            if pub is None:
                continue  # our own attribute / session-limit requests
            if reason >= 0x80:
                failed.append((pub, reason))
                continue
            self.refusals.accepted(pub)
            self.probe = False
            ranges.append((pub.priority, pub.first_id, pub.last_id))
            delivered += pub.count
            sizes.append(pub.size)
        self.acks.clear()
        if ranges:
            try:
                queues.mark_delivered_ranges(self.db, ranges)
            except sqlite3.Error:
                self.needs_reset = True  # the rows stay queued: send them again from the head
                raise
            self.delivered += delivered
            self.retry_backoff.reset()
            self.changed = True
        if sizes:
            self.limits.acked(sizes, self.db)
        for pub, reason in failed:
            self._refused(pub, reason, now)
        return bool(ranges)

    def _refused(self, pub: Publish, code: int, now: float) -> None:
        """MQTT 5 PUBACK >= 0x80: resend, split the batch, or dead-letter the one record (refusals.py)."""
        v = self.refusals.refused(pub, code, self.accepted_any)
        delay = 0.0 if code in PERMANENT else self.retry_backoff.next()
        what = f"a publish of {pub.count} records" if pub.count > 1 else f"outbox row {pub.first_id}"
        if v.action == DEAD_LETTER:
            row = self._row_of(pub)
            if row is not None:
                self.dead_letter(row, v.reason)
            self.caps.pop(pub.priority, None)
            delay = 0.0
        elif v.action == SHRINK:
            self.limits.refused_too_large(pub.size)
        elif v.action == SPLIT:
            self.isolate(pub, v.records)
            log.warning("the server refused %s %d times (%s): sending them at most %d at a time to find the one "
                        "it refuses", what, v.times, rc_name(code), v.records)
        if v.action != DEAD_LETTER:
            self.throttle.log(f"refused{code}", logging.WARNING, "the server refused %s: %s; it stays queued, "
                              "resending in %.1f s", what, rc_name(code), delay)
        self.report(f"publish refused by the server: {rc_name(code)}")
        self.paused_until = max(self.paused_until, now + delay)
        self.needs_reset = True
