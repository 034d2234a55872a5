"""Real SMTP servers on loopback for the tests (no mocks).

* :class:`ScriptedServer`: a small threaded SMTP server of our own that speaks ESMTP with
  PIPELINING, CHUNKING (BDAT), SIZE, 8BITMIME, SMTPUTF8, STARTTLS, implicit TLS and AUTH
  (PLAIN, LOGIN, CRAM-MD5), records every session and transaction byte-exact (after
  dot-unstuffing or BDAT reassembly) and the command batches as they arrived, and can be
  told to misbehave (see :class:`Behaviour`).
* :class:`AioSink`: aiosmtpd's ``Controller`` recording what it receives (an independent
  implementation, with its own STARTTLS and AUTH).
* :class:`Certs`: trustme certificates (good, expired, self-signed, wrong-name, client).
* :func:`spool_message`: a real queue file through ``dma._core``.

Every socket has a timeout and every server stops within seconds.
"""

from __future__ import annotations

import base64
import datetime
import errno
import hmac
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

SESSION_TIMEOUT = 20.0
CRLF = b"\r\n"


def crlf(body: bytes) -> bytes:
    """What a byte-exact receiver must see for ``body`` sent with BDAT (kind "crlf")."""
    return body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def over_data(body: bytes) -> bytes:
    """... and over DATA: a final CRLF is added when missing, and lines over 998 octets are
    broken the way Postfix does (CRLF SPACE after every 998 octets, the space counting
    toward the next 998), a reference independent of the Rust transform."""
    out = crlf(body)
    out = out if out.endswith(b"\r\n") or not out else out + b"\r\n"
    lines = []
    for line in out.split(b"\r\n"):
        while len(line) > 998:
            lines.append(line[:998])
            line = b" " + line[998:]
        lines.append(line)
    return b"\r\n".join(lines)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def closed_port(host: str = "127.0.0.1") -> int:
    """A port where nothing listens: connecting is refused."""
    return free_port(host)


def spool_message(directory: Path, body: bytes, name: str = "msg") -> Any:
    """A committed queue file holding ``body`` (CRLF -> LF), opened as a MessageFile."""
    from dma import _core

    directory.mkdir(parents=True, exist_ok=True)
    src = directory / f"{name}.in"
    src.write_bytes(body)
    tmp, dest = directory / f"{name}.tmp", directory / f"{name}.queue"
    with open(src, "rb") as f:
        w = _core.SpoolWriter(str(tmp), f.fileno(), False)
        w.write_head(w.read_head())
        w.stream_rest()
        w.commit(b"{}", str(dest))
    src.unlink()
    return _core.MessageFile(str(dest))


# -- the scripted server -----------------------------------------------------------------


@dataclass
class Transaction:
    mail_from: str
    mail_params: list[str]
    rcpts: list[str] = field(default_factory=list)
    data: bytes = b""
    via: str = ""
    """``DATA`` or ``BDAT``."""
    chunks: list[int] = field(default_factory=list)
    """BDAT chunk sizes."""
    tls: bool = False
    auth_user: str | None = None
    bare_lf: int = 0
    """LFs not preceded by CR in the received data (should be 0)."""


@dataclass
class Session:
    peer: tuple[Any, ...]
    commands: list[bytes] = field(default_factory=list)
    batches: list[list[bytes]] = field(default_factory=list)
    """Command lines grouped by the recv() that completed them."""
    transactions: list[Transaction] = field(default_factory=list)
    tls_version: str | None = None
    tls_error: str | None = None
    client_cert: dict[str, Any] | None = None
    auth_user: str | None = None
    auth_attempts: list[tuple[str, str, bool]] = field(default_factory=list)
    """(mechanism, user, success)."""
    auth_in_cleartext: bool = False
    closed: threading.Event = field(default_factory=threading.Event)
    after_data: list[bytes] = field(default_factory=list)
    """For each DATA transaction: what had already arrived behind its end-of-data line
    (commands pipelined with the message)."""

    def batch_of(self, prefix: bytes) -> int:
        for i, b in enumerate(self.batches):
            if any(c.upper().startswith(prefix) for c in b):
                return i
        raise KeyError(prefix)


