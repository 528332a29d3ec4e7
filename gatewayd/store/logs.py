"""gatewayd's own log lines queued for ThingsBoard (what to send is decided in `gatewayd.logforward`).

The per-minute limit holds for all daemons together: the times of the lines queued in the
last minute are kept in the state table and read and written in the transaction that queues
the new ones.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from gatewayd import topics
from gatewayd.clock import now_ms
from gatewayd.store import queues
from gatewayd.store.db import transaction

STATE_KEY = "logging.forwarded"
WINDOW_MS = 60_000


def queue_log_lines(conn: sqlite3.Connection, lines: Sequence[tuple[int, dict[str, Any]]], max_per_min: int,
                    now: int | None = None) -> int:
    """Queue as many of `lines` (epoch ms, telemetry values) as the limit allows; returns how many.

    Rows get priority `PRIO_LOG` and stay out of the ledger. Each gets its own timestamp, after
    the last one queued by any daemon: ThingsBoard keeps one value per key and timestamp, so two
    lines in the same millisecond would otherwise overwrite each other.
    """
    now = now_ms() if now is None else now
    with transaction(conn):
        st = queues.get_state(conn, STATE_KEY) or {}
        sent = [t for t in st.get("sent_ms") or [] if isinstance(t, int) and now - WINDOW_MS < t <= now]
        last_ts = st.get("last_ts")
        last_ts = last_ts if isinstance(last_ts, int) and last_ts <= now + WINDOW_MS else 0  # clock stepped back
        take = max(0, min(len(lines), max_per_min - len(sent)))
        rows: list[queues.NewRow] = []
        for ms, values in lines[:take]:
            ts = max(ms, last_ts + 1)
            last_ts = ts
            payload = json.dumps({"ts": ts, "values": values}, ensure_ascii=True, allow_nan=False)
            rows.append((queues.PRIO_LOG, queues.KIND_TELEMETRY, topics.TOPIC_TELEMETRY, payload, ts, 0))
            sent.append(now)
        if rows:
            queues.append(conn, rows)
            queues.set_state(conn, STATE_KEY, {"sent_ms": sent, "last_ts": last_ts})
    return take
