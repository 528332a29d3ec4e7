from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.config import EX_CONFIG, MASK, ConfigError, load, render_toml

ROOT = Path(__file__).resolve().parents[2]


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_defaults_without_any_file(tmp_path: Path) -> None:
    cfg = load(None, env={"GATEWAYD_CONFIG": ""} | {})
    assert cfg["thingsboard"]["port"] == 1883
    assert cfg["paths"]["state_dir"] == "/var/lib/gatewayd"
    assert cfg["controller"]["enabled"] is True


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "nope.toml", env={})
    assert "config file not found" in e.value.problems[0]


def test_confd_merged_in_lexical_order(tmp_path: Path) -> None:
    main = write(tmp_path / "gatewayd.toml", '[thingsboard]\nhost = "a"\nport = 1000\n')
    write(tmp_path / "conf.d" / "20-b.toml", '[thingsboard]\nhost = "b"\n')
    write(tmp_path / "conf.d" / "10-a.toml", '[thingsboard]\nhost = "x"\nport = 2000\n')
    write(tmp_path / "conf.d" / "ignored.txt", '[thingsboard]\nhost = "no"\n')
    cfg = load(main, env={})
    assert cfg["thingsboard"]["host"] == "b"
    assert cfg["thingsboard"]["port"] == 2000
    assert cfg.sources[0] == str(main) and cfg.sources[-1].endswith("20-b.toml")


def test_variable_expansion(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", '[thingsboard]\nhost = "${TBHOST}"\ndevice_name = "${NAME:-edge-1}"\n'
                                      'access_token = "pre-${TOK:-x}-post"\n')
    cfg = load(main, env={"TBHOST": "tb.example", "TOK": "abc"})
    assert cfg["thingsboard"]["host"] == "tb.example"
    assert cfg["thingsboard"]["device_name"] == "edge-1"
    assert cfg["thingsboard"]["access_token"] == "pre-abc-post"


def test_unset_variable_without_default_is_reported(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", '[thingsboard]\nhost = "${NOPE}"\n')
    with pytest.raises(ConfigError) as e:
        load(main, env={})
    assert any("${NOPE} is not set" in p for p in e.value.problems)


def test_environment_overrides(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", '[thingsboard]\nhost = "file"\nport = 1\n')
    env = {"THINGSBOARD_HOST": "envhost", "THINGSBOARD_PORT": "8883", "THINGSBOARD_ACCESS_TOKEN": "tok",
           "THINGSBOARD_DEVICE_NAME": "dev", "GATEWAYD_STATE_DIR": "/srv/gw",
           "THINGSBOARD_PROVISION_DEVICE_KEY": "k", "THINGSBOARD_PROVISION_DEVICE_SECRET": "s"}
    cfg = load(main, env=env)
    tb = cfg["thingsboard"]
    assert (tb["host"], tb["port"], tb["access_token"], tb["device_name"]) == ("envhost", 8883, "tok", "dev")
    assert cfg.state_dir == Path("/srv/gw")
    assert cfg.queues_db == Path("/srv/gw/queues.db")


def test_bad_env_port(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path / "g.toml", ""), env={"THINGSBOARD_PORT": "http"})
    assert e.value.problems == ["$THINGSBOARD_PORT='http': thingsboard.port must be an integer"]


def test_every_problem_reported_one_line_each(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", """
[thingsboard]
port = 70000
tls = "yes"
mqtt_version = "4"
provision_device_key = "only-key"
[paths]
state_dir = "relative/dir"
[outbox]
max_rows = 0
[forwarder]
batch_size = true
""")
    with pytest.raises(ConfigError) as e:
        load(main, env={})
    problems = e.value.problems
    joined = "\n".join(problems)
    assert "[thingsboard] port = 70000: must be between 1 and 65535" in joined
    assert "[thingsboard] tls = 'yes': must be true or false" in joined
    assert "mqtt_version = '4': must be one of '3.1.1', '5'" in joined
    assert "provision_device_key and provision_device_secret: set both or neither" in joined
    assert "state_dir = 'relative/dir': must be an absolute path" in joined
    assert "[outbox] max_rows = 0: must be at least 1" in joined
    assert "[forwarder] batch_size = True: must be an integer" in joined
    assert all("\n" not in p for p in problems)
    assert len(problems) == 7


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path / "g.toml", "[thingsboard\nhost="), env={})
    assert "not valid TOML" in e.value.problems[0]


def test_unknown_keys_warn(tmp_path: Path) -> None:
    cfg = load(write(tmp_path / "g.toml", '[thingsboard]\nhots = "x"\n[nosuch]\na = 1\n'), env={})
    assert "[thingsboard] hots: unknown key, ignored" in cfg.warnings
    assert "[nosuch]: unknown section, ignored" in cfg.warnings


def test_integer_accepted_for_float_keys(tmp_path: Path) -> None:
    cfg = load(write(tmp_path / "g.toml", "[thingsboard]\nstall_timeout_s = 5\n"), env={})
    assert cfg["thingsboard"]["stall_timeout_s"] == 5.0


def test_masked_hides_secrets(tmp_path: Path) -> None:
    cfg = load(write(tmp_path / "g.toml", '[thingsboard]\naccess_token = "SECRET"\n'
                                          'provision_device_key = "K"\nprovision_device_secret = "S"\n'), env={})
    m = cfg.masked()
    assert m["thingsboard"]["access_token"] == MASK
    assert m["thingsboard"]["provision_device_secret"] == MASK
    assert cfg["thingsboard"]["access_token"] == "SECRET"
    assert "SECRET" not in render_toml(m)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd", *args], capture_output=True, text=True,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=60)


def test_check_config_ok_prints_masked(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", '[thingsboard]\naccess_token = "SECRET"\nhost = "h"\n')
    r = run_cli("--check-config", "--config", str(main))
    assert r.returncode == 0, r.stderr
    assert 'host = "h"' in r.stdout
    assert "SECRET" not in r.stdout and MASK in r.stdout


def test_check_config_bad_exits_78(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", "[thingsboard]\nport = -1\nkeepalive_s = 1\n")
    r = run_cli("--check-config", "--config", str(main))
    assert r.returncode == EX_CONFIG
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("<3>gatewayd: config: [thingsboard]") for line in lines)


def test_daemon_refuses_bad_config_with_78(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", "[thingsboard]\nport = 0\n")
    r = run_cli("forwarder", "--config", str(main))
    assert r.returncode == EX_CONFIG
    assert "port = 0: must be between 1 and 65535" in r.stderr


def test_gatewayd_config_env_names_file(tmp_path: Path) -> None:
    main = write(tmp_path / "g.toml", '[thingsboard]\nhost = "from-env-file"\n')
    r = run_cli("--check-config", env={"GATEWAYD_CONFIG": str(main)})
    assert r.returncode == 0 and 'host = "from-env-file"' in r.stdout
