"""The size of an MQTT PUBLISH, as every part of gatewayd judges it against `max_packet_bytes`.

One worst case for MQTT 3.1.1 and MQTT 5, counting the whole packet as MQTT 5's Maximum Packet
Size and mosquitto's `max_packet_size` do (ThingsBoard's limit counts less: the remaining length):

- fixed header: 1 byte, plus the remaining length, a variable byte integer of at most 4 bytes;
- topic name: 2 bytes of length, then its UTF-8 bytes;
- packet identifier: 2 bytes (gatewayd publishes with QoS 1);
- MQTT 5 only: the property length, 1 byte (gatewayd sends no PUBLISH properties);
- the payload's bytes.

So 10 bytes besides topic and payload. MQTT 3.1.1 needs 9 at most; the one byte more is kept for
it too, so that a record the forwarder accepted still fits when the bridge's protocol is switched
while it waits in the outbox, and the forwarder needs no protocol setting. A telemetry record
travelling in a JSON array with others costs one comma more, counted where arrays are built
(`bridge/publisher.plan`); a record alone goes without brackets.
"""

from __future__ import annotations

PUBLISH_OVERHEAD = 1 + 4 + 2 + 2 + 1


def utf8_len(text: str) -> int:
    """Bytes of `text` in UTF-8; O(1) for ASCII strings (CPython keeps that flag)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def packet_size(topic_bytes: int, payload_bytes: int) -> int:
    """Upper bound of the PUBLISH packet carrying a topic and a payload of these UTF-8 lengths."""
    return PUBLISH_OVERHEAD + topic_bytes + payload_bytes
