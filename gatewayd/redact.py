"""Keeping secrets out of everything gatewayd prints, logs, ships or replies.

Two layers. The config printers mask by *key* (`Config.masked()`: every key marked secret,
every value of `[controller] environment`). Below that, this module masks by *value*: each
process registers the secret values it knows (configured token, provisioning key and secret,
controller environment values under secret-looking names, what `credentials.json` holds),
and every log line, status
report, support-bundle file and RPC reply passes through `redact()`, so a secret that ends up
in an error message, a traceback or a command's output is masked there too.

Values shorter than `MIN_LENGTH` are not registered: masking every "test" in every log line
would destroy the logs and protect nothing. URL passwords (`scheme://user:password@host`)
are masked whatever their value.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MASK = "********"
MIN_LENGTH = 6

_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@")

_lock = threading.Lock()
_known: frozenset[str] = frozenset()
_pattern: re.Pattern[str] | None = None


def _variants(value: str) -> set[str]:
    """The value as written, and as it appears inside a JSON or Python string literal."""
    out = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1], repr(value)[1:-1]}
    return {v for v in out if len(v) >= MIN_LENGTH}


def register(values: Iterable[Any]) -> None:
    """Add secret values (non-strings and short strings are ignored) to the process-wide set."""
    global _known, _pattern
    new: set[str] = set()
    for v in values:
        if isinstance(v, str) and len(v) >= MIN_LENGTH:
            new |= _variants(v)
    with _lock:
        if new <= _known:
            return
        known = _known | new
        # Longest first, so a secret containing another is masked whole.
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(known, key=len, reverse=True)))
        _known = frozenset(known)


def registered() -> frozenset[str]:
    return _known


def reset() -> None:
    """Forget every registered value (tests)."""
    global _known, _pattern
    with _lock:
        _known, _pattern = frozenset(), None


def redact(text: str) -> str:
    """`text` with every registered secret and every URL password replaced by the mask."""
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", text)
    return text


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like structure with `redact()` applied to every string, keys included."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


def saved_credentials(path: Path) -> list[str]:
    """Every string in a saved `credentials.json` (best effort: unreadable means nothing to add)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict):
        return []
    keep = ("accessToken", "credentialsValue", "userName", "password", "clientId", "token")
    return [v for k, v in data.items() if k in keep and isinstance(v, str)]


def register_config(cfg: Any) -> None:
    """Register what a resolved configuration and the saved credentials beside it hold."""
    register(cfg.secret_values())
    register(saved_credentials(cfg.credentials_file))
