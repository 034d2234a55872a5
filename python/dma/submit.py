"""Submission: from an input stream and a request to a committed queue file.

Order matters for callers: command-line recipients are checked before the input is read (a
typo fails at once, as in C dma); the message is then streamed into the spool, its head
rewritten on the way; ``-t`` recipients come from that head; the envelope is committed last.
Nothing is left in the spool unless the commit succeeded.
"""

from __future__ import annotations

import os
import pwd
import time

from dma import __version__, message
from dma.address import Address, parse_header_addresses, parse_mailbox
from dma.aliases import Aliases
from dma.config import Config
from dma.errors import AddressError, NoRecipientsError, UnknownUserError
from dma.record import Frozen
from dma.spool import Envelope, Spool, spool_error

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

HEAD_LIMIT = 1 << 20

# Request, DropRequest and Submitter are plain classes rather than dataclasses (whose import
# costs milliseconds of every ``sendmail`` start); they keep the frozen dataclass behaviour:
# keyword arguments, read-only attributes, equality and hash by value, repr.


class Request(Frozen):
    """What the caller asked for (sendmail flags or ``dma.send`` arguments)."""

    __slots__ = ("recipients", "sender", "full_name", "from_headers", "dot_ends")

    recipients: Sequence[str]
    sender: str | None
    """``-f``/``-r``; None means the default (``$EMAIL`` or the submitting user)."""
    full_name: str
    """``-F``: used when dma has to add a ``From:`` header."""
    from_headers: bool
    """``-t``: also take recipients from To/Cc/Bcc."""
    dot_ends: bool
    """False with ``-i``/``-oi``: a lone ``.`` line is message text."""

    def __init__(self, recipients: Sequence[str] = (), sender: str | None = None,
                 full_name: str = "", from_headers: bool = False, dot_ends: bool = True) -> None:
        _set = object.__setattr__
        _set(self, "recipients", recipients)
        _set(self, "sender", sender)
        _set(self, "full_name", full_name)
        _set(self, "from_headers", from_headers)
        _set(self, "dot_ends", dot_ends)


