"""Real DNS servers on loopback for tests.

``DnsServer`` runs dnsmasq (Debian package ``dnsmasq-base``, binary ``/usr/sbin/dnsmasq``)
as a child process, authoritative-style for the zones it is given: names it does not know
get NXDOMAIN, known names without the asked type get NODATA.  ``SilentDns`` never answers
(timeouts) and ``RcodeDns`` answers every query with one rcode (SERVFAIL by default);
``DnsServer(servfail=[...])`` forwards those domains to an ``RcodeDns`` so the failure comes
through dnsmasq like it would from a broken authoritative server.

Everything binds 127.0.0.1 only, is started and stopped by the context manager, and every
wait is bounded::

    with DnsServer(mx={"example.test": [(10, "mx1.example.test")]},
                   hosts={"mx1.example.test": ["127.0.0.2", "::1"]}) as dns:
        config = Config(resolver=dns.resolver)
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode

LOOPBACK = "127.0.0.1"
DNSMASQ_PACKAGE = "dnsmasq-base"


def find_dnsmasq() -> str | None:
    """The dnsmasq binary, or None (tests then skip)."""
    found = shutil.which("dnsmasq")
    if found:
        return found
    return "/usr/sbin/dnsmasq" if os.access("/usr/sbin/dnsmasq", os.X_OK) else None


def free_port() -> int:
    """A loopback port that is free for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port for UDP and TCP")


def _bind_pair() -> tuple[socket.socket, socket.socket, int]:
    """A UDP socket and a listening TCP socket on the same free loopback port."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((LOOPBACK, 0))
        port: int = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((LOOPBACK, port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp, port
    raise RuntimeError("no free loopback port for UDP and TCP")


def _pdeathsig_hook() -> Callable[[], None] | None:
    """A preexec_fn making the child die with its parent (Linux), so a killed test run
    leaves no dnsmasq behind.  libc is loaded here, in the parent: the hook itself runs
    between fork and exec and must not take loader locks another thread may hold."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return hook


