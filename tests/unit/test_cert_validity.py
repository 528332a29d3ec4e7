"""The certificate validity reader of `gatewayctl check` (gatewayd.diagnostics): exact dates
from real certificates (UTCTime and GeneralizedTime), a clean ValueError for any other bytes."""

from __future__ import annotations

import calendar
import ssl
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd import diagnostics
from tests.helpers.tls import issue, make_ca


def _epoch(cert: object, which: str) -> float:
    """not_valid_before/after: `*_utc` on cryptography >= 42 (the naive ones are deprecated there)."""
    d = getattr(cert, f"{which}_utc", None) or getattr(cert, which)
    return float(calendar.timegm(d.utctimetuple()))


@pytest.mark.parametrize("days", [-400, -1, 20, 3650, 12000])  # 12000 days: after 2049, GeneralizedTime
def test_validity_matches_the_certificate(tmp_path: Path, days: int) -> None:
    ca = make_ca(tmp_path)
    leaf = issue(ca, tmp_path, "leaf", "leaf", hosts=("127.0.0.1",), days=days)
    der = diagnostics.pem_certificate(str(leaf.cert))
    assert der == ssl.PEM_cert_to_DER_cert(leaf.cert.read_text())
    not_before, not_after = diagnostics.cert_validity(der)
    assert not_after == _epoch(leaf.certificate, "not_valid_after")
    assert not_before == _epoch(leaf.certificate, "not_valid_before")


def test_expiry_outcomes(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    for days, outcome in ((-2, diagnostics.FAIL), (10, diagnostics.WARN), (90, diagnostics.OK)):
        leaf = issue(ca, tmp_path, f"l{days}", "leaf", days=days)
        r = diagnostics._expiry(diagnostics.pem_certificate(str(leaf.cert)), "x")
        assert r.outcome == outcome, r
        assert ("days ago" in r.detail) == (days < 0)


def test_a_key_file_is_not_a_certificate(tmp_path: Path) -> None:
    leaf = issue(make_ca(tmp_path), tmp_path, "leaf", "leaf")
    with pytest.raises(ValueError, match="no PEM certificate") as e:
        diagnostics.pem_certificate(str(leaf.key))
    assert leaf.key_pem_body() not in str(e.value)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_validity_or_a_value_error(data: bytes) -> None:
    try:
        nb, na = diagnostics.cert_validity(data)
    except ValueError:
        return
    assert isinstance(nb, float) and isinstance(na, float)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2000), st.binary(min_size=1, max_size=8))
def test_damaged_real_certificates_never_crash(tmp_path_factory: pytest.TempPathFactory, cut: int,
                                                junk: bytes) -> None:
    d = tmp_path_factory.getbasetemp() / "damaged"
    if not (d / "leaf.crt").exists():
        issue(make_ca(d), d, "leaf", "leaf")
    der = diagnostics.pem_certificate(str(d / "leaf.crt"))
    pos = cut % len(der)
    for damaged in (der[:pos], der[:pos] + junk + der[pos + len(junk):]):
        try:
            diagnostics.cert_validity(damaged)
        except ValueError:
            pass
