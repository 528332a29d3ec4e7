"""The life of one RPC request, from its inbound row to its reply (durable, never run twice).

1. `handle()`: parse, record the request as started (`store.rpc.begin`), run the method
   (`commands.dispatch`); a plain reply is queued at once;
2. a `Deferred` reply waits for its background work: `tick()` queues it when the work is done,
   or `{"state": "running", ...}` at the deadline (the late result goes out as telemetry
   `rpc_result`);
3. a `PowerAction` is replied to first; `tick()` runs its command once the bridge delivered the
   reply, or after `power_action_delay_s`.
Every reply is queued in the transaction that marks the request done and deletes its inbound
row (`store.rpc.finish`). Whatever its bytes, every request row gets exactly one reply: a
malformed one (not UTF-8, not JSON, nested too deeply, a method that is not text) an
`{"error": ...}`; a duplicate of a finished request the stored reply again; a request the
ledger shows started by an earlier run "interrupted" — it is never run twice.

A reply whose transaction fails (a full disk, a lock, I/O) is kept here and committed before
anything new is taken (`flush()`), so a fault of the moment never turns a request that ran into
an "interrupted" one; its inbound row is not taken again meanwhile. Should the supervisor stop
before it could commit them, they are kept in the runtime directory (another file system, a
tmpfs under systemd) and committed by the next start (`save_unsent`, `load_unsent`).

Finished requests are remembered for `rpc_dedup_window_s` of this supervisor's running time,
measured on the monotonic clock against inbound row ids (`LedgerAge`), never by wall-clock age.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd import redact
from gatewayd.config import Config
from gatewayd.store import rpc as ledger
from gatewayd.supervisor import commands, runcmd
from gatewayd.supervisor.jobs import Job, Jobs

log = logging.getLogger("gatewayd.supervisor")


@dataclass
class PendingRpc:
    inbound_id: int | None  # None: the row was in a queues.db that has been replaced since
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
    outbox_id: int | None  # the reply's outbox row; None until it is committed
    deadline: float
    job: Job | None = None


@dataclass
class Unsent:
    """A reply whose transaction has not committed yet."""

    inbound_id: int | None
    rpc_id: str
    digest: str
    method: str | None
    payload: str
    power: PendingPower | None = None


def json_text(reply: dict[str, Any]) -> str:
    """Compact JSON for the outbox, always storable as UTF-8 (lone surrogates are escaped)."""
    try:
        out = json.dumps(reply, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        return json.dumps({"error": f"internal error: the reply cannot be encoded as JSON ({e})"})
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:
        out = json.dumps(reply, separators=(",", ":"), ensure_ascii=True, default=str, allow_nan=False)
    return out


def parse_request(payload: bytes) -> tuple[str | None, Any, str | None]:
    """(method, params, problem) of a request's bytes; `problem` says why it cannot be run."""
    try:
        req = json.loads(payload)
    except RecursionError:
        return None, None, "request is nested too deeply to be read"
    except ValueError as e:  # also UnicodeDecodeError: not UTF-8
        return None, None, f"request is not valid JSON: {e}"
    if not isinstance(req, dict):
        return None, None, "request must be a JSON object {\"method\": ..., \"params\": ...}"
    method = req.get("method")
    if not isinstance(method, str) or not method:
        return None, None, "'method' is missing or not a non-empty string"
    if ledger.text(method) != method:
        return ledger.text(method), None, f"'method' {ledger.text(method)!r} is not valid Unicode text"
    return method, req.get("params"), None


