"""Network peers that misbehave on purpose, for the bridge's transport tests (loopback only).

- `StalledListener`: accepts TCP connections and never sends a byte (a TLS server whose
  handshake never answers, a proxy that hangs).
- `SlowDNS`: a DNS server on a loopback address that ignores queries until told to answer;
  `resolv_conf()` points a process at it (run that process in its own mount namespace with
  `private_resolv_conf()`).
- `make_tls_files()`: a CA and a server certificate for 127.0.0.1 / localhost (openssl).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
from pathlib import Path


class _Served:
    """A socket served by a thread of its own until `close()`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.serve_once()
            except (TimeoutError, OSError):
                continue

    def serve_once(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class StalledListener(_Served):
    """A TCP listener on loopback that accepts and then says nothing, until `close()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(16)
        self.port = int(srv.getsockname()[1])
        self.accepted: list[socket.socket] = []
        super().__init__(srv)

    def serve_once(self) -> None:
        self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        super().close()
        for c in self.accepted:
            with contextlib.suppress(OSError):
                c.close()


def _dns_name(packet: bytes, pos: int) -> tuple[str, int]:
    labels: list[str] = []
    while packet[pos]:
        n = packet[pos]
        labels.append(packet[pos + 1:pos + 1 + n].decode("ascii", "replace"))
        pos += 1 + n
    return ".".join(labels).lower(), pos + 1


class SlowDNS(_Served):
    """UDP DNS on `ip`:53 answering A queries for `names` only while `answering` is set."""

    def __init__(self, ip: str, names: dict[str, str]) -> None:
        self.ip = ip
        self.names = {k.lower(): v for k, v in names.items()}
        self.answering = threading.Event()
        self.queries = 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ip, 53))
        super().__init__(sock)

    def resolv_conf(self, path: Path) -> Path:
        # glibc asks again every 2 s, so an answer is picked up soon after `answering` is set
        path.write_text(f"nameserver {self.ip}\noptions timeout:2 attempts:5\n")
        return path

    def serve_once(self) -> None:
        packet, peer = self.sock.recvfrom(4096)
        self.queries += 1
        if self.answering.is_set() and len(packet) > 12:
            with contextlib.suppress(Exception):
                self.sock.sendto(self._answer(packet), peer)

    def _answer(self, query: bytes) -> bytes:
        qid = query[:2]
        name, pos = _dns_name(query, 12)
        qtype = struct.unpack("!H", query[pos:pos + 2])[0]
        question = query[12:pos + 4]
        ip = self.names.get(name)
        flags = 0x8180 if ip is not None else 0x8183  # response, recursion available; NXDOMAIN when unknown
        answers = b""
        if ip is not None and qtype == 1:
            answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton(ip)
        return qid + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0) + question + answers

def private_resolv_conf(resolv_conf: Path) -> list[str]:
    """A command prefix running the rest in a mount namespace where /etc/resolv.conf is `resolv_conf`."""
    return ["unshare", "--mount", "--", "sh", "-c", f'mount --bind "{resolv_conf}" /etc/resolv.conf && exec "$@"',
            "sh"]


def make_tls_files(directory: Path) -> dict[str, Path]:
    """CA, server certificate and key for 127.0.0.1 and localhost; returns {"ca", "cert", "key"}."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                          "server.pem"))
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=gatewayd test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "cert": cert, "key": key}
