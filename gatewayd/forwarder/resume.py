"""Where reading the controller's table resumes whenever the forwarder (re)opens a database: the
same table, a new file, or a table recreated in the same file (docs/DESIGN.md, "Exactly-once
between stages")."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path

from gatewayd.forwarder.files import CONTROLLER, QUEUES, on
from gatewayd.store import controller as controller_store
from gatewayd.store import queues
from gatewayd.store.db import get_mark, schema_version, set_mark, transaction

log = logging.getLogger("gatewayd.forwarder")

MARK = "controller"
BATCH_STATE = "forwarder.batch"  # {"epoch", "schema", "delete": [[first, last], ...], "last"} of the last batch
ROW_READ_MAX_BYTES = 16 << 20


def fingerprint(row: controller_store.Row) -> str:
    """What identifies a controller row moved: its id and values as read. The same id with the
    same values after a schema change is the same table (a controller's migration), not a new one."""
    return hashlib.blake2b(repr(row).encode("ascii", "backslashreplace"), digest_size=12).hexdigest()


def last_row_print(ctrl: sqlite3.Connection, mark: int, max_value: int) -> str | None:
    """`fingerprint` of the row at `mark` read as the forwarder reads it, None when it is gone."""
    _, rows = controller_store.read_batch(ctrl, mark - 1, 1, max_value, ROW_READ_MAX_BYTES)
    return fingerprint(rows[0]) if rows and rows[0][0] == mark else None


def resume_point(ctrl: sqlite3.Connection, q: sqlite3.Connection, path: Path,
                 max_value: int) -> tuple[str, int, int]:
    """(epoch, mark, schema version) to read on from, recorded in queues.db; the ranges of the last
    batch are deleted from the controller's table first when they are still there.

    A table dropped and recreated reuses ids from 1, which a mark would silently skip (and a
    delete of 'moved' ids would remove unread). It shows as an AUTOINCREMENT sequence below the
    mark, or as a schema change with rows at or below the mark: a new epoch, read from the
    start. When unsure, reading again (duplicates) is preferred to skipping (loss).
    """
    with on(CONTROLLER):
        rebuilt = controller_store.ensure_autoincrement(ctrl)
        epoch = controller_store.epoch(ctrl)
        schema = schema_version(ctrl)
        seq = controller_store.sequence(ctrl)
    with on(QUEUES):
        q_epoch, mark = get_mark(q, MARK)
        saved = queues.get_state(q, BATCH_STATE) or {}
    pending: list[list[int]] = []
    if q_epoch != epoch:
        if q_epoch:
            log.warning("controller database %s is a new file (epoch %s, was %s); reading it from the start",
                        path, epoch, q_epoch)
        mark = 0
    else:
        same = saved.get("epoch") == epoch
        recreated = ""
        if mark > 0 and (seq is None or seq < mark or rebuilt):
            recreated = f"its id sequence is at {seq or 0}, below the {mark} already moved"
        elif same and saved.get("schema") not in (None, schema):
            with on(CONTROLLER):
                if controller_store.has_rows_upto(ctrl, mark):
                    if seq is not None and saved.get("last") and last_row_print(ctrl, mark, max_value) == saved["last"]:
                        # The rows moved are still there, unchanged: a migration (an index, a
                        # column, a trigger) while their delete was pending. Delete them now.
                        pending = saved.get("delete") or []
                    else:
                        recreated = f"its schema changed and it holds rows with ids up to {mark} again"
        elif same:
            pending = saved.get("delete") or []
            with on(CONTROLLER):
                at_mark = last_row_print(ctrl, mark, max_value) if saved.get("last") and mark > 0 else None
            if at_mark is not None and at_mark != saved["last"]:
                # The ids were reused (`DELETE FROM sqlite_sequence`, the usual way to empty a
                # table and restart its ids): the recorded ranges now name rows never moved.
                recreated = f"its ids were reused: the row at {mark} is not the one moved"
        if not recreated and pending:
            with on(CONTROLLER):
                controller_store.delete_ranges(ctrl, [(int(a), int(b)) for a, b in pending], schema)
            pending = []
        if not recreated and mark > 0:
            with on(CONTROLLER):
                if controller_store.has_rows_upto(ctrl, mark):
                    recreated = f"it holds rows with ids up to {mark} that were never moved"
        if recreated:
            log.warning("controller table 'messages' in %s was recreated (%s): a new epoch, read from "
                        "the start", path, recreated)
            with on(CONTROLLER):
                epoch = controller_store.new_epoch(ctrl)
            mark = 0
    with on(QUEUES), transaction(q):
        set_mark(q, MARK, epoch, mark)
        queues.set_state(q, BATCH_STATE, {"epoch": epoch, "schema": schema, "delete": []})
    return epoch, mark, schema
