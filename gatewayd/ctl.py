"""`gatewayctl`: the operator's view of a running gateway. Reads the stores; talks to no daemon."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gatewayd import dead_letters, redact
from gatewayd.clock import now_ms
from gatewayd.config import EX_CONFIG, Config, ConfigError, load
from gatewayd.daemon import read_runtime_status
from gatewayd.store import controller as controller_store
from gatewayd.store import dead_letters as dl_store
from gatewayd.store import queues
from gatewayd.store.db import corrupt_copies, file_identity, open_readonly
from gatewayd.store.errors import describe

DAEMONS = ("bridge", "forwarder", "supervisor", "ingest")
HEARTBEAT_MAX_AGE_S = 180.0

EXIT_OK, EXIT_DEGRADED, EXIT_UNREADABLE = 0, 1, 2


def _json(obj: Any) -> str:
    """JSON for output, registered secrets masked in every string (the JSON stays valid)."""
    return json.dumps(redact.redact_obj(obj), indent=2)


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def unit_states(cfg: Config) -> dict[str, str]:
    """systemd's ActiveState of each unit; without systemd, judged from the heartbeat files."""
    if _systemd_running():
        units = [f"gatewayd-{d}.service" for d in DAEMONS]
        try:
            out = subprocess.run(["systemctl", "is-active", *units], capture_output=True, text=True,
                                 timeout=10).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            out = []
        if len(out) == len(units):
            return dict(zip(DAEMONS, out, strict=True))
    states = {}
    for d in DAEMONS:
        hb = cfg.runtime_dir / f"{d}.heartbeat"
        try:
            pid = int(hb.read_text().split()[1])
            age = time.time() - hb.stat().st_mtime
            _alive(pid)
        except (OSError, ValueError, IndexError):
            states[d] = "inactive"
            continue
        states[d] = "active" if age <= HEARTBEAT_MAX_AGE_S else "stale"
    return states


def _alive(pid: int) -> None:
    """Raise OSError unless the process exists (one of another user counts: the HTTP endpoint
    runs as its own user)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass


def daemon_faults(cfg: Config) -> dict[str, Any]:
    """Each running daemon's current fault (from its runtime status file, which needs no database)
    and whether it still has a `queues.db` open that is no longer the one at its path."""
    current = file_identity(cfg.queues_db)
    faults: dict[str, str | None] = {}
    stale: list[str] = []
    for d in DAEMONS:
        st = read_runtime_status(cfg.runtime_dir, d)
        faults[d] = st.get("fault") if st else None
        held = (st or {}).get("files", {}).get("queues.db")
        if held and tuple(held) != current:
            stale.append(d)
    return {"faults": faults, "stale_queues_db": stale}


def _controller_view(cfg: Config) -> tuple[int | None, int | None, str | None]:
    """(depth, last health check, error): the controller's file may be locked, damaged or missing."""
    if not cfg.controller_db.exists():
        return 0, None, None
    try:
        cc = open_readonly(cfg.controller_db)
        try:
            return controller_store.depth(cc), controller_store.last_health_check_ms(cc), None
        finally:
            cc.close()
    except sqlite3.Error as e:
        return None, None, describe(e)


