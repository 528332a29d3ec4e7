"""Prometheus metrics from the `gatewayctl status` object, read afresh at each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

LEDGER_KINDS = ("ingested", "delivered", "queued", "dead_lettered", "dropped")
QUEUES = ("controller", "outbox", "inbound", "dead_letters")

Report = Callable[[], tuple[int, dict[str, Any]]]


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value or 0))


def _labelled(name: str, doc: str, label: str, values: dict[str, Any]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        g.add_metric([key], float(value or 0))
    return g


class StatusCollector:
    """A custom collector: each scrape asks `report()` (the status object and its exit code)."""

    def __init__(self, report: Report):
        self.report = report

    def describe(self) -> list[Metric]:
        return []  # nothing at registration time: the stores are read only when scraped

    def collect(self) -> Iterator[Metric]:
        code, st = self.report()
        units = dict(st.get("units") or {})
        if "ingest" in units and not (st.get("ingest") or {}).get("adapters"):
            del units["ingest"]  # inactive on purpose without an adapter: not a unit that is down
        yield _labelled("gatewayd_unit_up", "1 while the daemon's unit is active", "unit",
                        {u: s == "active" for u, s in units.items()})
        readable = "error" not in st
        yield _gauge("gatewayd_state_readable", "1 when the gateway's databases could be read", readable)
        yield _gauge("gatewayd_healthy", "1 when gatewayctl status would exit 0", code == 0)
        if not readable:
            return
        ledger = st["ledger"]
        yield _labelled("gatewayd_ledger_records", "records by where they are: ingested = delivered + queued + "
                        "dead_lettered + dropped", "kind", {k: ledger.get(k, 0) for k in LEDGER_KINDS})
        yield _gauge("gatewayd_ledger_balanced", "1 while the ledger adds up", ledger.get("balanced"))
        yield _labelled("gatewayd_dropped_records", "the part of the dropped records each reason accounts for",
                        "reason", ledger.get("dropped_by_reason") or {})
        clock = st.get("clock") or {}
        if clock.get("synchronized") is not None:
            yield _gauge("gatewayd_clock_synchronized", "1 while the kernel says the system clock is synchronised",
                         clock["synchronized"])
        yield _gauge("gatewayd_clock_waiting", "1 while controller records wait for the system clock to be set",
                     clock.get("forwarder_waiting"))
        q = st["queues"]
        yield _labelled("gatewayd_queue_depth", "rows waiting in each queue", "queue", {k: q.get(k, 0) for k in QUEUES})
        yield _gauge("gatewayd_dead_letters_unacknowledged", "dead letters no operator has acknowledged yet",
                     q.get("dead_letters_unacknowledged"))
        yield _gauge("gatewayd_outbox_bytes", "payload bytes in the outbox", q.get("outbox_bytes"))
        yield _gauge("gatewayd_oldest_queued_age_seconds", "age of the oldest outbox row (0 when empty)",
                     q.get("oldest_queued_age_s"))
        mqtt = st["mqtt"]
        yield _gauge("gatewayd_mqtt_connected", "1 while the bridge's MQTT session is up", mqtt.get("connected"))
        totals = st.get("totals") or {}
        yield CounterMetricFamily("gatewayd_publish_records", "outbox rows the broker acknowledged",
                                  value=float(totals.get("published", 0)))
        yield CounterMetricFamily("gatewayd_inbound_messages", "messages received from ThingsBoard",
                                  value=float(totals.get("inbound", 0)))
        yield _gauge("gatewayd_archive_bytes", "size of the archive database", (st.get("archive") or {}).get("bytes"))
        yield _gauge("gatewayd_damaged_files", "damaged database files moved aside", len(st.get("corrupt_files") or []))
        errors = GaugeMetricFamily("gatewayd_last_error_timestamp_seconds",
                                   "when each daemon last recorded an error (absent: never)", labels=["daemon"])
        for daemon, info in (st.get("daemons") or {}).items():
            if info.get("last_error_ms"):
                errors.add_metric([daemon], info["last_error_ms"] / 1000)
        yield errors


def registry(report: Report) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(report))
    return reg