class SilentDns:
    """A bound UDP socket and a listening TCP socket that never answer anything."""

    def __init__(self) -> None:
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self.port = 0

    @property
    def resolver(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def __enter__(self) -> SilentDns:
        self._udp, self._tcp, self.port = _bind_pair()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None


class RcodeDns:
    """A loopback DNS server (UDP and TCP) answering every query with ``rcode``."""

    def __init__(self, rcode: dns.rcode.Rcode = dns.rcode.SERVFAIL) -> None:
        self.rcode = rcode
        self.port = 0
        self.queries = 0
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def resolver(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def __enter__(self) -> RcodeDns:
        self._udp, self._tcp, self.port = _bind_pair()
        self._thread = threading.Thread(target=self._serve, name="RcodeDns", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        self.queries += 1
        response = dns.message.make_response(query)
        response.set_rcode(self.rcode)
        return response.to_wire()

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._udp, selectors.EVENT_READ)
            sel.register(self._tcp, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    if key.fileobj is self._udp:
                        wire, peer = self._udp.recvfrom(65535)
                        reply = self._answer(wire)
                        if reply is not None:
                            self._udp.sendto(reply, peer)
                    else:
                        conn, _ = self._tcp.accept()
                        with conn, contextlib.suppress(OSError):
                            self._serve_tcp(conn)

    def _serve_tcp(self, conn: socket.socket) -> None:
        conn.settimeout(2)
        while True:
            head = conn.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            (length,) = struct.unpack("!H", head)
            reply = self._answer(conn.recv(length, socket.MSG_WAITALL))
            if reply is None:
                return
            conn.sendall(struct.pack("!H", len(reply)) + reply)


class DnsServer:
    """dnsmasq on 127.0.0.1:<free port>, answering only from the records given.

    mx:       domain -> [(preference, exchange), ...]
    hosts:    name -> addresses (IPv4 and/or IPv6), served as A / AAAA
    null_mx:  domains with the RFC 7505 null MX (``MX 0 .``)
    servfail: domains whose every query fails with SERVFAIL (forwarded to an RcodeDns)
    cname:    alias -> target
    zones:    the domains dnsmasq answers for alone (unknown names there: NXDOMAIN);
              default: the top-level labels of every name above, e.g. ``test``
    extra:    raw dnsmasq configuration lines

    Names outside the zones (and outside ``servfail``) are refused: nothing is forwarded
    to the real DNS.
    """

    def __init__(
        self,
        *,
        mx: Mapping[str, Sequence[tuple[int, str]]] | None = None,
        hosts: Mapping[str, Sequence[str]] | None = None,
        null_mx: Iterable[str] = (),
        servfail: Iterable[str] = (),
        cname: Mapping[str, str] | None = None,
        zones: Iterable[str] | None = None,
        extra: Sequence[str] = (),
        start_timeout: float = 10.0,
    ) -> None:
        self.mx = dict(mx or {})
        self.hosts = dict(hosts or {})
        self.null_mx = tuple(null_mx)
        self.servfail = tuple(servfail)
        self.cname = dict(cname or {})
        self.extra = tuple(extra)
        self.start_timeout = start_timeout
        if zones is None:
            names: list[str] = [*self.mx, *self.hosts, *self.null_mx, *self.cname]
            for exchanges in self.mx.values():
                names += [exchange for _, exchange in exchanges]
            zones = sorted({name.rstrip(".").rsplit(".", 1)[-1].lower() for name in names})
        self.zones = tuple(zones)
        self.port = 0
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._rcode: RcodeDns | None = None

    @property
    def resolver(self) -> tuple[str, int]:
        """What ``Config.resolver`` takes."""
        return (LOOPBACK, self.port)

    @property
    def log(self) -> str:
        """dnsmasq's log so far (every query is logged)."""
        if self._tmp is None:
            return ""
        try:
            with open(os.path.join(self._tmp.name, "dnsmasq.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def config_lines(self, port: int) -> list[str]:
        lines = [
            "no-resolv",
            "no-hosts",
            "no-poll",
            "keep-in-foreground",
            f"listen-address={LOOPBACK}",
            "bind-interfaces",
            f"port={port}",
            "pid-file=",
            "cache-size=0",
            "local-ttl=0",
            "log-queries",
        ]
        if self._tmp is not None:
            lines.append(f"log-facility={os.path.join(self._tmp.name, 'dnsmasq.log')}")
        if os.geteuid() == 0:
            lines += ["user=root", "group=root"]  # else dnsmasq drops to nobody
        lines += [f"local=/{zone}/" for zone in self.zones]
        for domain, exchanges in self.mx.items():
            lines += [f"mx-host={domain},{exchange},{pref}" for pref, exchange in exchanges]
        for name, addresses in self.hosts.items():
            lines.append(f"host-record={name},{','.join(addresses)}")
        # MX RDATA: preference 0 (two bytes) and the root name (one zero byte).
        lines += [f"dns-rr={domain},15,000000" for domain in self.null_mx]
        lines += [f"cname={alias},{target}" for alias, target in self.cname.items()]
        if self._rcode is not None:
            lines += [f"server=/{d}/{LOOPBACK}#{self._rcode.port}" for d in self.servfail]
        lines += self.extra
        return lines

    def __enter__(self) -> DnsServer:
        binary = find_dnsmasq()
        if binary is None:
            raise RuntimeError(f"dnsmasq not installed (apt-get install {DNSMASQ_PACKAGE})")
        self._tmp = tempfile.TemporaryDirectory(prefix="dnsd-")
        try:
            if self.servfail:
                self._rcode = RcodeDns(dns.rcode.SERVFAIL).__enter__()
            last_error = ""
            for _ in range(5):  # another process may grab the port in between: retry
                port = free_port()
                if self._start(binary, port):
                    return self
                last_error = self.log
            raise RuntimeError(f"dnsmasq did not start:\n{last_error}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self, binary: str, port: int) -> bool:
        assert self._tmp is not None
        conf = os.path.join(self._tmp.name, "dnsmasq.conf")
        with open(conf, "w") as f:
            f.write("\n".join(self.config_lines(port)) + "\n")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._tmp.name, "dnsmasq.log"))
        self._proc = subprocess.Popen(
            [binary, f"--conf-file={conf}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_pdeathsig_hook(),
        )
        self.pid = self._proc.pid
        self.port = port
        deadline = time.monotonic() + self.start_timeout
        probe = dns.message.make_query(f"dnsd-probe.{self.zones[0] if self.zones else 'test'}", "A")
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._stop()
                return False
            try:
                dns.query.udp(probe, LOOPBACK, port=port, timeout=0.2)
                return True
            except (dns.exception.Timeout, OSError):
                time.sleep(0.02)
        self._stop()
        raise RuntimeError(f"dnsmasq did not answer within {self.start_timeout}s:\n{self.log}")

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.pid = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._stop()
        finally:
            if self._rcode is not None:
                self._rcode.__exit__(None, None, None)
                self._rcode = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
