"""ThingsBoard's MQTT device API as gatewayd speaks it: every topic once, the builders of the
numbered ones and the parsers of what arrives (docs/CONTRACT.md, section 5).

The test peers (`tests/tbsim`, the tests themselves) spell these topics on their own on purpose:
they are the independent other side of the contract, not users of this module.
"""

from __future__ import annotations

import json
import re

TOPIC_TELEMETRY = "v1/devices/me/telemetry"
TOPIC_ATTRIBUTES = "v1/devices/me/attributes"  # client attributes out, shared attribute updates in
TOPIC_ATTRIBUTES_REQUEST = "v1/devices/me/attributes/request/"     # + request id
TOPIC_ATTRIBUTES_RESPONSE = "v1/devices/me/attributes/response/"   # + request id
TOPIC_RPC_REQUEST = "v1/devices/me/rpc/request/"    # + id: server-side requests in, client-side out
TOPIC_RPC_RESPONSE = "v1/devices/me/rpc/response/"  # + id: our replies out, answers to ours in
TOPIC_PROVISION_REQUEST = "/provision/request"
TOPIC_PROVISION_RESPONSE = "/provision/response"
PROVISION_USERNAME = "provision"  # the MQTT user name of a provisioning session
# ThingsBoard's gateway API (`{"<device>": [...]}`): what `gatewayd ingest` takes by default.
TOPIC_GATEWAY_TELEMETRY = "v1/gateway/telemetry"
TOPIC_GATEWAY_ATTRIBUTES = "v1/gateway/attributes"

# What the device session subscribes to after every (re)connect: sessions are not persistent.
SUBSCRIPTIONS = (
    TOPIC_RPC_REQUEST + "+",
    TOPIC_ATTRIBUTES,
    TOPIC_ATTRIBUTES_RESPONSE + "+",
    "v2/sw/response/+/chunk/+",
    "v2/fw/error",
    TOPIC_RPC_RESPONSE + "+",  # answers to client-side RPCs (getSessionLimits, ...)
)

_RPC_REQUEST = re.compile(r"v1/devices/me/rpc/request/([^/]+)")
_ATTRIBUTES_RESPONSE = re.compile(r"v1/devices/me/attributes/response/([^/]+)")
_OTA_CHUNK = re.compile(r"v2/(?:sw|fw)/response/([^/]+)/chunk/(\d+)")
_OTA_ERROR = re.compile(r"v2/(?:sw|fw)/error")


def rpc_request(request_id: str | int) -> str:
    """A client-side RPC request (ours to the server)."""
    return f"{TOPIC_RPC_REQUEST}{request_id}"


def rpc_response(request_id: str | int) -> str:
    """The reply to server-side RPC `request_id`, or the server's answer to ours."""
    return f"{TOPIC_RPC_RESPONSE}{request_id}"


def attributes_request(request_id: str | int, shared: list[str], client: list[str] | None = None
                       ) -> tuple[str, str] | None:
    """(topic, payload) asking for attribute values; None when no key is named.

    ThingsBoard wants comma-separated strings, not arrays: `{"sharedKeys":"a,b","clientKeys":"c"}`.
    """
    body: dict[str, str] = {}
    if shared:
        body["sharedKeys"] = ",".join(shared)
    if client:
        body["clientKeys"] = ",".join(client)
    if not body:
        return None
    return f"{TOPIC_ATTRIBUTES_REQUEST}{request_id}", json.dumps(body, separators=(",", ":"))


def sw_chunk_request(request_id: str, chunk: int) -> str:
    """Asks for chunk `chunk` (from 0) of the software package; the payload is the chunk size."""
    return f"v2/sw/request/{request_id}/chunk/{chunk}"


def rpc_request_id(topic: str) -> str | None:
    """The id of a server-side RPC request arriving on `topic`, else None."""
    m = _RPC_REQUEST.fullmatch(topic)
    return m.group(1) if m else None


def is_attributes_response(topic: str) -> bool:
    return _ATTRIBUTES_RESPONSE.fullmatch(topic) is not None


def is_rpc_response(topic: str) -> bool:
    """An answer to a client-side RPC, or (outgoing) one of our replies."""
    return topic.startswith(TOPIC_RPC_RESPONSE)


def sw_chunk(topic: str) -> tuple[str, int] | None:
    """(request id, chunk number) of a software (or firmware) package chunk, else None."""
    m = _OTA_CHUNK.fullmatch(topic)
    return (m.group(1), int(m.group(2))) if m else None


def is_ota_error(topic: str) -> bool:
    return _OTA_ERROR.fullmatch(topic) is not None