def collect(cfg: Config) -> dict[str, Any]:
    """Everything `status` shows; raises sqlite3.Error / OSError when the state cannot be read."""
    if not cfg.queues_db.exists():
        raise FileNotFoundError(f"{cfg.queues_db} does not exist (has the forwarder ever run?)")
    q = open_readonly(cfg.queues_db)
    try:
        c = queues.counters(q)
        state = queues.all_state(q)
        oldest = queues.oldest_created_ms(q)
        inbound = queues.depth(q, "inbound")
        dead = dl_store.summary(q)
    finally:
        q.close()
    controller_depth, last_health, controller_error = _controller_view(cfg)
    mqtt = {"connected": False, "since_ms": None, "last_puback_ms": None, "last_error": None}
    mqtt.update(state.get("bridge.mqtt") or {})
    ledger = queues.ledger(c)
    ledger["dropped_by_reason"] = queues.dropped_by_reason(c)
    controller = dict(state.get("supervisor.controller") or {})
    controller.setdefault("enabled", cfg["controller"]["enabled"])
    controller["last_health_check_ms"] = last_health
    controller["database_error"] = controller_error
    archive_bytes = cfg.archive_db.stat().st_size if cfg.archive_db.exists() else 0
    units = unit_states(cfg)
    faults = daemon_faults(cfg)
    return {
        "units": units,
        "mqtt": mqtt,
        "queues": {
            "controller": controller_depth,
            "outbox": c.get("outbox_rows", 0),
            "outbox_bytes": c.get("outbox_bytes", 0),
            "inbound": inbound,
            "dead_letters": dead["total"],
            "dead_letters_unacknowledged": dead["unacknowledged"],
            "oldest_queued_age_s": None if oldest is None else round((now_ms() - oldest) / 1000, 3),
        },
        "ledger": ledger,
        "totals": {"published": c.get("published", 0), "inbound": c.get("inbound_total", 0),
                   "requeued": c.get("requeued", 0), "purged": c.get("purged", 0)},
        "archive": {"bytes": archive_bytes},
        "controller": controller,
        "ingest": {"adapters": cfg.ingest_adapters()},
        "clock": clock_view(state.get("forwarder.clock") or {}, c),
        "errors": {d: queues.last_error(state, d) for d in DAEMONS},
        "daemons": {d: {"unit": units.get(d, "unknown"), "up": units.get(d) == "active",
                        **queues.daemon_report(state, d), "fault": faults["faults"][d]} for d in DAEMONS},
        "corrupt_files": corrupt_copies(cfg.state_dir, cfg.controller_data_dir),
        **faults,
    }


def clock_view(saved: dict[str, Any], c: dict[str, int]) -> dict[str, Any]:
    """The system clock now, and what the forwarder did about it (its saved clock history)."""
    from gatewayd.clock import system_clock

    r = system_clock().read()
    boots = saved.get("boots") or [{}]
    current = boots[-1] if boots[-1].get("boot_id") == r.boot_id else {}
    return {"synchronized": r.sync.synced if r.sync.known else None, "state": r.sync.describe(),
            "forwarder_waiting": bool(saved.get("waiting")),
            "steps_this_boot": max(0, len(current.get("segments") or [None]) - 1),
            "corrected": c.get("clock.corrected", 0), "forwarded_unsynchronized": c.get("clock.unsynced", 0)}


def degraded_reasons(st: dict[str, Any]) -> list[str]:
    # gatewayd-ingest is meant to be inactive while no adapter is configured.
    wanted = {d for d in st["units"] if d != "ingest" or st.get("ingest", {}).get("adapters")}
    reasons = [f"{d} is {s}" for d, s in st["units"].items() if s != "active" and d in wanted]
    if not st["mqtt"]["connected"]:
        reasons.append("MQTT disconnected" + (f" ({st['mqtt']['last_error']})" if st["mqtt"]["last_error"] else ""))
    if st["queues"]["dead_letters_unacknowledged"]:
        reasons.append(f"{st['queues']['dead_letters_unacknowledged']} unacknowledged dead letters "
                       "(gatewayctl dead-letters list, then requeue, purge or ack)")
    if not st["ledger"]["balanced"]:
        reasons.append("ledger does not add up")
    if st["corrupt_files"]:
        reasons.append(f"{len(st['corrupt_files'])} damaged database file(s) moved aside")
    reasons.extend(f"{d}: {fault}" for d, fault in st["faults"].items() if fault)
    reasons.extend(f"{d} still uses a queues.db that was replaced" for d in st["stale_queues_db"])
    if st.get("clock", {}).get("forwarder_waiting"):
        reasons.append("controller records wait for the system clock to be set")
    if st["controller"].get("database_error"):
        reasons.append(f"controller database unreadable: {st['controller']['database_error']}")
    return reasons


