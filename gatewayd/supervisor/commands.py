"""RPC methods (docs/CONTRACT.md, section 6). Each returns a reply object, a `Deferred` (work finishing in the
background) or a `PowerAction` (reply first, act after)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gatewayd import __version__, dead_letters, privacy, topics
from gatewayd.clock import now_ms
from gatewayd.config import Config
from gatewayd.packet import packet_size, utf8_len
from gatewayd.store import archive as archive_store
from gatewayd.store import queues
from gatewayd.store.db import transaction
from gatewayd.supervisor import runcmd
from gatewayd.supervisor.docker_api import Docker
from gatewayd.supervisor.jobs import Future, Job, Jobs


class ControllerOps(Protocol):
    """What RPC methods may ask of the controller thread."""

    def restart(self, reason: str) -> Future: ...

    def stop_container(self) -> Future: ...

    def start_container(self) -> Future: ...

    def snapshot(self) -> dict[str, Any]: ...


@dataclass
class Context:
    """Everything an RPC method may use, and nothing more (methods never see the supervisor)."""

    cfg: Config
    jobs: Jobs
    controller: ControllerOps | None
    uptime_s: Callable[[], float]
    status_report: Callable[[], dict[str, Any]]
    sw_report: Callable[[], dict[str, Any]]
    init_files: Callable[[], Future]
    devices: Callable[[], dict[str, Any]]
    reply_budget: int  # bytes of JSON a reply may hold


class BadRequest(Exception):
    """Unknown method, bad params, or a request that cannot be carried out: an error reply."""


@dataclass
class Deferred:
    """A reply that waits for background work; `to_reply(result)` builds it."""

    waitable: Job | Future
    to_reply: Callable[[Any], dict[str, Any]]
    what: str


@dataclass
class PowerAction:
    reply: dict[str, Any]
    argv: list[str]
    action: str


Result = dict[str, Any] | Deferred | PowerAction


@dataclass
class Method:
    fn: Callable[[Context, Any], Result]
    doc: str
    params: dict[str, str] = field(default_factory=dict)


# -- parameter helpers -------------------------------------------------------------------

def _params(params: Any) -> dict[str, Any]:
    if params is None or params == "" or params == []:
        return {}
    if not isinstance(params, dict):
        raise BadRequest("params must be a JSON object")
    return params


def _int(p: dict[str, Any], name: str, required: bool = True, default: int | None = None,
         lo: int | None = None, hi: int | None = None) -> int:
    if name not in p or p[name] is None:
        if required:
            raise BadRequest(f"params.{name} is required")
        assert default is not None
        return default
    v = p[name]
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"params.{name} must be an integer")
    if lo is not None and v < lo:
        raise BadRequest(f"params.{name} must be at least {lo}")
    if hi is not None and v > hi:
        raise BadRequest(f"params.{name} must be at most {hi}")
    return v


def _need_controller(ctx: Context) -> Any:
    if ctx.controller is None:
        raise BadRequest("the controller is disabled ([controller] enabled = false)")
    return ctx.controller


# -- methods -----------------------------------------------------------------------------

def m_list(ctx: Context, params: Any) -> Result:
    return {"methods": {name: ({"doc": m.doc, "params": m.params} if m.params else {"doc": m.doc})
                        for name, m in sorted(METHODS.items())}}


def m_ping(ctx: Context, params: Any) -> Result:
    return {"pong": True, "ts": now_ms(), "uptime_s": round(ctx.uptime_s(), 1)}


def m_status(ctx: Context, params: Any) -> Result:
    return ctx.status_report()


def _controller_reply(ctx: Context, key: str) -> Callable[[Any], dict[str, Any]]:
    def build(result: Any) -> dict[str, Any]:
        snap = ctx.controller.snapshot() if ctx.controller is not None else {}
        return {key: True, "state": snap.get("state"), "restarts": snap.get("restarts")}

    return build


def m_restart_controller(ctx: Context, params: Any) -> Result:
    ctl = _need_controller(ctx)
    return Deferred(ctl.restart("requested by RPC restart_controller"), _controller_reply(ctx, "restarted"),
                    "restart_controller")


def m_stop_controller(ctx: Context, params: Any) -> Result:
    ctl = _need_controller(ctx)
    return Deferred(ctl.stop_container(), _controller_reply(ctx, "stopped"), "stop_controller")


def m_start_controller(ctx: Context, params: Any) -> Result:
    ctl = _need_controller(ctx)
    return Deferred(ctl.start_container(), _controller_reply(ctx, "started"), "start_controller")


def _power(ctx: Context, action: str, key: str) -> Result:
    argv = list(ctx.cfg["supervisor"][key])
    if not argv:
        raise BadRequest(f"{action} is disabled ([supervisor] {key} is empty)")
    if shutil.which(argv[0], path=runcmd.CLEAN_PATH) is None:
        raise BadRequest(f"cannot {action}: {argv[0]} not found")
    delay = ctx.cfg["supervisor"]["power_action_delay_s"]
    return PowerAction({"ok": True, "action": action, "command": argv,
                        "note": f"acting after this reply is delivered (at most {delay:.0f} s)"}, argv, action)


def m_reboot(ctx: Context, params: Any) -> Result:
    return _power(ctx, "reboot", "reboot_command")


def m_shutdown(ctx: Context, params: Any) -> Result:
    return _power(ctx, "shutdown", "shutdown_command")


def m_restart_gateway(ctx: Context, params: Any) -> Result:
    return _power(ctx, "restart_gateway", "restart_gateway_command")


def allowed_argv(cfg: Config, command: Any) -> list[str]:
    """The argv of an allowed command line (see runcmd.py); BadRequest naming why not."""
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise BadRequest(f"params.command cannot be parsed: {e}") from e
    elif isinstance(command, list) and all(isinstance(a, str) for a in command):
        argv = list(command)
    else:
        raise BadRequest("params.command must be a string or a list of strings")
    if not argv or not argv[0]:
        raise BadRequest("params.command is empty")
    allow = list(cfg["supervisor"]["run_command_allow"])
    if not allow:
        raise BadRequest("run_command is disabled ([supervisor] run_command_allow is empty)")
    try:
        return runcmd.check_argv(argv, allow)
    except runcmd.NotAllowed as e:
        raise BadRequest(str(e)) from e


def m_run_command(ctx: Context, params: Any) -> Result:
    p = _params(params)
    if "command" not in p:
        raise BadRequest("params.command is required")
    argv = allowed_argv(ctx.cfg, p["command"])
    limit = ctx.cfg["supervisor"]["run_command_timeout_s"]
    timeout = float(limit)
    if "timeout_s" in p:
        t = p["timeout_s"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise BadRequest("params.timeout_s must be a positive number")
        timeout = min(float(t), float(limit))
    max_out = ctx.cfg["supervisor"]["run_command_max_output_bytes"]
    env = runcmd.clean_env(ctx.cfg["supervisor"]["run_command_environment"])
    job = ctx.jobs.submit(f"run {os.path.basename(argv[0])}", runcmd.run, argv, timeout, max_out, "/", env)

    def reply(result: Any) -> dict[str, Any]:
        out = dict(result)
        out["command"] = argv
        out["job"] = job.id
        return out

    return Deferred(job, reply, "run_command")


def m_job_status(ctx: Context, params: Any) -> Result:
    p = _params(params)
    job = ctx.jobs.get(_int(p, "job", lo=1))
    if job is None:
        raise BadRequest("no such job (finished jobs are remembered for a while only)")
    return job.summary()


def m_init_files(ctx: Context, params: Any) -> Result:
    return Deferred(ctx.init_files(), dict, "init_files")


def _range(params: Any) -> tuple[int, int]:
    p = _params(params)
    start = _int(p, "start_timestamp_ms")
    end = _int(p, "end_timestamp_ms")
    if end < start:
        raise BadRequest("end_timestamp_ms must not be before start_timestamp_ms")
    return start, end


def _archive_enabled(ctx: Context) -> None:
    if not ctx.cfg["archive"]["enabled"]:
        raise BadRequest("the archive is disabled ([archive] enabled = false)")


def republish(cfg: Config, start: int, end: int, batch: int = 2000) -> dict[str, int]:
    """Put archived records with start <= ts < end back into the outbox as telemetry."""
    a = archive_store.open_archive(cfg.archive_db, check=False)
    q = queues.open_queues(cfg.queues_db, check=False)
    count = skipped = 0
    after: tuple[int, int] | None = None
    try:
        while True:
            rows = archive_store.page_range(a, start, end, after, batch)
            if not rows:
                break
            new: list[queues.NewRow] = []
            for rid, ts, _type, message in rows:
                after = (ts, rid)
                payload = archived_to_telemetry(ts, message)
                if payload is None:
                    skipped += 1
                    continue
                new.append((queues.PRIO_TELEMETRY, queues.KIND_TELEMETRY, topics.TOPIC_TELEMETRY, payload, ts, 0))
            with transaction(q):
                queues.append(q, new)
            count += len(new)
    finally:
        a.close()
        q.close()
    return {"count": count, "skipped": skipped}


def archived_to_telemetry(ts: int, message: Any) -> str | None:
    import json

    try:
        obj = json.loads(message)
    except (TypeError, ValueError):
        return None
    if isinstance(obj, dict) and "values" in obj and isinstance(obj["values"], dict):
        values = obj["values"]
        ts = obj.get("ts", ts) if isinstance(obj.get("ts"), int) else ts
    elif isinstance(obj, dict):
        values = obj  # an attributes record: its values object
    else:
        return None
    if not values:
        return None
    return json.dumps({"ts": ts, "values": values}, separators=(",", ":"), ensure_ascii=False)


def discard(cfg: Config, start: int, end: int, batch: int = 10000) -> dict[str, int]:
    a = archive_store.open_archive(cfg.archive_db, check=False)
    try:
        return {"count": archive_store.discard_range(a, start, end, batch)}
    finally:
        a.close()


def count(cfg: Config, start: int, end: int) -> dict[str, int]:
    a = archive_store.open_archive(cfg.archive_db, check=False)
    try:
        return {"count": archive_store.count_range(a, start, end)}
    finally:
        a.close()


def _archive_job(ctx: Context, name: str, fn: Callable[..., dict[str, int]], params: Any) -> Result:
    _archive_enabled(ctx)
    start, end = _range(params)
    job = ctx.jobs.submit(name, fn, ctx.cfg, start, end)
    return Deferred(job, lambda r: {**r, "start_timestamp_ms": start, "end_timestamp_ms": end}, name)


def m_archive_republish(ctx: Context, params: Any) -> Result:
    return _archive_job(ctx, "archive_republish_messages", republish, params)


def m_archive_discard(ctx: Context, params: Any) -> Result:
    return _archive_job(ctx, "archive_discard_messages", discard, params)


def m_archive_count(ctx: Context, params: Any) -> Result:
    return _archive_job(ctx, "archive_count_messages", count, params)


def fit_lines(lines: list[str], budget: int) -> tuple[list[str], bool]:
    """The newest lines that fit in `budget` bytes of JSON."""
    out: list[str] = []
    used = 0
    for line in reversed(lines):
        cost = len(line.encode()) + 8
        if used + cost > budget:
            return list(reversed(out)), True
        out.append(line)
        used += cost
    return list(reversed(out)), False


def _logs(cfg: Config, name: str, lines: int) -> list[str]:
    d = Docker(timeout_s=20)
    try:
        return d.logs(name, lines)
    finally:
        d.close()


def m_controller_logs(ctx: Context, params: Any) -> Result:
    _need_controller(ctx)
    p = _params(params)
    lines = _int(p, "lines", required=False, default=100, lo=1, hi=5000)
    name = ctx.cfg["controller"]["container_name"]
    job = ctx.jobs.submit("controller_logs", _logs, ctx.cfg, name, lines)
    budget = ctx.reply_budget - 200

    def reply(result: Any) -> dict[str, Any]:
        kept, truncated = fit_lines(list(result), budget)
        return {"container": name, "lines": kept, "truncated": truncated}

    return Deferred(job, reply, "controller_logs")


def m_sw_status(ctx: Context, params: Any) -> Result:
    return ctx.sw_report()


def m_system_info(ctx: Context, params: Any) -> Result:
    from gatewayd.supervisor.system import system_metrics

    info: dict[str, Any] = {"gatewayd": __version__, "python": sys.version.split()[0],
                            "platform": platform.platform(), "hostname": platform.node()}
    info.update(system_metrics(ctx.cfg.state_dir))
    return info


def m_devices(ctx: Context, params: Any) -> Result:
    return ctx.devices()


# -- dead letters (the same operations as `gatewayctl dead-letters`) ----------------------

DEAD_LETTER_LIST_MAX = 200
DEAD_LETTER_IDS_MAX = 10_000
REPORTED_IDS_MAX = 50


def m_dead_letters_list(ctx: Context, params: Any) -> Result:
    p = _params(params)
    limit = _int(p, "limit", required=False, default=20, lo=1, hi=DEAD_LETTER_LIST_MAX)
    out = dead_letters.listing(ctx.cfg, limit)
    rows = out["dead_letters"]
    if privacy.configured(ctx.cfg["privacy"]):
        # A dead letter is the raw record, before the policy: a reply to ThingsBoard would carry
        # what the policy keeps from it. `gatewayctl dead-letters show` on the device still shows it.
        for r in rows:
            if r.get("message") is not None:
                r["message"] = None
                r["message_withheld"] = "privacy policy: see gatewayctl dead-letters show on the device"
    # the newest that fit in one reply
    while rows and len(json.dumps(out, default=str)) > ctx.reply_budget - 100:
        rows.pop(0)
        out["truncated"] = True
    return out


def _selection(p: dict[str, Any], dated: bool) -> dict[str, Any]:
    """`ids` (or `id`), `all: true`, or (purge) `before`: exactly one of them."""
    given = [k for k in ("ids", "id", "all", "before") if k in p and (dated or k != "before")]
    if len(given) != 1:
        raise BadRequest("give exactly one of params.ids, params.id, params.all"
                         + (", params.before" if dated else ""))
    key = given[0]
    if key == "all":
        if p["all"] is not True:
            raise BadRequest("params.all must be true")
        return {"ids": None}
    if key == "before":
        try:
            return {"before_ms": dead_letters.parse_before(p["before"])}
        except dead_letters.DeadLetterError as e:
            raise BadRequest(f"params.before: {e}") from None
    ids = [p["id"]] if key == "id" else p["ids"]
    if not isinstance(ids, list) or not ids or len(ids) > DEAD_LETTER_IDS_MAX:
        raise BadRequest(f"params.ids must be a list of 1 to {DEAD_LETTER_IDS_MAX} dead letter ids")
    return {"ids": [_int({"id": i}, "id", lo=1) for i in ids]}


def _dead_letter_reply(result: Any) -> dict[str, Any]:
    out = dict(result)
    for key in ("refused", "not_found"):
        if len(out.get(key, ())) > REPORTED_IDS_MAX:
            out[key + "_count"] = len(out[key])
            out[key] = out[key][:REPORTED_IDS_MAX]
    return out


def m_dead_letters_requeue(ctx: Context, params: Any) -> Result:
    sel = _selection(_params(params), dated=False)
    job = ctx.jobs.submit("dead_letters_requeue", dead_letters.requeue, ctx.cfg, sel["ids"])
    return Deferred(job, _dead_letter_reply, "dead_letters_requeue")


def m_dead_letters_purge(ctx: Context, params: Any) -> Result:
    sel = _selection(_params(params), dated=True)
    job = ctx.jobs.submit("dead_letters_purge", dead_letters.purge, ctx.cfg, sel.get("ids"), sel.get("before_ms"),
                          "ids" in sel and sel["ids"] is None)
    return Deferred(job, _dead_letter_reply, "dead_letters_purge")


def m_dead_letters_ack(ctx: Context, params: Any) -> Result:
    job = ctx.jobs.submit("dead_letters_ack", dead_letters.ack, ctx.cfg)
    return Deferred(job, dict, "dead_letters_ack")


METHODS: dict[str, Method] = {
    "list": Method(m_list, "the RPC methods this gateway answers"),
    "ping": Method(m_ping, "answers at once: is the supervisor alive"),
    "status": Method(m_status, "controller, software version, queues, jobs"),
    "restart_controller": Method(m_restart_controller, "restart the controller container"),
    "stop_controller": Method(m_stop_controller, "stop the controller until start_controller"),
    "start_controller": Method(m_start_controller, "start the controller after stop_controller"),
    "reboot": Method(m_reboot, "reboot the device (after replying)"),
    "shutdown": Method(m_shutdown, "power the device off (after replying)"),
    "restart_gateway": Method(m_restart_gateway, "restart all gatewayd services (after replying)"),
    "run_command": Method(m_run_command, "run an allow-listed program without a shell",
                          {"command": "string or list", "timeout_s": "number (optional)"}),
    "job_status": Method(m_job_status, "state and result of a background job", {"job": "integer"}),
    "init_files": Method(m_init_files, "report all managed files again and fetch pending contents"),
    "archive_republish_messages": Method(m_archive_republish, "send archived records again as telemetry",
                                         {"start_timestamp_ms": "integer, inclusive",
                                          "end_timestamp_ms": "integer, exclusive"}),
    "archive_discard_messages": Method(m_archive_discard, "delete archived records",
                                       {"start_timestamp_ms": "integer, inclusive",
                                        "end_timestamp_ms": "integer, exclusive"}),
    "archive_count_messages": Method(m_archive_count, "count archived records",
                                     {"start_timestamp_ms": "integer, inclusive",
                                      "end_timestamp_ms": "integer, exclusive"}),
    "controller_logs": Method(m_controller_logs, "recent log lines of the controller container",
                              {"lines": "integer (default 100)"}),
    "sw_status": Method(m_sw_status, "software update state and current version"),
    "system_info": Method(m_system_info, "versions and system metrics"),
    "devices": Method(m_devices, "USB and serial devices"),
    "dead_letters_list": Method(m_dead_letters_list, "the newest dead letters, their reasons and counts",
                                {"limit": f"integer (default 20, at most {DEAD_LETTER_LIST_MAX})"}),
    "dead_letters_requeue": Method(m_dead_letters_requeue, "send dead letters back through validation",
                                   {"ids": "list of ids", "id": "one id", "all": "true: every dead letter"}),
    "dead_letters_purge": Method(m_dead_letters_purge, "delete dead letters (ledger records count as dropped)",
                                 {"ids": "list of ids", "id": "one id", "all": "true: every dead letter",
                                  "before": "epoch ms or ISO date: those dead-lettered before"}),
    "dead_letters_ack": Method(m_dead_letters_ack, "mark every dead letter present as seen (not degraded)"),
}


def dispatch(ctx: Context, method: Any, params: Any) -> Result:
    if not isinstance(method, str) or not method:
        raise BadRequest("'method' must be a non-empty string")
    m = METHODS.get(method)
    if m is None:
        raise BadRequest(f"unknown method {method!r} (the 'list' method names all)")
    return m.fn(ctx, params)


def reply_fits(payload: str, rpc_id: str, max_packet: int) -> bool:
    return packet_size(utf8_len(topics.rpc_response(rpc_id)), utf8_len(payload)) <= max_packet
