"""Real peers for integration tests: free ports, a mosquitto broker, the ThingsBoard simulator
(the `tests/tbsim` package, run as `python3 -m tbsim`) and a small synchronous MQTT test device.

Plain functions and context managers, importable as `from tests.helpers.brokers import ...`
by tests, `make demo` and the system tests.  Every process is started by us, stopped by its
PID in teardown (SIGTERM, then SIGKILL), and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.helpers.daemons import wait_for
from tests.tbsim import READY_LINE, SimulatorClient
from tests.tbsim import SimulatorError as SimulatorError  # re-exported for tests

REPO_ROOT = Path(__file__).resolve().parents[2]
# The simulator package; its parent directory goes on the PYTHONPATH of `python3 -m tbsim`.
SIMULATOR_PACKAGE = REPO_ROOT / "tests" / "tbsim"
MOSQUITTO_BIN = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------

# The one bounded wait (`daemons.wait_for`), under the name tests, `make demo` and the
# benchmarks import from here.
wait_until = wait_for


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    wait_until(lambda: port_open(host, port), timeout, what=f"{host}:{port} to accept connections")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """Stop a child we started, by its PID: SIGTERM, bounded wait, then SIGKILL. Returns its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@contextlib.contextmanager
def temp_dir(base: str | os.PathLike[str] | None = None, prefix: str = "gatewayd-test-") -> Iterator[Path]:
    """`base` itself when given, else a fresh temporary directory removed afterwards."""
    if base is not None:
        path = Path(base)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


