"""The life of one RPC request, from its inbound row to its reply (durable, never run twice).

1. `handle()`: parse, record the request as started (`store.rpc.begin`), run the method
   (`commands.dispatch`); a plain reply is queued at once;
2. a `Deferred` reply waits for its background work: `tick()` queues it when the work is done,
   or `{"state": "running", ...}` at the deadline (the late result goes out as telemetry
   `rpc_result`);
3. a `PowerAction` is replied to first; `tick()` runs its command once the bridge delivered the
   reply, or after `power_action_delay_s`.
Every reply is queued in the transaction that marks the request done and deletes its inbound
row (`store.rpc.finish`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gatewayd.config import Config
from gatewayd.store import rpc as ledger
from gatewayd.supervisor import commands, runcmd
from gatewayd.supervisor.jobs import Job, Jobs

log = logging.getLogger("gatewayd.supervisor")


@dataclass
class PendingRpc:
    inbound_id: int
    rpc_id: str
    digest: str
    method: str
    deferred: commands.Deferred
    started: float
    replied: bool = False


@dataclass
class PendingPower:
    argv: list[str]
    action: str
    outbox_id: int
    deadline: float
    job: Job | None = None


@dataclass
class RpcCounters:
    rpcs: int = 0
    rpc_errors: int = 0
    duplicates: int = 0


class RpcLifecycle:
    def __init__(self, cfg: Config, ctx: commands.Context, db: Callable[[], sqlite3.Connection], jobs: Jobs,
                 publish_telemetry: Callable[[dict[str, Any]], None], report_error: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic):
        self.ctx = ctx
        self.db = db
        self.jobs = jobs
        self.publish_telemetry = publish_telemetry
        self.report_error = report_error
        self.clock = clock
        self.max_packet: int = cfg["thingsboard"]["max_packet_bytes"]
        self.deadline_s: float = cfg["supervisor"]["rpc_reply_deadline_s"]
        self.power_delay_s: float = cfg["supervisor"]["power_action_delay_s"]
        self.pending: dict[int, PendingRpc] = {}
        self.power: list[PendingPower] = []
        self.counters = RpcCounters()

    def busy_inbound_ids(self) -> set[int]:
        """Inbound rows whose request is still running here (not to be taken again)."""
        return {p.inbound_id for p in self.pending.values() if not p.replied}

    # -- a new request -------------------------------------------------------------------
    def handle(self, rid: int, rpc_id: str, payload: bytes) -> None:
        conn = self.db()
        dig = ledger.digest(payload)
        method: str | None = None
        params: Any = None
        problem: str | None = None
        try:
            req = json.loads(payload)
        except ValueError as e:
            problem = f"request is not valid JSON: {e}"
        else:
            if not isinstance(req, dict):
                problem = "request must be a JSON object {\"method\": ..., \"params\": ...}"
            else:
                method = req.get("method") if isinstance(req.get("method"), str) else None
                params = req.get("params")
                if method is None:
                    problem = "'method' is missing or not a string"
        state, _stored = ledger.begin(conn, rpc_id, dig, method)
        if state == "done":
            self.counters.duplicates += 1
            log.info("RPC %s (%s) was answered before; duplicate delivery dropped", rpc_id, method)
            ledger.delete_inbound(conn, rid)
            return
        if state == "started":
            self.reply(rid, rpc_id, dig, method, {
                "error": f"interrupted: the supervisor restarted while running {method!r}; not run again"})
            return
        if problem is not None:
            log.warning("RPC %s refused: %s", rpc_id, problem)
            self.reply(rid, rpc_id, dig, method, {"error": problem})
            return
        assert method is not None
        log.info("RPC %s: %s", rpc_id, method)
        try:
            outcome = commands.dispatch(self.ctx, method, params)
        except commands.BadRequest as e:
            self.reply(rid, rpc_id, dig, method, {"error": str(e)})
            return
        except Exception as e:  # noqa: BLE001
            log.exception("RPC %s (%s) failed", rpc_id, method)
            self.reply(rid, rpc_id, dig, method, {"error": f"internal error: {type(e).__name__}: {e}"})
            return
        if isinstance(outcome, commands.Deferred):
            self.pending[rid] = PendingRpc(rid, rpc_id, dig, method, outcome, self.clock())
            self._tick_pending(self.clock())
        elif isinstance(outcome, commands.PowerAction):
            outbox_id = self.reply(rid, rpc_id, dig, method, outcome.reply)
            log.warning("%s requested by RPC %s; acting once the reply is delivered (at most %.0f s)",
                        outcome.action, rpc_id, self.power_delay_s)
            self.power.append(PendingPower(outcome.argv, outcome.action, outbox_id,
                                           self.clock() + self.power_delay_s))
        else:
            self.reply(rid, rpc_id, dig, method, outcome)

    def reply(self, rid: int, rpc_id: str, dig: str, method: str | None, reply: dict[str, Any]) -> int:
        payload = ledger.reply_payload(reply)
        if not commands.reply_fits(payload, rpc_id, self.max_packet):
            reply = {"error": f"the reply ({len(payload)} bytes) is larger than the maximum MQTT packet"}
        if "error" in reply:
            self.counters.rpc_errors += 1
        self.counters.rpcs += 1
        return ledger.finish(self.db(), rpc_id, dig, method, rid, reply)

    # -- requests in progress ------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        self._tick_pending(now)
        self._tick_power(now)

    def _tick_pending(self, now: float) -> None:
        for rid, p in list(self.pending.items()):
            w = p.deferred.waitable
            if w.done():
                if w.error is not None:
                    reply: dict[str, Any] = {"error": w.error}
                else:
                    try:
                        reply = p.deferred.to_reply(w.result)
                    except Exception as e:  # noqa: BLE001
                        reply = {"error": f"internal error: {type(e).__name__}: {e}"}
                if p.replied:
                    log.info("RPC %s (%s) finished after its reply", p.rpc_id, p.method)
                    result = dict(reply)
                    result.update({"rpc_id": p.rpc_id, "method": p.method})
                    self.publish_telemetry({"rpc_result": result})
                else:
                    self.reply(rid, p.rpc_id, p.digest, p.method, reply)
                del self.pending[rid]
            elif not p.replied and now - p.started >= self.deadline_s:
                job_id = w.id if isinstance(w, Job) else None
                body: dict[str, Any] = {
                    "state": "running",
                    "note": f"{p.method} takes longer than {self.deadline_s:.0f} s; its result will be sent as "
                            "telemetry 'rpc_result'" + (" and is available from job_status" if job_id else ""),
                }
                if job_id is not None:
                    body["job"] = job_id
                self.reply(rid, p.rpc_id, p.digest, p.method, body)
                p.replied = True

    def _tick_power(self, now: float) -> None:
        for p in list(self.power):
            if p.job is None:
                delivered = not p.outbox_id or not ledger.outbox_has(self.db(), p.outbox_id)
                if delivered or now >= p.deadline:
                    log.warning("%s: running %s", p.action, " ".join(p.argv))
                    p.job = self.jobs.submit(p.action, runcmd.run, p.argv, 60.0, 4096)
            elif p.job.done():
                self.power.remove(p)
                res = p.job.result or {}
                if p.job.error is not None or res.get("exit_code") != 0:
                    text = p.job.error or f"exit {res.get('exit_code')}: {str(res.get('output', '')).strip()[:300]}"
                    log.error("%s failed: %s", p.action, text)
                    self.report_error(f"{p.action} failed: {text}")
                    self.publish_telemetry({"power_action_error": f"{p.action}: {text}"})
