"""Configuration: TOML main file + conf.d drop-ins, ${VAR} expansion, env overrides, validation.

Every daemon and gatewayctl resolve their configuration here, so that what
`gatewayd --check-config` prints is exactly what the daemons run with.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatewayd import privacy
from gatewayd.redact import MASK, redact
from gatewayd.schema import INGEST_TOPIC_KEYS, SCHEMA, Key

DEFAULT_CONFIG_PATH = "/etc/gatewayd/gatewayd.toml"
EX_CONFIG = 78
# Bounds every number in a configuration must keep, whatever its key: an integer must fit
# SQLite's INTEGER (it may become a query parameter), a number of seconds (or days) must be
# finite and one that `time.sleep`, `select` and `threading` take (a billion seconds is 31
# years). Larger values used to pass --check-config and then crash or wedge a daemon.
MAX_INT = 2**63 - 1
MAX_NUMBER = 1e9
# A configuration file is read whole; anything larger is not a configuration.
MAX_FILE_BYTES = 4 * 1024 * 1024


class ConfigError(Exception):
    """Raised with every problem found, one line each, so an operator fixes them all at once."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "THINGSBOARD_HOST": ("thingsboard", "host"),
    "THINGSBOARD_PORT": ("thingsboard", "port"),
    "THINGSBOARD_ACCESS_TOKEN": ("thingsboard", "access_token"),
    "THINGSBOARD_PROVISION_DEVICE_KEY": ("thingsboard", "provision_device_key"),
    "THINGSBOARD_PROVISION_DEVICE_SECRET": ("thingsboard", "provision_device_secret"),
    "THINGSBOARD_DEVICE_NAME": ("thingsboard", "device_name"),
    "THINGSBOARD_CA_CERT": ("thingsboard", "ca_cert"),
    "GATEWAYD_STATE_DIR": ("paths", "state_dir"),
}

# Environment variable names whose values are masked in any text, not only in printed configs.
SECRET_NAME = re.compile(r"PASS|PWD|SECRET|TOKEN|KEY|CRED|AUTH|PRIVATE|SALT|COOKIE|SESSION|DSN", re.IGNORECASE)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class Config:
    """The resolved configuration: `data[section][key]`, plus where it came from."""

    data: dict[str, dict[str, Any]]
    sources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.data[section]

    @property
    def state_dir(self) -> Path:
        return Path(self.data["paths"]["state_dir"])

    @property
    def runtime_dir(self) -> Path:
        return Path(self.data["paths"]["runtime_dir"])

    @property
    def controller_data_dir(self) -> Path:
        return Path(self.data["paths"]["controller_data_dir"])

    @property
    def controller_db(self) -> Path:
        return self.controller_data_dir / "communication_queue.db"

    @property
    def queues_db(self) -> Path:
        return self.state_dir / "queues.db"

    @property
    def archive_db(self) -> Path:
        return self.state_dir / "archive.db"

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / "credentials.json"

    def device_name(self) -> str:
        return self.data["thingsboard"]["device_name"] or socket.gethostname()

    def allowed_roots(self) -> list[Path]:
        roots = self.data["files"]["allowed_roots"] or [str(self.controller_data_dir)]
        return [Path(r) for r in roots]

    def secret_values(self) -> list[str]:
        """Configured values to mask wherever they appear: the secret keys, and the controller
        environment values whose names look secret (all of them would mask words like "info")."""
        out = [self.data[s][n] for s, keys in SCHEMA.items() for n, k in keys.items()
               if k.secret and isinstance(self.data[s][n], str) and self.data[s][n]]
        tables = [self.data["controller"]["environment"]]
        tables.extend(self.data[s][n] for s, keys in SCHEMA.items() for n, k in keys.items()
                      if k.secret and isinstance(self.data[s][n], dict))
        out.extend(str(v) for table in tables for k, v in table.items() if SECRET_NAME.search(k))
        return out

    def masked(self) -> dict[str, dict[str, Any]]:
        """A copy safe to print or ship in a support bundle: secrets and URL passwords masked."""
        out = copy.deepcopy(self.data)
        for section, keys in SCHEMA.items():
            for name, key in keys.items():
                value = out[section].get(name)
                if key.secret and isinstance(value, dict):
                    out[section][name] = {k: MASK for k in value}
                elif key.secret and value:
                    out[section][name] = MASK
        out["controller"]["environment"] = {k: MASK for k in out["controller"]["environment"]}
        return {s: {k: _map_strings(v, redact) for k, v in keys.items()} for s, keys in out.items()}

    def ingest_adapters(self) -> list[str]:
        """The ingest adapters switched on (an address set); none: `gatewayd ingest` has nothing to do."""
        on = {"mqtt": self.data["ingest.mqtt"]["host"], "http": self.data["ingest.http"]["listen"],
              "spool": self.data["ingest.spool"]["directory"]}
        return [name for name, address in on.items() if address]

    def ensure_dirs(self) -> None:
        for d in (self.state_dir, self.runtime_dir, self.controller_data_dir):
            d.mkdir(parents=True, exist_ok=True)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    return value


