"""`python3 -m tbsim`: the command line, start-up order and shutdown."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

from .control import ControlHandler, Controller, ControlServer
from .proxy import Proxy
from .state import State
from .thingsboard import ThingsBoardLogic

log = logging.getLogger(__name__)

READY_LINE = "tb_simulator ready"


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return "127.0.0.1", int(text)
    return host or "127.0.0.1", int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m tbsim",
                                description="ThingsBoard device-API simulator (MQTT proxy + TB logic)")
    p.add_argument("--listen", default="127.0.0.1:1884", help="HOST:PORT devices connect to (port 0: any)")
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the real MQTT broker")
    p.add_argument("--control-port", type=int, default=0, help="loopback HTTP control API port (0: any)")
    p.add_argument("--control-host", default="127.0.0.1")
    p.add_argument("--device", action="append", metavar="NAME=TOKEN", help="a known device (repeatable)")
    p.add_argument("--state", metavar="FILE",
                   help="JSON device registry, loaded at start and kept up to date")
    p.add_argument("--provision-key")
    p.add_argument("--provision-secret")
    p.add_argument("--provision-fail-existing", action="store_true",
                   help="provisioning an existing device name answers FAILURE")
    p.add_argument("--provision-close-after", type=float, default=60.0,
                   help="seconds after which a provisioning session is closed (as ThingsBoard)")
    p.add_argument("--capture", metavar="FILE", help="append every telemetry record as a JSON line")
    p.add_argument("--keep-records", type=int, default=10000, help="records kept in memory per device")
    p.add_argument("--max-packet-bytes", type=int, default=65536)
    p.add_argument("--max-inflight", type=int, default=100)
    p.add_argument("--no-session-limits", action="store_true", help="do not answer getSessionLimits")
    p.add_argument("--rate-limit-messages", default="200:1,6000:60")
    p.add_argument("--rate-limit-telemetry-messages", default="200:1,6000:60")
    p.add_argument("--rate-limit-telemetry-datapoints", default="1000000:1,60000000:60")
    p.add_argument("--topic-root", default="tb",
                   help="first topic level of the rewritten topics (several simulators can share a broker)")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.listen_host, args.listen_port = host_port(args.listen)
    args.broker_host, args.broker_port = host_port(args.broker)
    if not args.topic_root or any(c in args.topic_root for c in "/+#$"):
        p.error("--topic-root must be one topic level without wildcards or $")
    if bool(args.provision_key) != bool(args.provision_secret):
        p.error("--provision-key and --provision-secret go together")
    return args


async def amain(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    state = State(args)
    proxy = Proxy(state, args.listen_host, args.listen_port, args.broker_host, args.broker_port,
                  args.provision_close_after, args.topic_root)

    def close_from_thread(key: str, reason: str) -> None:
        loop.call_soon_threadsafe(proxy.close_key, key, reason)

    tb = ThingsBoardLogic(state, args, close_from_thread)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tb.start()
    httpd: ControlServer | None = None
    http_thread: threading.Thread | None = None
    try:
        await proxy.start()
        httpd = ControlServer((args.control_host, args.control_port), ControlHandler)
        httpd.controller = Controller(state, tb, loop, proxy)
        http_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="control", daemon=True)
        http_thread.start()
        deadline = loop.time() + args.startup_timeout
        while not tb.subscribed.is_set():
            if stop.is_set():
                return 0
            if loop.time() > deadline:
                log.error("could not connect to the broker at %s:%d", args.broker_host, args.broker_port)
                return 1
            await asyncio.sleep(0.05)
        print(f"{READY_LINE} listen={args.listen_host}:{proxy.listen_port} "
              f"control={args.control_host}:{httpd.server_address[1]} pid={os.getpid()}", flush=True)
        log.info("listening on %s:%d, broker %s:%d, control port %d", args.listen_host, proxy.listen_port,
                 args.broker_host, args.broker_port, httpd.server_address[1])
        await stop.wait()
        log.info("stopping")
        return 0
    finally:
        await proxy.stop()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        tb.stop()
        state.save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s tb_simulator %(levelname)s %(message)s")
    try:
        return asyncio.run(amain(args))
    except OSError as exc:  # e.g. a port already in use
        log.error("%s", exc)
        return 1

