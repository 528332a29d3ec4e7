"""The TCP-level MQTT proxy between a device and the real broker (asyncio).

Each device connection gets its own connection to the broker; packets pass through as bytes
except the few the simulator rewrites (PUBLISH, SUBSCRIBE, UNSUBSCRIBE topics; SUBACK codes of
refused filters) or answers itself (injected faults: oversize, rate limit, refused payloads,
swallowed PUBACKs).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from .mqtt import (
    CONNACK,
    CONNECT,
    MQTT5,
    PUBACK,
    PUBLISH,
    RC3_NOT_AUTHORIZED,
    RC3_SERVER_UNAVAILABLE,
    RC3_SUB_FAILURE,
    RC5_NOT_AUTHORIZED,
    RC5_SERVER_UNAVAILABLE,
    RC5_TOPIC_FILTER_INVALID,
    RC5_TOPIC_NAME_INVALID,
    SUBACK,
    SUBSCRIBE,
    UNSUBSCRIBE,
    ProtocolError,
    build_broker_connect,
    connack,
    decode_varint,
    enc_bin,
    enc_str,
    make_packet,
    parse_connect,
    read_bin,
    read_packet,
    read_props,
    read_str,
    read_u16,
    rewrite_connack,
)
from .state import Device, State
from .topics import map_down_filter, map_up_topic, unmap_down_topic

log = logging.getLogger(__name__)

# device packets the proxy rewrites; the others pass through as they are
_DEVICE_REWRITTEN = frozenset((PUBLISH, SUBSCRIBE, UNSUBSCRIBE, CONNECT))
READ_SIZE = 256 * 1024
CONNECT_TIMEOUT_S = 10.0
HARD_MAX_PACKET = 16 * 1024 * 1024


class Session:
    """One device connection and its private connection to the broker."""

    def __init__(self, proxy: Proxy, seq: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.state = proxy.state
        self.seq = seq
        self.reader = reader
        self.writer = writer
        self.broker_reader: asyncio.StreamReader | None = None
        self.broker_writer: asyncio.StreamWriter | None = None
        self.level = 4
        self.key = ""
        self.base = ""
        self.device: Device | None = None
        self.provisioning = False
        self.closed = False
        self.registered = False
        self.close_reason = ""
        self.down_prefix = ""
        self.invalid_subs: dict[int, list[int]] = {}
        self.rl_window = 0.0
        self.rl_count = 0
        self.peer = writer.get_extra_info("peername")

    # lifecycle -------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        log.info("session %d (%s) closed: %s", self.seq, self.device.name if self.device else self.key,
                 reason)
        for w in (self.writer, self.broker_writer):
            if w is not None:
                try:
                    w.close()
                except Exception:  # noqa: BLE001 - closing a broken transport
                    pass

    async def run(self) -> None:
        try:
            if not await self._handshake():
                return
            await self._relay()
        except TimeoutError:
            self.close("timeout waiting for CONNECT/CONNACK")
        except (ProtocolError, ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            self.close(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # one broken session must not hurt the others
            log.exception("session %d: unexpected error", self.seq)
            self.close(f"internal error: {exc!r}")
        finally:
            self.close(self.close_reason or "done")
            self.proxy.forget(self)
            for w in (self.writer, self.broker_writer):
                if w is not None:
                    try:
                        await asyncio.wait_for(w.wait_closed(), 1.0)
                    except Exception:  # noqa: BLE001 - closing a broken transport
                        pass

    async def _handshake(self) -> bool:
        pkt = await asyncio.wait_for(read_packet(self.reader, 1 << 20), CONNECT_TIMEOUT_S)
        if pkt[0] >> 4 != CONNECT:
            self.close("first packet is not CONNECT")
            return False
        parsed = parse_connect(pkt)
        self.level = parsed["level"]
        username = parsed["username"]
        st = self.state
        if username == "provision":
            self.provisioning = True
            self.key = f"__provision_{os.getpid()}_{self.seq}"
            st.count(None, "provision_sessions")
        else:
            with st.lock:
                dev = st.by_token.get(username) if username else None
            if dev is None:
                st.count(None, "refused_connects")
                log.info("session %d: refused unknown access token %r", self.seq, username)
                code = RC5_NOT_AUTHORIZED if self.level >= MQTT5 else RC3_NOT_AUTHORIZED
                self.writer.write(connack(self.level, code))
                await self.writer.drain()
                self.close("bad access token")
                return False
            self.device = dev
            self.key = dev.key
        self.base = f"{self.proxy.root}/{self.key}"
        self.down_prefix = f"{self.base}/down/"
        # connect to the real broker
        try:
            broker_reader, broker_writer = await asyncio.wait_for(
                asyncio.open_connection(self.proxy.broker_host, self.proxy.broker_port, limit=1 << 20),
                CONNECT_TIMEOUT_S)
        except OSError as exc:
            log.warning("session %d: broker unreachable: %s", self.seq, exc)
            code = RC5_SERVER_UNAVAILABLE if self.level >= MQTT5 else RC3_SERVER_UNAVAILABLE
            self.writer.write(connack(self.level, code))
            await self.writer.drain()
            self.close("broker unreachable")
            return False
        self.broker_reader, self.broker_writer = broker_reader, broker_writer
        broker_writer.write(build_broker_connect(parsed, f"tbsim-{os.getpid()}-{self.seq}"))
        await broker_writer.drain()
        ack = await asyncio.wait_for(read_packet(broker_reader, 1 << 20), CONNECT_TIMEOUT_S)
        if ack[0] >> 4 != CONNACK:
            raise ProtocolError("broker did not answer CONNACK")
        ack = rewrite_connack(ack, self.level)
        dec = decode_varint(ack, 1)
        if dec is None or dec[1] + 2 > len(ack):
            raise ProtocolError("short CONNACK from the broker")
        rc = ack[dec[1] + 1]
        if rc != 0:
            self.writer.write(ack)
            await self.writer.drain()
            self.close(f"broker refused the connection ({rc})")
            return False
        if self.closed:  # dropped while connecting
            return False
        self.proxy.register(self)
        self.writer.write(ack)
        await self.writer.drain()
        if self.provisioning:
            self.proxy.loop.call_later(self.proxy.provision_close_after, self.close,
                                       "provisioning session timeout")
        return True

    async def _relay(self) -> None:
        assert self.broker_reader is not None and self.broker_writer is not None
        up = asyncio.ensure_future(self._pump(self.reader, self.broker_writer, self._from_device,
                                              self.state.faults.max_packet_bytes + 131072))
        down = asyncio.ensure_future(self._pump(self.broker_reader, self.writer, self._from_broker,
                                                HARD_MAX_PACKET))
        done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        reason = "closed"
        for t in done:
            if not t.cancelled() and t.exception() is None:
                reason = t.result()
            elif not t.cancelled():
                reason = f"error: {t.exception()!r}"
        self.close(reason)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    handler: Callable[[bytearray], tuple[list[bytes], int, str | None]],
                    max_len: int) -> str:
        buf = bytearray()
        name = "device" if reader is self.reader else "broker"
        try:
            while not self.closed:
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    return f"{name} closed the connection"
                buf += chunk
                out, consumed, reason = handler_with_limit(handler, buf, max_len)
                if consumed:
                    del buf[:consumed]
                if out:
                    writer.write(b"".join(out) if len(out) > 1 else out[0])
                if reason:
                    if out:
                        try:
                            await asyncio.wait_for(writer.drain(), 1.0)
                        except Exception:  # noqa: BLE001 - closing a broken transport
                            pass
                    return reason
                if out:
                    await writer.drain()
            return self.close_reason or "closed"
        except ProtocolError as exc:
            return f"protocol error from {name}: {exc}"
        except (ConnectionError, OSError) as exc:
            return f"{name} connection error: {exc}"

    # both directions ------------------------------------------------------------------
    def _rewrite(self, buf: bytearray, wanted: Callable[[int], bool],
                 rewrite: Callable[[int, bytes, int], tuple[bytes | None, str | None]],
                 publish_limit: int | None = None) -> tuple[list[bytes], int, str | None]:
        """Walk the whole packets in `buf`: runs of packets not `wanted` pass through as they are,
        the others go through `rewrite` (a replacement or nothing, and a reason to close).
        Returns (bytes to send, bytes consumed, reason to close or None)."""
        out: list[bytes] = []
        pos = 0
        passed = 0  # start of the pending pass-through run
        n = len(buf)
        while pos < n:
            dec = decode_varint(buf, pos + 1)
            if dec is None:
                break
            rl, body = dec
            end = body + rl
            ptype = buf[pos] >> 4
            if publish_limit is not None and ptype == PUBLISH and rl > publish_limit:
                # certainly larger than the limit: do not wait for the rest
                self._flush(out, buf, passed, pos)
                self.state.count(self.device, "oversize_closes")
                return out, pos, f"oversized PUBLISH ({rl} bytes)"
            if end > n:
                break
            if wanted(ptype):
                self._flush(out, buf, passed, pos)
                repl, reason = rewrite(ptype, bytes(buf[pos:end]), body - pos)
                if reason:
                    return out, end, reason
                if repl is not None:
                    out.append(repl)
                passed = end
            pos = end
        self._flush(out, buf, passed, pos)
        return out, pos, None

    # device -> broker -------------------------------------------------------------------
    def _from_device(self, buf: bytearray) -> tuple[list[bytes], int, str | None]:
        return self._rewrite(buf, _DEVICE_REWRITTEN.__contains__, self._device_packet,
                             self.state.faults.max_packet_bytes + 131072)

    def _device_packet(self, ptype: int, pkt: bytes, body: int) -> tuple[bytes | None, str | None]:
        if ptype == PUBLISH:
            return self._device_publish(pkt, body)
        if ptype == SUBSCRIBE:
            return self._device_subscribe(pkt, body), None
        if ptype == UNSUBSCRIBE:
            return self._device_unsubscribe(pkt, body), None
        return None, "second CONNECT"

    @staticmethod
    def _flush(out: list[bytes], buf: bytearray, start: int, end: int) -> None:
        if end > start:
            out.append(bytes(buf[start:end]))

    def _device_publish(self, pkt: bytes, body: int) -> tuple[bytes | None, str | None]:
        st = self.state
        faults = st.faults
        dev = self.device
        qos = (pkt[0] >> 1) & 0x03
        topic_b, p = read_bin(pkt, body)
        pid = 0
        if qos:
            pid = read_u16(pkt, p)
            p += 2
        after_topic = body + 2 + len(topic_b)
        payload_start = p
        if self.level >= MQTT5:
            payload_start = read_props(pkt, p)[1]
        payload_len = len(pkt) - payload_start
        st.count(dev, "publishes")
        if len(topic_b) + payload_len > faults.max_packet_bytes:
            st.count(dev, "oversize_closes")
            return None, (f"PUBLISH of {len(topic_b) + payload_len} bytes (topic + payload) exceeds "
                          f"{faults.max_packet_bytes}")
        if faults.rate_limit > 0:
            t = self.proxy.loop.time()
            if t - self.rl_window >= 1.0:
                self.rl_window = t
                self.rl_count = 0
            self.rl_count += 1
            if self.rl_count > faults.rate_limit:
                st.count(dev, "rate_limit_closes")
                return None, f"rate limit exceeded ({faults.rate_limit} publishes/s)"
        if qos == 1 and self.level >= MQTT5 and faults.refuse_payloads:
            code = faults.refusal(pkt[payload_start:])
            if code:
                st.count(dev, "publishes_refused")
                self._send_to_device(self._puback(pid, code))
                return None, None
        try:
            topic = topic_b.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("topic is not UTF-8") from exc
        new_topic = map_up_topic(self.base, topic, self.provisioning)
        if new_topic is None:
            st.count(dev, "unknown_topic_publishes")
            log.info("session %d: unsupported publish topic %r", self.seq, topic)
            if self.provisioning:
                return None, f"unsupported topic {topic!r} in a provisioning session"
            if qos == 1:
                self._send_to_device(self._puback(pid, RC5_TOPIC_NAME_INVALID))
            elif qos == 2:
                return None, f"unsupported topic {topic!r} at QoS 2"
            return None, None
        nt = new_topic.encode("utf-8")
        rest = pkt[after_topic:]
        return make_packet(pkt[0], enc_bin(nt) + rest), None

    def _puback(self, pid: int, reason: int) -> bytes:
        if self.level >= MQTT5:
            return make_packet(PUBACK << 4, pid.to_bytes(2, "big") + bytes([reason]))
        return make_packet(PUBACK << 4, pid.to_bytes(2, "big"))

    def _send_to_device(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)

    def _device_subscribe(self, pkt: bytes, body: int) -> bytes:
        pid = read_u16(pkt, body)
        p = body + 2
        head = pkt[body:p]
        if self.level >= MQTT5:
            props, p2 = read_props(pkt, p)
            head += pkt[p:p2]
            p = p2
        parts = [head]
        invalid: list[int] = []
        idx = 0
        while p < len(pkt):
            topic_filter, p = read_str(pkt, p)
            if p >= len(pkt):
                raise ProtocolError("SUBSCRIBE without options byte")
            options = pkt[p:p + 1]
            p += 1
            mapped = map_down_filter(self.base, topic_filter)
            if mapped is None:
                invalid.append(idx)
                self.state.count(self.device, "subscribe_failures")
                log.info("session %d: refused subscription %r", self.seq, topic_filter)
                mapped = f"{self.base}/invalid"
            parts.append(enc_str(mapped) + options)
            idx += 1
        if idx == 0:
            raise ProtocolError("SUBSCRIBE without topic filters")
        if invalid:
            self.invalid_subs[pid] = invalid
        return make_packet(pkt[0], b"".join(parts))

    def _device_unsubscribe(self, pkt: bytes, body: int) -> bytes:
        p = body + 2
        if self.level >= MQTT5:
            p = read_props(pkt, p)[1]
        parts = [pkt[body:p]]
        while p < len(pkt):
            topic_filter, p = read_str(pkt, p)
            mapped = map_down_filter(self.base, topic_filter) or f"{self.base}/invalid"
            parts.append(enc_str(mapped))
        return make_packet(pkt[0], b"".join(parts))

    # broker -> device -------------------------------------------------------------------
    def _from_broker(self, buf: bytearray) -> tuple[list[bytes], int, str | None]:
        return self._rewrite(buf, self._broker_wanted, self._broker_packet)

    def _broker_wanted(self, ptype: int) -> bool:
        return ptype == PUBLISH or (ptype == SUBACK and bool(self.invalid_subs)) or (
            ptype == PUBACK and self.state.faults.no_puback)

    def _broker_packet(self, ptype: int, pkt: bytes, body: int) -> tuple[bytes | None, str | None]:
        if ptype == PUBLISH:
            return self._broker_publish(pkt, body), None
        if ptype == SUBACK:
            return self._broker_suback(pkt, body), None
        self.state.count(self.device, "pubacks_swallowed")
        return None, None

    def _broker_publish(self, pkt: bytes, body: int) -> bytes:
        topic, _ = read_str(pkt, body)
        new_topic = unmap_down_topic(self.down_prefix, topic)
        if new_topic == topic:
            return pkt
        return make_packet(pkt[0], enc_str(new_topic) + pkt[body + 2 + len(topic.encode("utf-8")):])

    def _broker_suback(self, pkt: bytes, body: int) -> bytes:
        pid = read_u16(pkt, body)
        invalid = self.invalid_subs.pop(pid, None)
        if not invalid:
            return pkt
        p = body + 2
        if self.level >= MQTT5:
            p = read_props(pkt, p)[1]
        codes = bytearray(pkt[p:])
        fail = RC5_TOPIC_FILTER_INVALID if self.level >= MQTT5 else RC3_SUB_FAILURE
        for i in invalid:
            if i < len(codes):
                codes[i] = fail
        return make_packet(pkt[0], pkt[body:p] + bytes(codes))


def handler_with_limit(handler: Callable[[bytearray], tuple[list[bytes], int, str | None]],
                       buf: bytearray, max_len: int) -> tuple[list[bytes], int, str | None]:
    out, consumed, reason = handler(buf)
    if reason is None and consumed < len(buf):
        dec = decode_varint(buf, consumed + 1) if len(buf) > consumed + 1 else None
        if dec is not None and dec[0] > max_len:
            return out, consumed, f"packet of {dec[0]} bytes exceeds {max_len}"
    return out, consumed, reason



class Proxy:
    def __init__(self, state: State, listen_host: str, listen_port: int, broker_host: str,
                 broker_port: int, provision_close_after: float, root: str = "tb") -> None:
        self.state = state
        self.root = root
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.provision_close_after = provision_close_after
        self.loop = asyncio.get_running_loop()
        self.server: asyncio.Server | None = None
        self.sessions: dict[str, Session] = {}  # key -> session
        self.all_sessions: set[Session] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.seq = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port,
                                                 limit=1 << 20, reuse_address=True)
        sock = self.server.sockets[0]
        self.listen_port = sock.getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state.faults.refuse:
            writer.close()
            return
        self.seq += 1
        self.state.count(None, "connections")
        session = Session(self, self.seq, reader, writer)
        self.all_sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await session.run()
        finally:
            self.all_sessions.discard(session)
            if task is not None:
                self.tasks.discard(task)

    def register(self, session: Session) -> None:
        old = self.sessions.get(session.key)
        if old is not None and old is not session:
            self.state.count(old.device, "evictions")
            old.close("evicted by a new session with the same token")
        self.sessions[session.key] = session
        session.registered = True
        if session.device is not None:
            with self.state.lock:
                session.device.connected = True
            self.state.count(session.device, "connects")

    def forget(self, session: Session) -> None:
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            if session.device is not None:
                with self.state.lock:
                    session.device.connected = False
        if session.device is not None and session.registered:
            self.state.count(session.device, "disconnects")

    def close_key(self, key: str, reason: str) -> bool:
        s = self.sessions.get(key)
        if s is None:
            return False
        s.close(reason)
        return True

    def drop_all(self) -> int:
        sessions = list(self.all_sessions)
        for s in sessions:
            s.close("dropped by fault injection")
        return len(sessions)

    async def set_refuse(self, refuse: bool) -> None:
        self.state.faults.refuse = refuse
        if refuse and self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        elif not refuse and self.server is None:
            self.server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port,
                                                     limit=1 << 20, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.drop_all()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1.0)