def _expand(value: Any, env: Mapping[str, str], where: str, problems: list[str]) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and (env[name] != "" or default is None):
                return env[name]
            if default is not None:
                return default
            problems.append(f"{where}: environment variable ${{{name}}} is not set")
            return ""

        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [_expand(v, env, where, problems) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, env, f"{where}.{k}", problems) for k, v in value.items()}
    return value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _coerce_env(raw: str, key: Key) -> Any:
    types = key.type if isinstance(key.type, tuple) else (key.type,)
    if bool in types:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if int in types and float not in types:
        return int(raw.strip())
    if float in types:
        return float(raw.strip())
    return raw


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a table"}
    if isinstance(t, tuple):
        return names[float] if float in t else " or ".join(names[x] for x in t)
    return names[t]


def _check_type(value: Any, key: Key) -> bool:
    types = key.type if isinstance(key.type, tuple) else (key.type,)
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _number_problem(value: Any, key: Key) -> str | None:
    """Out of the range every number must keep (MAX_INT, MAX_NUMBER), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    types = key.type if isinstance(key.type, tuple) else (key.type,)
    if float in types:
        if not math.isfinite(value) or abs(value) > MAX_NUMBER:
            return f"must be a finite number between {-MAX_NUMBER:g} and {MAX_NUMBER:g}"
    elif not -MAX_INT - 1 <= value <= MAX_INT:
        return f"must be between {-MAX_INT - 1} and {MAX_INT}"
    return None


def _has_nul(value: Any) -> bool:
    """A NUL character anywhere in a value: no path, host, topic or argument can hold one."""
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


def _read_toml(f: Path) -> dict[str, Any]:
    """Parse one file; OSError or ValueError (with the reason) for anything that is not a
    regular UTF-8 TOML file of a sane size. Opened non-blocking: a FIFO never hangs start-up."""
    fd = os.open(f, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return tomllib.loads(text)


def _drop_ins(confd: Path, problems: list[str], warnings: list[str]) -> list[Path]:
    """`conf.d/*.toml` in lexical order. A conf.d that exists but cannot be listed is a problem:
    skipping it silently ran a daemon (as its own user) with another configuration than the one
    `--check-config` showed root."""
    try:
        entries = sorted((e for e in os.scandir(confd) if e.name.endswith(".toml")), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        problems.append(f"{confd}: cannot read: {e.strerror}")
        return []
    out = []
    for entry in entries:
        try:
            regular = entry.is_file()
        except OSError:
            regular = False
        if regular:
            out.append(Path(entry.path))
        else:
            warnings.append(f"{entry.path}: not a regular file, ignored")
    return out


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Resolve the configuration; raise ConfigError listing every problem found."""
    env = os.environ if env is None else env
    main = Path(path) if path else Path(env.get("GATEWAYD_CONFIG") or DEFAULT_CONFIG_PATH)
    problems: list[str] = []
    warnings: list[str] = []
    merged: dict[str, Any] = {}
    sources: list[str] = []

    files: list[Path] = []
    try:
        os.stat(main)
        files.append(main)
    except (FileNotFoundError, NotADirectoryError):
        if path is not None or env.get("GATEWAYD_CONFIG"):
            problems.append(f"{main}: config file not found")
    except OSError as e:   # a directory this user may not enter: say so, like an unreadable file
        problems.append(f"{main}: cannot read: {e.strerror}")
    files.extend(_drop_ins(main.parent / "conf.d", problems, warnings))

    for f in files:
        try:
            doc = _read_toml(f)
        except tomllib.TOMLDecodeError as e:
            problems.append(f"{f}: not valid TOML: {e}")
            continue
        except OSError as e:
            problems.append(f"{f}: cannot read: {e.strerror}")
            continue
        except ValueError as e:
            problems.append(f"{f}: cannot read: {e}")
            continue
        sources.append(str(f))
        _merge(merged, _expand(doc, env, str(f), problems))

    data: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given: Any = merged
        for part in section.split("."):  # "ingest.mqtt" is the TOML table [ingest.mqtt]
            given = given.get(part, {}) if isinstance(given, dict) else None
        if not isinstance(given, dict):
            problems.append(f"[{section}]: must be a table")
            given = {}
        data[section] = {}
        for name, key in keys.items():
            data[section][name] = copy.deepcopy(key.default)
        for name, value in given.items():
            if f"{section}.{name}" in SCHEMA:
                continue
            if name not in keys:
                warnings.append(f"[{section}] {name}: unknown key, ignored")
                continue
            data[section][name] = value
    for section in merged:
        if section not in SCHEMA:
            warnings.append(f"[{section}]: unknown section, ignored")

    for var, (section, name) in ENV_OVERRIDES.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            data[section][name] = _coerce_env(raw, SCHEMA[section][name])
        except ValueError:
            problems.append(f"${var}={raw!r}: {section}.{name} must be {_type_name(SCHEMA[section][name].type)}")
        else:
            sources.append(f"${var}")

    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            value = data[section][name]
            shown = MASK if key.secret or (section, name) == ("controller", "environment") else repr(value)
            if not _check_type(value, key):
                problems.append(f"[{section}] {name} = {shown}: must be {_type_name(key.type)}")
                continue
            out_of_range = _number_problem(value, key)
            if out_of_range:
                problems.append(f"[{section}] {name} = {shown}: {out_of_range}")
                continue
            if _has_nul(value):
                problems.append(f"[{section}] {name} = {shown}: must not contain a NUL character (\\u0000)")
                continue
            if isinstance(key.type, tuple) and float in key.type:
                data[section][name] = value = float(value)
            if key.check is not None:
                msg = key.check(value)
                if msg:
                    problems.append(f"[{section}] {name} = {shown}: {msg}")

    tb = data["thingsboard"]
    if isinstance(tb.get("host"), str) and not tb["host"].strip():
        problems.append("[thingsboard] host: must not be empty")
    for name in ("ca_cert", "client_cert", "client_key"):
        p = tb.get(name)
        if isinstance(p, str) and p and not Path(p).is_file():
            problems.append(f"[thingsboard] {name} = {p!r}: file not found")
    if isinstance(tb.get("client_cert"), str) and bool(tb["client_cert"]) != bool(tb.get("client_key")):
        problems.append("[thingsboard] client_cert and client_key: set both or neither")
    if bool(tb.get("provision_device_key")) != bool(tb.get("provision_device_secret")):
        problems.append("[thingsboard] provision_device_key and provision_device_secret: set both or neither")
    for name in ("state_dir", "runtime_dir", "controller_data_dir"):
        p = data["paths"].get(name)
        if isinstance(p, str) and not os.path.isabs(p):
            problems.append(f"[paths] {name} = {p!r}: must be an absolute path")

    mq = data["ingest.mqtt"]
    if mq.get("host") and not any(mq.get(k) for k in INGEST_TOPIC_KEYS):
        problems.append("[ingest.mqtt] topics: with a host set, at least one topic list must be non-empty")
    spool = data["ingest.spool"].get("directory")
    if isinstance(spool, str) and spool and not os.path.isabs(spool):
        problems.append(f"[ingest.spool] directory = {spool!r}: must be an absolute path")

    problems.extend(privacy.problems(data["privacy"]))

    if problems:
        raise ConfigError(problems)
    return Config(data=data, sources=sources, warnings=warnings)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    return toml_value(str(v))


def render_toml(data: Mapping[str, Mapping[str, Any]]) -> str:
    """Print a resolved config as TOML (for --check-config, support bundles and test configs)."""
    lines: list[str] = []
    for section, keys in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
        lines.append("")
    return "\n".join(lines)
