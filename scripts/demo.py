#!/usr/bin/env python3
"""`make demo`: gatewayd end to end on loopback, in a temporary directory, in under two minutes.

mosquitto (the broker behind the ThingsBoard stand-in) + the simulator (tests/tbsim, ThingsBoard's
device API) + the gatewayd daemons (forwarder, bridge, and the supervisor with
`controller.enabled = false` when it starts) + a demo controller writing telemetry into the
controller database the way a seed-gateway controller does. It shows:

1. provisioning: no access token is configured; the bridge provisions the device with the
   provisioning key/secret and saves the credentials (mode 0600);
2. records arriving at "ThingsBoard";
3. an RPC `ping` round trip through the supervisor (skipped, with a note, without one);
4. a ThingsBoard outage of a few seconds survived with zero loss;

then stops everything it started (by PID) and prints a summary. Exit status 1 if any record
was lost.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEVICE = "demo-gateway"
KEY, SECRET = "demo-provision-key", "demo-provision-secret"
RATE = 100  # records per second from the demo controller
OUTAGE_S = 5.0


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


def main() -> int:
    try:
        importlib.import_module("paho.mqtt.client")
    except ImportError:
        print("demo: python3-paho-mqtt is missing (apt install python3-paho-mqtt)", file=sys.stderr)
        return 2
    from tests.helpers.brokers import MOSQUITTO_BIN, free_port, start_mosquitto, start_simulator, wait_until
    from tests.helpers.daemons import Daemon, write_config

    if not os.path.exists(MOSQUITTO_BIN):
        print(f"demo: mosquitto not found at {MOSQUITTO_BIN} (apt install mosquitto)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="gatewayd-demo-"))
    started: list[Any] = []  # everything we started, stopped by PID in reverse order
    controller: subprocess.Popen[bytes] | None = None
    sent = 0
    t_start = time.monotonic()
    capture = work / "captured.jsonl"
    sim_state = work / "simulator-devices.json"
    sim_port, sim_control = free_port(), free_port()

    def start_sim(broker_port: int) -> Any:
        return start_simulator(work, broker_port, provision_key=KEY, provision_secret=SECRET, port=sim_port,
                               control_port=sim_control, capture=capture, extra_args=["--state", str(sim_state)])

    def captured() -> list[int]:
        if not capture.exists():
            return []
        seqs = []
        for line in capture.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("device") == DEVICE and "seq" in rec.get("values", {}):
                seqs.append(rec["values"]["seq"])
        return seqs

    def counters() -> dict[str, int]:
        db = work / "state" / "queues.db"
        if not db.exists():
            return {}
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return dict(c.execute("SELECT name, value FROM counters").fetchall())
        except sqlite3.Error:
            return {}
        finally:
            c.close()

    try:
        say(f"working in {work} (loopback only)")
        broker = start_mosquitto(work)
        started.append(broker)
        sim = start_sim(broker.port)
        started.append(sim)
        say(f"mosquitto on 127.0.0.1:{broker.port}, ThingsBoard simulator on 127.0.0.1:{sim.port}")

        cfg = write_config(work, {
            "thingsboard": {"host": "127.0.0.1", "port": sim.port, "access_token": "", "device_name": DEVICE,
                            "provision_device_key": KEY, "provision_device_secret": SECRET,
                            "reconnect_max_s": 1.0},
            "controller": {"enabled": False},
        })
        (work / "controller").mkdir(parents=True, exist_ok=True)
        forwarder = Daemon("forwarder", cfg).start()
        started.append(forwarder)
        bridge = Daemon("bridge", cfg).start()
        started.append(bridge)
        supervisor = None
        if (ROOT / "gatewayd" / "supervisor" / "main.py").exists():
            try:
                supervisor = Daemon("supervisor", cfg).start(timeout=20)
                started.append(supervisor)
            except Exception as e:  # noqa: BLE001 - the demo goes on without it
                say(f"note: the supervisor did not start ({str(e).splitlines()[0]}); RPC step skipped")
                supervisor = None
        say("daemons started: forwarder, bridge" + (", supervisor (controller.enabled = false)"
                                                     if supervisor else ""))

        # 1. provisioning
        creds = work / "state" / "credentials.json"
        wait_until(creds.exists, 20, what="provisioning")
        token = json.loads(creds.read_text())["accessToken"]
        mode = oct(creds.stat().st_mode & 0o777)
        say(f"1. provisioned device '{DEVICE}': token {token[:4]}… saved in {creds} (mode {mode})")
        sim.client.wait_connected(DEVICE, timeout=20)

        # 2. records arriving
        controller = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo_controller.py"),
                                       str(work / "controller" / "communication_queue.db"), str(RATE)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        say(f"2. demo controller writing {RATE} records/s into the controller database")
        for _ in range(4):
            time.sleep(1.0)
            say(f"   ThingsBoard has {len(set(captured()))} records")

        # 3. RPC ping
        if supervisor is not None:
            try:
                t0 = time.monotonic()
                reply = sim.client.rpc(DEVICE, "ping", {}, timeout=15)
                ms = (time.monotonic() - t0) * 1000
                say(f"3. RPC ping -> {json.dumps(reply.get('response', reply))[:200]} in {ms:.0f} ms")
            except Exception as e:  # noqa: BLE001 - the demo goes on without it
                say(f"3. RPC ping failed: {e}")
        else:
            say("3. RPC ping skipped: no supervisor daemon in this tree")

        # 4. outage
        before = len(set(captured()))
        say(f"4. stopping ThingsBoard for {OUTAGE_S:.0f} s (controller keeps writing)")
        sim.stop()
        started.remove(sim)
        for _ in range(int(OUTAGE_S)):
            time.sleep(1.0)
            say(f"   outbox {counters().get('outbox_rows', 0)} records waiting")
        sim = start_sim(broker.port)
        started.append(sim)
        say("   ThingsBoard is back")
        time.sleep(3.0)
        say(f"   ThingsBoard has {len(set(captured()))} records ({len(set(captured())) - before} since the outage"
            " began)")

        # stop the controller, let everything drain
        controller.terminate()
        out, _ = controller.communicate(timeout=10)
        sent = int(out.decode().strip().split()[-1]) if out.strip() else 0
        controller = None
        say(f"controller stopped after {sent} records; waiting for the queues to drain")
        wait_until(lambda: len(set(captured())) >= sent and counters().get("outbox_rows", 1) == 0, 60,
                   interval=0.2, what="every record to reach ThingsBoard")
    except Exception as e:  # noqa: BLE001 - any failure is shown with the daemons' logs
        say(f"demo failed: {type(e).__name__}: {e}")
        for d in started:
            if hasattr(d, "log") and callable(d.log) and hasattr(d, "name"):
                say(f"--- {d.name} log (tail) ---\n{d.log()[-1500:]}")
    finally:
        if controller is not None:
            controller.terminate()
            try:
                out, _ = controller.communicate(timeout=10)
                sent = int(out.decode().strip().split()[-1]) if out.strip() else sent
            except Exception:  # noqa: BLE001 - the controller is killed instead
                controller.kill()
        for proc in reversed(started):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - stopping the rest anyway
                pass

    seqs = captured()
    delivered = len(set(seqs))
    lost = len(set(range(sent)) - set(seqs))
    c = counters()
    print()
    print("summary")
    print(f"  records sent by the controller : {sent}")
    print(f"  delivered to ThingsBoard       : {delivered}")
    print(f"  duplicates on the wire         : {len(seqs) - delivered}")
    print(f"  lost                           : {lost}")
    print(f"  ledger                         : ingested {c.get('ingested')} = delivered {c.get('delivered')} + "
          f"queued {c.get('queued')} + dead-lettered {c.get('dead_lettered')} + dropped {c.get('dropped')}")
    print(f"  wall time                      : {time.monotonic() - t_start:.0f} s")
    ok = sent > 0 and lost == 0
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"  (kept {work} for inspection)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
