"""The SMTP client: one transaction per destination, streamed from the spool file.

Built on :mod:`smtplib` for EHLO/HELO and its feature parsing, the reply plumbing
(``putcmd``/``docmd``) and the AUTH mechanisms (CRAM-MD5 > PLAIN > LOGIN).  The reply reader
is replaced by a bounded one (a whole reply must arrive before its deadline, a line longer
than ``smtplib._MAXLINE`` or a reply of too many lines ends the conversation as a temporary
failure), and the mail transaction is done here so that MAIL/RCPT/DATA can be pipelined and
the body streamed from a ``_core`` cursor: BDAT chunks when CHUNKING is offered, otherwise
DATA with dot-stuffing done in Rust (``send_to`` with the GIL released on plain sockets).

Per recipient: 2xx delivered (after the final reply only), 4xx deferred, 5xx failed, a lost
or stalled connection before the final reply deferred.  :func:`deliver` tries the hosts of a
destination in order and each of their addresses, moving the deferred recipients on.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from . import tls as tlsmod
from .auth import AuthTable, Credentials
from .config import Config
from .errors import SpoolCorrupt
from .log import Log
from .outcome import Outcome
from .route import Destination, Host

__all__ = ["Connection", "DeliveryError", "deliver"]

_MAXLINE: int = getattr(smtplib, "_MAXLINE", 8192)  # the longest reply line we accept
_MAX_REPLY_LINES = 512
_RECV = 65536
_QUIT_TIMEOUT = 5.0
_PIPELINE_BATCH = 100
_STAGES = {"MAIL FROM": "sending MAIL FROM", "RCPT TO": "sending RCPT TO",
           "DATA": "sending DATA command"}
CRLF = b"\r\n"
_HELD_MAX = 256 * 1024
"""Messages up to this size (on disk) are read whole to ride in one write with the next
message's commands (``send_many``); bigger ones stream on their own."""
_DUP_STAGE = "sending end of data -- message may be sent more than once"


TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds of start-up
if TYPE_CHECKING:
    from typing import Literal, Protocol, TypeVar

    from ._core import MessageFile as MessageLike
    from .outcome import Status

    class Job(Protocol):
        """One message for ``send_many`` / ``deliver_many``."""

        @property
        def msg(self) -> MessageLike: ...
        @property
        def sender(self) -> str: ...
        @property
        def recipients(self) -> Sequence[str]: ...
        @property
        def queue_id(self) -> str: ...
        @property
        def created(self) -> float: ...
        @property
        def wire(self) -> int | None: ...

    J = TypeVar("J", bound=Job)
    _Prep = tuple[J, "_Txn", tuple[bytes, list[int], list[bytes]] | None, bytes | None, str]


class DeliveryError(Exception):
    """The connection could not be made ready for a transaction (connect, greeting, EHLO,
    TLS, AUTH).  Applies to every recipient of the attempt."""

    def __init__(self, reply: str, dsn: str = "4.0.0", *, status: Status = "deferred",
                 relay: str = "", scope: Literal["address", "host"] = "address") -> None:
        super().__init__(reply)
        self.reply = reply
        self.dsn = dsn
        self.status: Status = status
        self.relay = relay
        self.scope = scope
        """``address``: another address of the host may do better; ``host``: not."""


