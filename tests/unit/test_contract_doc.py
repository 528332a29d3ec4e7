"""docs/CONTRACT.md names everything outside users rely on: checked against the code, so a
command, option, configuration section, status field, metric, RPC method or topic added to the
code without a word in the contract fails here."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

import pytest

from gatewayd import cli, ctl, topics
from gatewayd.config import load
from gatewayd.schema import SCHEMA
from gatewayd.store import archive, queues
from gatewayd.supervisor.commands import METHODS
from tests.helpers.daemons import write_config

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = (ROOT / "docs" / "CONTRACT.md").read_text()


def missing(names: set[str]) -> list[str]:
    return sorted(n for n in names if n not in CONTRACT)


def subcommands(parser: argparse.ArgumentParser, prefix: str) -> dict[str, argparse.ArgumentParser]:
    """Every (nested) subcommand, as "gatewayctl dead-letters list", with its parser."""
    out = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(subcommands(sub, f"{prefix} {name}"))
    return out


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings
            if o.startswith("--") and o != "--help"}


@pytest.mark.parametrize(("parser", "prog"), [(ctl._parser(), "gatewayctl"), (cli._parser(), "gatewayd")])
def test_every_command_and_option(parser: argparse.ArgumentParser, prog: str) -> None:
    commands = subcommands(parser, prog)
    assert len(commands) > 3
    words = {" ".join(c.split()[1:]) for c in commands if c != prog}
    assert missing({f"`{prog} {w}" for w in words if " " not in w}) == []
    assert missing({w.split()[-1] for w in words}) == []
    assert missing({o for p in commands.values() for o in options(p)}) == []


def test_every_configuration_section() -> None:
    assert missing({f"[{section}]" for section in SCHEMA}) == []


def test_every_rpc_method() -> None:
    assert len(METHODS) > 10
    assert missing({f"`{m}`" for m in METHODS}) == []


def test_every_metric() -> None:
    tree = ast.parse((ROOT / "gatewayd" / "http" / "metrics.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.args[0].value
            if isinstance(name, str) and name.startswith("gatewayd_"):
                counter = getattr(node.func, "id", "") == "CounterMetricFamily"
                names.add(f"`{name}_total`" if counter else f"`{name}")
    assert len(names) > 10
    assert missing(names) == []


def test_every_topic() -> None:
    spelled = {v for k, v in vars(topics).items() if k.startswith("TOPIC_")}
    spelled |= set(topics.SUBSCRIPTIONS)
    spelled |= {topics.rpc_request("<n>"), topics.rpc_response("<id>"), topics.sw_chunk_request("<req>", 0)[:-1]}
    request = topics.attributes_request("<n>", ["a"])
    assert request is not None
    spelled.add(request[0])
    assert missing(spelled) == []


def keys(obj: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(f"{prefix}{k}")
            out |= keys(v, f"{prefix}{k}.")
    return out


def test_every_status_field(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), env={})
    cfg.ensure_dirs()
    queues.open_queues(cfg.queues_db).close()
    archive.open_archive(cfg.archive_db).close()
    _, status = ctl.status_report(cfg)
    fields = keys(status)
    assert {"units", "mqtt.connected", "ledger.balanced", "daemons.bridge.doing"} <= fields
    # a field's name is quoted where the contract's JSON shows it; dropped_by_reason's keys are data
    documented = {f'"{f.split(".")[-1]}"' for f in fields if not f.startswith("ledger.dropped_by_reason.")}
    assert missing(documented) == []