def _print_status(st: dict[str, Any], reasons: list[str]) -> None:
    m = st["mqtt"]
    q = st["queues"]
    led = st["ledger"]
    width = max(len(d) for d in st["daemons"])
    for d, info in st["daemons"].items():
        doing = info["doing"] or "-"
        if info["doing_ms"] and not info["up"]:
            doing = f"last seen {_clock(info['doing_ms'])}: {doing}"
        print(f"daemon:     {d:<{width}}  {info['unit']:<8}  {doing}")
        if info["fault"]:
            print(f"            {'':<{width}}  fault: {info['fault']}")
        if info["last_error"]:
            print(f"            {'':<{width}}  last error {_clock(info['last_error_ms'])}: {info['last_error']}")
    print(f"mqtt:       {'connected' if m['connected'] else 'disconnected'}"
          + (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(m['since_ms'] / 1000))}"
             if m["connected"] and m["since_ms"] else "")
          + (f", last error: {m['last_error']}" if m["last_error"] else ""))
    age = q["oldest_queued_age_s"]
    unacked = q["dead_letters_unacknowledged"]
    print(f"queues:     controller {q['controller']}, outbox {q['outbox']}, inbound {q['inbound']}, "
          f"dead letters {q['dead_letters']}" + (f" ({unacked} unacknowledged)" if unacked else "")
          + (f", oldest {age:.1f} s" if age is not None else ""))
    reasons_text = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in led.get("dropped_by_reason", {}).items() if n)
    print(f"ledger:     ingested {led['ingested']} = delivered {led['delivered']} + queued {led['queued']} "
          f"+ dead-lettered {led['dead_lettered']} + dropped {led['dropped']}"
          f"{f' ({reasons_text})' if reasons_text else ''}{'' if led['balanced'] else '  (DOES NOT ADD UP)'}")
    clk = st.get("clock") or {}
    if clk:
        print(f"clock:      {clk['state']}" + ("; controller records WAIT for it" if clk["forwarder_waiting"] else "")
              + (f"; {clk['corrected']} timestamps corrected" if clk["corrected"] else "")
              + (f"; {clk['forwarded_unsynchronized']} records forwarded unsynchronised"
                 if clk["forwarded_unsynchronized"] else ""))
    print(f"archive:    {st['archive']['bytes']} bytes")
    ctl = st["controller"]
    print(f"controller: {ctl.get('state', 'unknown') if ctl.get('enabled') else 'disabled'}")
    for f in st["corrupt_files"]:
        print(f"damaged:    {f}")
    print("health:     " + ("ok" if not reasons else "DEGRADED: " + "; ".join(reasons)))


def _clock(ms: int | None) -> str:
    return "?" if not ms else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def status_report(cfg: Config) -> tuple[int, dict[str, Any]]:
    """The `status --json` object and its exit code (0 healthy, 1 degraded, 2 unreadable);
    the HTTP endpoint serves the same object. Registered secrets are masked."""
    try:
        st = collect(cfg)
    except (sqlite3.Error, OSError) as e:
        return EXIT_UNREADABLE, redact.redact_obj({"error": f"cannot read gateway state: {e}", "healthy": False,
                                                   "units": unit_states(cfg), **daemon_faults(cfg)})
    st = redact.redact_obj(st)
    reasons = degraded_reasons(st)
    st["healthy"] = not reasons
    st["degraded_reasons"] = reasons
    return (EXIT_OK if not reasons else EXIT_DEGRADED), st


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    code, st = status_report(cfg)
    if args.json:
        print(_json(st))
    elif code == EXIT_UNREADABLE:
        print(f"gatewayctl: {st['error']}", file=sys.stderr)
        for d, fault in st["faults"].items():
            if fault:
                print(f"gatewayctl: {d}: {fault}", file=sys.stderr)
    else:
        _print_status(st, st["degraded_reasons"])
    return code


