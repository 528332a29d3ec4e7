"""ThingsBoard device-API simulator for gatewayd tests, `make demo` and system tests.

A plain MQTT broker echoes a client's own publishes back to its matching subscriptions;
ThingsBoard never does.  This simulator therefore sits *between* the device and a real
mosquitto as a TCP-level MQTT proxy (MQTT 3.1, 3.1.1 and 5) and rewrites topics:

    device PUBLISH        v1/devices/me/<rest>      -> tb/<dev>/up/<rest>
                          v2/{sw,fw}/request/...    -> tb/<dev>/up/v2/{sw,fw}/request/...
                          /provision/request        -> tb/<dev>/up/provision/request
    device (UN)SUBSCRIBE  v1/devices/me/<rest>      -> tb/<dev>/down/<rest>
                          v2/...                    -> tb/<dev>/down/v2/...
                          /provision/response       -> tb/<dev>/down/provision/response
    broker PUBLISH        tb/<dev>/down/...         -> the device topic above

`<dev>` is the device name the access token (CONNECT username) maps to, with `%`, `/`,
`+`, `#` percent-encoded (see `topic_key`).  Provisioning sessions (username `provision`)
get a private key `__provision_<n>`.

The ThingsBoard logic is a paho client subscribed to `tb/+/up/#` on the same broker:
telemetry / attribute capture (re-published on `tb/<dev>/captured/{telemetry,attributes}`
and appended to `--capture FILE`), attribute requests, server-side and client-side RPC
(`getSessionLimits`), provisioning and OTA package chunks.

A loopback HTTP JSON API (`--control-port`) drives it; `SimulatorClient` wraps it:

    GET  /health                      {"ok", "listen_port", "topic_root", "broker_connected"}
    GET  /devices                     {"devices": [{"name","token","connected","shared","client"}]}
    GET  /telemetry?device=X[&limit=N] {"device","total","records":[{"ts","values","received_ms"}]}
    GET  /attributes?device=X         {"client":{...},"shared":{...}}
    GET  /stats[?device=X]            per-device counters (connects, attribute_requests, publishes,
                                      telemetry_records, ...), "global" and "faults"
    GET  /faults, /session_limits, /client_rpc?device=X
    POST /devices {name, token?}                  add a device (random token when omitted)
    POST /shared_attributes {device, values?, deleted?}
    POST /rpc {device, method, params, timeout?, persistent?}  -> {"id", "response"}; HTTP 504 on timeout.
                                      persistent (ThingsBoard's persistent RPC): sent again every
                                      PERSISTENT_RESEND_S while the device is connected and has not
                                      answered, so it survives a device that was offline or dropped it
    POST /faults {no_puback?, max_packet_bytes?, rate_limit?, refuse?, drop?, refuse_payloads?}
                                      refuse_payloads: [{"match": TEXT, "code": N}]: an MQTT 5 PUBLISH
                                      whose payload contains TEXT ("" = any) is answered with a PUBACK
                                      of reason code N and not forwarded
    POST /disconnect {device}                     close that device's session
    POST /package {device, title, version, data_b64|text|file, corrupt?, type: "sw"|"fw"}
    POST /client_rpc {method, response, device?}  canned reply to a client-side RPC
    POST /reset                                   zero the counters, forget captured records

Prints `tb_simulator ready listen=HOST:PORT control=HOST:PORT pid=N` on stdout once it
listens and is subscribed on the broker; SIGTERM/SIGINT stop it.  Only the Python standard
library and paho-mqtt (1.6.1 or 2.x) are used, and only relative imports, so the package runs
wherever its directory is copied: `python3 -m tbsim` with the directory holding `tbsim/` on
the path (`PYTHONPATH=tests`, or the system test's container), `python3 -m tests.tbsim` from
the repository root.

Modules, along the simulator's seams: `mqtt` (framing), `topics` (ThingsBoard's topics and
their rewriting), `state` (devices, packages, faults), `proxy` (the TCP proxy, one session per
device), `thingsboard` (ThingsBoard's logic), `control` (the HTTP API), `client` (its client),
`cli` (command line and start-up).
"""

from __future__ import annotations

from .cli import READY_LINE, main, parse_args
from .client import SimulatorClient, SimulatorError
from .topics import key_to_name, topic_key

__all__ = ["READY_LINE", "SimulatorClient", "SimulatorError", "key_to_name", "main", "parse_args", "topic_key"]