class _Lost(smtplib.SMTPServerDisconnected):
    """The conversation broke: the peer closed, stalled, or spoke nonsense."""

    def __init__(self, kind: Literal["closed", "timeout", "protocol"], detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind
        self.detail = detail

    def describe(self, relay: str, stage: str) -> tuple[str, str]:
        if self.kind == "timeout":
            return f"conversation with {relay} timed out while {stage}", "4.4.2"
        if self.kind == "protocol":
            return f"protocol error with {relay} while {stage}: {self.detail}", "4.5.0"
        why = f" ({self.detail})" if self.detail else ""
        return f"lost connection with {relay} while {stage}{why}", "4.4.2"


class _Closing(Exception):
    """The server said 421: it is closing the connection."""

    def __init__(self, reply: str, dsn: str) -> None:
        super().__init__(reply)
        self.reply = reply
        self.dsn = dsn


class _Fallback(Exception):
    """MX_TLS may: the STARTTLS handshake failed; retry the address in plaintext."""

    def __init__(self, error: tlsmod.TlsError) -> None:
        super().__init__(error.reason)
        self.error = error


class _Client(smtplib.SMTP):
    """smtplib.SMTP with a bounded reply reader and per-phase timeouts."""

    ehlo_msg = "EHLO"

    def __init__(self, mailname: str) -> None:
        super().__init__(local_hostname=mailname)  # no host: no connect, no getfqdn()
        self._rbuf = bytearray()
        self.timeout_s: float = 300.0
        """Applies to the next command's send and to its whole reply."""

    def attach(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = None
        self._rbuf.clear()
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False

    def helo(self, name: str = "") -> tuple[int, bytes]:
        self.putcmd("HELO", name or self.local_hostname)
        code, msg = self.getreply()
        self.helo_resp = msg
        return code, msg

    def close(self) -> None:
        self._rbuf.clear()
        try:
            super().close()
        except OSError:
            pass

    def send(self, s: object) -> None:
        data = s.encode(self.command_encoding) if isinstance(s, str) else s
        assert isinstance(data, bytes | bytearray | memoryview)
        self.send_raw(data, self.timeout_s)

    def send_raw(self, data: bytes | bytearray | memoryview, timeout: float) -> None:
        sock = self.sock
        if sock is None:
            raise _Lost("closed", "not connected")
        try:
            sock.settimeout(max(timeout, 0.001))
            sock.sendall(data)
        except TimeoutError:
            self.close()
            raise _Lost("timeout") from None
        except OSError as e:
            self.close()
            raise _Lost("closed", _oserror(e)) from None

    def _readline(self, deadline: float) -> bytes:
        buf = self._rbuf
        start = 0
        while True:
            i = buf.find(b"\n", start)
            if i >= 0:
                if i >= _MAXLINE:
                    break
                line = bytes(buf[:i + 1])
                del buf[:i + 1]
                return line
            if len(buf) > _MAXLINE:
                break
            start = len(buf)
            sock = self.sock
            if sock is None:
                raise _Lost("closed", "not connected")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise _Lost("timeout")
            try:
                sock.settimeout(remaining)
                data = sock.recv(_RECV)
            except TimeoutError:
                self.close()
                raise _Lost("timeout") from None
            except OSError as e:
                self.close()
                raise _Lost("closed", _oserror(e)) from None
            if not data:
                self.close()
                raise _Lost("closed", "connection closed by the server")
            buf += data
        self.close()
        raise _Lost("protocol", f"reply line longer than {_MAXLINE} bytes")

    def getreply(self) -> tuple[int, bytes]:
        deadline = time.monotonic() + self.timeout_s
        lines: list[bytes] = []
        while True:
            line = self._readline(deadline)
            code_b, sep = line[:3], line[3:4]
            if (len(code_b) != 3 or not code_b.isdigit() or code_b[:1] not in b"2345"
                    or sep not in (b" ", b"-", b"\r", b"\n", b"")):
                self.close()
                raise _Lost("protocol", f"unexpected reply {_show(line)}")
            lines.append(line[4:].strip(b" \t\r\n"))
            if sep != b"-":
                return int(code_b), b"\n".join(lines)
            if len(lines) >= _MAX_REPLY_LINES:
                self.close()
                raise _Lost("protocol", f"reply of more than {_MAX_REPLY_LINES} lines")


class _Txn:
    """One transaction's bookkeeping while its replies come in."""

    __slots__ = ("rcpts", "results", "accepted", "mail_ok", "data_code", "data_text")

    def __init__(self, rcpts: list[str], results: list[Outcome | None]) -> None:
        self.rcpts = rcpts
        self.results = results
        self.accepted: list[int] = []
        self.mail_ok = True
        self.data_code = 0
        self.data_text = ""


class Connection:
    """One SMTP session with one host: connect, greeting, EHLO, TLS, AUTH, then any number
    of transactions (``send``), then ``close``."""

    def __init__(self, host: Host, config: Config, *, kind: str = "smarthost",
                 auth: AuthTable | None = None, policy: tlsmod.TlsPolicy | None = None) -> None:
        self.host = host
        self.config = config
        self.kind = kind
        self.policy = policy if policy is not None else tlsmod.policy_for(config, kind)
        self.credentials: Credentials | None = auth.get(host.name) if auth is not None else None
        self.relay = f"{host.name}[{host.addresses[0] if host.addresses else host.name}]" \
                     f":{host.port}"
        self.tls_version = "no TLS"
        self.authenticated = False
        self.tls_note = ""
        """Why an optional TLS did not happen (for logs), e.g. "STARTTLS refused"."""
        self._client: _Client | None = None
        self._stage = "connecting"
        self._need_rset = False
        self._broken: tuple[str, str] | None = None

    # -- session set-up -------------------------------------------------------------------

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._client is not None and self._client.sock is not None

    @property
    def features(self) -> dict[str, str]:
        return dict(self._client.esmtp_features) if self._client is not None else {}

    def open(self) -> None:
        """Connects to the first address that takes us through greeting, EHLO, TLS and AUTH.
        Raises DeliveryError (with the last address's reason) when none does."""
        if self.policy.mode != "none":
            try:
                tlsmod.client_context(self.policy)  # CERTFILE/CAFILE errors before connecting
            except tlsmod.TlsError as e:
                raise DeliveryError(e.reason, e.dsn, relay=self.relay, scope="host") from None
        addresses = self.host.addresses or (self.host.name,)
        last: DeliveryError | None = None
        for addr in addresses:
            self.tls_note = ""
            try:
                try:
                    self._open_address(addr, use_tls=True)
                except _Fallback as fb:
                    self.tls_note = f"TLS handshake failed ({fb.error.reason}); plaintext"
                    self._open_address(addr, use_tls=False)
                return
            except DeliveryError as e:
                last = e
                if e.scope == "host":
                    break
        assert last is not None
        raise last

    def _open_address(self, addr: str, *, use_tls: bool) -> None:
        self.close()
        self._broken = None
        self._need_rset = False
        self.authenticated = False
        self.tls_version = "no TLS"
        port = self.host.port
        self.relay = relay = f"{self.host.name}[{addr}]:{port}"
        self._stage = "connecting"
        try:
            sock = socket.create_connection((addr, port),
                                            timeout=float(self.config.connect_timeout))
        except TimeoutError:
            raise DeliveryError(f"connect to {relay}: connection timed out", "4.4.1",
                                relay=relay) from None
        except OSError as e:
            raise DeliveryError(f"connect to {relay}: {_oserror(e)}", "4.4.1",
                                relay=relay) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        client = self._client = _Client(self.config.mailname)
        greeting_timeout = float(self.config.greeting_timeout)
        try:
            if self.policy.mode == "implicit" and use_tls:
                self._stage = "performing the TLS handshake"
                sock.settimeout(greeting_timeout)
                sock = tlsmod.wrap(sock, self.policy, self.host.name, relay)
                self.tls_version = tlsmod.version(sock)
            client.attach(sock)
            client.timeout_s = greeting_timeout
            self._stage = "receiving the initial server greeting"
            code, resp = client.getreply()
            if code != 220:
                reply = _fmt(code, resp)
                raise DeliveryError(f"host {relay} refused to talk to us: {reply}",
                                    _dsn(code, reply, temporary=True), relay=relay)
            self._ehlo()
            if self.policy.mode == "starttls" and use_tls:
                self._starttls(greeting_timeout)
            self._auth()
        except tlsmod.TlsError as e:
            self.close()
            raise DeliveryError(e.reason, e.dsn, relay=relay) from None
        except _Lost as e:
            self.close()
            reason, dsn = e.describe(relay, self._stage)
            raise DeliveryError(reason, dsn, relay=relay) from None
        except BaseException:
            self.close()
            raise

    def _ehlo(self) -> None:
        client = self._client
        assert client is not None
        self._stage = "performing the EHLO handshake"
        name = self.config.mailname
        code, resp = client.ehlo(name)
        if 200 <= code <= 299:
            return
        if code != 421:
            code, resp = client.helo(name)
            if 200 <= code <= 299:
                return
        reply = _fmt(code, resp)
        raise DeliveryError(f"host {self.relay} refused our greeting: {reply} "
                            f"(in reply to EHLO/HELO)", _dsn(code, reply, temporary=True),
                            relay=self.relay)

    def _starttls(self, timeout: float) -> None:
        client = self._client
        assert client is not None
        policy = self.policy
        self._stage = "performing the STARTTLS handshake"
        if not client.has_extn("starttls"):
            if policy.required:
                raise DeliveryError(f"TLS is required, but {self.relay} does not offer "
                                    f"STARTTLS", "4.7.4", relay=self.relay)
            self.tls_note = "STARTTLS not offered"
            return
        code, resp = client.docmd("STARTTLS")
        if code != 220:
            reply = _fmt(code, resp)
            if policy.required or code == 421:
                raise DeliveryError(f"STARTTLS refused by {self.relay}: {reply}",
                                    _dsn(code, reply, temporary=True), relay=self.relay)
            self.tls_note = f"STARTTLS refused ({reply})"
            return
        sock = client.sock
        assert sock is not None
        client._rbuf.clear()  # RFC 3207: nothing said before the handshake counts
        client.sock = None
        sock.settimeout(timeout)
        try:
            ssock = tlsmod.wrap(sock, policy, self.host.name, self.relay)
        except tlsmod.TlsError as e:
            if policy.fallback_plaintext and e.kind == "handshake":
                raise _Fallback(e) from None
            raise
        client.attach(ssock)
        self.tls_version = tlsmod.version(ssock)
        self._ehlo()

    def _auth(self) -> None:
        creds = self.credentials
        client = self._client
        assert client is not None
        if creds is None:
            return
        who = f"{creds.user} at {self.host.name}"
        tls_active = isinstance(client.sock, ssl.SSLSocket)
        if not tls_active and not self.config.insecure:
            raise DeliveryError(f"authentication requires TLS for {who}", "4.7.0",
                                relay=self.relay, scope="host")
        self._stage = "performing the AUTH handshake"
        if not client.has_extn("auth"):
            raise DeliveryError(f"authentication failed for {who}: the server does not offer "
                                f"AUTH", "4.7.0", relay=self.relay, scope="host")
        try:
            client.login(creds.user, creds.password)
        except _Lost:
            raise
        except smtplib.SMTPAuthenticationError as e:
            reply = _fmt(e.smtp_code, e.smtp_error)
            if e.smtp_code == 421:
                raise DeliveryError(f"authentication failed for {who}: {reply}", "4.7.0",
                                    relay=self.relay) from None
            raise DeliveryError(f"authentication failed for {who}: {reply}", "4.7.0",
                                relay=self.relay, scope="host") from None
        except smtplib.SMTPException as e:
            offered = client.esmtp_features.get("auth", "").strip()
            raise DeliveryError(f"authentication failed for {who}: {e} (offered: {offered})",
                                "4.7.0", relay=self.relay, scope="host") from None
        except UnicodeError:
            raise DeliveryError(f"authentication failed for {who}: the user name or password "
                                f"is not ASCII", "4.7.0", relay=self.relay,
                                scope="host") from None
        self.authenticated = True

    def close(self) -> None:
        """QUIT and close; never raises."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if client.sock is not None:
                client.timeout_s = min(_QUIT_TIMEOUT, float(self.config.mail_timeout))
                client.putcmd("QUIT")
                client.getreply()
        except Exception:  # noqa: BLE001 - a failed QUIT changes nothing
            pass
        finally:
            client.close()

    @property
    def needs_reset(self) -> bool:
        """The last transaction broke off midway: RSET before the next one."""
        return self._need_rset

    def reset(self) -> bool:
        """RSET before reusing the session for another message; False (and closed) when the
        server is gone or does not answer 250, so the caller opens a fresh connection."""
        client = self._client
        if client is None or client.sock is None:
            return False
        try:
            client.timeout_s = float(self.config.mail_timeout)
            client.putcmd("RSET")
            code, _ = client.getreply()
        except Exception:  # noqa: BLE001 - any failure means: do not reuse
            code = 0
        if code != 250:
            self.close()
            return False
        self._need_rset = False
        return True

    # -- the transaction ----------------------------------------------------------------

    def send(self, msg: MessageLike, sender: str, recipients: Sequence[str], *,
             wire: int | None = None) -> list[Outcome]:
        """One mail transaction for ``recipients``; an Outcome for each, in order.  ``wire``
        is the message's size with CRLF line ends when known (else counted for SIZE=)."""
        rcpts = list(recipients)
        results: list[Outcome | None] = [None] * len(rcpts)
        if not rcpts:
            return []
        client = self._client
        if client is None or client.sock is None:
            reason, dsn = self._broken or (f"no connection to {self.relay}", "4.4.2")
            return [self._out(r, "deferred", reason, dsn) for r in rcpts]
        try:
            self._transaction(client, msg, sender, rcpts, results, wire)
        except _Lost as e:
            self._broken = e.describe(self.relay, self._stage)
            self._fill(results, rcpts, "deferred", *self._broken)
            self.close()
        except _Closing as e:
            self._broken = (e.reply, e.dsn)
            self._fill(results, rcpts, "deferred", e.reply, e.dsn)
            self.close()
        except (OSError, SpoolCorrupt) as e:  # reading the queue file (the socket's are _Lost)
            reason = f"cannot read the queue file {msg.path}: {e}"
            self._broken = (reason, "4.3.0")
            self._fill(results, rcpts, "deferred", reason, "4.3.0")
            self.close()
        return self._complete(rcpts, results)

    def _out(self, rcpt: str, status: Status, reply: str, dsn: str) -> Outcome:
        return Outcome(rcpt, status, reply, dsn, self.relay)

    def _fill(self, results: list[Outcome | None], rcpts: list[str], status: Status,
              reply: str, dsn: str) -> None:
        for i, r in enumerate(rcpts):
            if results[i] is None:
                results[i] = self._out(r, status, reply, dsn)

    def _reply(self, client: _Client, timeout: float, what: str) -> tuple[int, str]:
        client.timeout_s = timeout
        code, resp = client.getreply()
        text = _fmt(code, resp)
        if code == 421:
            raise _Closing(f"{text} (in reply to {what})", _dsn(code, text, temporary=True))
        return code, text

    def _commands(self, msg: MessageLike, sender: str, rcpts: list[str],
                  results: list[Outcome | None],
                  wire: int | None) -> tuple[bytes, list[int], list[bytes]] | None:
        """MAIL FROM and one RCPT TO per recipient that can be sent (indexes in ``wanted``);
        what cannot be sent gets its outcome in ``results``; None when nothing can."""
        feats = self._client.esmtp_features if self._client is not None else {}
        # Addresses: ASCII, IDNA for a non-ASCII domain, else SMTPUTF8 when offered.
        utf8_ok = "smtputf8" in feats
        try:
            sender_b, sender_utf8 = _encode_address(sender)
        except ValueError:
            self._fill(results, rcpts, "failed", f"bad sender address syntax: {sender!r}",
                       "5.1.7")
            return None
        if sender_utf8 and not utf8_ok:
            self._fill(results, rcpts, "failed", f"the sender address {sender} needs SMTPUTF8, "
                       f"which {self.relay} does not support", "5.6.7")
            return None
        wanted: list[int] = []
        encoded: dict[int, bytes] = {}
        need_utf8 = sender_utf8
        for i, r in enumerate(rcpts):
            try:
                b, u = _encode_address(r)
            except ValueError:
                results[i] = self._out(r, "failed", f"bad recipient address syntax: {r!r}",
                                       "5.1.3")
                continue
            if u and not utf8_ok:
                results[i] = self._out(r, "failed", f"the recipient address {r} needs SMTPUTF8, "
                                       f"which {self.relay} does not support", "5.6.7")
                continue
            need_utf8 = need_utf8 or u
            wanted.append(i)
            encoded[i] = b
        if not wanted:
            return None

        params: list[bytes] = []
        if "size" in feats:
            wire = wire_size(msg) if wire is None else wire
            try:
                limit = int(feats["size"].split()[0]) if feats["size"].strip() else 0
            except ValueError:
                limit = 0
            if limit and wire > limit:
                self._fill(results, rcpts, "failed", f"message size {wire} exceeds size limit "
                           f"{limit} of server {self.relay}", "5.3.4")
                return None
            params.append(b"SIZE=%d" % wire)
        if msg.eight_bit and "8bitmime" in feats:
            params.append(b"BODY=8BITMIME")
        if need_utf8:
            params.append(b"SMTPUTF8")
        mail_cmd = b"MAIL FROM:<" + sender_b + b">" + b"".join(b" " + p for p in params) + CRLF
        rcpt_cmds = [b"RCPT TO:<" + encoded[i] + b">" + CRLF for i in wanted]
        return mail_cmd, wanted, rcpt_cmds

    def _transaction(self, client: _Client, msg: MessageLike, sender: str,
                     rcpts: list[str], results: list[Outcome | None], wire: int | None) -> None:
        cfg = self.config
        mail_t, rcpt_t = float(cfg.mail_timeout), float(cfg.rcpt_timeout)
        data_t, block_t = float(cfg.data_timeout), float(cfg.datablock_timeout)
        dot_t = float(cfg.dot_timeout)
        feats = client.esmtp_features

        if self._need_rset:
            self._stage = "sending RSET"
            client.timeout_s = mail_t
            client.putcmd("RSET")
            code, text = self._reply(client, mail_t, "RSET")
            if code // 100 != 2:
                raise _Closing(f"{text} (in reply to RSET)", "4.0.0")
            self._need_rset = False

        cmds = self._commands(msg, sender, rcpts, results, wire)
        if cmds is None:
            return
        mail_cmd, wanted, rcpt_cmds = cmds
        bdat = "chunking" in feats
        pipelining = "pipelining" in feats

        self._need_rset = True  # until the transaction ends with a final reply
        txn = _Txn(rcpts, results)
        # With PIPELINING: MAIL, the RCPTs and (for DATA) the DATA command go out in one
        # send, then the replies are read in order.  Batches are capped so that neither side
        # can block on a full socket buffer with many recipients (RFC 2920 section 3.1).
        steps: list[tuple[str, bytes, int]] = [("MAIL FROM", mail_cmd, -1)]
        steps += [("RCPT TO", cmd, i) for i, cmd in zip(wanted, rcpt_cmds, strict=True)]
        if not bdat:
            steps.append(("DATA", b"DATA\r\n", -1))
        timeouts = {"MAIL FROM": mail_t, "RCPT TO": rcpt_t, "DATA": data_t}
        group = _PIPELINE_BATCH if pipelining else 1
        pos = 0
        while pos < len(steps):
            batch = steps[pos:pos + group]
            pos += len(batch)
            first = batch[0][0]
            if not pipelining and (not txn.mail_ok or (first == "DATA" and not txn.accepted)):
                break
            self._stage = _STAGES[first]
            client.send_raw(b"".join(cmd for _, cmd, _ in batch), timeouts[first])
            for what, _, i in batch:
                self._stage = _STAGES[what]
                code, text = self._reply(client, timeouts[what], what)
                self._on_reply(txn, what, i, code, text)
        accepted, data_code, data_text = txn.accepted, txn.data_code, txn.data_text
        if data_code == 354 and not accepted:
            # Pipelined DATA got its go-ahead with no recipient: send an empty message's end.
            self._stage = "sending end of data"
            client.send_raw(b".\r\n", data_t)
            self._reply(client, dot_t, "end of DATA")
            return
        if not accepted:
            return
        if bdat:
            code, text, what = self._send_bdat(client, msg, block_t, dot_t)
        else:
            if data_code != 354:
                self._finish(txn, data_code if data_code // 100 != 2 else 451, data_text,
                             "DATA")
                return
            self._stage = "sending message body"
            self._send_body(client, msg, _body_kind(msg), block_t)
            self._stage = _DUP_STAGE
            code, text = self._reply(client, dot_t, "end of DATA")
            what = "end of DATA"
        self._finish(txn, code, text, what)
        self._need_rset = what == "BDAT"  # a chunk refused before LAST: the server may wait

    def _on_reply(self, txn: _Txn, what: str, i: int, code: int, text: str) -> None:
        """One reply to MAIL FROM, RCPT TO (recipient index ``i``) or DATA."""
        if what == "MAIL FROM":
            txn.mail_ok = code // 100 == 2
            if not txn.mail_ok:
                self._fill(txn.results, txn.rcpts, _status(code),
                           f"{text} (in reply to MAIL FROM)", _dsn(code, text))
        elif what == "RCPT TO":
            if not txn.mail_ok:
                return
            if code // 100 == 2:
                txn.accepted.append(i)
            else:
                txn.results[i] = self._out(txn.rcpts[i], _status(code),
                                           f"{text} (in reply to RCPT TO)", _dsn(code, text))
        else:
            txn.data_code, txn.data_text = code, text

    def _finish(self, txn: _Txn, code: int, text: str, what: str) -> None:
        """The final reply for every accepted recipient."""
        status = _status(code)
        reply = text if status == "delivered" else f"{text} (in reply to {what})"
        dsn = _dsn(code, text)
        for i in txn.accepted:
            txn.results[i] = self._out(txn.rcpts[i], status, reply, dsn)

    # -- many messages back to back ------------------------------------------------------

    def send_many(self, jobs: Iterator[J],
                  put_back: Callable[[J], None]) -> Iterator[tuple[J, list[Outcome]]]:
        """Transactions back to back on this session, one per job (a queue run to one
        smarthost).  With PIPELINING a message costs one round trip: its MAIL, RCPTs and DATA
        go out in the same write as the previous message's body and dot, whose final reply
        is read before theirs (RFC 2920 section 3.1: message content may start a group, DATA
        ends one); the next job is taken and read while the server works.  Yields (job,
        outcomes) in order for every job started.  When the session breaks, a message whose
        end of data had no reply is deferred (it may have arrived); a job not started, or
        whose commands had no reply yet, goes to ``put_back`` for a new session, provided
        this one delivered something (else it is deferred: no endless reconnecting)."""
        client = self._client
        feats = client.esmtp_features if client is not None else {}
        if (client is None or client.sock is None or "pipelining" not in feats
                or "chunking" in feats):
            # One transaction at a time (BDAT pipelines within a message already).
            for job in jobs:
                yield job, self.send(job.msg, job.sender, job.recipients, wire=job.wire)
                if not self.is_open:
                    return
            return
        cfg = self.config
        timeouts = {"MAIL FROM": float(cfg.mail_timeout), "RCPT TO": float(cfg.rcpt_timeout),
                    "DATA": float(cfg.data_timeout)}
        block_t, dot_t = float(cfg.datablock_timeout), float(cfg.dot_timeout)
        held: tuple[J, _Txn, bytes] | None = None
        """Its body and dot go out with the next message's commands."""
        sent: _Prep[J] | None = None
        """Its commands are out, not all their replies are in."""
        ready: _Prep[J] | None = None
        """Taken and read, nothing sent yet: (job, txn, commands, body, error)."""
        answered = False
        """Whether any reply to ``sent``'s commands has come."""
        progressed = False
        """Whether a message was accepted or refused for good on this session."""
        finished = False
        try:
            ready = self._prep(next(jobs, None))
            while ready is not None:
                job, txn, cmds, body, error = p = ready
                if body is None or cmds is None:
                    # Nothing to send, unreadable, or too big to hold: on its own.
                    if held is not None:
                        yield self._send_held(client, held, block_t, dot_t)
                        held = None
                    ready = None
                    if error:
                        self._fill(txn.results, txn.rcpts, "deferred", error, "4.3.0")
                    elif cmds is not None:
                        txn.results[:] = self.send(job.msg, job.sender, txn.rcpts,
                                                   wire=job.wire)
                    yield job, self._results(txn)
                    if not self.is_open:
                        return
                    ready = self._prep(next(jobs, None))
                    continue
                mail_cmd, wanted, rcpt_cmds = cmds
                rset = held is None and self._need_rset
                out = [held[2]] if held is not None else []
                if rset:
                    out.append(b"RSET\r\n")
                out += [mail_cmd, *rcpt_cmds, b"DATA\r\n"]
                self._stage = _STAGES["MAIL FROM"]
                sent, ready, answered = p, None, False
                client.send_raw(b"".join(out),
                                block_t if held is not None else timeouts["MAIL FROM"])
                self._need_rset = True
                ready = self._prep(next(jobs, None))
                if held is not None:
                    done = self._held_reply(client, held, dot_t)
                    held, progressed = None, True
                    yield done
                if rset:
                    self._stage = "sending RSET"
                    code, text = self._reply(client, timeouts["MAIL FROM"], "RSET")
                    if code // 100 != 2:
                        raise _Closing(f"{text} (in reply to RSET)", "4.0.0")
                for what, i in [("MAIL FROM", -1), *[("RCPT TO", i) for i in wanted],
                                ("DATA", -1)]:
                    self._stage = _STAGES[what]
                    code, text = self._reply(client, timeouts[what], what)
                    answered = True
                    self._on_reply(txn, what, i, code, text)
                sent = None
                if txn.data_code == 354:
                    # With no recipient accepted, only the dot (an empty message) follows.
                    held = (job, txn, body if txn.accepted else b".\r\n")
                    continue
                if txn.accepted:
                    self._finish(txn, txn.data_code if txn.data_code // 100 != 2 else 451,
                                 txn.data_text, "DATA")
                yield job, self._results(txn)
            if held is not None:
                yield self._send_held(client, held, block_t, dot_t)
                held = None
            finished = True
        except (_Lost, _Closing) as e:
            if isinstance(e, _Lost):
                self._broken = e.describe(self.relay, self._stage)
                dup = e.describe(self.relay, _DUP_STAGE)
            else:
                self._broken = dup = (e.reply, e.dsn)
            self.close()
            if ready is not None:
                put_back(ready[0])
                ready = None
            if sent is not None and not answered and progressed:
                put_back(sent[0])
                sent = None
            if held is not None:
                self._fill(held[1].results, held[1].rcpts, "deferred", *dup)
                yield held[0], self._results(held[1])
                held = None
            if sent is not None:
                self._fill(sent[1].results, sent[1].rcpts, "deferred", *self._broken)
                yield sent[0], self._results(sent[1])
                sent = None
        finally:
            if not finished and self._client is not None and (held or sent or ready):
                self.close()  # abandoned midway (the caller stopped): the session is unusable

    def _prep(self, job: J | None) -> _Prep[J] | None:
        """A job made ready to go: its commands, and its body read whole when small."""
        if job is None:
            return None
        rcpts = list(job.recipients)
        txn = _Txn(rcpts, [None] * len(rcpts))
        msg = job.msg
        try:
            cmds = (self._commands(msg, job.sender, rcpts, txn.results, job.wire)
                    if rcpts else None)
            body = None
            if cmds is not None and len(cmds[1]) <= _PIPELINE_BATCH and msg.size <= _HELD_MAX:
                body = b"".join(msg.cursor(_body_kind(msg)))
        except (OSError, SpoolCorrupt) as e:
            return job, txn, None, None, f"cannot read the queue file {msg.path}: {e}"
        return job, txn, cmds, body, ""

    def _send_held(self, client: _Client, held: tuple[J, _Txn, bytes], block_t: float,
                   dot_t: float) -> tuple[J, list[Outcome]]:
        self._stage = _DUP_STAGE
        client.send_raw(held[2], block_t)
        result = self._held_reply(client, held, dot_t)
        self._need_rset = False
        return result

    def _held_reply(self, client: _Client, held: tuple[J, _Txn, bytes],
                    dot_t: float) -> tuple[J, list[Outcome]]:
        job, txn, _ = held
        self._stage = _DUP_STAGE
        code, text = self._reply(client, dot_t, "end of DATA")
        self._finish(txn, code, text, "end of DATA")
        return job, self._results(txn)

    def _results(self, txn: _Txn) -> list[Outcome]:
        return self._complete(txn.rcpts, txn.results)

    def _complete(self, rcpts: list[str], results: list[Outcome | None]) -> list[Outcome]:
        return [o if o is not None else self._out(r, "deferred", "internal error", "4.3.0")
                for r, o in zip(rcpts, results, strict=True)]

    def _send_body(self, client: _Client, msg: MessageLike, kind: str, timeout: float) -> None:
        sock = client.sock
        if sock is None:
            raise _Lost("closed", "not connected")
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(timeout)
                for chunk in msg.cursor(kind):
                    sock.sendall(chunk)
            else:
                # Rust writes the stream with the GIL released: the fd must be blocking, with
                # SO_SNDTIMEO bounding each write instead of Python's socket timeout.
                sock.settimeout(None)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
                try:
                    msg.send_to(sock.fileno(), kind)
                finally:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
        except TimeoutError:
            client.close()
            raise _Lost("timeout") from None
        except BlockingIOError:  # SO_SNDTIMEO expired (EAGAIN)
            client.close()
            raise _Lost("timeout") from None
        except OSError as e:
            if e.filename is not None and e.filename == msg.path:
                raise  # reading the queue file failed, not the connection
            client.close()
            raise _Lost("closed", _oserror(e)) from None

    def _send_bdat(self, client: _Client, msg: MessageLike, block_t: float,
                   dot_t: float) -> tuple[int, str, str]:
        """BDAT chunks straight from the CRLF cursor (no stuffing); one chunk in flight
        while the previous chunk's reply is read.  Returns the final (code, text, what)."""
        self._stage = "sending message body"
        it = iter(msg.cursor("crlf"))
        chunk: bytes | None = next(it, None)
        pending = 0
        if chunk is None:
            client.send_raw(b"BDAT 0 LAST\r\n", block_t)
            pending = 1
        while chunk is not None:
            nxt = next(it, None)
            last = nxt is None
            head = b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"")
            client.send_raw(head + chunk, block_t)
            pending += 1
            chunk = nxt
            if pending > 1:
                code, text = self._reply(client, block_t, "BDAT")
                pending -= 1
                if code // 100 != 2:
                    self._drain(client, pending, block_t)
                    return code, text, "BDAT"
        while pending > 1:
            code, text = self._reply(client, block_t, "BDAT")
            pending -= 1
            if code // 100 != 2:
                self._drain(client, pending, block_t)
                return code, text, "BDAT"
        self._stage = _DUP_STAGE
        code, text = self._reply(client, dot_t, "BDAT LAST")
        return code, text, "BDAT LAST"

    def _drain(self, client: _Client, pending: int, timeout: float) -> None:
        for _ in range(pending):
            self._reply(client, timeout, "BDAT")


# -- deliver -------------------------------------------------------------------------------


_REUSE_WITHOUT_RSET = 5.0
"""Seconds after its last transaction a pooled session is reused without an RSET probe."""


class ConnectionPool:
    """Sessions kept open for the length of one queue run, one per (kind, host, port), so
    that many messages to one smarthost share a connection.  Thread-safe: a session is
    taken out while in use."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], tuple[Connection, float]] = {}
        self._lock = threading.Lock()
        self.opened = 0
        """Connections opened through this pool (for logs and benchmarks)."""

    def take(self, key: tuple[str, str, int]) -> Connection | None:
        with self._lock:
            conn, since = self._idle.pop(key, (None, 0.0))
        if conn is None:
            return None
        # A session used moments ago is alive (RFC 5321 servers wait minutes before timing
        # out) and a MAIL may follow a completed transaction directly; one idle for longer
        # is checked with RSET first, and replaced if that fails.
        if time.monotonic() - since < _REUSE_WITHOUT_RSET and not conn.needs_reset:
            return conn
        if conn.reset():
            return conn
        return None

    def give(self, key: tuple[str, str, int], conn: Connection) -> None:
        if not conn.is_open:
            conn.close()
            return
        with self._lock:
            old, self._idle[key] = self._idle.get(key, (None, 0.0))[0], (conn, time.monotonic())
        if old is not None:
            old.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = list(self._idle.values()), {}
        for conn, _ in idle:
            conn.close()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def deliver(msg: MessageLike, sender: str, recipients: Sequence[str], hosts: Sequence[Host],
            dest: Destination, config: Config, auth: AuthTable | None, log: Log, *,
            queue_id: str = "", created: float | None = None,
            pool: ConnectionPool | None = None, wire: int | None = None) -> list[Outcome]:
    """Delivers one message to one destination: hosts in order, each address of each host,
    until every recipient has a final answer; recipients deferred by one host are tried at
    the next.  Returns one Outcome per (distinct) recipient, in order.  Logs one line per
    attempt.  ``created`` (the message's arrival time) makes ``delay=`` the message's age;
    otherwise it is the attempt's duration."""
    rcpts = list(dict.fromkeys(recipients))
    final: dict[str, Outcome] = {}
    pending = rcpts
    policy = tlsmod.policy_for(config, dest.kind)
    if not hosts:
        for r in rcpts:
            final[r] = Outcome(r, "deferred", f"no host to deliver to for {dest.name}", "4.4.4")
    for host in hosts:
        if not pending:
            break
        t0 = time.time()
        key = (dest.kind, host.name, host.port)
        reused = pool.take(key) if pool is not None else None
        conn = reused or Connection(host, config, kind=dest.kind, auth=auth, policy=policy)
        try:
            if reused is None:
                conn.open()
                if pool is not None:
                    pool.opened += 1
            outs = conn.send(msg, sender, pending, wire=wire)
        except DeliveryError as e:
            outs = [Outcome(r, e.status, e.reply, e.dsn, e.relay or conn.relay) for r in pending]
        finally:
            tls_version, note = conn.tls_version, conn.tls_note
            if pool is not None:
                pool.give(key, conn)
            else:
                conn.close()
        _log_attempt(log, queue_id, outs, conn.relay, tls_version, note, msg.size,
                     time.time() - (created if created is not None else t0))
        for o in outs:
            final[o.recipient] = o
        pending = [o.recipient for o in outs if o.status == "deferred"]
    return [final[r] for r in rcpts]


def deliver_many(jobs: Iterable[J], hosts: Sequence[Host], dest: Destination, config: Config,
                 auth: AuthTable | None, log: Log, pool: ConnectionPool) -> Iterator[
                     tuple[J, list[Outcome]]]:
    """``deliver`` for a stream of messages to one destination (a queue run): they go back
    to back over the first host's session (``Connection.send_many``); recipients that host
    defers are tried at the next hosts, message by message, as ``deliver`` does.  Yields
    (job, outcomes) in order, once per job.  One log line per message and attempt."""
    it = iter(jobs)
    if not hosts:
        for job in it:
            yield job, deliver(job.msg, job.sender, job.recipients, hosts, dest, config, auth,
                               log, queue_id=job.queue_id, created=job.created, pool=pool,
                               wire=job.wire)
        return
    host, rest = hosts[0], hosts[1:]
    key = (dest.kind, host.name, host.port)
    policy = tlsmod.policy_for(config, dest.kind)
    down: DeliveryError | None = None
    """Set when the first host could not be reached: not tried again in this run."""

    def onward(job: J, outs: list[Outcome], relay: str, tls_version: str,
               note: str) -> list[Outcome]:
        _log_attempt(log, job.queue_id, outs, relay, tls_version, note, job.msg.size,
                     time.time() - job.created)
        deferred = [o.recipient for o in outs if o.status == "deferred"]
        if not deferred or not rest:
            return outs
        final = {o.recipient: o for o in outs}
        for o in deliver(job.msg, job.sender, deferred, rest, dest, config, auth, log,
                         queue_id=job.queue_id, created=job.created, pool=pool,
                         wire=job.wire):
            final[o.recipient] = o
        return [final[o.recipient] for o in outs]

    back: list[J] = []
    """Jobs a broken session gave back untouched."""

    def take() -> J | None:
        return back.pop() if back else next(it, None)

    def more() -> Iterator[J]:
        while (job := take()) is not None:
            yield job

    while (first := take()) is not None:
        conn = pool.take(key) if down is None else None
        if conn is None and down is None:
            conn = Connection(host, config, kind=dest.kind, auth=auth, policy=policy)
            try:
                conn.open()
                pool.opened += 1
            except DeliveryError as e:
                down = e
                down.relay = down.relay or conn.relay
                conn.close()
                conn = None
        if conn is None:
            assert down is not None
            outs = [Outcome(r, down.status, down.reply, down.dsn, down.relay)
                    for r in first.recipients]
            yield first, onward(first, outs, down.relay, "no TLS", "")
            continue
        try:
            for job, outs in conn.send_many(_chain(first, more()), back.append):
                yield job, onward(job, outs, conn.relay, conn.tls_version, conn.tls_note)
        finally:
            pool.give(key, conn)


def _chain(first: J, rest: Iterator[J]) -> Iterator[J]:
    yield first
    yield from rest


def _log_attempt(log: Log, queue_id: str, outs: list[Outcome], relay: str, tls_version: str,
                 note: str, size: int, delay: float) -> None:
    try:
        groups: dict[tuple[str, str], list[str]] = {}
        for o in outs:
            groups.setdefault((o.status, o.reply), []).append(o.recipient)
        to = ",".join([f"<{o.recipient}>" for o in outs])
        tls = f"{tls_version} ({note})" if note else tls_version
        if len(groups) == 1:
            status, reply = outs[0].status, outs[0].reply
            state = f"status={status} ({reply})"
        else:
            state = "status=mixed: " + "; ".join(
                f"{status} {','.join(f'<{r}>' for r in who)} ({reply})"
                for (status, reply), who in groups.items())
        prefix = f"{queue_id}: " if queue_id else ""
        log.info(f"{prefix}to={to}, relay={relay}, tls={tls}, size={size}, "
                 f"delay={delay:.2f}, {state}")
    except Exception:  # noqa: BLE001 - logging never fails a delivery
        pass


# -- helpers -------------------------------------------------------------------------------

_size_cache: dict[tuple[str, int, int], int] = {}
_size_lock = threading.Lock()


def wire_size(msg: MessageLike) -> int:
    """The message's size on the wire with CRLF line ends (RFC 1870: no dot-stuffing, no
    terminator), counted once per message file and cached."""
    key = (msg.path, msg.size, msg.crc32)
    with _size_lock:
        cached = _size_cache.get(key)
    if cached is not None:
        return cached
    lines = sum(chunk.count(b"\n") for chunk in msg.cursor("raw"))
    total = msg.size + lines
    with _size_lock:
        if len(_size_cache) > 256:
            _size_cache.clear()
        _size_cache[key] = total
    return total


_UNSENDABLE = re.compile(r"[\x00-\x1f<>]")


def _encode_address(addr: str) -> tuple[bytes, bool]:
    """(bytes for MAIL/RCPT, needs SMTPUTF8).  ValueError for what cannot be sent."""
    if _UNSENDABLE.search(addr):
        raise ValueError(addr)
    if addr.isascii():
        return addr.encode("ascii"), False
    local, at, domain = addr.rpartition("@")
    if at and local.isascii():
        try:
            return (local + "@" + domain.encode("idna").decode("ascii")).encode("ascii"), False
        except UnicodeError:
            pass
    try:
        return addr.encode("utf-8"), True
    except UnicodeEncodeError:
        raise ValueError(addr) from None


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


def _fmt(code: int, resp: bytes | str) -> str:
    text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else resp
    if (len(text) <= 1000 and text.isprintable() and "  " not in text
            and text[:1] != " " and text[-1:] != " "):
        return f"{code} {text}".rstrip()  # the common case, what the general one gives
    parts = [" ".join(p.split()) for p in text.split("\n")]
    body = " ".join(p for p in parts if p)
    body = "".join(c if c.isprintable() else "?" for c in body)
    if len(body) > 1000:
        body = body[:1000] + "..."
    return f"{code} {body}".rstrip()


def _dsn(code: int, text: str, *, temporary: bool = False) -> str:
    cls = str(code // 100)
    found = _ENHANCED.match(text, 4)
    dsn = found.group(0) if found and found.group(1) == cls else f"{cls}.0.0"
    if temporary and dsn[0] != "4":
        dsn = "4" + dsn[1:]
    return dsn


def _status(code: int) -> Status:
    if code // 100 == 2:
        return "delivered"
    if code // 100 == 5:
        return "failed"
    return "deferred"


def _body_kind(msg: MessageLike) -> str:
    # Lines over 998 octets are broken the way Postfix does (CRLF SPACE inserted): RFC 5321
    # lets a server refuse them, and only BDAT may carry them unchanged.
    return "smtp-wrap" if msg.max_line > 998 else "smtp"


def _timeval(seconds: float) -> bytes:
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1_000_000))


def _oserror(e: OSError) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason.lower().replace("_", " ")
    return e.strerror or str(e) or type(e).__name__


def _show(line: bytes) -> str:
    s = line[:60].decode("ascii", "backslashreplace").rstrip("\r\n")
    return repr(s + ("..." if len(line) > 60 else ""))
