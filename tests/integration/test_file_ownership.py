"""Files under the state directories belong to the daemons' user, databases mode 0640, whoever
creates them: `gatewayctl send` run as root on a fresh install, then the forwarder running as
the unprivileged owner of the state directory moves the record.

Needs root (it creates a system user, removed afterwards)."""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.store import controller as controller_store
from gatewayd.store import queues
from tests.helpers.daemons import ROOT, Daemon, wait_for, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def system_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd")
    name = f"gwtest{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True, timeout=60)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


@pytest.fixture
def base() -> Iterator[Path]:
    """A world-traversable directory (pytest's tmp_path is 0700, closed to the test user)."""
    path = Path(tempfile.mkdtemp(prefix="gatewayd-own-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def files_under(d: Path) -> list[Path]:
    return [Path(root) / n for root, dirs, names in os.walk(d) for n in [*dirs, *names]]


def ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def assert_owned_by(d: Path, uid: int) -> None:
    wrong = {str(p): os.lstat(p).st_uid for p in files_under(d) if os.lstat(p).st_uid != uid}
    assert not wrong, f"not owned by uid {uid}: {wrong}"
    for p in files_under(d):
        if p.name.endswith((".db", ".db-wal", ".db-shm")):
            assert stat.S_IMODE(os.lstat(p).st_mode) == 0o640, f"{p}: mode {os.lstat(p).st_mode:o}"


def test_send_as_root_then_forwarder_as_the_owner_moves_it(system_user: pwd.struct_passwd, base: Path) -> None:
    uid, gid = system_user.pw_uid, system_user.pw_gid
    state = base / "state"
    state.mkdir(mode=0o750)
    os.chown(state, uid, gid)
    cfg = write_config(base, {"paths": {"state_dir": str(state), "runtime_dir": str(state / "run"),
                                        "controller_data_dir": str(state / "controller")}})

    # An operator's root shell: umask 022, nothing created yet.
    sent = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), "send", '{"t": 21.5}'],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          preexec_fn=lambda: os.umask(0o022))
    assert sent.returncode == 0, sent.stderr
    assert f"acting as user {system_user.pw_name} (uid {uid})" in sent.stderr
    assert (state / "controller" / "communication_queue.db").exists()
    assert_owned_by(state, uid)

    fwd = Daemon("forwarder", cfg, argv_prefix=["setpriv", f"--reuid={uid}", f"--regid={gid}",
                                                 "--clear-groups", "--"])
    fwd.start(timeout=30)
    try:
        def moved() -> bool:
            q = ro(state / "queues.db")
            try:
                c = queues.counters(q)
            finally:
                q.close()
            return c.get("outbox_rows") == 1 and c.get("ingested") == 1

        wait_for(moved, 30, what="the forwarder to move the record into the outbox")
        c = ro(state / "controller" / "communication_queue.db")
        try:
            assert controller_store.depth(c) == 0
        finally:
            c.close()
        assert "attempt to write a readonly database" not in fwd.log()
        assert_owned_by(state, uid)
    finally:
        fwd.stop()
    assert_owned_by(state, uid)


def test_send_as_the_owner_says_nothing_about_users(base: Path) -> None:
    cfg = write_config(base, {"paths": {"state_dir": str(base / "state"), "runtime_dir": str(base / "run"),
                                        "controller_data_dir": str(base / "state" / "controller")}})
    (base / "state").mkdir()
    sent = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--config", str(cfg), "send", '{"t": 1}'],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert "acting as" not in sent.stderr  # the state directory belongs to the caller already
    db = base / "state" / "controller" / "communication_queue.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o640
