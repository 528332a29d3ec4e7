"""A real Docker engine for integration tests, offline: no registry is ever contacted.

- `ensure_dockerd()` starts `setsid dockerd` (its own log file) when `docker info` fails,
  waits a bounded time for it, and says whether it started it; `stop_dockerd()` stops only
  an engine this process started, by PID.
- `ensure_base_image()` builds `gatewayd-test-base:latest` by `docker import` of a rootfs
  made from Debian's busybox-static (installed with apt-get if missing). No registry is
  ever contacted: test images are built `FROM` it with `docker build --network none`.
- The session fixture `docker_engine` (tests/integration/conftest.py) does both, and skips the
  tests when no engine can be had.
- `BridgeSide` plays the bridge for a supervisor under test (inbound rows in, outbox out), and
  `NotifySocket` plays systemd's notify socket (to watch WATCHDOG=1 pings).

Helpers use the docker CLI, not the code under test.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.daemons import wait_for

BASE_IMAGE = "gatewayd-test-base:latest"
BUSYBOX = "/bin/busybox"
# Applets linked into the base image (busybox-static has them all; links keep Dockerfiles short).
APPLETS = ("sh", "sleep", "echo", "cat", "test", "touch", "rm", "ls", "date", "true", "false", "mkdir", "env",
           "kill", "ps", "grep", "wc", "head", "tail")
DOCKERD_START_TIMEOUT_S = 60.0


def docker_cli() -> str | None:
    return shutil.which("docker")


def docker(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    cli = docker_cli()
    if cli is None:
        raise RuntimeError("the docker CLI is not installed")
    proc = subprocess.run([cli, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def engine_up() -> bool:
    if docker_cli() is None:
        return False
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


@dataclass
class Dockerd:
    started: bool
    pid: int | None = None
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None


def ensure_dockerd(timeout: float = DOCKERD_START_TIMEOUT_S) -> Dockerd:
    """A running engine; starts one (and says so) if `docker info` fails. RuntimeError if impossible."""
    if engine_up():
        return Dockerd(started=False)
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if os.path.exists("/usr/sbin/dockerd") else None)
    if dockerd is None:
        raise RuntimeError("no Docker engine: dockerd is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise RuntimeError("no Docker engine running, and starting dockerd needs root")
    # Someone else may be starting one right now: give it a moment before starting ours.
    pidfile = Path("/var/run/docker.pid")
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text().strip()), 0)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if engine_up():
                    return Dockerd(started=False)
                time.sleep(0.5)
        except (OSError, ValueError):
            pass
    log_path = Path(tempfile.gettempdir()) / f"gatewayd-test-dockerd-{os.getpid()}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([dockerd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    handle = Dockerd(started=True, pid=proc.pid, log_path=log_path, proc=proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if engine_up():  # lost a race against another starter; theirs is running
                return Dockerd(started=False)
            raise RuntimeError(f"dockerd exited with {proc.returncode}; log {log_path}:\n"
                               + log_path.read_text(errors="replace")[-2000:])
        if engine_up():
            return handle
        time.sleep(0.5)
    stop_dockerd(handle)
    raise RuntimeError(f"dockerd did not become ready within {timeout:.0f} s (log {log_path})")


def stop_dockerd(handle: Dockerd, timeout: float = 30.0) -> None:
    """Stop the engine only if we started it (SIGTERM to its PID, then SIGKILL)."""
    if not handle.started or handle.proc is None:
        return
    proc = handle.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def ensure_busybox() -> str:
    if os.path.exists(BUSYBOX) and _is_static(BUSYBOX):
        return BUSYBOX
    for candidate in ("/usr/bin/busybox", "/bin/busybox"):
        if os.path.exists(candidate) and _is_static(candidate):
            return candidate
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "busybox-static"], capture_output=True, timeout=300,
                       check=False)
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(candidate) and _is_static(candidate):
            return candidate
    raise RuntimeError("busybox-static is needed for the test images (apt-get install busybox-static)")


def _is_static(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    # A dynamically linked ELF names its interpreter (PT_INTERP): "/lib64/ld-linux" etc.
    return b"/ld-linux" not in head and b"ld-musl" not in head


def ensure_base_image() -> str:
    """`gatewayd-test-base:latest`: a busybox-static rootfs imported with `docker import`."""
    if docker("image", "inspect", BASE_IMAGE, check=False, timeout=30).returncode == 0:
        return BASE_IMAGE
    import_image(BASE_IMAGE)
    return BASE_IMAGE


def import_image(ref: str, changes: list[str] | tuple[str, ...] = ()) -> str:
    """`docker import` of the busybox-static rootfs as `ref` (`changes`: Dockerfile lines such as
    CMD, applied with `--change`); returns the image id."""
    busybox = ensure_busybox()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "data", "etc"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
    cli = docker_cli()
    assert cli is not None
    args = [a for c in changes for a in ("--change", c)]
    proc = subprocess.run([cli, "import", *args, "-", ref], input=buf.getvalue(), capture_output=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"docker import failed: {proc.stderr.decode(errors='replace')}")
    return docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()


def build_image(tag: str, dockerfile: str, files: dict[str, str | bytes] | None = None,
                timeout: float = 300.0) -> str:
    """`docker build --network none` of a Dockerfile (FROM the base image); returns the image id."""
    with tempfile.TemporaryDirectory() as ctx:
        Path(ctx, "Dockerfile").write_text(dockerfile)
        for name, content in (files or {}).items():
            p = Path(ctx, name)
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content)
        docker("build", "--network", "none", "-q", "-t", tag, ctx, timeout=timeout)
    return docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def remove_containers(*names: str) -> None:
    for n in names:
        docker("rm", "-f", n, check=False, timeout=60)


def remove_images(*refs: str) -> None:
    for r in refs:
        docker("rmi", "-f", r, check=False, timeout=60)


def images_with_prefix(prefix: str) -> list[str]:
    out = docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).stdout.split()
    return [x for x in out if x.startswith(prefix)]


def container_state(name: str) -> dict[str, str] | None:
    proc = docker("inspect", "--format", "{{json .}}", name, check=False, timeout=30)
    if proc.returncode != 0:
        return None
    doc = json.loads(proc.stdout)
    st = doc.get("State") or {}
    return {"status": st.get("Status", ""), "started_at": st.get("StartedAt", ""), "image": doc.get("Image", ""),
            "health": (st.get("Health") or {}).get("Status", ""), "id": doc.get("Id", "")}


# --------------------------------------------------------------------------------------
# Talking to a supervisor the way the bridge does: through queues.db (inbound in, outbox out)
# --------------------------------------------------------------------------------------

class BridgeSide:
    """Plays the bridge for a supervisor under test: writes inbound rows, reads (and 'delivers') the outbox."""

    def __init__(self, state_dir: Path):
        from gatewayd.store import queues

        self.q = queues
        self.conn = queues.open_queues(state_dir / "queues.db", check=False)

    def close(self) -> None:
        self.conn.close()

    def inbound(self, topic: str, payload: bytes | str) -> None:
        self.q.put_inbound(self.conn, topic, payload.encode() if isinstance(payload, str) else payload)

    def rpc(self, rpc_id: str | int, method: Any, params: Any = None) -> None:
        self.inbound(f"v1/devices/me/rpc/request/{rpc_id}", json.dumps({"method": method, "params": params}))

    def shared(self, attrs: dict[str, Any]) -> None:
        """A shared-attribute update pushed by ThingsBoard."""
        self.inbound("v1/devices/me/attributes", json.dumps(attrs))

    def outbox(self, kind: str | None = None) -> list[tuple[int, int, str, str, str]]:
        sql = "SELECT id, priority, kind, topic, payload FROM outbox"
        if kind:
            return self.conn.execute(sql + " WHERE kind = ? ORDER BY id", (kind,)).fetchall()
        return self.conn.execute(sql + " ORDER BY id").fetchall()

    def reply(self, rpc_id: str | int, timeout: float = 10.0) -> dict[str, Any]:
        topic = f"v1/devices/me/rpc/response/{rpc_id}"

        def find() -> dict[str, Any] | None:
            row = self.conn.execute("SELECT priority, payload FROM outbox WHERE topic = ? ORDER BY id LIMIT 1",
                                    (topic,)).fetchone()
            if row is None:
                return None
            assert row[0] == self.q.PRIO_RPC_REPLY
            doc = json.loads(row[1])
            assert isinstance(doc, dict)
            return doc

        return wait_for(find, timeout, what=f"the reply to RPC {rpc_id}")

    def replies(self, rpc_id: str | int) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT payload FROM outbox WHERE topic = ?",
                                 (f"v1/devices/me/rpc/response/{rpc_id}",)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def telemetry(self) -> list[dict[str, Any]]:
        out = []
        for (payload,) in self.conn.execute("SELECT payload FROM outbox WHERE kind = 'telemetry' ORDER BY id"):
            out.append(json.loads(payload)["values"])
        return out

    def sw_states(self) -> list[tuple[str, str | None]]:
        return [(v["sw_state"], v.get("sw_version")) for v in self.telemetry() if "sw_state" in v]

    def attributes(self) -> dict[str, Any]:
        """Client attributes published so far, the latest value of each key."""
        merged: dict[str, Any] = {}
        for (payload,) in self.conn.execute("SELECT payload FROM outbox WHERE kind = 'attributes' ORDER BY id"):
            merged.update(json.loads(payload))
        return merged

    def raw(self, prefix: str) -> list[tuple[int, str, str]]:
        return self.conn.execute("SELECT id, topic, payload FROM outbox WHERE kind = 'raw' AND topic LIKE ? "
                                 "ORDER BY id", (prefix + "%",)).fetchall()

    def deliver(self, ids: list[int]) -> None:
        """What the bridge does after a PUBACK."""
        self.q.mark_delivered(self.conn, ids)


class NotifySocket:
    """A fake systemd notify socket: records (monotonic time, message) of every datagram."""

    def __init__(self, directory: Path):
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def watchdog_times(self) -> list[float]:
        return [t for t, m in self.messages if "WATCHDOG=1" in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
