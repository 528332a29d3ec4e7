"""Run one program without a shell, with a timeout and bounded output."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from typing import Any


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(argv: list[str], timeout_s: float, max_output: int, cwd: str | None = None,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    """{"exit_code", "output", "truncated", "timed_out", "duration_ms"}; raises OSError if it cannot start.

    stdout and stderr go to one temporary file (not a pipe), so a chatty program can neither
    fill our memory nor block on a full pipe. The program gets its own session; on timeout
    the whole process group is terminated, then killed.
    """
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, cwd=cwd, env=env)
        timed_out = False
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        size = out.seek(0, os.SEEK_END)
        half = max(max_output // 2, 1)
        out.seek(0)
        if size <= max_output:
            text, truncated = out.read().decode("utf-8", "replace"), False
        else:
            head = out.read(half)
            out.seek(size - half)
            tail = out.read(half)
            text = (head.decode("utf-8", "replace") + f"\n[... {size - 2 * half} bytes omitted ...]\n"
                    + tail.decode("utf-8", "replace"))
            truncated = True
    return {
        "exit_code": proc.returncode,
        "output": text,
        "output_bytes": size,
        "truncated": truncated,
        "timed_out": timed_out,
        "duration_ms": int((time.monotonic() - t0) * 1000),
    }
