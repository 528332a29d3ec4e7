"""The ledger and queue figures the supervisor sends to ThingsBoard (`gw_*` telemetry).

Made of the store functions `gatewayctl status` uses (`queues.counters`, `queues.ledger`,
`queues.depth`, `queues.oldest_created_ms`, `controller.depth`), read in one read
transaction so that the counters and the depths belong to the same moment.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from gatewayd.store import dead_letters as dl_store
from gatewayd.store import queues


@dataclass(frozen=True)
class Reading:
    counters: dict[str, int]
    inbound: int
    dead_letters: int
    dead_letters_unacknowledged: int
    oldest_created_ms: int | None

    def telemetry(self, controller: int | None, now_ms: int) -> dict[str, Any]:
        """The `gw_` telemetry keys (docs/CONTRACT.md); the controller depth only when it could be read."""
        values: dict[str, Any] = {f"gw_{k}": v for k, v in queues.ledger(self.counters).items() if k != "balanced"}
        values.update({f"gw_dropped_{reason}": n for reason, n in queues.dropped_by_reason(self.counters).items()})
        values.update(gw_queue_outbox=self.counters.get("outbox_rows", 0), gw_queue_inbound=self.inbound,
                      gw_queue_dead_letters=self.dead_letters,
                      gw_queue_dead_letters_unacknowledged=self.dead_letters_unacknowledged)
        if controller is not None:
            values["gw_queue_controller"] = controller
        oldest = self.oldest_created_ms
        values["gw_oldest_queued_age_s"] = 0.0 if oldest is None else max(0.0, round((now_ms - oldest) / 1000, 3))
        return values


def read(conn: sqlite3.Connection) -> Reading:
    """Counters, inbound and dead-letter depths (all, and not yet acknowledged) and the oldest outbox row,
    as of one moment."""
    conn.execute("BEGIN")
    try:
        dead = dl_store.summary(conn)
        return Reading(queues.counters(conn), queues.depth(conn, "inbound"), dead["total"], dead["unacknowledged"],
                       queues.oldest_created_ms(conn))
    finally:
        conn.execute("COMMIT")