@dataclass
class Behaviour:
    hostname: str = "test.local"
    greeting: bytes = b"220 test.local ESMTP ready\r\n"
    greeting_delay: float = 0.0
    ehlo_ok: bool = True
    """False: 502 to EHLO (the client must fall back to HELO)."""
    pipelining: bool = True
    chunking: bool = False
    size: int | None = None
    """None: SIZE not advertised; 0: advertised without a limit."""
    eightbitmime: bool = True
    smtputf8: bool = False
    starttls: ssl.SSLContext | None = None
    """Offer STARTTLS with this server context."""
    starttls_reply: bytes | None = None
    """Refuse STARTTLS with this reply (it is still offered when ``starttls`` is set)."""
    advertise_starttls_without_context: bool = False
    implicit_tls: ssl.SSLContext | None = None
    auth_users: dict[str, str] | None = None
    auth_mechanisms: tuple[str, ...] = ("CRAM-MD5", "PLAIN", "LOGIN")
    auth_always_fail: bool = False
    auth_fail_reply: bytes = b"535 5.7.8 Error: authentication failed\r\n"
    mail_reply: bytes = b"250 2.1.0 Ok\r\n"
    rcpt_reply: Callable[[str], bytes] | None = None
    data_reply: bytes = b"354 End data with <CR><LF>.<CR><LF>\r\n"
    final_reply: bytes | Callable[[Transaction], bytes] = b"250 2.0.0 Ok: queued as TEST\r\n"
    drop_after_data_bytes: int | None = None
    """Close the connection once this many message bytes (DATA or BDAT) have arrived."""
    stall_after_data_bytes: int | None = None
    """Stop reading (without closing) once this many message bytes have arrived."""
    stall_after_dot: float = 0.0
    """Say nothing for this long after the end of the data (then reply as usual)."""
    raw: dict[str, bytes] = field(default_factory=dict)
    """Verb (GREETING, EHLO, HELO, STARTTLS, MAIL, RCPT, DATA, DOT, BDAT) -> bytes sent
    instead of the normal reply (garbage, a 10 MB line ...)."""
    close_after: frozenset[str] = frozenset()
    """Close the connection right after answering these verbs."""
    session_timeout: float = SESSION_TIMEOUT


class _Stop(Exception):
    pass