class DropRequest(Frozen):
    """What an unprivileged submitter asked for, stored with its dropped message.  Nothing
    in it is trusted beyond what the submitter could ask of ``sendmail`` directly; who
    submitted is the dropped file's owner."""

    __slots__ = ("recipients", "sender", "full_name", "from_headers")

    recipients: tuple[str, ...]
    sender: str
    full_name: str
    from_headers: bool

    def __init__(self, recipients: tuple[str, ...], sender: str, full_name: str = "",
                 from_headers: bool = False) -> None:
        _set = object.__setattr__
        _set(self, "recipients", recipients)
        _set(self, "sender", sender)
        _set(self, "full_name", full_name)
        _set(self, "from_headers", from_headers)

    def to_bytes(self) -> bytes:
        import json

        return json.dumps({"v": 1, "drop": True, "recipients": list(self.recipients),
                           "sender": self.sender, "full_name": self.full_name,
                           "from_headers": self.from_headers}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DropRequest:
        import json

        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("v") != 1 or not doc.get("drop"):
            raise ValueError("not a drop request")
        rcpts = doc["recipients"]
        if not isinstance(rcpts, list) or not all(isinstance(r, str) for r in rcpts):
            raise ValueError("bad recipients")
        return cls(tuple(rcpts), str(doc["sender"]), str(doc.get("full_name", "")),
                   bool(doc.get("from_headers", False)))


class Submitter(Frozen):
    """The local identity of the caller, from the real uid (never from a header)."""

    __slots__ = ("user", "uid", "gecos")

    user: str
    uid: int
    gecos: str

    def __init__(self, user: str, uid: int, gecos: str = "") -> None:
        _set = object.__setattr__
        _set(self, "user", user)
        _set(self, "uid", uid)
        _set(self, "gecos", gecos)

    @classmethod
    def current(cls, env: Mapping[str, str] = os.environ) -> Submitter:
        uid = os.getuid()
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return cls(f"uid={uid}", uid)
        # A login name from the environment is trusted only when it maps to our real uid.
        for name in (env.get("LOGNAME"), env.get("USER")):
            if name and name != pw.pw_name:
                try:
                    if pwd.getpwnam(name).pw_uid == uid:
                        return cls(name, uid, pw.pw_gecos.split(",", 1)[0])
                except KeyError:
                    pass
        return cls(pw.pw_name, uid, pw.pw_gecos.split(",", 1)[0])


def envelope_sender(request: Request, submitter: Submitter, config: Config,
                    env: Mapping[str, str]) -> str:
    """C dma's set_from: -f/-r, else $EMAIL; empty user -> login name, empty host ->
    MAILNAME; MASQUERADE overrides.  ``<>`` (or ``-f ''`` given as ``<>``) is the null
    sender, as Postfix allows."""
    given = request.sender if request.sender is not None else env.get("EMAIL", "")
    given = given.strip()
    if given == "<>":
        return ""
    if given.startswith("<") and given.endswith(">"):
        given = given[1:-1]
    user, _, host = given.rpartition("@") if "@" in given else (given, "", "")
    if not user:
        user = submitter.user
    if not host:
        host = config.mailname
    if config.masquerade_user:
        user = config.masquerade_user
    if config.masquerade_host:
        host = config.masquerade_host
    return str(parse_mailbox(f"{user}@{host}", allow_local=False))


class RecipientResolver:
    """Turns what the caller wrote into envelope recipients: local names through the
    aliases to existing users, remote addresses kept (IDNA-checked), NULLCLIENT qualifying
    everything for the smarthost."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.local_domains = config.local_domains
        self._aliases: Aliases | None = None

    @property
    def aliases(self) -> Aliases:
        if self._aliases is None:
            self._aliases = Aliases.load(self.config.aliases)
        return self._aliases

    def _local_name(self, addr: Address) -> str | None:
        if addr.domain is None:
            return addr.local
        if addr.domain.lower() in self.local_domains:
            return addr.local
        return None

    def resolve(self, addresses: Sequence[Address], out: list[str]) -> None:
        """Appends final recipients to ``out`` (duplicates dropped, order kept)."""
        seen = set(out)

        def add(r: str) -> None:
            if r not in seen:
                seen.add(r)
                out.append(r)

        for addr in addresses:
            local = self._local_name(addr)
            if self.config.nullclient:
                add(f"{local}@{self.config.mailname}" if local is not None else str(addr))
                continue
            if local is None:
                add(str(addr))
                continue
            for r in self._expand_local(local):
                add(r)

    def _expand_local(self, name: str) -> list[str]:
        """A local name through the aliases to existing users and remote addresses.  A
        target ``user@<this host>`` is taken as the local user, without a second pass
        through the aliases (which could loop)."""
        final: list[str] = []
        for target in self.aliases.expand(name, self.local_domains):
            if "@" in target:
                addr = parse_mailbox(target)
                local = self._local_name(addr)
                if local is None:
                    final.append(str(addr))
                    continue
                target = local
            _require_user(target, name)
            final.append(target)
        return final


def _require_user(user: str, asked: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        via = "" if user == asked else f" (via alias {asked!r})"
        raise UnknownUserError(f"invalid recipient {user!r}{via}: no such user") from None


def _split_arguments(args: Sequence[str]) -> list[Address]:
    """Command-line recipients; an argument may hold a comma-separated list."""
    result = []
    for arg in args:
        parts = [arg]
        if "," in arg and '"' not in arg:
            parts = [p for p in arg.split(",") if p.strip()]
        for part in parts:
            result.append(parse_mailbox(part.strip()))
    return result


def submit(fd: int, request: Request, config: Config, *, submitter: Submitter | None = None,
           env: Mapping[str, str] = os.environ, notice: str = "") -> str:
    """Read a message from ``fd`` and commit it to the spool; returns its queue id.

    Raises a :class:`dma.errors.DmaError` subclass on anything the caller must hear about;
    nothing is spooled in that case.
    """
    submitter = submitter or Submitter.current(env)
    sender = envelope_sender(request, submitter, config, env)
    resolver = RecipientResolver(config)
    recipients: list[str] = []
    resolver.resolve(_split_arguments(request.recipients), recipients)
    if not recipients and not request.from_headers:
        raise NoRecipientsError("no recipients given on the command line")

    spool = Spool(config.spooldir)
    drop = spool.must_drop()
    if drop:
        qid, writer = spool.new_drop(fd, dot_ends=request.dot_ends)
    else:
        qid, writer = spool.new_writer(fd, dot_ends=request.dot_ends)
    try:
        raw_head = writer.read_head(HEAD_LIMIT)
        head = message.parse_head(raw_head)
        if request.from_headers:
            for value in message.header_recipients(head):
                try:
                    addrs = parse_header_addresses(value)
                except AddressError as e:
                    raise AddressError(f"invalid address in header: {e}") from None
                resolver.resolve(addrs, recipients)
            if not recipients:
                raise NoRecipientsError("no recipients in the To/Cc/Bcc headers")
        if drop:
            # The queue runner submits it again with the dropped file's owner as the
            # submitter; only then are the headers rewritten.
            writer.write_head(raw_head)
            writer.stream_rest()
            spool.commit_drop(writer, DropRequest(
                recipients=tuple(request.recipients), sender=sender or "<>",
                full_name=request.full_name, from_headers=request.from_headers).to_bytes())
            return qid
        now = time.time()
        ident = message.Identity(sender=sender, user=submitter.user, uid=submitter.uid,
                                 full_name=request.full_name or submitter.gecos,
                                 mailname=config.mailname, version=__version__)
        writer.write_head(message.rewrite(head, ident, qid, now))
        writer.stream_rest()
        envelope = Envelope(id=qid, sender=sender, recipients=tuple(recipients), created=now,
                            uid=submitter.uid, user=submitter.user, size=writer.size,
                            eight_bit=writer.eight_bit, notice=notice, lines=writer.lines)
        spool.commit(writer, envelope)
    except BaseException as e:
        writer.abort()
        if isinstance(e, OSError):
            raise spool_error(e, "cannot write the message to the spool") from None
        raise
    return qid


def submit_chunks(chunks: Iterable[bytes], request: Request, config: Config, *,
                  submitter: Submitter | None = None, env: Mapping[str, str] | None = None,
                  notice: str = "") -> str:
    """:func:`submit` for a message that is not on a file descriptor (bytes, a generated
    report, another spool file): the chunks are streamed through a pipe by a thread, never
    joined in memory.  A submission that stops reading early simply ends the copy."""
    import threading

    rfd, wfd = os.pipe()

    def feed() -> None:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(wfd, view[: 1 << 20]):]
        except OSError:
            pass  # the reader gave up; submit() says why
        finally:
            os.close(wfd)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        return submit(rfd, request, config, submitter=submitter,
                      env=os.environ if env is None else env, notice=notice)
    finally:
        os.close(rfd)
        feeder.join()
