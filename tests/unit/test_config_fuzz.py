"""Any TOML value for any configuration key: `load` refuses it with one line per problem, or
returns a configuration every daemon can run with (numbers in range, no NUL characters), and
the files themselves may be anything (not UTF-8, a FIFO, too large, a directory)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.config import EX_CONFIG, MAX_FILE_BYTES, MAX_INT, MAX_NUMBER, ConfigError, load, render_toml
from gatewayd.schema import SCHEMA

ROOT = Path(__file__).resolve().parents[2]
KEYS = sorted((s, n) for s, keys in SCHEMA.items() for n in keys)

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, 1, 5, 65535, 65536, MAX_INT, MAX_INT + 1, -MAX_INT - 2]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([MAX_NUMBER, MAX_NUMBER * 1.0000001, 1e300, float("inf"), float("-inf"), float("nan")]),
    st.text(max_size=20),
    st.sampled_from(["\0", "/tmp/a\0b", "127.0.0.1:9\0", ""]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def _walk(value: Any) -> Any:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def assert_runnable(data: dict[str, dict[str, Any]]) -> None:
    for section, keys in data.items():
        for name, value in keys.items():
            for leaf in _walk(value):
                if isinstance(leaf, str):
                    assert "\0" not in leaf, (section, name)
                elif isinstance(leaf, float):
                    assert math.isfinite(leaf) and abs(leaf) <= MAX_NUMBER, (section, name, leaf)
                elif isinstance(leaf, int) and not isinstance(leaf, bool):
                    assert -MAX_INT - 1 <= leaf <= MAX_INT, (section, name, leaf)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=4))
def test_any_value_for_any_key_is_refused_or_runnable(tmp_path: Path, assignments: list[tuple[Any, Any]]) -> None:
    data: dict[str, dict[str, Any]] = {"paths": {"state_dir": "/tmp/s", "runtime_dir": "/tmp/r",
                                                 "controller_data_dir": "/tmp/c"}}
    for (section, name), value in assignments:
        data.setdefault(section, {})[name] = value
    path = tmp_path / "g.toml"
    path.write_text(render_toml(data))
    try:
        cfg = load(path, env={})
    except ConfigError as e:
        assert e.problems and all(p and "\n" not in p for p in e.problems)
        return
    assert_runnable(cfg.data)


@pytest.mark.parametrize("text, reason", [
    ("[thingsboard]\nreconnect_max_s = inf\n", "reconnect_max_s = inf: must be a finite number"),
    ("[forwarder]\nwait_for_clock_max_s = inf\n", "wait_for_clock_max_s = inf: must be a finite number"),
    ("[archive]\nretention_days = 1e300\n", "retention_days = 1e+300: must be a finite number"),
    ("[forwarder]\nbatch_size = 1180591620717411303424\n", "batch_size = 1180591620717411303424: must be between"),
    ("[thingsboard]\nkeepalive_s = 65536\n", "keepalive_s = 65536: must be between 5 and 65535"),
    ("[paths]\nstate_dir = \"/var/lib/a\\u0000b\"\n", "must not contain a NUL character"),
])
def test_values_that_used_to_stop_a_daemon_are_refused(tmp_path: Path, text: str, reason: str) -> None:
    """Each of these passed --check-config and then crashed a daemon (inf, a NUL in a path),
    wedged its loop on an OverflowError (an integer SQLite cannot bind) or kept the bridge
    from ever connecting (a keep-alive MQTT cannot encode)."""
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path, env={})
    assert any(reason in p for p in e.value.problems), e.value.problems


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd", "--check-config", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"}, timeout=30)


def test_unreadable_files_are_one_line_each(tmp_path: Path) -> None:
    """A Latin-1 comment, a FIFO (used to hang start-up), an oversized drop-in: each one line,
    exit 78, never a traceback."""
    main = tmp_path / "g.toml"
    main.write_bytes("# caf\u00e9 in Latin-1\n".encode("latin-1") + b"[thingsboard]\nhost = \"h\"\n")
    confd = tmp_path / "conf.d"
    confd.mkdir()
    os.mkfifo(confd / "10-fifo.toml")
    (confd / "20-dir.toml").mkdir()
    with open(confd / "30-huge.toml", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    r = run_check(main)
    assert r.returncode == EX_CONFIG, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert any("g.toml: cannot read: not valid UTF-8 (byte 0xe9" in line for line in lines), lines
    assert any("30-huge.toml: cannot read: larger than" in line for line in lines), lines
    assert len(lines) == 2, lines  # the FIFO and the directory are not files: skipped as before


def test_a_fifo_as_the_main_file_is_refused_not_waited_for(tmp_path: Path) -> None:
    main = tmp_path / "g.toml"
    os.mkfifo(main)
    r = run_check(main)
    assert r.returncode == EX_CONFIG
    assert "g.toml: cannot read: not a regular file" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run as another user")
def test_what_another_user_cannot_read_is_refused_not_skipped() -> None:
    """The daemons run as their own user. A conf.d it cannot list was skipped in silence, so a
    daemon ran with another configuration than `--check-config` showed root (here: another
    server); a configuration directory it cannot enter was a traceback."""
    with tempfile.TemporaryDirectory(prefix="gatewayd-test-") as top:  # pytest's own is root's alone
        other_user_cannot_read(Path(top))


def other_user_cannot_read(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    confd = etc / "conf.d"
    confd.mkdir(parents=True)
    main = etc / "gatewayd.toml"
    main.write_text('[thingsboard]\nhost = "default.example"\n')
    (confd / "10-site.toml").write_text('[thingsboard]\nhost = "site.example"\n')
    tmp_path.chmod(0o755)
    etc.chmod(0o755)
    main.chmod(0o644)
    as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_nobody, sys.executable, "-m", *args, "--config", str(main)], capture_output=True,
                              text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=30)

    r = run("gatewayd", "--check-config")
    assert r.returncode == 0 and 'host = "site.example"' in r.stdout, r.stderr
    for mode, unreadable in ((0o700, confd), (0o755, None)):
        confd.chmod(mode)
        etc.chmod(0o700 if unreadable is None else 0o755)
        unreadable = unreadable or main
        for argv in (("gatewayd", "--check-config"), ("gatewayd", "forwarder"), ("gatewayd.ctl", "status")):
            r = run(*argv)
            assert r.returncode == EX_CONFIG and "Traceback" not in r.stderr, (argv, r.stderr[-2000:])
            assert unreadable == main or f"{main}: cannot read" not in r.stderr, (argv, r.stderr)
            assert f"{unreadable}: cannot read: Permission denied" in r.stderr, (argv, r.stderr)
