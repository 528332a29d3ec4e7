"""A Debian bookworm container with a real systemd, booted with systemd-nspawn, for the system tests.

The rootfs comes from `scripts/nspawn-rootfs.sh` (debootstrapped once, cached in
/var/cache/gatewayd-test); each `Container` works on its own copy of it.  Commands run
inside with `nsenter -t <PID 1> -a`.  Every wait is bounded, and everything started here
is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
ROOTFS_SCRIPT = REPO_ROOT / "scripts" / "nspawn-rootfs.sh"
BUILD_DEB_SCRIPT = REPO_ROOT / "scripts" / "build-deb.sh"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(RuntimeError):
    pass


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.25,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except (ContainerError, subprocess.SubprocessError, OSError) as exc:
            last = exc
            value = None
        else:
            value = last
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def build_rootfs(timeout: float = 900) -> Path:
    """Build or reuse the cached rootfs; returns its path."""
    proc = subprocess.run([str(ROOTFS_SCRIPT)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ContainerError(f"nspawn-rootfs.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def build_deb(out_dir: Path, timeout: float = 900) -> Path:
    """Build the .deb (without lintian: that is a test of its own) into out_dir."""
    proc = subprocess.run([str(BUILD_DEB_SCRIPT), "--no-lintian", "--out", str(out_dir)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ContainerError(f"build-deb.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


class Container:
    """One booted container.  `start()`, `run()`, `reboot()`, `stop()`."""

    def __init__(self, rootfs: Path, name: str | None = None, workdir: Path | None = None):
        self.name = name or f"gatewayd-test-{os.getpid()}"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="gatewayd-nspawn-", dir="/var/tmp"))
        self.root = self.workdir / "root"
        self.log_path = self.workdir / "nspawn.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self.boots = 0
        self.install_output = ""      # what installing the package printed (set by the system tests)
        self.reconfigure_output = ""  # what dpkg-reconfigure printed
        if not self.root.exists():
            subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs), str(self.root)], check=True,
                           timeout=300)

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 90) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            raise ContainerError("already running")
        with open(self.log_path, "ab") as log:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-q", "-D", str(self.root), "-M", self.name, "-b",
                 "--register=no", "--keep-unit", "--console=pipe", "--private-network"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.boots += 1
        self.pid1 = wait_until(self._find_pid1, 30, 0.1, "the container's PID 1")
        wait_until(self._system_up, timeout, 0.5, "systemctl is-system-running = running/degraded")

    def _find_pid1(self) -> int | None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {self.nspawn.returncode}: {self.log_tail()}")
        children: list[int] = []
        for task in Path(f"/proc/{self.nspawn.pid}/task").glob("*/children"):
            try:
                children += [int(x) for x in task.read_text().split()]
            except OSError:
                continue
        for pid in children:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                # NSpid: <pid on the host> 1  -> PID 1 of a new PID namespace
                if line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2:
                    return pid
        return None

    def _system_up(self) -> bool:
        if self.nspawn is not None and self.nspawn.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {self.nspawn.returncode}: {self.log_tail()}")
        out = self.run(["systemctl", "is-system-running"], check=False, timeout=10).stdout.strip()
        return out in ("running", "degraded")

    def running(self) -> bool:
        return self.nspawn is not None and self.nspawn.poll() is None

    def reboot(self, timeout: float = 90) -> None:
        """`systemctl reboot` inside, then boot again (see `await_reboot`)."""
        self.run(["systemctl", "--no-block", "reboot"], timeout=30)
        self.await_reboot(timeout)

    def await_reboot(self, timeout: float = 90, down_timeout: float = 60) -> None:
        """A reboot inside makes systemd-nspawn exit with 133 (systemd-nspawn@.service
        would restart it): wait for that, then boot the same root again."""
        assert self.nspawn is not None
        try:
            rc = self.nspawn.wait(timeout=down_timeout)
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"container did not go down for reboot: {self.log_tail()}") from exc
        if rc != 133:
            raise ContainerError(f"systemd-nspawn exited with {rc}, expected 133 (reboot): {self.log_tail()}")
        self.nspawn = None
        self.pid1 = None
        self.start(timeout)

    def stop(self, timeout: float = 30) -> None:
        """Power off (SIGTERM to nspawn shuts the container down cleanly); kill if stuck."""
        proc = self.nspawn
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                if self.pid1 is not None:
                    try:
                        os.kill(self.pid1, signal.SIGKILL)   # takes the whole PID namespace down
                    except ProcessLookupError:
                        pass
                proc.wait(timeout=10)
        self.nspawn = None
        self.pid1 = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        # nspawn leaves its (empty) propagation directory behind when /run is not tmpfs.
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- commands inside --------------------------------------------------------------

    def run(self, argv: Sequence[str] | str, check: bool = True, timeout: float = 120,
            input: str | None = None, env: dict[str, str] | None = None,
            user: str | None = None) -> subprocess.CompletedProcess[str]:
        if self.pid1 is None:
            raise ContainerError("container is not running")
        cmd = ["bash", "-c", argv] if isinstance(argv, str) else list(argv)
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        environment = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
                       "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb", **(env or {})}
        full = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i",
                *(f"{k}={v}" for k, v in environment.items()), *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise ContainerError(f"{shlex.join(cmd)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
        return proc

    def sh(self, script: str, **kw: Any) -> str:
        return self.run(script, **kw).stdout

    def write(self, path: str, text: str, mode: int = 0o644, owner: str = "root:root") -> None:
        """Write a file inside (through the container's own view: /run and /tmp are tmpfs)."""
        self.run(f"mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)} && "
                 f"chmod {mode:o} {shlex.quote(path)} && chown {owner} {shlex.quote(path)}", input=text)

    def copy_in(self, src: Path, dest: str) -> None:
        """Copy a host file or directory (without byte code) to a path inside that is on the root
        file system (not /run, /tmp)."""
        target = self.root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)

    # -- systemd helpers --------------------------------------------------------------

    def show(self, unit: str, *props: str) -> dict[str, str]:
        args = ["systemctl", "show", unit]
        for p in props:
            args += ["-p", p]
        out = self.run(args, timeout=30).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def active_state(self, unit: str) -> str:
        return self.show(unit, "ActiveState")["ActiveState"]

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def journal(self, *args: str) -> list[dict[str, Any]]:
        out = self.run(["journalctl", "--no-pager", "-o", "json", *args], timeout=60).stdout
        entries = []
        for line in out.splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def journal_text(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", "-o", "short-precise", *args], timeout=60).stdout

    def http(self, method: str, port: int, path: str, body: Any = None, timeout: float = 15) -> Any:
        """A JSON HTTP call to a server on the container's own loopback."""
        code = textwrap.dedent("""
            import json, sys, urllib.request, urllib.error
            method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
            data = body.encode() if body else None
            req = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=float(sys.argv[4])) as r:
                    sys.stdout.write(r.read().decode())
            except urllib.error.HTTPError as e:
                sys.stdout.write(e.read().decode()); sys.exit(1)
        """)
        proc = self.run(["python3", "-c", code, method, f"http://127.0.0.1:{port}{path}",
                         json.dumps(body) if body is not None else "", str(timeout)],
                        check=False, timeout=timeout + 15)
        if proc.returncode != 0:
            raise ContainerError(f"HTTP {method} {path} failed: {proc.stdout} {proc.stderr[-2000:]}")
        return json.loads(proc.stdout) if proc.stdout.strip() else None