class _Conn:
    """Buffered line/byte reading with a recv counter (for the batch records)."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.recvs = 0
        self.stopping = stopping

    def fill(self) -> None:
        if self.stopping.is_set():
            raise _Stop
        data = self.sock.recv(262144)
        if not data:
            raise _Stop
        self.buf += data
        self.recvs += 1

    def line(self, limit: int = 1 << 20) -> tuple[bytes, int]:
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line.rstrip(b"\r\n"), self.recvs
            if len(self.buf) > limit:
                raise _Stop
            start = len(self.buf)
            self.fill()

    def exactly(self, n: int, drop_at: int | None, got: int, stall_at: int | None) -> bytes:
        while len(self.buf) < n:
            if drop_at is not None and got + len(self.buf) >= drop_at:
                raise _Stop
            if stall_at is not None and got + len(self.buf) >= stall_at:
                self.stall()
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def stall(self) -> None:
        self.stopping.wait(SESSION_TIMEOUT)
        raise _Stop


class _Handler(socketserver.BaseRequestHandler):
    server: ScriptedServer

    def handle(self) -> None:
        srv = self.server
        b = srv.behaviour
        sock: socket.socket = self.request
        sock.settimeout(b.session_timeout)
        sess = Session(peer=self.client_address)
        with srv.lock:
            srv.sessions.append(sess)
            srv.live.add(sock)
        try:
            if b.implicit_tls is not None:
                try:
                    sock = b.implicit_tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    sess.tls_error = str(e)
                    return
                self._tls_done(sess, sock)
            conn = _Conn(sock, srv.stopping)
            self._run(conn, sess, sock)
        except (_Stop, OSError, ValueError):
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with srv.lock:
                srv.live.discard(self.request)
            sess.closed.set()

    @staticmethod
    def _tls_done(sess: Session, sock: ssl.SSLSocket) -> None:
        sess.tls_version = sock.version()
        cert = sock.getpeercert()
        sess.client_cert = dict(cert) if cert else None

    def _reply(self, conn: _Conn, verb: str, normal: bytes) -> None:
        b = self.server.behaviour
        conn.send(b.raw.get(verb, normal))
        if verb in b.close_after:
            raise _Stop

    def _run(self, conn: _Conn, sess: Session, sock: socket.socket) -> None:
        b = self.server.behaviour
        if b.greeting_delay:
            self.server.stopping.wait(b.greeting_delay)
        self._reply(conn, "GREETING", b.greeting)
        txn: Transaction | None = None
        batch_index = -1
        while True:
            line, recv_no = conn.line()
            sess.commands.append(line)
            if recv_no != batch_index:
                sess.batches.append([])
                batch_index = recv_no
            sess.batches[-1].append(line)
            verb, _, arg = line.decode("utf-8", "replace").partition(" ")
            verb = verb.upper()
            tls_on = isinstance(conn.sock, ssl.SSLSocket)
            if verb == "EHLO":
                if not b.ehlo_ok:
                    self._reply(conn, "EHLO", b"502 5.5.2 EHLO not implemented\r\n")
                    continue
                feats = [f"{b.hostname} hello"]
                if b.pipelining:
                    feats.append("PIPELINING")
                if b.size is not None:
                    feats.append(f"SIZE {b.size}" if b.size else "SIZE")
                if b.eightbitmime:
                    feats.append("8BITMIME")
                if b.smtputf8:
                    feats.append("SMTPUTF8")
                if b.chunking:
                    feats.append("CHUNKING")
                if not tls_on and (b.starttls is not None or b.advertise_starttls_without_context):
                    feats.append("STARTTLS")
                if b.auth_users is not None:
                    feats.append("AUTH " + " ".join(b.auth_mechanisms))
                text = "".join(f"250-{f}\r\n" for f in feats[:-1]) + f"250 {feats[-1]}\r\n"
                self._reply(conn, "EHLO", text.encode())
            elif verb == "HELO":
                self._reply(conn, "HELO", f"250 {b.hostname}\r\n".encode())
            elif verb == "STARTTLS":
                if tls_on:
                    self._reply(conn, "STARTTLS", b"503 5.5.1 Already in TLS\r\n")
                    continue
                if b.starttls_reply is not None or b.starttls is None:
                    self._reply(conn, "STARTTLS",
                                b.starttls_reply or b"502 5.5.1 STARTTLS not available\r\n")
                    continue
                self._reply(conn, "STARTTLS", b"220 2.0.0 Ready to start TLS\r\n")
                try:
                    ssock = b.starttls.wrap_socket(conn.sock, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    sess.tls_error = str(e)
                    raise _Stop from None
                self._tls_done(sess, ssock)
                conn.sock = ssock
                conn.buf.clear()
                txn = None
            elif verb == "AUTH":
                self._auth(conn, sess, arg, tls_on)
            elif verb == "MAIL":
                if txn is not None:
                    self._reply(conn, "MAIL", b"503 5.5.1 Error: nested MAIL command\r\n")
                    continue
                addr, params = _parse_path(arg, "FROM:")
                size = next((int(p[5:]) for p in params if p.upper().startswith("SIZE=")), 0)
                if b.size and size > b.size:
                    self._reply(conn, "MAIL", b"552 5.3.4 Message size exceeds fixed limit\r\n")
                    continue
                reply = b.raw.get("MAIL", b.mail_reply)
                if reply.startswith(b"2"):
                    txn = Transaction(addr, params, tls=tls_on, auth_user=sess.auth_user)
                self._reply(conn, "MAIL", reply)
            elif verb == "RCPT":
                if txn is None:
                    self._reply(conn, "RCPT", b"503 5.5.1 Error: need MAIL command\r\n")
                    continue
                addr, _params = _parse_path(arg, "TO:")
                reply = b.rcpt_reply(addr) if b.rcpt_reply else b"250 2.1.5 Ok\r\n"
                reply = b.raw.get("RCPT", reply)
                if reply.startswith(b"2"):
                    txn.rcpts.append(addr)
                self._reply(conn, "RCPT", reply)
            elif verb == "DATA":
                if txn is None or not txn.rcpts:
                    self._reply(conn, "DATA", b"554 5.5.1 Error: no valid recipients\r\n")
                    continue
                self._reply(conn, "DATA", b.data_reply)
                if not b.data_reply.startswith(b"354"):
                    continue
                txn.data, txn.via = self._read_data(conn), "DATA"
                sess.after_data.append(bytes(conn.buf))
                self._finish(conn, sess, txn)
                txn = None
            elif verb == "BDAT":
                parts = arg.split()
                n, last = int(parts[0]), len(parts) > 1 and parts[1].upper() == "LAST"
                got = len(txn.data) if txn is not None else 0
                chunk = conn.exactly(n, b.drop_after_data_bytes, got, b.stall_after_data_bytes)
                if txn is None or not txn.rcpts:
                    self._reply(conn, "BDAT", b"554 5.5.1 Error: no valid recipients\r\n")
                    txn = None
                    continue
                txn.data += chunk
                txn.chunks.append(n)
                txn.via = "BDAT"
                if not last:
                    self._reply(conn, "BDAT", f"250 2.0.0 {n} octets received\r\n".encode())
                    continue
                self._finish(conn, sess, txn)
                txn = None
            elif verb == "RSET":
                txn = None
                self._reply(conn, "RSET", b"250 2.0.0 Ok\r\n")
            elif verb == "NOOP":
                self._reply(conn, "NOOP", b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                conn.send(b"221 2.0.0 Bye\r\n")
                return
            else:
                self._reply(conn, verb, b"500 5.5.2 Error: command not recognized\r\n")

    def _read_data(self, conn: _Conn) -> bytes:
        b = self.server.behaviour
        drop = b.drop_after_data_bytes
        while len(conn.buf) < 3:
            conn.fill()
        if conn.buf.startswith(b".\r\n"):
            del conn.buf[:3]
            return b""
        start = 0
        while True:
            i = conn.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                raw = bytes(conn.buf[:i + 2])
                del conn.buf[:i + 5]
                break
            if drop is not None and len(conn.buf) >= drop:
                raise _Stop
            if b.stall_after_data_bytes is not None and len(conn.buf) >= b.stall_after_data_bytes:
                conn.stall()
            start = max(0, len(conn.buf) - 4)
            conn.fill()
        return b"\r\n".join(x[1:] if x.startswith(b".") else x for x in raw.split(b"\r\n"))

    def _finish(self, conn: _Conn, sess: Session, txn: Transaction) -> None:
        b = self.server.behaviour
        txn.bare_lf = txn.data.count(b"\n") - txn.data.count(b"\r\n")
        sess.transactions.append(txn)
        if b.stall_after_dot:
            self.server.stopping.wait(b.stall_after_dot)
        reply = b.final_reply(txn) if callable(b.final_reply) else b.final_reply
        self._reply(conn, "DOT", reply)

    def _auth(self, conn: _Conn, sess: Session, arg: str, tls_on: bool) -> None:
        b = self.server.behaviour
        users = b.auth_users
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if users is None or mech not in b.auth_mechanisms:
            conn.send(b"504 5.5.4 Unrecognized authentication type\r\n")
            return
        if not tls_on:
            sess.auth_in_cleartext = True

        def ask(prompt: bytes) -> bytes:
            conn.send(b"334 " + base64.b64encode(prompt) + CRLF)
            line, _ = conn.line()
            if line == b"*":
                raise ValueError("cancelled")
            return base64.b64decode(line)

        user, ok = "", False
        try:
            if mech == "PLAIN":
                data = base64.b64decode(initial) if initial else ask(b"")
                _authz, user_b, pw_b = data.split(b"\0")
                user = user_b.decode()
                ok = users.get(user) == pw_b.decode()
            elif mech == "LOGIN":
                user = (base64.b64decode(initial) if initial else ask(b"Username:")).decode()
                ok = users.get(user) == ask(b"Password:").decode()
            else:  # CRAM-MD5
                challenge = f"<{time.time_ns()}@{b.hostname}>".encode()
                user, _, digest = ask(challenge).decode().rpartition(" ")
                pw_s = users.get(user)
                ok = pw_s is not None and hmac.compare_digest(
                    hmac.new(pw_s.encode(), challenge, "md5").hexdigest(), digest)
        except (ValueError, UnicodeDecodeError):
            sess.auth_attempts.append((mech, user, False))
            conn.send(b"501 5.5.2 Cannot decode response\r\n")
            return
        ok = ok and not b.auth_always_fail
        sess.auth_attempts.append((mech, user, ok))
        if ok:
            sess.auth_user = user
            conn.send(b"235 2.7.0 Authentication successful\r\n")
        else:
            conn.send(b.auth_fail_reply)


def _parse_path(arg: str, prefix: str) -> tuple[str, list[str]]:
    if not arg.upper().startswith(prefix):
        raise ValueError(arg)
    rest = arg[len(prefix):].strip()
    end = rest.find(">")
    if not rest.startswith("<") or end < 0:
        raise ValueError(arg)
    return rest[1:end], rest[end + 1:].split()


class ScriptedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, behaviour: Behaviour | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.behaviour = behaviour or Behaviour()
        self.sessions: list[Session] = []
        self.lock = threading.Lock()
        self.live: set[socket.socket] = set()
        self.stopping = threading.Event()
        # A fixed port (25 for MX tests) may still be held for a moment by the sockets of a
        # server that just stopped: retry the bind briefly instead of failing the test.
        deadline = time.monotonic() + 10
        while True:
            try:
                super().__init__((host, port), _Handler)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or not port or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.host = host
        self.port: int = self.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> ScriptedServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        with self.lock:
            live = list(self.live)
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def transactions(self) -> list[Transaction]:
        with self.lock:
            return [t for s in self.sessions for t in s.transactions]

    def wait_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for s in list(self.sessions):
            s.closed.wait(max(0.0, deadline - time.monotonic()))


def serve(behaviour: Behaviour | None = None, host: str = "127.0.0.1",
          port: int = 0) -> ScriptedServer:
    return ScriptedServer(behaviour, host, port).start()


# -- aiosmtpd -----------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    tls: bool
    auth_user: str | None


class AioSink:
    """aiosmtpd on 127.0.0.1:<free port>, recording each message byte-exact."""

    def __init__(self, *, host: str = "127.0.0.1", tls_context: ssl.SSLContext | None = None,
                 require_starttls: bool = False, users: dict[str, str] | None = None,
                 auth_require_tls: bool = True) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.messages: list[Received] = []
        self.auth_attempts: list[tuple[str, bool]] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                sink.messages.append(Received(
                    envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                    list(envelope.mail_options), session.ssl is not None,
                    session.auth_data.login.decode() if session.auth_data else None))
                return "250 2.0.0 Message accepted"

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                          auth_data: Any) -> Any:
            if not isinstance(auth_data, LoginPassword) or users is None:
                return AuthResult(success=False, handled=False)
            user, pw = auth_data.login.decode(), auth_data.password.decode()
            ok = users.get(user) == pw
            self.auth_attempts.append((user, ok))
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

        kwargs: dict[str, Any] = {"decode_data": False, "enable_SMTPUTF8": True}
        if tls_context is not None:
            kwargs.update(tls_context=tls_context, require_starttls=require_starttls)
        if users is not None:
            kwargs.update(authenticator=authenticator, auth_require_tls=auth_require_tls)
        self.port = free_port(host)
        self.host = host
        self.controller = Controller(Handler(), hostname=host, port=self.port,
                                     ready_timeout=10.0, **kwargs)

    def __enter__(self) -> AioSink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


# -- certificates --------------------------------------------------------------------------


class Certs:
    """A trustme CA with server certificates for localhost/127.0.0.1/::1: good, expired,
    wrong-name, self-signed (another CA's own certificate), and a client certificate."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.cafile = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))
        names = ("localhost", "127.0.0.1", "::1")
        self.good = self.ca.issue_cert(*names)
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
        self.expired = self.ca.issue_cert(*names, not_before=past - datetime.timedelta(days=30),
                                          not_after=past)
        self.wrong_name = self.ca.issue_cert("wrong.example")
        self.other_ca = trustme.CA()
        self.client = self.ca.issue_cert("client@dma.test", common_name="dma client")
        self.client_pem = directory / "client.pem"
        self.client.private_key_and_cert_chain_pem.write_to_path(str(self.client_pem))

    def server_context(self, which: str = "good", *,
                       require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if which == "self_signed":
            # A certificate that signs itself: the other CA's root used as a server cert.
            path = self.dir / "selfsigned.pem"
            path.write_bytes(self.other_ca.private_key_pem.bytes() + self.other_ca.cert_pem.bytes())
            ctx.load_cert_chain(str(path))
        else:
            leaf: trustme.LeafCert = getattr(self, which)
            leaf.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx

    def leaf_der(self, which: str = "good") -> bytes:
        leaf: trustme.LeafCert = getattr(self, which)
        pem = leaf.cert_chain_pems[0].bytes().decode()
        return ssl.PEM_cert_to_DER_cert(pem)
