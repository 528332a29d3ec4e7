"""What the ingest tests and `scripts/bench_ingest.py` share: configs, a QoS 1 publisher that
republishes whatever the broker has not acknowledged, and readers of the controller queue."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from tests.helpers.daemons import wait_for, write_config

TOPIC = "v1/devices/me/telemetry"


def ingest_config(base: Path, *, mqtt_port: int | None = None, http_port: int | None = None,
                  spool: Path | None = None, tb_port: int | None = None, token: str = "ingest-token",
                  **sections: dict[str, Any]) -> Path:
    """A config under `base` with the adapters given switched on (and the bridge pointed at `tb_port`)."""
    data: dict[str, dict[str, Any]] = {}
    if mqtt_port is not None:
        data["ingest.mqtt"] = {"host": "127.0.0.1", "port": mqtt_port, "reconnect_max_s": 1.0}
    if http_port is not None:
        data["ingest.http"] = {"listen": f"127.0.0.1:{http_port}"}
    if spool is not None:
        data["ingest.spool"] = {"directory": str(spool), "settle_s": 1.0}
    if tb_port is not None:
        data["thingsboard"] = {"host": "127.0.0.1", "port": tb_port, "access_token": token, "reconnect_max_s": 1.0}
    for name, keys in sections.items():
        data.setdefault(name.replace("__", "."), {}).update(keys)
    return write_config(base, data)


def batch_payload(first: int, n: int) -> str:
    """ThingsBoard device format: an array of n records with seq first .. first+n-1."""
    return "[" + ",".join(f'{{"ts":{1_700_000_000_000 + s},"values":{{"seq":{s},"t":21.5}}}}'
                          for s in range(first, first + n)) + "]"


def controller_rows(base: Path) -> list[tuple[str, Any]]:
    path = base / "controller" / "communication_queue.db"
    if not path.exists():
        return []
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return list(c.execute("SELECT type, message FROM messages ORDER BY id"))
    except sqlite3.OperationalError:
        return []
    finally:
        c.close()


def queued_seqs(base: Path) -> list[int]:
    """`values.seq` of every record waiting in the controller queue, in queue order."""
    out = []
    for _type, message in controller_rows(base):
        try:
            out.append(json.loads(message)["values"]["seq"])
        except (ValueError, KeyError, TypeError):
            pass
    return out


class Publisher:
    """A QoS 1 publisher like a field device: it keeps every message the broker has not
    acknowledged and publishes it again after a reconnect (at least once)."""

    def __init__(self, host: str, port: int, client_id: str = "ingest-test-publisher", max_inflight: int = 100):
        import paho.mqtt.client as mqtt

        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": mqtt.MQTTv311, "clean_session": True}
        if hasattr(mqtt, "CallbackAPIVersion"):
            kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION2
        self.client = mqtt.Client(**kwargs)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 1)  # whole seconds: what paho 2 declares
        self.lock = threading.Condition()
        self.unacked: dict[int, tuple[str, str]] = {}   # mid -> (topic, payload)
        self.early: set[int] = set()
        self.connected = threading.Event()
        self.connects = 0
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()
        if not self.connected.wait(10):
            self.close()
            raise TimeoutError(f"publisher: no connection to {host}:{port}")

    def _on_connect(self, *args: Any) -> None:
        rc = args[3]
        if int(getattr(rc, "value", rc) or 0) != 0:
            return
        with self.lock:
            self.connects += 1
            again = list(self.unacked.values()) if self.connects > 1 else []
            if again:
                self.unacked.clear()
        self.connected.set()
        for topic, payload in again:
            self.publish(topic, payload)

    def _on_disconnect(self, *_args: Any) -> None:
        self.connected.clear()

    def _on_publish(self, *args: Any) -> None:
        # paho may call this before publish() returned the mid (it holds its own lock here,
        # so ours is never held around client.publish).
        with self.lock:
            if self.unacked.pop(args[2], None) is None:
                self.early.add(args[2])
            self.lock.notify_all()

    def publish(self, topic: str, payload: str) -> None:
        """Queue one message; without a connection it is kept and sent again by _on_connect."""
        info = self.client.publish(topic, payload, qos=1)
        with self.lock:
            if info.mid in self.early:
                self.early.discard(info.mid)
            else:
                self.unacked[info.mid] = (topic, payload)

    def wait_acked(self, timeout: float) -> None:
        with self.lock:
            if not self.lock.wait_for(lambda: not self.unacked, timeout):
                raise TimeoutError(f"publisher: {len(self.unacked)} messages without PUBACK after {timeout} s")

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.client.loop_stop()


def publish_stream(pub: Publisher, total: int, per_message: int, topic: str = TOPIC, first: int = 0,
                   pause_every: int = 0, pause_s: float = 0.0) -> None:
    """Publish records first .. first+total-1, `per_message` to a message."""
    end = first + total
    for i, start in enumerate(range(first, end, per_message)):
        pub.publish(topic, batch_payload(start, min(per_message, end - start)))
        if pause_every and i % pause_every == pause_every - 1:
            time.sleep(pause_s)


__all__ = ["wait_for"]
