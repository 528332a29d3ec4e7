"""Provisioning answers and the saved credentials file."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.bridge import provisioning
from gatewayd.bridge.provisioning import Credentials, ProvisioningError


def test_request_payload() -> None:
    assert json.loads(provisioning.request_payload("dev", "k", "s")) == {
        "deviceName": "dev", "provisionDeviceKey": "k", "provisionDeviceSecret": "s"}
    assert provisioning.client_id_for_provisioning() != "provision"


def test_success_access_token() -> None:
    c = provisioning.parse_response(b'{"status":"SUCCESS","credentialsType":"ACCESS_TOKEN",'
                                    b'"credentialsValue":"tok123"}')
    assert c == Credentials("tok123", source="provisioned")


def test_success_mqtt_basic() -> None:
    c = provisioning.parse_response(json.dumps({"status": "SUCCESS", "credentialsType": "MQTT_BASIC",
                                                "credentialsValue": {"clientId": "c", "userName": "u",
                                                                     "password": "p"}}).encode())
    assert (c.username, c.password, c.client_id) == ("u", "p", "c")


@pytest.mark.parametrize("payload, words", [
    (b'{"status":"NOT_FOUND","errorMsg":"Provision data was not found!"}', ["NOT_FOUND", "not found"]),
    (b'{"status":"FAILURE","errorMsg":"Failed to provision device!"}', ["FAILURE", "Failed"]),
    (b"not json", ["not JSON"]),
    (b"[1]", ["not a JSON object"]),
    (b'{"status":"SUCCESS","credentialsType":"X509_CERTIFICATE","credentialsValue":"..."}', ["unsupported"]),
])
def test_refusals_are_clear(payload: bytes, words: list[str]) -> None:
    with pytest.raises(ProvisioningError) as e:
        provisioning.parse_response(payload)
    for w in words:
        assert w in str(e.value)


def test_save_and_load_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "credentials.json"
    provisioning.save(path, Credentials("tok", source="provisioned"), "dev")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert provisioning.load(path) == Credentials("tok", source="file")
    provisioning.save(path, Credentials("u", "p", "c"), "dev")
    assert provisioning.load(path) == Credentials("u", "p", "c", source="file")
    assert not list(path.parent.glob(".*tmp"))


def test_load_missing_and_bad(tmp_path: Path) -> None:
    assert provisioning.load(tmp_path / "nope.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError):
        provisioning.load(bad)
    bad.write_text("{}")
    with pytest.raises(ValueError):
        provisioning.load(bad)


ANSWER_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                             | st.text(st.characters(), max_size=8) | st.sampled_from(["\0", "\ud800", "x" * 70000]),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["ACCESS_TOKEN", "MQTT_BASIC", "X509_CERTIFICATE", None, 5]),
       ANSWER_VALUES | st.fixed_dictionaries({"userName": ANSWER_VALUES, "password": ANSWER_VALUES,
                                              "clientId": ANSWER_VALUES}))
def test_any_provisioning_answer_gives_sendable_credentials_or_a_refusal(ctype: Any, value: Any) -> None:
    """Whatever the server answers: credentials paho can put in a CONNECT, or ProvisioningError."""
    payload = json.dumps({"status": "SUCCESS", "credentialsType": ctype, "credentialsValue": value}).encode()
    try:
        creds = provisioning.parse_response(payload)
    except ProvisioningError:
        return
    for text in (creds.username, creds.password, creds.client_id):
        if text is not None:
            assert isinstance(text, str) and "\0" not in text and len(text.encode("utf-8")) <= 65535
    assert creds.username
