"""Facts about the device: system metrics (psutil) and USB/serial devices (pyudev, hot-plug)."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("gatewayd.supervisor")


def system_metrics(disk_path: Path) -> dict[str, Any]:
    """CPU, memory, disk, temperature (where the hardware reports one), uptime; never raises."""
    values: dict[str, Any] = {}
    try:
        import psutil
    except ImportError:
        pass
    else:
        _psutil_metrics(psutil, disk_path, values)
    try:
        values["load_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return values


def _psutil_metrics(psutil: Any, disk_path: Path, values: dict[str, Any]) -> None:
    try:
        values["cpu_percent"] = float(psutil.cpu_percent(interval=None))
        mem = psutil.virtual_memory()
        values["memory_percent"] = float(mem.percent)
        values["memory_available_bytes"] = int(mem.available)
        values["memory_total_bytes"] = int(mem.total)
    except Exception as e:  # noqa: BLE001 - a figure psutil cannot read is left out
        log.debug("psutil cpu/memory: %s", e)
    try:
        du = psutil.disk_usage(str(disk_path))
        values["disk_percent"] = float(du.percent)
        values["disk_free_bytes"] = int(du.free)
    except Exception as e:  # noqa: BLE001 - a figure psutil cannot read is left out
        log.debug("psutil disk: %s", e)
    try:
        values["uptime_s"] = int(time.time() - psutil.boot_time())
    except Exception as e:  # noqa: BLE001 - a figure psutil cannot read is left out
        log.debug("psutil boot_time: %s", e)
    temps = getattr(psutil, "sensors_temperatures", None)
    if temps is not None:
        try:
            readings = [t.current for entries in temps().values() for t in entries
                        if isinstance(t.current, (int, float)) and -50 < t.current < 200]
            if readings:
                values["temperature_c"] = round(float(max(readings)), 1)
        except Exception as e:  # noqa: BLE001 - a figure psutil cannot read is left out
            log.debug("psutil temperatures: %s", e)


def _props(dev: Any) -> dict[str, str]:
    try:
        return {str(k): str(v) for k, v in dev.properties.items()}
    except Exception:  # noqa: BLE001 - pyudev raises its own errors, and OSError for a device gone
        return {}


def _sysattr(dev: Any, name: str) -> str | None:
    try:
        v = dev.attributes.get(name)
    except Exception:  # noqa: BLE001 - pyudev raises its own errors, and OSError for a device gone
        return None
    if v is None:
        return None
    return v.decode("utf-8", "replace").strip() if isinstance(v, bytes) else str(v).strip()


def describe_device(dev: Any) -> dict[str, Any] | None:
    """A USB device or a serial port worth reporting; None for virtual ttys and USB interfaces."""
    subsystem = getattr(dev, "subsystem", None)
    props = _props(dev)
    if subsystem == "usb":
        if getattr(dev, "device_type", None) != "usb_device":
            return None
        usb = dev
    elif subsystem == "tty":
        try:
            usb = dev.find_parent("usb", "usb_device")
        except Exception:  # noqa: BLE001 - pyudev raises its own errors, and OSError for a device gone
            usb = None
        name = os.path.basename(getattr(dev, "device_node", None) or "")
        if usb is None and not props.get("ID_BUS") and not name.startswith(("ttyAMA", "ttyACM", "ttyUSB",
                                                                            "serial")):
            return None
    else:
        return None
    uprops = _props(usb) if usb is not None else {}
    vendor_id = props.get("ID_VENDOR_ID") or uprops.get("ID_VENDOR_ID") or (
        _sysattr(usb, "idVendor") if usb is not None else None)
    model_id = props.get("ID_MODEL_ID") or uprops.get("ID_MODEL_ID") or (
        _sysattr(usb, "idProduct") if usb is not None else None)
    out: dict[str, Any] = {"subsystem": subsystem, "devnode": getattr(dev, "device_node", None)}
    if vendor_id and model_id:
        out["id"] = f"{vendor_id}:{model_id}"
    vendor = props.get("ID_VENDOR_FROM_DATABASE") or props.get("ID_VENDOR") or (
        _sysattr(usb, "manufacturer") if usb is not None else None)
    model = props.get("ID_MODEL_FROM_DATABASE") or props.get("ID_MODEL") or (
        _sysattr(usb, "product") if usb is not None else None)
    serial = props.get("ID_SERIAL_SHORT") or (_sysattr(usb, "serial") if usb is not None else None)
    if vendor:
        out["vendor"] = vendor
    if model:
        out["model"] = model
    if serial:
        out["serial"] = serial
    links = sorted(link for link in (props.get("DEVLINKS") or "").split() if link.startswith("/dev/serial/"))
    if links:
        out["links"] = links
    return out


def matches(dev: dict[str, Any], patterns: list[str]) -> str | None:
    """The first pattern (devnode, /dev/serial link, vendor:model id; shell wildcards) naming the device."""
    names = [dev.get("devnode") or "", dev.get("id") or "", *(dev.get("links") or [])]
    for p in patterns:
        if any(n and fnmatch.fnmatchcase(n, p) for n in names):
            return p
    return None


class Devices:
    """USB/serial inventory with a non-blocking udev monitor (rescans periodically without one)."""

    RESCAN_WITHOUT_MONITOR_S = 30.0

    def __init__(self, enabled: bool = True, *, monitor: Any = None,
                 lister: Callable[[], list[dict[str, Any]]] | None = None):
        """With `monitor` (pyudev.Monitor-like, `poll(timeout=0)`) and `lister` (the inventory), no udev is used."""
        self.enabled = enabled
        self._context: Any = None
        self._monitor: Any = monitor
        self._lister = lister
        self._last_scan = float("-inf")
        self.devices: list[dict[str, Any]] = []
        self.error: str | None = None
        if not enabled or lister is not None:
            return
        try:
            import pyudev

            self._context = pyudev.Context()
        except Exception as e:  # noqa: BLE001 - no libudev, no /sys
            self.error = f"udev unavailable: {e}"
            log.warning("device reporting disabled: %s", self.error)
            self.enabled = False
            return
        try:
            mon = pyudev.Monitor.from_netlink(self._context)
            mon.filter_by("tty")
            mon.filter_by("usb")
            mon.start()
            self._monitor = mon
        except Exception as e:  # noqa: BLE001 - no netlink in this sandbox
            log.info("udev monitor unavailable (%s); rescanning devices every %.0f s", e,
                     self.RESCAN_WITHOUT_MONITOR_S)

    def scan(self) -> list[dict[str, Any]]:
        if not self.enabled:
            return []
        found: list[dict[str, Any]] = []
        if self._lister is not None:
            found = list(self._lister())
        elif self._context is None:
            return []
        else:
            try:
                for subsystem in ("usb", "tty"):
                    for dev in self._context.list_devices(subsystem=subsystem):
                        d = describe_device(dev)
                        if d is not None:
                            found.append(d)
            except Exception as e:  # noqa: BLE001 - a failed scan keeps the inventory it had
                log.debug("device scan failed: %s", e)
        found.sort(key=lambda d: (d.get("subsystem") or "", d.get("devnode") or "", d.get("id") or ""))
        self._last_scan = time.monotonic()
        return found

    def poll(self) -> tuple[bool, list[dict[str, Any]]]:
        """(inventory changed, devices added since the last poll); never blocks."""
        if not self.enabled:
            return False, []
        added: list[dict[str, Any]] = []
        events = 0
        if self._monitor is not None:
            for _ in range(200):
                try:
                    dev = self._monitor.poll(timeout=0)
                except Exception as e:  # noqa: BLE001 - reported; rescans take over
                    log.warning("udev monitor failed (%s); falling back to rescans", e)
                    self._monitor = None
                    break
                if dev is None:
                    break
                events += 1
                if getattr(dev, "action", None) == "add":
                    d = describe_device(dev)
                    if d is not None:
                        added.append(d)
        elif time.monotonic() - self._last_scan >= self.RESCAN_WITHOUT_MONITOR_S:
            events = 1
        if not events:
            return False, added
        before = self.devices
        self.devices = self.scan()
        if self._monitor is None:
            known = {(d.get("devnode"), d.get("id")) for d in before}
            added = [d for d in self.devices if (d.get("devnode"), d.get("id")) not in known]
        return self.devices != before, added


class DeviceReporter:
    """Reports the device inventory as client attribute `connected_devices` (debounced by a second)
    and restarts the controller when a device matching `[controller] restart_on_device` appears."""

    ATTRIBUTE = "connected_devices"
    DEBOUNCE_S = 1.0

    def __init__(self, devices: Devices, restart_patterns: list[str], max_packet: int,
                 publish: Callable[[dict[str, Any]], None], restart: Callable[[str], Any] | None):
        self.devices = devices
        self.patterns = list(restart_patterns)
        self.budget = max_packet - 200
        self.publish = publish
        self.restart = restart
        self._dirty = False
        self._event_at = 0.0

    def start(self) -> None:
        self.devices.devices = self.devices.scan()
        if self.devices.enabled:
            self.publish({self.ATTRIBUTE: self.value()})

    def value(self) -> list[dict[str, Any]]:
        """The inventory, cut to what fits in one MQTT packet."""
        out: list[dict[str, Any]] = []
        used = 0
        for d in self.devices.devices:
            size = len(json.dumps(d))
            if used + size > self.budget:
                break
            out.append(d)
            used += size
        return out

    def poll(self, now: float) -> None:
        changed, added = self.devices.poll()
        if added and self.patterns and self.restart is not None:
            for d in added:
                p = matches(d, self.patterns)
                if p:
                    log.info("device %s (%s) appeared; restarting the controller", d.get("devnode"), p)
                    self.restart(f"device {d.get('devnode') or d.get('id')} appeared")
                    break
        if changed:
            self._dirty = True
            self._event_at = now
        if self._dirty and now - self._event_at >= self.DEBOUNCE_S:
            self._dirty = False
            self.publish({self.ATTRIBUTE: self.value()})