def act_as_state_owner(cfg: Config) -> None:
    """Run as root, become the owner of the state directory before writing under it.

    The daemons run as that user (gatewayd); a database or directory root created there
    would be one they cannot write. Like `sudo -u gatewayd`, and said on stderr. A state
    directory owned by root (daemons running as root) needs nothing.
    """
    if os.geteuid() != 0:
        return
    import pwd

    for d in (cfg.state_dir, cfg.controller_data_dir):
        try:
            st = os.stat(d)
        except OSError:
            continue
        uid, gid, why = st.st_uid, st.st_gid, f"the owner of {d}"
        break
    else:
        try:
            pw = pwd.getpwnam("gatewayd")
        except KeyError:
            return
        uid, gid, why = pw.pw_uid, pw.pw_gid, f"the daemons' user ({cfg.state_dir} does not exist yet)"
    if uid == 0:
        return
    try:
        name = pwd.getpwuid(uid).pw_name
        os.initgroups(name, gid)
    except KeyError:
        name = str(uid)
        os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    print(f"gatewayctl: running as root: acting as user {name} (uid {uid}), {why}, so that the daemons "
          "can write what it creates", file=sys.stderr)


def cmd_send(cfg: Config, args: argparse.Namespace) -> int:
    try:
        obj = json.loads(args.json_text)
    except ValueError as e:
        print(f"gatewayctl: not valid JSON: {e}", file=sys.stderr)
        return 2
    if isinstance(obj, dict) and not ("ts" in obj and "values" in obj):
        obj = {"ts": now_ms(), "values": obj}
    try:
        conn = controller_store.open_controller(cfg.controller_db)
        try:
            row_id = controller_store.enqueue(conn, args.type, json.dumps(obj))
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as e:
        print(f"gatewayctl: cannot queue the record: {describe(e)}", file=sys.stderr)
        return 1
    print(f"queued as controller row {row_id}")
    return 0


def cmd_check(cfg: Config, args: argparse.Namespace) -> int:
    from gatewayd import diagnostics

    results = diagnostics.run_all(cfg)
    if args.json:
        print(_json(diagnostics.as_dicts(results)))
    else:
        marks = {diagnostics.OK: " ok ", diagnostics.WARN: "warn", diagnostics.FAIL: "FAIL"}
        for r in results:
            print(redact.redact(f"[{marks[r.outcome]}] {r.name}: {r.detail}"))
    return 1 if any(r.outcome == diagnostics.FAIL for r in results) else 0


