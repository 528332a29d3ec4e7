"""The privacy policy: what of a record's `values` may leave the device or reach the archive.

`[[privacy.rules]]` act on the top-level keys of `values`, in order: the first rule whose
`match` (a key name or a glob: `*`, `?`, `[...]`, `[!...]`, case-sensitive, the whole key)
fits a key decides it — `drop` removes the key, `redact` replaces its value with "***",
`hash` with the hex HMAC-SHA256 of the value under `[privacy] hash_key` (a string's UTF-8
bytes, any other value's compact JSON text), `round` rounds a number to `digits` decimals
(other values are left alone). A key matching `[privacy] drop_record_if` drops the whole
record, and so does a policy that leaves `values` empty.

Compiled once: every key's decision is a pure function of its name, so it is cached, and a
record none of whose keys is touched is returned as it came (the forwarder then keeps the
controller's own text).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

ACTIONS = ("drop", "redact", "hash", "round")
REDACTED = "***"
MIN_HASH_KEY = 16
DIGITS_RANGE = (-15, 15)
RULE_KEYS = {"match", "action", "digits"}
_CACHE_MAX = 4096

_KEEP, _DROP_RECORD = 0, 1  # key decisions; a rule's decision is its index + 2


class GlobError(ValueError):
    pass


def glob_regex(pattern: str) -> str:
    """The regular expression of a glob with `fnmatch.fnmatchcase`'s meaning, except that what
    fnmatch silently takes literally is an error: an unclosed `[` and a reversed range."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                raise GlobError(f"'[' at position {i - 1} is never closed")
            body = pattern[i:j]
            i = j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            parts = []
            k = 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    lo, hi = body[k], body[k + 2]
                    if lo > hi:
                        raise GlobError(f"range {lo}-{hi} is reversed")
                    parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
                    k += 3
                else:
                    parts.append(re.escape(body[k]))
                    k += 1
            out.append(("[^" if negate else "[") + "".join(parts) + "]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pattern_problem(where: str, pattern: Any) -> str | None:
    if not isinstance(pattern, str) or not pattern:
        return f"{where}: must be a non-empty string (a key name or a glob)"
    try:
        re.compile(glob_regex(pattern))
    except (GlobError, re.error) as e:
        return f"{where} = {pattern!r}: not a valid glob: {e}"
    return None


def problems(section: Mapping[str, Any]) -> list[str]:
    """Every problem of a `[privacy]` section, one line each (empty: it compiles)."""
    out: list[str] = []
    rules = section.get("rules", [])
    drop_if = section.get("drop_record_if", [])
    hash_key = section.get("hash_key", "")
    if isinstance(drop_if, list):
        for i, pattern in enumerate(drop_if):
            problem = _pattern_problem(f"[privacy] drop_record_if[{i}]", pattern)
            if problem:
                out.append(problem)
    if not isinstance(rules, list):
        return out  # the type check of the schema reports it
    hashing = False
    for n, rule in enumerate(rules, 1):
        where = f"[[privacy.rules]] #{n}"
        if not isinstance(rule, dict):
            out.append(f"{where}: must be a table with match and action")
            continue
        unknown = sorted(str(k) for k in rule if k not in RULE_KEYS)
        if unknown:
            out.append(f"{where}: unknown key(s) {', '.join(unknown)} (a rule has match, action and, "
                       "for round, digits)")
        if "match" not in rule:
            out.append(f"{where}: match is missing")
        else:
            problem = _pattern_problem(f"{where} match", rule["match"])
            if problem:
                out.append(problem)
        action = rule.get("action")
        if action is None:
            out.append(f"{where}: action is missing (one of {', '.join(ACTIONS)})")
        elif action not in ACTIONS:
            out.append(f"{where}: action = {action!r}: must be one of {', '.join(ACTIONS)}")
        if action == "round":
            digits = rule.get("digits")
            lo, hi = DIGITS_RANGE
            if digits is None:
                out.append(f"{where}: action round needs digits (decimals to keep, {lo} to {hi})")
            elif not _int(digits) or not lo <= digits <= hi:
                out.append(f"{where}: digits = {digits!r}: must be an integer from {lo} to {hi}")
        elif "digits" in rule:
            out.append(f"{where}: digits applies to action round only")
        hashing = hashing or action == "hash"
    if hashing and isinstance(hash_key, str) and len(hash_key) < MIN_HASH_KEY:
        out.append("[privacy] hash_key: " + ("must be set" if not hash_key else f"must be at least {MIN_HASH_KEY} "
                   "characters") + " for a hash rule (a short key lets anyone recompute the hashes)")
    return out


def _hash_input(value: Any) -> bytes:
    """What is hashed of a value: a string's UTF-8 bytes, anything else as compact JSON."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                                                           sort_keys=True)
    return text.encode("utf-8", "surrogatepass")


def hash_value(key: bytes, value: Any) -> str:
    """HMAC-SHA256 hex of a value."""
    return hmac.new(key, _hash_input(value), hashlib.sha256).hexdigest()


def _redact(_value: Any) -> str:
    return REDACTED


def _hasher(key: bytes) -> Callable[[Any], str]:
    """`hash_value` with the key's inner and outer SHA-256 states computed once (RFC 2104): a
    copy per value costs less than half of `hmac.new`."""
    block = hashlib.sha256().block_size
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def act(v: Any) -> str:
        i = inner.copy()
        i.update(_hash_input(v))
        o = outer.copy()
        o.update(i.digest())
        return o.hexdigest()

    return act


def _rounder(digits: int) -> Callable[[Any], Any]:
    def act(v: Any) -> Any:
        t = type(v)
        return round(v, digits) if t is float or t is int else v

    return act


class Policy:
    """A compiled policy; `apply(values)` is all the forwarder calls."""

    def __init__(self, rules: list[dict[str, Any]], drop_record_if: list[str], hash_key: str):
        key = hash_key.encode()
        self._actions: list[Callable[[Any], Any] | None] = []  # None: drop the key
        for rule in rules:
            action = rule["action"]
            if action == "drop":
                self._actions.append(None)
            elif action == "redact":
                self._actions.append(_redact)
            elif action == "hash":
                self._actions.append(_hasher(key))
            else:
                self._actions.append(_rounder(rule["digits"]))
        # (literal names, compiled globs) per decision, in the order they are tried
        self._tests: list[tuple[int, frozenset[str], re.Pattern[str] | None]] = []
        self._add_test(_DROP_RECORD, drop_record_if)
        for i, rule in enumerate(rules):
            self._add_test(i + 2, [rule["match"]])
        self._decisions: dict[str, int] = {}

    def _add_test(self, decision: int, patterns: list[str]) -> None:
        names = frozenset(p for p in patterns if not _is_glob(p))
        globs = [glob_regex(p) for p in patterns if _is_glob(p)]
        regex = re.compile("(?s:" + "|".join(f"(?:{g})" for g in globs) + r")\Z") if globs else None
        self._tests.append((decision, names, regex))

    def _decide(self, key: str) -> int:
        decision = next((d for d, names, regex in self._tests
                         if key in names or (regex is not None and regex.match(key))), _KEEP)
        if len(self._decisions) >= _CACHE_MAX:
            self._decisions.clear()
        self._decisions[key] = decision
        return decision

    def apply(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """`values` itself when no key is touched, a new dict when some are, None when the
        record must be dropped (a `drop_record_if` key, or nothing left)."""
        decisions = self._decisions
        touched = False
        for k in values:
            d = decisions.get(k)
            if d is None:
                d = self._decide(k)
            if d:
                if d == _DROP_RECORD:
                    return None
                touched = True
        if not touched:
            return values
        out: dict[str, Any] = {}
        actions = self._actions
        for k, v in values.items():
            d = decisions.get(k)
            if d is None:
                d = self._decide(k)
            if not d:
                out[k] = v
                continue
            act = actions[d - 2]
            if act is not None:
                out[k] = act(v)
        return out or None


def configured(section: Mapping[str, Any]) -> bool:
    """Whether a `[privacy]` section has anything to do: rules or whole-record drops."""
    return bool(section.get("rules") or section.get("drop_record_if"))


def compile_policy(section: Mapping[str, Any]) -> Policy | None:
    """The policy of a validated `[privacy]` section; None when it has nothing to do (the
    forwarder's fast path)."""
    if not configured(section):
        return None
    return Policy(list(section.get("rules") or []), list(section.get("drop_record_if") or []),
                  section.get("hash_key") or "")
