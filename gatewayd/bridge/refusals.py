"""What to do when the server refuses a publish (MQTT 5 PUBACK reason code >= 0x80).

A refused batch is sent again; refused `REFUSALS_TO_SPLIT` times it is split in halves, and so
on, until the record the server refuses travels alone. That record is dead-lettered with the
server's reason code once refused `REFUSALS_TO_DEAD_LETTER` times — but only when the server
accepted some other publish in the same session: a server that refuses everything (a tenant
over its quota, say) says nothing about any one record, so nothing is dead-lettered and the
stall detector ends the silence instead. Codes that can never succeed for the same bytes
(topic name invalid, payload format invalid, packet too large) act at the first refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

from gatewayd.bridge.publisher import Publish

RC_PACKET_TOO_LARGE = 0x95
RC_NAMES = {
    0x80: "unspecified error", 0x83: "implementation specific error", 0x87: "not authorized",
    0x90: "topic name invalid", 0x91: "packet identifier in use", 0x95: "packet too large",
    0x97: "quota exceeded", 0x99: "payload format invalid",
}
PERMANENT = frozenset({0x90, RC_PACKET_TOO_LARGE, 0x99})
REFUSALS_TO_SPLIT = 2
REFUSALS_TO_DEAD_LETTER = 3
MAX_TRACKED = 10000  # refused batches remembered at most (each forgotten once accepted)

RESEND, SPLIT, SHRINK, DEAD_LETTER = "resend", "split", "shrink", "dead-letter"


def rc_name(code: int) -> str:
    return f"{RC_NAMES.get(code, 'refused')} (PUBACK reason code 0x{code:02X})"


@dataclass
class Verdict:
    action: str        # RESEND, SPLIT, SHRINK or DEAD_LETTER
    records: int = 0   # SPLIT: at most this many records per publish, up to the refused batch's last id
    reason: str = ""   # DEAD_LETTER: why, for the dead letter
    times: int = 0     # refusals of this batch so far


class Refusals:
    """Counts refusals per batch (by its first row) and decides when to split and to dead-letter."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], int] = {}

    def refused(self, pub: Publish, code: int, others_accepted: bool) -> Verdict:
        """`pub` was refused with `code`; `others_accepted`: the server accepted a publish this session."""
        key = (pub.priority, pub.first_id)
        if len(self.counts) >= MAX_TRACKED and key not in self.counts:
            self.counts.clear()
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        permanent = code in PERMANENT
        if pub.count > 1:
            if code == RC_PACKET_TOO_LARGE:
                del self.counts[key]
                return Verdict(SHRINK, times=n)
            if permanent or n >= REFUSALS_TO_SPLIT:
                del self.counts[key]
                return Verdict(SPLIT, records=max(1, pub.count // 2), times=n)
            return Verdict(RESEND, times=n)
        if permanent or (n >= REFUSALS_TO_DEAD_LETTER and others_accepted):
            del self.counts[key]
            said = "once" if n == 1 else f"{n} times"
            return Verdict(DEAD_LETTER, reason=f"the server refused this record {said}: {rc_name(code)}", times=n)
        return Verdict(RESEND, times=n)

    def accepted(self, pub: Publish) -> None:
        if self.counts:
            self.counts.pop((pub.priority, pub.first_id), None)