def _journal(lines: int) -> str:
    if not shutil.which("journalctl"):
        return "journalctl not available\n"
    cmd = ["journalctl", "--no-pager", "-o", "short-iso-precise", "-n", str(lines),
           *[f"--unit=gatewayd-{d}.service" for d in DAEMONS], "-t", "gatewayd-watchdog"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"journalctl failed: {e}\n"
    return r.stdout + r.stderr


def _dead_letter_sample(cfg: Config, limit: int = 200) -> list[dict[str, Any]]:
    return list(dead_letters.listing(cfg, limit, 2000)["dead_letters"])


def cmd_support_bundle(cfg: Config, args: argparse.Namespace) -> int:
    """A tarball an operator can mail to support: nothing secret, everything useful."""
    import io
    import platform
    import tarfile

    from gatewayd import __version__, diagnostics
    from gatewayd.config import render_toml

    out = Path(args.output or f"gatewayd-support-{platform.node()}-{time.strftime('%Y%m%dT%H%M%S')}.tar.gz")
    files: dict[str, str] = {}
    try:
        files["status.json"] = _json(collect(cfg))
    except (sqlite3.Error, OSError) as e:
        files["status.json"] = _json({"error": f"cannot read gateway state: {e}"})
    files["config.toml"] = f"# sources: {', '.join(cfg.sources)}\n" + render_toml(cfg.masked())
    files["check.json"] = _json(diagnostics.as_dicts(diagnostics.run_all(cfg)))
    files["journal.txt"] = _journal(args.journal_lines)
    try:
        files["dead_letters.json"] = _json(_dead_letter_sample(cfg))
    except sqlite3.Error as e:
        files["dead_letters.json"] = _json({"error": str(e)})
    files["version.txt"] = (f"gatewayd {__version__}\npython {platform.python_version()}\n"
                            f"platform {platform.platform()}\n")
    stamp = time.time()
    with tarfile.open(out, "w:gz") as tar:
        for name, text in files.items():
            data = (text if name.endswith(".json") else redact.redact(text)).encode()
            info = tarfile.TarInfo(f"gatewayd-support/{name}")
            info.size, info.mtime, info.mode = len(data), int(stamp), 0o600
            tar.addfile(info, io.BytesIO(data))
    os.chmod(out, 0o600)
    print(f"wrote {out}")
    return 0


def _preview(message: Any, width: int = 100) -> str:
    text = json.dumps(message, ensure_ascii=False)[1:-1] if isinstance(message, str) else repr(message)
    return text if len(text) <= width else text[:width - 1] + "…"


def cmd_dl_list(cfg: Config, args: argparse.Namespace) -> int:
    out = dead_letters.listing(cfg, args.limit)
    if args.json:
        print(_json(out))
        return 0
    rows = out["dead_letters"]
    print(f"dead letters: {out['total']} ({out['unacknowledged']} unacknowledged)"
          + (f"; the newest {len(rows)} below" if len(rows) < out["total"] else ""))
    for r in rows:
        mark = " " if r["acknowledged"] else "*"
        print(redact.redact(f"{mark}{r['id']:>8}  {_clock(r['created_ms'])}  {r['stage']:<9}  {str(r['type']):<10}  "
                            f"{r['reason']}"))
        print(redact.redact(f"{'':>11}{_preview(r['message'])}"))
    if out["unacknowledged"]:
        print("(* = not acknowledged yet: gatewayctl dead-letters ack)")
    return 0


def cmd_dl_show(cfg: Config, args: argparse.Namespace) -> int:
    row = dead_letters.show(cfg, args.id)
    if row is None:
        print(f"gatewayctl: no dead letter {args.id}", file=sys.stderr)
        return 1
    if args.json:
        print(_json(row))
        return 0
    for key in ("id", "stage", "src_id", "type", "reason", "created_ms", "ledger_record", "topic", "priority",
                "acknowledged", "message_length", "raw_bytes", "raw_size"):
        value = row[key]
        if key == "created_ms":
            value = f"{value} ({_clock(value)})"
        print(redact.redact(f"{key + ':':<16}{value}"))
    print("message:")
    print(redact.redact(row["message"] if isinstance(row["message"], str) else repr(row["message"])))
    return 0


def _dl_ids(args: argparse.Namespace) -> list[int] | None:
    if args.all == bool(args.ids):
        raise dead_letters.DeadLetterError("name dead letters by ID, or give --all (not both)")
    return None if args.all else list(args.ids)


def _ledger_line(led: dict[str, Any]) -> str:
    return (f"ledger: ingested {led['ingested']} = delivered {led['delivered']} + queued {led['queued']} + "
            f"dead-lettered {led['dead_lettered']} + dropped {led['dropped']}"
            + ("" if led["balanced"] else "  (DOES NOT ADD UP)"))


def _dl_report(cfg: Config, out: dict[str, Any], verb: str, count: int) -> int:
    print(f"{verb} {count} dead letter{'s' if count != 1 else ''}" + (
        f" ({out['to_controller_queue']} into the controller queue, {out['to_outbox']} into the outbox, "
        f"{out['to_inbound']} into the inbound queue)"
        if "to_outbox" in out and count else ""))
    for r in out.get("refused", []):
        print(redact.redact(f"gatewayctl: dead letter {r['id']} not requeued: {r['reason']}"), file=sys.stderr)
    if out["not_found"]:
        print(f"gatewayctl: no dead letter {', '.join(map(str, out['not_found']))}", file=sys.stderr)
    print(_ledger_line(out["ledger"]))
    return 1 if out["not_found"] or out.get("refused") else 0


def cmd_dl_requeue(cfg: Config, args: argparse.Namespace) -> int:
    out = dead_letters.requeue(cfg, _dl_ids(args))
    return _dl_report(cfg, out, "requeued", out["requeued"])


def cmd_dl_purge(cfg: Config, args: argparse.Namespace) -> int:
    if args.before is not None:
        if args.all or args.ids:
            raise dead_letters.DeadLetterError("--before cannot be combined with IDs or --all")
        out = dead_letters.purge(cfg, before_ms=dead_letters.parse_before(args.before))
    else:
        ids = _dl_ids(args)
        out = dead_letters.purge(cfg, ids, everything=ids is None)
    return _dl_report(cfg, out, "purged", out["purged"])


def cmd_dl_ack(cfg: Config, args: argparse.Namespace) -> int:
    out = dead_letters.ack(cfg)
    print(f"acknowledged the dead letters up to id {out['acked_id']} ({out['total']} kept, "
          f"{out['unacknowledged']} unacknowledged)")
    return 0


def _dead_letter_commands(sub: Any) -> None:
    dl = sub.add_parser("dead-letters", help="list, show, requeue, purge or acknowledge refused records")
    dsub = dl.add_subparsers(dest="dl_command", required=True, metavar="{list,show,requeue,purge,ack}")
    s = dsub.add_parser("list", help="the newest dead letters and their reasons")
    s.add_argument("--json", action="store_true")
    s.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    s.set_defaults(func=cmd_dl_list)
    s = dsub.add_parser("show", help="one dead letter in full")
    s.add_argument("id", type=int)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_dl_show)
    s = dsub.add_parser("requeue", help="send back through validation (a still invalid record returns)")
    s.add_argument("ids", type=int, nargs="*", metavar="ID")
    s.add_argument("--all", action="store_true")
    s.set_defaults(func=cmd_dl_requeue, writes_state=True)
    s = dsub.add_parser("purge", help="delete for good (ledger records count as dropped)")
    s.add_argument("ids", type=int, nargs="*", metavar="ID")
    s.add_argument("--all", action="store_true")
    s.add_argument("--before", metavar="DATE",
                   help="those dead-lettered before DATE (YYYY-MM-DD[THH:MM[:SS]][+HH:MM], local time; "
                        "or epoch ms)")
    s.set_defaults(func=cmd_dl_purge, writes_state=True)
    s = dsub.add_parser("ack", help="mark every dead letter present as seen (ends the degraded state)")
    s.set_defaults(func=cmd_dl_ack, writes_state=True)
    for sp in dsub.choices.values():
        sp.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatewayctl", description="Inspect and operate a gatewayd installation.")
    p.add_argument("--config", help="main config file (default: $GATEWAYD_CONFIG or /etc/gatewayd/gatewayd.toml)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("status", help="units, MQTT, queues, ledger; exit 0 healthy, 1 degraded, 2 unreadable")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("send", help="enqueue a record exactly as a controller would")
    s.add_argument("--type", default="telemetry", choices=["telemetry", "attributes"])
    s.add_argument("json_text", metavar="JSON",
                   help='{"ts": ms, "values": {...}}, or a bare object of values stamped with the current time')
    s.set_defaults(func=cmd_send, writes_state=True)
    s = sub.add_parser("check", help="diagnostics: config, broker, TLS, credentials, Docker, disk, clock, journal")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("support-bundle", help="tarball of status, masked config, journal, queue statistics")
    s.add_argument("-o", "--output", help="file to write (default: gatewayd-support-<host>-<time>.tar.gz)")
    s.add_argument("--journal-lines", type=int, default=5000)
    s.set_defaults(func=cmd_support_bundle)
    for sp in sub.choices.values():
        sp.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
    _dead_letter_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load(getattr(args, "sub_config", None) or args.config)
    except ConfigError as e:
        for line in e.problems:
            print(f"gatewayctl: config: {line}", file=sys.stderr)
        return EX_CONFIG
    redact.register_config(cfg)
    if getattr(args, "writes_state", False):
        act_as_state_owner(cfg)
    try:
        return int(args.func(cfg, args))
    except dead_letters.DeadLetterError as e:
        print(f"gatewayctl: {e}", file=sys.stderr)
        return 2
    except (sqlite3.Error, OSError) as e:
        print(redact.redact(f"gatewayctl: cannot use the gateway state: {e}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
