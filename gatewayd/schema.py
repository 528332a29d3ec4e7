"""Every configuration key: its type, its default, its check and whether it is a secret (`SCHEMA`).

`config.py` loads, merges and validates against it; `gatewayd --check-config`,
`scripts/gen-default-config.py` (the installed `/etc/gatewayd/gatewayd.toml`) and the
documentation follow it.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gatewayd import topics


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None
    secret: bool = False
    doc: str = ""


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else "must be between 1 and 65535"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be 0 or greater"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def _str_list(v: list[Any]) -> str | None:
    return None if all(isinstance(x, str) for x in v) else "must be a list of strings"


def _env_table(v: dict[str, Any]) -> str | None:
    bad = sorted(str(k) for k, x in v.items() if not isinstance(x, (str, int, float, bool)))
    return None if not bad else "values must be strings, numbers or booleans (not: " + ", ".join(bad) + ")"


def _command_patterns(v: list[Any]) -> str | None:
    """`run_command_allow`: each entry a command line (program, then argument patterns; `**` last)."""
    if not all(isinstance(x, str) for x in v):
        return "must be a list of strings"
    for entry in v:
        try:
            tokens = shlex.split(entry)
        except ValueError as e:
            return f"entry {entry!r} cannot be parsed: {e}"
        if not tokens or "*" in tokens[0] or "?" in tokens[0] or "[" in tokens[0]:
            return f"entry {entry!r} must start with a program name or path (no wildcards)"
        if "**" in tokens[1:-1]:
            return f"entry {entry!r}: '**' (any further arguments) may only be the last word"
    return None


def _str_dict(v: dict[str, Any]) -> str | None:
    return None if all(isinstance(x, str) for x in v.values()) else "values must be strings"


def _min(n: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v >= n else f"must be at least {n}"

    return check


def _range(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}"

    return check


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _listen_address(v: str) -> str | None:
    if not v:
        return None
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return "must be HOST:PORT (port 1-65535), or empty"
    return None


def listen_address(v: str) -> tuple[str, int]:
    """(host, port) of a checked HOST:PORT; an IPv6 host may be written in brackets."""
    host, _, port = v.rpartition(":")
    return host.strip("[]"), int(port)


def _ip_listen(v: str) -> str | None:
    """HOST:PORT with an IP address (IPv6 in brackets) or localhost: systemd's ListenStream=
    takes no host names."""
    problem = _listen_address(v)
    if problem or not v:
        return problem
    host = listen_address(v)[0]
    if host == "localhost":
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "the host must be an IP address (IPv6 in brackets) or localhost"
    return None


MIB = 1024 * 1024

SCHEMA: dict[str, dict[str, Key]] = {
    "thingsboard": {
        "host": Key(str, "localhost"),
        "port": Key(int, 1883, _port),
        "tls": Key(bool, False),
        "ca_cert": Key(str, ""),
        "client_cert": Key(str, "", doc="X.509 device certificate (PEM)"),
        "client_key": Key(str, "", doc="its private key (PEM); the path is shown, the file is never read into output"),
        "access_token": Key(str, "", secret=True),
        "device_name": Key(str, ""),
        "provision_device_key": Key(str, "", secret=True),
        "provision_device_secret": Key(str, "", secret=True),
        "mqtt_version": Key(str, "3.1.1", _one_of("3.1.1", "5")),
        "keepalive_s": Key(int, 60, _range(5, 65535), doc="MQTT's keep-alive field holds 16 bits"),
        "connect_timeout_s": Key((int, float), 10.0, _positive,
                                 doc="DNS lookup, TCP connect and TLS handshake each give up after this long"),
        "reconnect_max_s": Key((int, float), 5.0, _positive),
        "auth_backoff_s": Key((int, float), 300.0, _positive),
        "stall_timeout_s": Key((int, float), 60.0, _positive),
        "max_packet_bytes": Key(int, 65536, _min(1024)),
        "max_inflight": Key(int, 20, _min(1)),
        "rate_limit_per_s": Key((int, float), 0.0, _non_negative, doc="publishes per second, 0 = off"),
        "shared_keys": Key(list, [], _str_list),
        "client_keys": Key(list, [], _str_list),
    },
    "paths": {
        "state_dir": Key(str, "/var/lib/gatewayd"),
        "runtime_dir": Key(str, "/run/gatewayd"),
        "controller_data_dir": Key(str, "/var/lib/gatewayd/controller"),
    },
    "controller": {
        "enabled": Key(bool, True),
        "container_name": Key(str, "gatewayd-controller"),
        "image": Key(str, ""),
        "repository": Key(str, "", doc="local git repository built with docker build"),
        "dockerfile": Key(str, "Dockerfile"),
        "command": Key(list, [], _str_list),
        "environment": Key(dict, {}, _env_table, doc="values are treated as secrets: masked wherever shown"),
        "mounts": Key(list, [], _str_list),
        "network_mode": Key(str, "host"),
        "data_mount_target": Key(str, "/data"),
        "health_check_max_age_s": Key((int, float), 6 * 3600.0, _positive),
        "restart_backoff_initial_s": Key((int, float), 10.0, _positive),
        "restart_backoff_max_s": Key((int, float), 300.0, _positive),
        "update_grace_s": Key((int, float), 60.0, _positive),
        "restart_on_device": Key(list, [], _str_list),
        # additions for the supervisor (issue 5)
        "devices": Key(list, [], _str_list, doc="host device nodes passed into the container"),
        "poll_interval_s": Key((int, float), 1.0, _positive, doc="how often the container is inspected"),
        "stop_timeout_s": Key((int, float), 10.0, _non_negative),
        "restart_reset_after_s": Key((int, float), 300.0, _positive,
                                     doc="running this long clears the crash counter (backoff restarts small)"),
        "crash_loop_threshold": Key(int, 3, _min(1), doc="failures in a row reported as a crash loop"),
        "update_stable_s": Key((int, float), 10.0, _non_negative,
                               doc="a new version without HEALTHCHECK is good after running this long"),
        "image_name": Key(str, "", doc="repository name of built/loaded images; default: container_name"),
        "keep_images": Key(int, 2, _min(1), doc="images built/loaded by updates kept (the running and the "
                           "last good one always are); older ones are removed after each update"),
        "version": Key(str, "", doc="version of the configured image, reported before any update"),
        "build_network_mode": Key(str, "", doc="network of docker build RUN steps; empty: Docker's default"),
        "build_timeout_s": Key((int, float), 3600.0, _positive),
        "git_fetch": Key(bool, True, doc="git fetch when a requested version is not in the repository"),
        "ota_chunk_size": Key(int, 32768, _min(256)),
        "ota_window": Key(int, 4, _min(1), doc="OTA chunk requests in flight"),
        "ota_chunk_timeout_s": Key((int, float), 30.0, _positive),
    },
    "forwarder": {
        "batch_size": Key(int, 5000, _min(1)),
        "poll_interval_ms": Key(int, 20, _min(1)),
        "min_free_bytes": Key(int, 64 * MIB, _min(0), doc="below this much free space under state_dir "
                              "controller records wait in the controller queue (room for the ledger and replies)"),
        "reserve_bytes": Key(int, 8 * MIB, _min(0), doc="pre-allocated file in state_dir, released when the "
                             "disk is found full so that the daemons can still commit and restart"),
        "wait_for_clock": Key(str, "set", _one_of("set", "sync", "no"),
                              doc='"set": controller records wait while the system clock reads a time before 2025 '
                                  '(never set since boot); "sync": while the kernel says it is not synchronised; '
                                  '"no": never'),
        "wait_for_clock_max_s": Key((int, float), 600.0, _non_negative,
                                    doc="the longest such a wait lasts per boot; then records flow, flagged"),
    },
    "outbox": {
        "max_rows": Key(int, 5_000_000, _min(1)),
        "max_bytes": Key(int, 1024 * MIB, _min(4096)),
    },
    "archive": {
        "enabled": Key(bool, True),
        "max_bytes": Key(int, 2048 * MIB, _min(4096)),
        "retention_days": Key((int, float), 90.0, _positive),
    },
    # Applied by the forwarder before archive and outbox (gatewayd/privacy.py).
    "privacy": {
        "rules": Key(list, [], doc="[[privacy.rules]] match = key or glob, action = drop | redact | hash | round "
                                   "(digits = N); the first matching rule decides a key"),
        "drop_record_if": Key(list, [], doc="keys (or globs) whose presence drops the whole record"),
        "hash_key": Key(str, "", secret=True, doc="HMAC-SHA256 key of the hash action (at least 16 characters)"),
    },
    "supervisor": {
        "telemetry_interval_s": Key((int, float), 20.0, _positive),
        "run_command_allow": Key(list, [], _command_patterns,
                                 doc="command lines run_command may run: program, then argument patterns "
                                     "(* ? [..] within one argument; a last '**' allows any further arguments)"),
        "run_command_environment": Key(dict, {}, _str_dict, secret=True,
                                       doc="variables added to run_command's minimal environment (PATH, LANG)"),
        "run_command_timeout_s": Key((int, float), 30.0, _positive),
        # additions for the supervisor (issue 5)
        "run_command_max_output_bytes": Key(int, 16384, _min(256)),
        "rpc_reply_deadline_s": Key((int, float), 8.0, _positive,
                                    doc="slow commands reply 'running' after this and report the result later"),
        "rpc_dedup_window_s": Key((int, float), 3600.0, _positive),
        "reboot_command": Key(list, ["systemctl", "--no-block", "reboot"], _str_list),
        "shutdown_command": Key(list, ["systemctl", "--no-block", "poweroff"], _str_list),
        "restart_gateway_command": Key(list, ["systemctl", "--no-block", "restart", "gatewayd.target"], _str_list),
        "power_action_delay_s": Key((int, float), 15.0, _non_negative,
                                    doc="longest wait for the reply's delivery before reboot/shutdown/restart"),
        "udev": Key(bool, True, doc="report USB/serial devices and watch hot-plug"),
    },
    "files": {
        "allowed_roots": Key(list, [], _str_list, doc="default: the controller data directory"),
        "check_interval_s": Key((int, float), 10.0, _positive, doc="change detection of managed files"),
        "max_file_bytes": Key(int, 16 * MIB, _min(1),
                              doc="managed files larger than this are refused (never read nor hashed)"),
        "path_variables": Key(dict, {}, _str_dict,
                              doc="${NAME} in FILES paths: only these names (and CONTROLLER_DATA_DIR); "
                                  "the environment is never used"),
    },
    "logging": {
        "level": Key(str, "info", _one_of("debug", "info", "warning", "error")),
        "format": Key(str, "text", _one_of("text", "json"),
                      doc='"text", or "json": one JSON object per line on stderr, for log shippers'),
        "forward_level": Key(str, "warning", _one_of("debug", "info", "warning", "error", "critical", "off"),
                             doc='own log lines at this level and above go to ThingsBoard as telemetry; "off": none'),
        "forward_max_per_min": Key(int, 10, _min(0), doc="at most this many per minute, all daemons together; "
                                   "0 = none"),
        "forward_repeat_window_s": Key((int, float), 30.0, _positive,
                                       doc="similar lines within this window are sent once, then as "
                                           "'(repeated N times)'"),
    },
    # `gatewayd http` (/health, /metrics): socket-activated under systemd, read-only.
    "http": {
        "listen": Key(str, "127.0.0.1:9101", _ip_listen, doc="HOST:PORT of /health and /metrics; empty: off"),
        "idle_exit_s": Key((int, float), 120.0, _non_negative,
                           doc="socket-activated: exit after this long without a request (systemd keeps "
                               "listening and starts it again); 0 = never"),
        "max_connections": Key(int, 16, _min(1), doc="connections served at once; more are answered 503"),
        "request_timeout_s": Key((int, float), 10.0, _positive, doc="longest a request may take to arrive"),
    },
    # `gatewayd ingest` (issue 12): each adapter is off while its address is empty.
    "ingest": {
        "max_queue_rows": Key(int, 1_000_000, _min(1),
                              doc="controller queue depth above which ingest stops accepting (HTTP 503)"),
        "stall_timeout_s": Key((int, float), 60.0, _positive,
                               doc="commits failing this long stop the watchdog pings (not on a full disk, a "
                                   "lock, read-only or I/O errors: a restart cures none of those)"),
    },
    "ingest.mqtt": {
        "host": Key(str, "", doc="the local broker; empty: MQTT ingest off"),
        "port": Key(int, 1883, _port),
        "username": Key(str, ""),
        "password": Key(str, "", secret=True),
        "client_id": Key(str, "gatewayd-ingest", _non_empty, doc="fixed: the broker keeps its session"),
        "mqtt_version": Key(str, "5", _one_of("3.1.1", "5")),
        "topics": Key(list, [topics.TOPIC_TELEMETRY], _str_list, doc="telemetry, device format"),
        "attribute_topics": Key(list, [topics.TOPIC_ATTRIBUTES], _str_list,
                                doc="client attributes, device format"),
        "gateway_topics": Key(list, [topics.TOPIC_GATEWAY_TELEMETRY], _str_list, doc="telemetry, gateway format"),
        "gateway_attribute_topics": Key(list, [topics.TOPIC_GATEWAY_ATTRIBUTES], _str_list,
                                        doc="client attributes, gateway format"),
        "receive_maximum": Key(int, 1000, _range(1, 65535), doc="MQTT 5: unacknowledged messages in flight"),
        "session_expiry_s": Key(int, 604800, _range(1, 0xFFFFFFFF),
                                doc="MQTT 5: how long the broker keeps the session while ingest is away"),
        "keepalive_s": Key(int, 30, _range(5, 65535)),
        "reconnect_max_s": Key((int, float), 5.0, _positive),
    },
    "ingest.http": {
        "listen": Key(str, "", _listen_address, doc="HOST:PORT; empty: HTTP ingest off"),
        "max_body_bytes": Key(int, MIB, _min(256)),
        "bearer_token": Key(str, "", secret=True, doc="empty: no Authorization required"),
        "max_connections": Key(int, 32, _min(1)),
        "request_timeout_s": Key((int, float), 10.0, _positive,
                                 doc="longest a request may take to arrive, body included"),
    },
    "ingest.spool": {
        "directory": Key(str, "", doc="*.json / *.jsonl files renamed in; empty: spool ingest off"),
        "settle_s": Key((int, float), 2.0, _non_negative,
                        doc="a file found without a close/rename event must be unchanged this long"),
        "max_file_bytes": Key(int, 64 * MIB, _min(1024), doc="a larger .json file is renamed *.rejected"),
    },
}

INGEST_TOPIC_KEYS = ("topics", "attribute_topics", "gateway_topics", "gateway_attribute_topics")
