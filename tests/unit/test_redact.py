"""Masking of secrets by value (gatewayd.redact) and where it is wired in: log records whatever
the handler, tracebacks, sd_notify STATUS=, the masked config."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gatewayd import log as gwlog
from gatewayd import redact
from gatewayd.config import MASK, load
from gatewayd.notify import Notifier
from tests.helpers.daemons import write_config

SECRET = "s3cr3t-T0ken\"with'quotes\\and-ünïcode"


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    redact.reset()
    yield
    redact.reset()


def test_registered_values_are_masked_in_every_spelling() -> None:
    redact.register([SECRET, None, 42, "short"])  # non-strings and short strings are ignored
    for text in (f"token {SECRET} refused", json.dumps({"t": SECRET}), json.dumps({"t": SECRET}, ensure_ascii=False),
                 repr({"t": SECRET})):
        out = redact.redact(text)
        assert SECRET not in out and MASK in out
    assert redact.redact("short shorts") == "short shorts"


def test_redact_obj_keeps_json_valid_and_masks_keys_too() -> None:
    redact.register([SECRET])
    obj = {"a": [SECRET, {"b": f"x{SECRET}y", SECRET: 1}], "n": 123}
    out = redact.redact_obj(obj)
    text = json.dumps(out)
    assert SECRET not in text and json.loads(text)["n"] == 123
    assert out["a"][1]["b"] == f"x{MASK}y"


def test_url_passwords_are_masked_without_registration() -> None:
    assert redact.redact("clone https://deploy:hunter2@git.example/x.git failed") == \
        f"clone https://deploy:{MASK}@git.example/x.git failed"
    assert redact.redact("see https://git.example/x.git") == "see https://git.example/x.git"


def test_longest_secret_wins() -> None:
    redact.register(["abcdef", "abcdefghij"])
    assert redact.redact("xabcdefghijx") == f"x{MASK}x"


@settings(max_examples=300, deadline=None)
@given(secret=st.text(min_size=redact.MIN_LENGTH, max_size=40), before=st.text(max_size=30),
       after=st.text(max_size=30))
def test_a_registered_secret_never_survives(secret: str, before: str, after: str) -> None:
    assume("*" not in secret)  # the mask itself is made of stars
    redact.reset()
    redact.register([secret])
    assert secret not in redact.redact(before + secret + after)
    dumped = json.dumps(redact.redact_obj({"k": before + secret + after, secret: [secret]}))
    assert secret not in json.loads(dumped)["k"]
    assert secret not in json.dumps(json.loads(dumped), ensure_ascii=False)


def test_log_lines_and_tracebacks_are_masked_for_every_handler() -> None:
    redact.register([SECRET])
    logger = gwlog.setup("gatewayd.test", "debug")
    other = io.StringIO()
    extra = logging.StreamHandler(other)  # e.g. a handler forwarding logs elsewhere
    extra.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(extra)
    stderr = io.StringIO()
    own = logging.getLogger().handlers[0]
    assert isinstance(own, logging.StreamHandler)  # what log.setup installs
    own.setStream(stderr)
    try:
        logger.error("refused %s", SECRET)
        try:
            raise ValueError(f"bad token {SECRET}")
        except ValueError:
            logger.exception("failed")
    finally:
        logging.getLogger().removeHandler(extra)
        own.setStream(sys.stderr)
    assert SECRET not in stderr.getvalue() and MASK in stderr.getvalue()
    assert "ValueError: bad token " + MASK in stderr.getvalue()
    assert SECRET not in other.getvalue() and "refused " + MASK in other.getvalue()
    assert "ValueError: bad token " + MASK in other.getvalue()


def test_sd_notify_status_is_masked(tmp_path: Path, notifier: Callable[..., Notifier]) -> None:
    redact.register([SECRET])
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        n = notifier(NOTIFY_SOCKET=str(path))
        n.status(f"refused {SECRET}")
        got = sock.recv(4096).decode()
    finally:
        sock.close()
    assert got == f"STATUS=refused {MASK}"


def test_masked_config_and_secret_values(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path, {
        "thingsboard": {"access_token": "tok-1234", "provision_device_key": "pk-1234",
                        "provision_device_secret": "ps-1234"},
        "controller": {"environment": {"DB_PASSWORD": "pw-1234", "PORT": 5432, "LOG_LEVEL": "information"},
                       "repository": "https://u:urlpw-1234@example.invalid/r.git"},
    }), env={})
    # masked in any text: secret keys, environment values under secret-looking names
    assert set(cfg.secret_values()) == {"tok-1234", "pk-1234", "ps-1234", "pw-1234"}
    m = cfg.masked()
    text = json.dumps(m)
    for v in ("tok-1234", "pk-1234", "ps-1234", "pw-1234", "urlpw-1234"):
        assert v not in text
    assert m["controller"]["environment"] == {"DB_PASSWORD": MASK, "PORT": MASK, "LOG_LEVEL": MASK}
    assert cfg["controller"]["environment"]["DB_PASSWORD"] == "pw-1234"  # the daemons still get it
    redact.register_config(cfg)
    assert redact.redact("system_info: information, pw-1234") == f"system_info: information, {MASK}"


def test_saved_credentials_are_registered(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), env={})
    cfg.state_dir.mkdir(parents=True)
    cfg.credentials_file.write_text(json.dumps({"credentialsType": "ACCESS_TOKEN", "accessToken": "saved-9876",
                                                "deviceName": "dev-name-not-secret"}))
    redact.register_config(cfg)
    assert redact.redact("saved-9876 dev-name-not-secret") == f"{MASK} dev-name-not-secret"
