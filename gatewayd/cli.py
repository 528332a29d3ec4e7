"""`gatewayd`: run one daemon in the foreground, or validate the configuration."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gatewayd import __version__
from gatewayd.config import EX_CONFIG, ConfigError, load, render_toml

DAEMONS = ("bridge", "forwarder", "supervisor", "ingest", "http")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatewayd", description="Self-healing edge gateway for ThingsBoard.")
    p.add_argument("--config", help="main config file (default: $GATEWAYD_CONFIG or /etc/gatewayd/gatewayd.toml)")
    p.add_argument("--check-config", action="store_true",
                   help="validate and print the resolved config (secrets masked); exit 78 on problems")
    p.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    sub = p.add_subparsers(dest="daemon", metavar="{" + ",".join(DAEMONS) + "}")
    for name in DAEMONS:
        sp = sub.add_parser(name, help="serve /health and /metrics (read-only)" if name == "http"
                            else f"run the {name} in the foreground")
        sp.add_argument("--config", dest="sub_config", help=argparse.SUPPRESS)
        if name == "ingest":
            sp.add_argument("--configured", action="store_true",
                            help="exit 0 if an ingest adapter is configured (or the config is invalid, so "
                                 "that starting reports it), 1 if none (the unit's ExecCondition=)")
    return p


def _config_problems(e: ConfigError) -> None:
    for line in e.problems:
        print(f"<3>gatewayd: config: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = getattr(args, "sub_config", None) or args.config
    if args.check_config:
        try:
            cfg = load(path)
        except ConfigError as e:
            _config_problems(e)
            return EX_CONFIG
        for w in cfg.warnings:
            print(f"<4>gatewayd: config: {w}", file=sys.stderr)
        print(f"# sources: {', '.join(cfg.sources) or '(defaults only)'}")
        print(render_toml(cfg.masked()), end="")
        return 0
    if not args.daemon:
        _parser().print_usage(sys.stderr)
        return 2
    try:
        cfg = load(path)
    except ConfigError as e:
        if getattr(args, "configured", False):
            return 0
        _config_problems(e)
        return EX_CONFIG
    if getattr(args, "configured", False):
        adapters = cfg.ingest_adapters()
        print(f"ingest adapters: {', '.join(adapters)}" if adapters else "no ingest adapter configured")
        return 0 if adapters else 1
    from gatewayd import log as gwlog
    from gatewayd import logforward, redact
    from gatewayd.daemon import AlreadyRunning

    redact.register_config(cfg)

    logger = gwlog.setup(f"gatewayd.{args.daemon}", cfg["logging"]["level"], cfg["logging"]["format"])
    forwarder = logforward.install(cfg, args.daemon)
    try:
        for w in cfg.warnings:
            logger.warning("config: %s", w)
        module = importlib.import_module(f"gatewayd.{args.daemon}.main")
        try:
            return int(module.run(cfg))
        except AlreadyRunning as e:
            logger.error("%s", e)
            return 1
        except KeyboardInterrupt:
            return 0
        except Exception:
            logging.getLogger(f"gatewayd.{args.daemon}").critical("fatal error", exc_info=True)
            return 1
    finally:
        if forwarder is not None:
            forwarder.close()


if __name__ == "__main__":
    raise SystemExit(main())
