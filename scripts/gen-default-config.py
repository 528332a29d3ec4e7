#!/usr/bin/env python3
"""Write the commented default /etc/gatewayd/gatewayd.toml the Debian package ships.

Every key of `gatewayd.schema.SCHEMA` appears, commented out, with its default, so the file
can never drift from the code.  Used by debian/rules; run from the repository root:

    python3 scripts/gen-default-config.py > gatewayd.toml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gatewayd.config import render_toml
from gatewayd.schema import SCHEMA

HEADER = """\
# /etc/gatewayd/gatewayd.toml: main configuration of gatewayd (see gatewayd(8)).
#
# Every setting is commented out and shows its default.  Files in
# /etc/gatewayd/conf.d/*.toml are merged over this file in lexical order; prefer a
# drop-in there (say conf.d/50-site.toml) to editing this file.  Strings may use ${VAR}
# and ${VAR:-default}.  The environment variables THINGSBOARD_HOST, THINGSBOARD_PORT,
# THINGSBOARD_ACCESS_TOKEN, THINGSBOARD_PROVISION_DEVICE_KEY,
# THINGSBOARD_PROVISION_DEVICE_SECRET, THINGSBOARD_DEVICE_NAME, THINGSBOARD_CA_CERT and
# GATEWAYD_STATE_DIR override the files (the services read /etc/default/gatewayd).
#
# After a change:  gatewayd --check-config  &&  systemctl restart gatewayd.target
#
# The package starts the services once the configuration names a way to authenticate
# (an access token, a provisioning key, a client certificate or saved credentials):
# systemctl enable --now gatewayd.target   (or: dpkg-reconfigure gatewayd)
"""

SECTION_NOTES = {
    "ingest": (
        "gatewayd-ingest.service runs only while an adapter is on: [ingest.mqtt] host,\n"
        "[ingest.http] listen or [ingest.spool] directory set.  Then:\n"
        "  systemctl restart gatewayd.target"
    ),
    "paths": (
        "The services may write only below /var/lib/gatewayd and /run/gatewayd: a path\n"
        "outside needs a drop-in, e.g.  systemctl edit gatewayd-forwarder.service  with\n"
        "  [Service]\n"
        "  ReadWritePaths=/srv/controller"
    ),
    "privacy": (
        "Applied to every record's values before the archive and ThingsBoard see them.\n"
        "Each rule is a table of its own, the first whose match fits a key decides it:\n"
        "  [[privacy.rules]]\n"
        "  match = \"gps_*\"        # a key name or a glob (*, ?, [...])\n"
        "  action = \"round\"       # drop | redact | hash | round\n"
        "  digits = 3"
    ),
    "outbox": (
        "Disk caps: past them the oldest telemetry is dropped first and counted\n"
        "(ledger.dropped in gatewayctl status); attributes and RPC replies are never dropped."
    ),
}

KEY_NOTES = {
    ("thingsboard", "tls"): "Verify the server against ca_cert (or the system CAs); never plain text.",
    ("thingsboard", "client_key"): "Set client_cert and client_key both or neither.",
    ("thingsboard", "access_token"): (
        "Empty: use the saved credentials (<state_dir>/credentials.json), else provision\n"
        "with provision_device_key and provision_device_secret."),
    ("thingsboard", "device_name"): "Empty: $THINGSBOARD_DEVICE_NAME, then the hostname.",
    ("thingsboard", "mqtt_version"): '"3.1.1" or "5".',
    ("thingsboard", "reconnect_max_s"): (
        "Upper bound of the reconnect backoff after a transport failure: each wait is random\n"
        "between 0 and a cap that doubles from 0.5 s up to this. Many devices on one server:\n"
        "at least 3 x devices / (CONNECTs per second the server takes), e.g. 60 for 1000 at 50/s."),
    ("thingsboard", "auth_backoff_s"): "Backoff after the server refused the credentials.",
    ("thingsboard", "stall_timeout_s"): (
        "Connected with records waiting and no PUBACK for this long: the bridge stops\n"
        "feeding its systemd watchdog and is restarted."),
    ("thingsboard", "shared_keys"): "Requested after every (re)connect, besides sw_title, sw_version, FILES.",
    ("paths", "runtime_dir"): (
        "Heartbeat files for the fallback watchdog (keep GATEWAYD_RUNTIME_DIR in\n"
        "/etc/default/gatewayd in line)."),
    ("paths", "controller_data_dir"): "Bind-mounted into the controller container; holds communication_queue.db.",
    ("controller", "enabled"): "false: no Docker needed; the supervisor still runs commands.",
    ("supervisor", "run_command_allow"): "Commands (argv[0]) the run_command RPC may run; empty: disabled.",
    ("supervisor", "reboot_command"): (
        "Run as the user gatewayd; polkit (/usr/share/polkit-1/rules.d/50-gatewayd.rules)\n"
        "allows it to reboot, power off and restart the gatewayd units."),
    ("files", "allowed_roots"): "Roots managed files must live under; empty: the controller data directory.",
    ("logging", "level"): '"debug", "info", "warning" or "error".',
}


def comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()]


def render() -> str:
    out = HEADER.splitlines()
    for section, keys in SCHEMA.items():
        out.append("")
        if section in SECTION_NOTES:
            out += comment(SECTION_NOTES[section])
        out.append(f"[{section}]")
        for name, key in keys.items():
            note = KEY_NOTES.get((section, name)) or key.doc
            if note:
                out += comment(note[0].upper() + note[1:] if note else note)
            line = render_toml({section: {name: key.default}}).splitlines()[1]
            out.append(f"# {line}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
