"""The ledger and queue figures `gatewayctl status` shows and the supervisor sends to ThingsBoard.

One reading of `queues.db`, taken in one read transaction so the counters and the depths
belong to the same moment, and the two ways it is shown: the status document and telemetry.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from gatewayd.store import queues

LEDGER_KEYS = ("ingested", "delivered", "queued", "dead_lettered", "dropped")


@dataclass(frozen=True)
class Reading:
    counters: dict[str, int]
    inbound: int
    dead_letters: int
    oldest_created_ms: int | None

    def ledger(self) -> dict[str, Any]:
        """`ingested = delivered + queued + dead_lettered + dropped` (`balanced`), plus `archived`."""
        out: dict[str, Any] = {k: self.counters.get(k, 0) for k in (*LEDGER_KEYS, "archived")}
        out["balanced"] = out["ingested"] == sum(out[k] for k in LEDGER_KEYS[1:])
        return out

    def oldest_age_s(self, now_ms: int) -> float | None:
        return None if self.oldest_created_ms is None else round((now_ms - self.oldest_created_ms) / 1000, 3)

    def queues(self, controller: int, now_ms: int) -> dict[str, Any]:
        return {"controller": controller, "outbox": self.counters.get("outbox_rows", 0),
                "outbox_bytes": self.counters.get("outbox_bytes", 0), "inbound": self.inbound,
                "dead_letters": self.dead_letters, "oldest_queued_age_s": self.oldest_age_s(now_ms)}

    def telemetry(self, controller: int | None, now_ms: int) -> dict[str, Any]:
        """The `gw_` telemetry keys (docs/CONTRACT.md); the controller depth only when it could be read."""
        values: dict[str, Any] = {f"gw_{k}": self.counters.get(k, 0) for k in (*LEDGER_KEYS, "archived")}
        values.update(gw_queue_outbox=self.counters.get("outbox_rows", 0), gw_queue_inbound=self.inbound,
                      gw_queue_dead_letters=self.dead_letters)
        if controller is not None:
            values["gw_queue_controller"] = controller
        age = self.oldest_age_s(now_ms)
        values["gw_oldest_queued_age_s"] = 0.0 if age is None else max(0.0, age)
        return values


def read(conn: sqlite3.Connection) -> Reading:
    """Counters, inbound and dead-letter depths and the oldest outbox row, as of one moment."""
    conn.execute("BEGIN")
    try:
        return Reading(queues.counters(conn), queues.depth(conn, "inbound"), queues.depth(conn, "dead_letters"),
                       queues.oldest_created_ms(conn))
    finally:
        conn.execute("COMMIT")