class LedgerAge:
    """Ages finished requests by this process's monotonic clock: downtime and clock steps do not count.

    Every `every_s` it notes the highest inbound id so far; finished requests last answered at or
    below the id noted at least `window_s` ago are purged.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.every_s = min(max(window_s / 4, 1.0), 900.0)
        self.clock = clock
        self.marks: deque[tuple[float, int]] = deque()
        self.next_at = float("-inf")

    def due(self) -> bool:
        return self.clock() >= self.next_at

    def purge(self, conn: sqlite3.Connection) -> int:
        now = self.clock()
        self.next_at = now + self.every_s
        self.marks.append((now, ledger.last_inbound_id(conn)))
        upto: int | None = None
        while self.marks and now - self.marks[0][0] >= self.window_s:
            upto = self.marks.popleft()[1]
        n = ledger.purge_orphans(conn)
        if upto is not None:
            n += ledger.purge_done(conn, upto)
        return n


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
        self.pending: list[PendingRpc] = []
        self.unsent: list[Unsent] = []
        self.waiting: set[int] = set()  # duplicates of a request running here, answered once it is done
        self.power: list[PendingPower] = []
        self.counters = RpcCounters()
        self.age = LedgerAge(cfg["supervisor"]["rpc_dedup_window_s"], clock)

    def busy_inbound_ids(self) -> set[int | None]:
        """Inbound rows not to be taken now: requests running here, replies not committed yet, and
        their duplicates."""
        return ({p.inbound_id for p in self.pending if not p.replied} | {u.inbound_id for u in self.unsent}
                | self.waiting)

    def _owes(self, inbound_id: int | None) -> bool:
        """Is the request of this inbound row running here, or its reply not committed yet?"""
        return inbound_id is not None and (any(p.inbound_id == inbound_id for p in self.pending)
                                           or any(u.inbound_id == inbound_id for u in self.unsent))

    def flush(self) -> None:
        """Commit the replies that could not be committed before, oldest first; raises (keeping the
        rest) while the database still fails."""
        if not self.unsent:
            return
        while self.unsent:
            u = self.unsent[0]
            outbox_id = ledger.finish(self.db(), u.rpc_id, u.digest, u.method, u.inbound_id, u.payload)
            self.unsent.pop(0)
            if u.power is not None:
                u.power.outbox_id = outbox_id
        self.waiting.clear()  # their duplicates can be answered now

    def save_unsent(self, path: Path, identity: tuple[int, int] | None) -> int:
        """Keep the replies not committed yet for the next start; how many there were."""
        if not self.unsent:
            return 0
        data = {"file": identity, "replies": [[u.inbound_id, u.rpc_id, u.digest, u.method, u.payload]
                                              for u in self.unsent]}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        return len(self.unsent)

    def load_unsent(self, path: Path, identity: tuple[int, int] | None) -> int:
        """The replies an earlier run could not commit (`save_unsent`); their inbound ids count only in
        the same queues.db."""
        try:
            data = json.loads(path.read_text())
            same = data["file"] is not None and tuple(data["file"]) == identity
            replies = [Unsent(int(i) if same and i is not None else None, str(r), str(d), m, str(p))
                       for i, r, d, m, p in data["replies"]]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.error("cannot read the RPC replies an earlier run left in %s: %s", path, e)
            replies = []
        with contextlib.suppress(OSError):
            path.unlink()
        self.unsent.extend(replies)
        return len(replies)

    def detach(self) -> None:
        """queues.db was replaced: the inbound and outbox ids known here name rows of the old file.
        Replies still owed are sent all the same, but touch no row of the new file."""
        for p in self.pending:
            p.inbound_id = None
        for u in self.unsent:
            u.inbound_id = None
        for power in self.power:
            if power.job is None:
                power.outbox_id = None  # acts at its deadline
        self.waiting.clear()
        self.age.marks.clear()

    def purge(self) -> None:
        if self.age.due():
            self.age.purge(self.db())

    # -- a new request -------------------------------------------------------------------
    def handle(self, rid: int, rpc_id: str, payload: bytes) -> None:
        conn = self.db()
        rpc_id = ledger.text(rpc_id)
        dig = ledger.digest(payload)
        method, params, problem = parse_request(payload)
        begun = ledger.begin(conn, rpc_id, dig, method, rid)
        if begun.state == "done":
            self.counters.duplicates += 1
            self.counters.rpcs += 1
            log.info("RPC %s (%s) was answered before; sending the same reply again", rpc_id, method)
            ledger.answer_again(conn, rpc_id, rid, begun.reply or json_text({"error": "answered before"}))
            return
        if begun.state == "started":
            if begun.inbound_id != rid and self._owes(begun.inbound_id):
                self.waiting.add(rid)  # the same request is running here: it gets the same reply
                return
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
        except Exception as e:
            log.exception("RPC %s (%s) failed", rpc_id, method)
            self.reply(rid, rpc_id, dig, method, {"error": f"internal error: {type(e).__name__}: {e}"})
            return
        if isinstance(outcome, commands.Deferred):
            self.pending.append(PendingRpc(rid, rpc_id, dig, method, outcome, self.clock()))
            self._tick_pending(self.clock())
        elif isinstance(outcome, commands.PowerAction):
            log.warning("%s requested by RPC %s; acting once the reply is delivered (at most %.0f s)",
                        outcome.action, rpc_id, self.power_delay_s)
            power = PendingPower(outcome.argv, outcome.action, None, self.clock() + self.power_delay_s)
            self.power.append(power)
            self.reply(rid, rpc_id, dig, method, outcome.reply, power)
        elif isinstance(outcome, dict):
            self.reply(rid, rpc_id, dig, method, outcome)
        else:
            self.reply(rid, rpc_id, dig, method, {"error": f"internal error: {method} returned no JSON object"})

    def fail(self, rid: int, rpc_id: str, payload: bytes, error: str) -> None:
        """The error reply of a request whose handling failed unexpectedly."""
        method = parse_request(payload)[0]
        self.reply(rid, ledger.text(rpc_id), ledger.digest(payload), method, {"error": f"internal error: {error}"})

    def reply(self, rid: int | None, rpc_id: str, dig: str, method: str | None, reply: dict[str, Any],
              power: PendingPower | None = None) -> None:
        """Queue the reply with the request's done mark (raises while the database fails: the reply is
        kept and committed by `flush()`)."""
        reply = redact.redact_obj(reply)
        payload = json_text(reply)
        failed = "error" in reply or payload.startswith('{"error"')
        if not commands.reply_fits(payload, rpc_id, self.max_packet):
            payload = json_text({"error": f"the reply ({len(payload)} bytes) is larger than the maximum MQTT packet"})
            failed = True
        if failed:
            self.counters.rpc_errors += 1
        self.counters.rpcs += 1
        self.unsent.append(Unsent(rid, rpc_id, dig, method, payload, power))
        self.flush()

    # -- requests in progress ------------------------------------------------------------
    def tick(self) -> None:
        now = self.clock()
        self._tick_pending(now)
        self._tick_power(now)

    def _tick_pending(self, now: float) -> None:
        for p in list(self.pending):
            w = p.deferred.waitable
            if w.done():
                if w.error is not None:
                    reply: dict[str, Any] = {"error": w.error}
                else:
                    try:
                        reply = p.deferred.to_reply(w.result)
                    except Exception as e:  # noqa: BLE001 - a reply that cannot be built becomes the error reply
                        reply = {"error": f"internal error: {type(e).__name__}: {e}"}
                self.pending.remove(p)
                self.waiting.clear()  # their request may be done now: look at them again
                if p.replied:
                    log.info("RPC %s (%s) finished after its reply", p.rpc_id, p.method)
                    result = redact.redact_obj(reply)
                    result.update({"rpc_id": p.rpc_id, "method": p.method})
                    self.publish_telemetry({"rpc_result": result})
                else:
                    self.reply(p.inbound_id, p.rpc_id, p.digest, p.method, reply)
            elif not p.replied and now - p.started >= self.deadline_s:
                job_id = w.id if isinstance(w, Job) else None
                body: dict[str, Any] = {
                    "state": "running",
                    "note": f"{p.method} takes longer than {self.deadline_s:.0f} s; its result will be sent as "
                            "telemetry 'rpc_result'" + (" and is available from job_status" if job_id else ""),
                }
                if job_id is not None:
                    body["job"] = job_id
                p.replied = True
                self.reply(p.inbound_id, p.rpc_id, p.digest, p.method, body)

    def _tick_power(self, now: float) -> None:
        for p in list(self.power):
            if p.job is None:
                delivered = p.outbox_id is not None and (not p.outbox_id or not ledger.outbox_has(self.db(),
                                                                                                   p.outbox_id))
                if delivered or now >= p.deadline:
                    log.warning("%s: running %s", p.action, " ".join(p.argv))
                    p.job = self.jobs.submit(p.action, runcmd.run, p.argv, 60.0, 4096, "/", runcmd.clean_env())
            elif p.job.done():
                self.power.remove(p)
                res = p.job.result or {}
                if p.job.error is not None or res.get("exit_code") != 0:
                    text = p.job.error or f"exit {res.get('exit_code')}: {str(res.get('output', '')).strip()[:300]}"
                    log.error("%s failed: %s", p.action, text)
                    self.report_error(f"{p.action} failed: {text}")
                    self.publish_telemetry({"power_action_error": f"{p.action}: {text}"})
