"""Hypothesis strategies for what a controller can store in `messages(type, message)`.

Every SQL type (TEXT, BLOB, INTEGER, REAL, NULL), TEXT that is not valid UTF-8, arbitrary
JSON of any shape, records with huge integers and floats, nesting thousands of levels deep,
and values longer than the forwarder reads. Each strategy yields `(spec, python_value)`:
the spec for `tests.helpers.datapath.Writer`, the value as Python sees it (bytes for TEXT/BLOB).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from tests.helpers.datapath import big_message, spec

Value = tuple[dict[str, Any], Any]

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


@st.composite
def deep(draw: st.DrawFn) -> str:
    """A record whose values nest 1..5000 levels (arrays, objects, or both)."""
    depth = draw(st.integers(1, 5000))
    kind = draw(st.sampled_from(["[", '{"a":']))
    close = "]" if kind == "[" else "}"
    inner = kind * depth + "1" + close * depth
    return '{"ts": 1, "values": {"deep": ' + inner + "}}"


def records() -> st.SearchStrategy[str]:
    """Record-shaped JSON: integer or odd `ts`, arbitrary values (huge numbers included)."""
    ts = st.integers() | st.integers(-(2**63), 2**63 - 1) | json_scalars
    values = st.dictionaries(st.text(max_size=10), json_values, max_size=5) | json_values
    extra = st.dictionaries(st.text(max_size=5), json_scalars, max_size=2)
    return st.builds(lambda t, v, e: _dumps({**e, "ts": t, "values": v}), ts, values, extra)


def valid_records() -> st.SearchStrategy[str]:
    """Records the forwarder must accept (64-bit ints, finite floats, shallow)."""
    leaf = (st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=20) | st.booleans() | st.none())
    values = st.dictionaries(st.text(max_size=10), leaf, min_size=1, max_size=5)
    return st.builds(lambda t, v: _dumps({"ts": t, "values": v}), st.integers(0, 2**63 - 1), values)


def _text(s: str) -> Value:
    return spec("text", s), s.encode()


texts = st.one_of(
    st.text(max_size=40).map(_text),
    st.builds(_dumps, json_values).map(_text),
    records().map(_text),
    valid_records().map(_text),
    deep().map(_text),
)

messages: st.SearchStrategy[Value] = st.one_of(
    texts,
    st.binary(max_size=60).map(lambda b: (spec("textbytes", b), b)),        # TEXT, often invalid UTF-8
    records().map(lambda s: (spec("textbytes", s.encode("latin-1", "replace")), s.encode("latin-1", "replace"))),
    st.binary(max_size=60).map(lambda b: (spec("blob", b), b)),
    valid_records().map(lambda s: (spec("blob", s.encode()), s.encode())),  # JSON stored as BLOB
    st.integers(-(2**63), 2**63 - 1).map(lambda i: (spec("int", i), i)),
    st.floats(allow_nan=False).map(lambda f: (spec("real", f), f)),
    st.just((spec("null"), None)),
    st.integers(60_000, 3_000_000).map(lambda n: (spec("big", n), big_message(n).encode())),  # up to 3x the read limit
)

types: st.SearchStrategy[Value] = st.one_of(
    st.sampled_from(["telemetry", "attributes", "controller_log", "weird"]).map(_text),
    st.just((spec("null"), None)),
    st.binary(max_size=20).map(lambda b: (spec("textbytes", b), b)),
    st.binary(max_size=20).map(lambda b: (spec("blob", b), b)),
    st.integers().filter(lambda i: -(2**63) <= i < 2**63).map(lambda i: (spec("int", i), i)),
    st.integers(300, 5000).map(lambda n: (spec("text", "t" * n), b"t" * n)),  # longer than a type may be
)
