"""ThingsBoard's device topics and their rewriting onto the broker's `<root>/<key>/{up,down}/...`."""

from __future__ import annotations

import re
import urllib.parse


def topic_key(device_name: str) -> str:
    """The topic level used for a device in `tb/<key>/...` (reversible, no wildcards)."""
    return (device_name.replace("%", "%25").replace("/", "%2F").replace("+", "%2B")
            .replace("#", "%23").replace("\0", "%00"))


def key_to_name(key: str) -> str:
    return urllib.parse.unquote(key)


# device topics ThingsBoard accepts for PUBLISH (v1/devices/me/ + rest)
_V1_UP_EXACT = {"telemetry", "attributes", "claim"}
_V1_UP_PREFIX = ("attributes/request/", "rpc/response/", "rpc/request/")
_OTA_REQUEST_RE = re.compile(r"^v2/(sw|fw)/request/[^/+#]+/chunk/\d+$")
# filters ThingsBoard accepts for SUBSCRIBE
_SUB_ALLOWED = {
    "v1/devices/me/attributes",
    "v1/devices/me/attributes/response/+",
    "v1/devices/me/rpc/request/+",
    "v1/devices/me/rpc/response/+",
    "v2/fw/response/+/chunk/+",
    "v2/sw/response/+/chunk/+",
    "v2/fw/error",
    "v2/sw/error",
    "/provision/response",
}
V1_PREFIX = "v1/devices/me/"


def map_up_topic(base: str, topic: str, provisioning: bool) -> str | None:
    """Device PUBLISH topic -> broker topic, None when ThingsBoard would not accept it."""
    if provisioning:
        return f"{base}/up/provision/request" if topic == "/provision/request" else None
    if topic.startswith(V1_PREFIX):
        rest = topic[len(V1_PREFIX):]
        if rest in _V1_UP_EXACT or (rest.startswith(_V1_UP_PREFIX) and "+" not in rest and "#" not in rest):
            return f"{base}/up/{rest}"
        return None
    if _OTA_REQUEST_RE.match(topic):
        return f"{base}/up/{topic}"
    return None


def map_down_filter(base: str, topic_filter: str) -> str | None:
    """Device SUBSCRIBE filter -> broker filter, None when ThingsBoard would refuse it."""
    if topic_filter not in _SUB_ALLOWED:
        return None
    if topic_filter.startswith(V1_PREFIX):
        return f"{base}/down/{topic_filter[len(V1_PREFIX):]}"
    if topic_filter == "/provision/response":
        return f"{base}/down/provision/response"
    return f"{base}/down/{topic_filter}"


def unmap_down_topic(prefix: str, topic: str) -> str:
    """Broker topic `tb/<key>/down/<rest>` -> device topic."""
    if not topic.startswith(prefix):
        return topic
    rest = topic[len(prefix):]
    if rest.startswith("v2/"):
        return rest
    if rest == "provision/response":
        return "/provision/response"
    return V1_PREFIX + rest
