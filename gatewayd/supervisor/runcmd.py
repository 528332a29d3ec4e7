"""Run one program without a shell, with a timeout, bounded output and a minimal environment;
and the allow-list that decides which command lines `run_command` may run.

Allow-list entries (`[supervisor] run_command_allow`) are whole command lines, split like a
shell would (quotes, no expansion): the first word is the program (a path, or a name looked
up in `CLEAN_PATH`), every further word a pattern for exactly one argument (`*`, `?`, `[...]`
as in shell globs, matched against the whole argument; a literal `*` is written `[*]`). A
last word `**` allows any number of further arguments. So `"systemctl status gatewayd-*"`
allows `systemctl status gatewayd-bridge` and nothing else, and `"echo **"` allows echo with
any arguments. Programs run with `MINIMAL_ENV` plus `[supervisor] run_command_environment`,
never with the supervisor's own environment, in `/`.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MINIMAL_ENV = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8"}
ANY_FURTHER = "**"


class NotAllowed(Exception):
    """A command line the allow-list does not allow (the message says why)."""


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(MINIMAL_ENV)
    env.update({str(k): str(v) for k, v in (extra or {}).items()})
    return env


@dataclass(frozen=True)
class AllowRule:
    program: str
    args: tuple[str, ...]
    any_further: bool

    @staticmethod
    def parse(entry: str) -> AllowRule:
        words = shlex.split(entry)
        any_further = len(words) > 1 and words[-1] == ANY_FURTHER
        return AllowRule(words[0], tuple(words[1:-1] if any_further else words[1:]), any_further)

    def names(self, program: str) -> bool:
        """`program` is this rule's: the same word, or its base name when the rule gives a path."""
        return program == self.program or ("/" not in program and "/" in self.program
                                           and os.path.basename(self.program) == program)

    def allows_args(self, args: list[str]) -> bool:
        if len(args) < len(self.args) or (len(args) > len(self.args) and not self.any_further):
            return False
        return all(fnmatch.fnmatchcase(a, p) for a, p in zip(args, self.args, strict=False))


def check_argv(argv: list[str], allow: list[str]) -> list[str]:
    """The argv to run (program resolved) when an allow-list entry allows it; NotAllowed otherwise."""
    for arg in argv:
        if "\0" in arg:
            raise NotAllowed("an argument contains a NUL character")
        if arg.encode("utf-8", "backslashreplace").decode("utf-8") != arg:
            raise NotAllowed("an argument is not valid Unicode text")
    rules = [AllowRule.parse(e) for e in allow]
    named = [r for r in rules if r.names(argv[0])]
    if not named:
        raise NotAllowed(f"command {argv[0]!r} is not allowed ([supervisor] run_command_allow)")
    rule = next((r for r in named if r.allows_args(argv[1:])), None)
    if rule is None:
        shown = "; ".join(shlex.join([r.program, *r.args]) + (" **" if r.any_further else "") for r in named)
        raise NotAllowed(f"these arguments of {argv[0]!r} are not allowed ([supervisor] run_command_allow "
                         f"allows: {shown})")
    resolved = rule.program if "/" in rule.program else shutil.which(rule.program, path=CLEAN_PATH)
    if not resolved:
        raise NotAllowed(f"command {argv[0]!r} is allowed but not installed")
    return [resolved, *argv[1:]]


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