class PeerProcess:
    """What the peers started here share: their process (stopped by PID) and their log file."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int | None:
        return stop_process(self.proc)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# --------------------------------------------------------------------------------------
# mosquitto
# --------------------------------------------------------------------------------------

@dataclass
class MosquittoProcess(PeerProcess):
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path


def start_mosquitto(workdir: Path, port: int | None = None, host: str = LOOPBACK,
                    extra_config: tuple[str, ...] | list[str] = (), start_timeout: float = 10.0,
                    name: str = "mosquitto") -> MosquittoProcess:
    """Start a plain mosquitto on loopback; the caller must `.stop()` it."""
    if not os.path.exists(MOSQUITTO_BIN):
        raise FileNotFoundError(f"mosquitto not found at {MOSQUITTO_BIN}")
    attempts = 1 if port is not None else 3
    last_error = ""
    for _ in range(attempts):
        p = port if port is not None else free_port(host)
        config_path = workdir / f"{name}-{p}.conf"
        log_path = workdir / f"{name}-{p}.log"
        lines = [
            f"listener {p} {host}",
            "allow_anonymous true",
            "persistence false",
            "max_queued_messages 100000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            *extra_config,
        ]
        config_path.write_text("\n".join(lines) + "\n")
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(config_path)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        broker = MosquittoProcess(host, p, proc, config_path, log_path)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if port_open(host, p):
                return broker
            time.sleep(0.05)
        broker.stop()
        last_error = broker.log_text()[-2000:]
    raise RuntimeError(f"mosquitto did not start: {last_error}")


@contextlib.contextmanager
def mosquitto(tmp_dir: str | os.PathLike[str] | None = None, port: int | None = None, host: str = LOOPBACK,
              extra_config: tuple[str, ...] | list[str] = ()) -> Iterator[MosquittoProcess]:
    """A running mosquitto for the duration of the block."""
    with temp_dir(tmp_dir) as work:
        broker = start_mosquitto(work, port, host, extra_config)
        try:
            yield broker
        finally:
            broker.stop()


# --------------------------------------------------------------------------------------
# the ThingsBoard simulator
# --------------------------------------------------------------------------------------

def load_simulator_module() -> ModuleType:
    """The simulator package (`SimulatorClient`, `SimulatorError`, `topic_key`, ...)."""
    return importlib.import_module("tests.tbsim")


def simulator_command(python: str | None = None) -> list[str]:
    """The command line that starts the simulator (arguments follow)."""
    return [python or sys.executable, "-m", SIMULATOR_PACKAGE.name]


def simulator_env() -> dict[str, str]:
    """This process's environment with the simulator package's parent first on PYTHONPATH."""
    paths = [str(SIMULATOR_PACKAGE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@dataclass
class SimulatorProcess(PeerProcess):
    host: str
    port: int              # where devices connect (the simulator's MQTT listener)
    control_port: int
    broker_port: int
    proc: subprocess.Popen[bytes]
    client: SimulatorClient
    log_path: Path
    stdout_path: Path
    capture_path: Path | None
    devices: dict[str, str] = field(default_factory=dict)


def start_simulator(workdir: Path, broker_port: int, devices: dict[str, str] | None = None,
                    broker_host: str = LOOPBACK, host: str = LOOPBACK, port: int = 0, control_port: int = 0,
                    provision_key: str | None = None, provision_secret: str | None = None,
                    capture: bool | str | os.PathLike[str] = False,
                    extra_args: tuple[str, ...] | list[str] = (), python: str | None = None,
                    start_timeout: float = 20.0, name: str = "tb_simulator") -> SimulatorProcess:
    """Start the simulator as a subprocess and wait for its ready line; the caller must `.stop()` it."""
    devices = dict(devices or {})
    seq = next(_sim_seq)
    stdout_path = workdir / f"{name}-{seq}.out"
    log_path = workdir / f"{name}-{seq}.log"
    capture_path: Path | None = None
    cmd = [*simulator_command(python), "--listen", f"{host}:{port}",
           "--broker", f"{broker_host}:{broker_port}", "--control-port", str(control_port)]
    for dev_name, token in devices.items():
        cmd += ["--device", f"{dev_name}={token}"]
    if provision_key is not None:
        cmd += ["--provision-key", provision_key, "--provision-secret", provision_secret or ""]
    if capture:
        capture_path = Path(capture) if not isinstance(capture, bool) else workdir / f"{name}-{seq}.jsonl"
        cmd += ["--capture", str(capture_path)]
    cmd += list(extra_args)
    with open(stdout_path, "wb") as out, open(log_path, "ab") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, cwd=str(REPO_ROOT), env=simulator_env())
    ready: dict[str, str] = {}

    def is_ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"tb_simulator exited with {proc.returncode}: "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        for line in stdout_path.read_text(errors="replace").splitlines():
            if line.startswith(READY_LINE):
                ready.update(w.partition("=")[::2] for w in line.split()[2:] if "=" in w)
                return True
        return False

    try:
        wait_until(is_ready, start_timeout, what="tb_simulator ready")
    except BaseException:
        stop_process(proc)
        raise
    listen_port = int(ready["listen"].rsplit(":", 1)[1])
    ctl_port = int(ready["control"].rsplit(":", 1)[1])
    client = SimulatorClient(ctl_port)
    return SimulatorProcess(host, listen_port, ctl_port, broker_port, proc, client, log_path, stdout_path,
                            capture_path, devices)


_sim_seq = itertools.count(1)


@contextlib.contextmanager
def tb_simulator(broker_port: int, tmp_dir: str | os.PathLike[str] | None = None,
                 **kwargs: Any) -> Iterator[SimulatorProcess]:
    """A running simulator (see `start_simulator` for the keyword arguments)."""
    with temp_dir(tmp_dir) as work:
        sim = start_simulator(work, broker_port, **kwargs)
        try:
            yield sim
        finally:
            sim.stop()


@contextlib.contextmanager
def thingsboard(tmp_dir: str | os.PathLike[str] | None = None,
                **kwargs: Any) -> Iterator[tuple[MosquittoProcess, SimulatorProcess]]:
    """mosquitto + the simulator in front of it: yields (broker, simulator)."""
    with temp_dir(tmp_dir) as work:
        broker = start_mosquitto(work)
        try:
            sim = start_simulator(work, broker.port, **kwargs)
            try:
                yield broker, sim
            finally:
                sim.stop()
        finally:
            broker.stop()


# --------------------------------------------------------------------------------------
# a synchronous MQTT test device (paho 1.6.1 and 2.x)
# --------------------------------------------------------------------------------------

def _rc(value: Any) -> int:
    if isinstance(value, int):
        return value
    return int(getattr(value, "value", 0) or 0)


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int

    def json(self) -> Any:
        import json

        return json.loads(self.payload)


_dev_seq = itertools.count(1)


class MqttDevice:
    """A plain paho client playing the device, with bounded blocking helpers."""

    def __init__(self, host: str, port: int, username: str | None = None, password: str | None = None,
                 client_id: str | None = None, mqtt5: bool = False, keepalive: int = 30,
                 max_inflight: int | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.mqtt = mqtt
        self.host = host
        self.port = port
        self.mqtt5 = mqtt5
        self.keepalive = keepalive
        protocol = mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"client_id": client_id or f"testdev-{os.getpid()}-{next(_dev_seq)}",
                                  "protocol": protocol, "reconnect_on_failure": False}
        if hasattr(mqtt, "CallbackAPIVersion"):
            kwargs["callback_api_version"] = mqtt.CallbackAPIVersion.VERSION2
        if not mqtt5:
            kwargs["clean_session"] = True
        self.client = mqtt.Client(**kwargs)
        if username is not None:
            self.client.username_pw_set(username, password)
        if max_inflight is not None:
            self.client.max_inflight_messages_set(max_inflight)
        self.messages: queue.Queue[Message] = queue.Queue()
        self.connacks: queue.Queue[int] = queue.Queue()
        self.subacks: dict[int, list[int]] = {}
        self.acked: set[int] = set()
        self.cond = threading.Condition()
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self._started = False

    # callbacks (positional: both paho callback APIs)
    def _on_connect(self, *args: Any) -> None:
        rc = _rc(args[3])
        if rc == 0:
            self.connected.set()
            self.disconnected.clear()
        self.connacks.put(rc)

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.messages.put(Message(msg.topic, bytes(msg.payload), msg.qos))

    def _on_publish(self, *args: Any) -> None:
        with self.cond:
            self.acked.add(args[2])
            self.cond.notify_all()

    def _on_subscribe(self, *args: Any) -> None:
        codes = args[3]
        with self.cond:
            self.subacks[args[2]] = [_rc(c) for c in codes]
            self.cond.notify_all()

    # actions
    def connect(self, timeout: float = 10.0) -> int:
        """Connect and wait for the CONNACK; returns its code (0 = accepted)."""
        if self.mqtt5:
            self.client.connect(self.host, self.port, keepalive=self.keepalive, clean_start=True)
        else:
            self.client.connect(self.host, self.port, keepalive=self.keepalive)
        if not self._started:
            self.client.loop_start()
            self._started = True
        try:
            return self.connacks.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no CONNACK within {timeout} s") from None

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> list[int]:
        """Subscribe and wait for the SUBACK; returns the granted QoS / reason codes."""
        result, mid = self.client.subscribe(topic, qos)
        if result != 0 or mid is None:
            raise ConnectionError(f"subscribe failed: {result}")
        with self.cond:
            if not self.cond.wait_for(lambda: mid in self.subacks, timeout):
                raise TimeoutError(f"no SUBACK for {topic} within {timeout} s")
            return self.subacks.pop(mid)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float | None = 10.0) -> bool:
        """Publish; with qos > 0 and a timeout wait for the PUBACK and return whether it came."""
        info = self.client.publish(topic, payload, qos=qos)
        if qos == 0 or timeout is None:
            return True
        return self.wait_acked(info.mid, timeout)

    def publish_json(self, topic: str, obj: Any, qos: int = 1, timeout: float | None = 10.0) -> bool:
        import json

        return self.publish(topic, json.dumps(obj), qos, timeout)

    def wait_acked(self, mid: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: mid in self.acked, timeout)

    def expect(self, topic: str | None = None, timeout: float = 10.0) -> Message:
        """The next message (on `topic` if given, others are dropped); TimeoutError if none comes."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message{' on ' + topic if topic else ''} within {timeout} s")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if topic is None or msg.topic == topic:
                return msg

    def no_message(self, wait: float = 1.0) -> Message | None:
        """Wait `wait` seconds; return the first message that arrived, or None."""
        try:
            return self.messages.get(timeout=wait)
        except queue.Empty:
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        if self._started:
            self.client.loop_stop()
            self._started = False

    def __enter__(self) -> MqttDevice:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
