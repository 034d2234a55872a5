"""The command line: the sendmail persona (``sendmail``, ``mailq``, ``newaliases`` and ``dma``
given sendmail flags).

Flags are parsed the way C dma's getopt string ``:A:b:B:C:d:Df:F:h:iL:N:no:O:q:r:R:tUV:vX:``
parses them on glibc (options may follow operands; ``--`` ends options; ``-q`` takes an
optional attached value).  This path is run once per message by cron and mail clients, so it
imports only what submission needs: no click, DNS, TLS or email parser.
"""

from __future__ import annotations

import os
import sys

from dma import __version__
from dma.errors import (
    EX_OK,
    EX_OSERR,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    DmaError,
    UsageError,
)
from dma.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from dma.config import Config
    from dma.log import Log

_WITH_ARG = set("AbBCdfFhLNoOqrRVX")
ADMIN_COMMANDS = ("queue", "setup", "--help", "-h")
_FLAGS = set("DintUv")


class Options(Record):
    """The parsed command line.  A plain class rather than a dataclass (``dataclasses``
    costs milliseconds of every start); equal by value, mutable."""

    __slots__ = ("recipients", "mode", "queue_only", "foreground", "sender", "full_name",
                 "from_headers", "dot_ends", "verbose", "config_path", "ident", "queue_ids")

    recipients: list[str]
    mode: str
    """send, list (-bp), queue-run (-q), newaliases (-bi)."""
    queue_only: bool
    foreground: bool
    sender: str | None
    full_name: str
    from_headers: bool
    dot_ends: bool
    verbose: bool
    config_path: str | None
    ident: str
    queue_ids: list[str]

    def __init__(self, recipients: list[str] | None = None, mode: str = "send",
                 queue_only: bool = False, foreground: bool = False, sender: str | None = None,
                 full_name: str = "", from_headers: bool = False, dot_ends: bool = True,
                 verbose: bool = False, config_path: str | None = None, ident: str = "dma",
                 queue_ids: list[str] | None = None) -> None:
        self.recipients = [] if recipients is None else recipients
        self.mode = mode
        self.queue_only = queue_only
        self.foreground = foreground
        self.sender = sender
        self.full_name = full_name
        self.from_headers = from_headers
        self.dot_ends = dot_ends
        self.verbose = verbose
        self.config_path = config_path
        self.ident = ident
        self.queue_ids = [] if queue_ids is None else queue_ids


def _getopt(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """C getopt with glibc's argument permutation, for C dma's option string."""
    opts: list[tuple[str, str]] = []
    operands: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            operands.extend(argv[i:])
            break
        if not tok.startswith("-") or tok == "-":
            operands.append(tok)
            continue
        j = 1
        while j < len(tok):
            letter = tok[j]
            j += 1
            if letter in _FLAGS:
                opts.append((letter, ""))
                continue
            if letter not in _WITH_ARG:
                raise UsageError(f"invalid argument: `-{letter}'")
            if j < len(tok):
                value, j = tok[j:], len(tok)
            elif letter == "q":
                # -q's value is optional: C dma re-parses a following option.
                if i < len(argv) and not argv[i].startswith("-"):
                    value, i = argv[i], i + 1
                else:
                    value = ""
            elif i < len(argv):
                value, i = argv[i], i + 1
            else:
                raise UsageError(f"option requires an argument: `-{letter}'")
            opts.append((letter, value))
    return opts, operands


def parse(argv: Sequence[str], prog: str) -> Options:
    o = Options()
    if prog == "mailq":
        if argv:
            raise UsageError("invalid arguments: mailq takes none")
        o.mode = "list"
        return o
    if prog == "newaliases":
        o.mode = "newaliases"
        return o
    opts, o.recipients = _getopt(argv)
    for letter, value in opts:
        if letter == "A" and value in ("c", "m"):
            continue
        if letter in ("b", "A"):
            if value == "p":
                o.mode = "list"
            elif value == "q":
                o.queue_only = True
            elif value == "i":
                o.mode = "newaliases"
            elif value in ("m", "d", "v", "t"):
                pass  # deliver mail normally, as C dma treats every other mode
            elif value == "s":
                raise UsageError("-bs (SMTP on standard input) is not supported")
            elif letter == "b":
                raise UsageError(f"unknown mode -b{value}")
        elif letter == "D":
            o.foreground = True
        elif letter in ("f", "r"):
            o.sender = value
        elif letter == "F":
            o.full_name = value
        elif letter == "i":
            o.dot_ends = False
        elif letter == "o":
            if value == "i":
                o.dot_ends = False
            elif value in ("dq", "dd"):
                o.queue_only = True
            elif value == "di":
                o.foreground = True
            # -oem, -odb, -oXxx...: accepted and ignored, as C dma does.
        elif letter == "q":
            o.mode = "queue-run"
            if value.startswith("I") and len(value) > 1:
                o.queue_ids.append(value[1:])
            elif value == "I":
                raise UsageError("-qI needs a queue id")
        elif letter == "t":
            o.from_headers = True
        elif letter == "v":
            o.verbose = True
        elif letter == "C":
            o.config_path = value
        elif letter == "L":
            o.ident = value or "dma"
        # B, d, h, N, O, R, U, V, X, n: accepted and ignored (C dma does the same).
    if o.mode in ("list", "queue-run") and o.recipients:
        raise UsageError("sending mail and queue operations are mutually exclusive")
    return o


def _fail(e: DmaError) -> int:
    sys.stderr.write(f"dma: {e}\n")
    return e.exit_code


def _is_admin(args: Sequence[str]) -> bool:
    """``dma queue …``, ``dma setup …``, also after a leading ``-C FILE``."""
    if args[:1] == ["-C"]:
        args = args[2:]
    elif args[:1] and args[0].startswith("-C"):
        args = args[1:]
    return bool(args) and args[0] in ADMIN_COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        # Run as the program: once the answer is known, flush and leave without the
        # interpreter's tear-down (a few ms on every sendmail call; after a fork it would
        # also copy pages the delivery child shares).
        code = _main(sys.argv)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return _main(argv)


def _main(argv: Sequence[str]) -> int:
    argv = list(argv)
    prog = os.path.basename(argv[0]) if argv else "dma"
    args = argv[1:]
    if args[:1] == ["--version"]:
        sys.stdout.write(f"dma {__version__}\n")
        return EX_OK
    try:
        if prog not in ("sendmail", "mailq", "newaliases") and _is_admin(args):
            from dma import admin

            return admin.run(args)
        return _run(parse(args, prog))
    except DmaError as e:
        return _fail(e)
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    except OSError as e:
        sys.stderr.write(f"dma: {e}\n")
        return EX_OSERR
    except Exception as e:  # noqa: BLE001 - one line for the caller, never a traceback
        sys.stderr.write(f"dma: internal error: {type(e).__name__}: {e}\n")
        return EX_SOFTWARE


def _run(o: Options) -> int:
    from dma import config as config_mod
    from dma.log import Log

    cfg = config_mod.load(o.config_path)
    log = Log(o.ident, verbose=o.verbose,
              fallback_path=cfg.log_path)
    if o.mode == "newaliases":
        from dma.aliases import Aliases

        for line in Aliases.check(cfg.aliases):
            sys.stdout.write(f"{line}\n")
        return EX_OK
    if o.mode == "list":
        from dma import mailq

        sys.stdout.write(mailq.render(cfg))
        return EX_OK
    if o.mode == "queue-run":
        from dma import queue
        from dma.spool import Spool

        spool = Spool(cfg.spooldir)
        if not o.queue_ids:
            from dma import pickup

            pickup.pickup(spool, cfg, log)
        results = queue.run_queue(spool, cfg, log, o.queue_ids or None)
        missing = [r.queue_id for r in results if not r.claimed]
        if o.queue_ids and missing:
            log.info(f"skipped (locked by another runner or gone): {', '.join(missing)}")
        return EX_OK
    return _send(o, cfg, log)


def _send(o: Options, cfg: Config, log: Log) -> int:
    from dma.spool import Spool
    from dma.submit import Request, submit

    request = Request(recipients=o.recipients, sender=o.sender, full_name=o.full_name,
                      from_headers=o.from_headers, dot_ends=o.dot_ends)
    spool = Spool(cfg.spooldir)
    detached = not (o.queue_only or cfg.defer or o.foreground or spool.must_drop())
    # A detached delivery is started before the message is read: it loads the delivery
    # code while this process spools, and waits for the queue id of the committed message.
    early = _start_delivery_child(cfg, log, _warm_modules(o, cfg)) if detached else None
    try:
        qid = submit(sys.stdin.fileno(), request, cfg)
        if spool.must_drop():
            # Not ours to deliver: the queue runner picks it up (dma setup installs one that
            # watches the drop directory).
            log.info(f"{qid}: dropped for the queue runner")
            return EX_OK
        log.info(f"{qid}: queued")
        if o.queue_only or cfg.defer:
            return EX_OK
        if o.foreground:
            return _deliver_now(qid, cfg, log)
        if early is None:
            # No head start (the fork before reading failed): the same child, started now.
            early = _start_delivery_child(cfg, log, ())
        if early is None:
            log.warning(f"{qid}: cannot start delivery (no process); it stays queued")
        else:
            _hand_over(early, qid, log)
            early = None
        return EX_OK
    finally:
        if early is not None:
            os.close(early)  # the child reads EOF: nothing to deliver, it exits


def _deliver_now(qid: str, cfg: Config, log: Log) -> int:
    """The first attempt at a message this process has just committed."""
    from dma import queue
    from dma.spool import Spool

    try:
        result = queue.deliver_message(Spool(cfg.spooldir), qid, cfg, log, fresh=True)
    except OSError as e:
        log.error(f"{qid}: delivery attempt failed: {e}; the message stays queued")
        return EX_TEMPFAIL
    # Still queued for someone: the caller should know it is not finished yet.
    if result.pending:
        return EX_TEMPFAIL
    if result.failed:
        return EX_UNAVAILABLE
    return EX_OK


def _warm_modules(o: Options, cfg: Config) -> tuple[str, ...]:
    """What the delivery will import, for the early child to load while the message is
    spooled.  Only what the recipients known now need: loading SMTP, TLS and DNS for a
    local mailbox would delay that delivery instead.  A wrong guess costs only time; the
    delivery imports whatever it needs itself (a local name aliased to a remote address
    loads SMTP then, as before)."""
    mods: tuple[str, ...] = ("dma.queue", "dma.local")
    if o.from_headers or cfg.nullclient or any("@" in r for r in o.recipients):
        mods += ("dma.smtp", "dma.auth")
        if not cfg.smarthost:
            mods += ("dns.resolver", "dns.nameserver")  # MX lookups
    return mods


def _start_delivery_child(cfg: Config, log: Log, modules: Sequence[str]) -> int | None:
    """Fork the detached delivery now; returns the pipe on which it waits for the queue
    id, or None when it cannot be started."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        rfd, wfd = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(rfd)
        os.close(wfd)
        return None
    if pid:
        os.close(rfd)
        return wfd
    status = EX_OK
    try:
        os.close(wfd)  # else the child would never see EOF when the parent dies
        _detach(log)
        for name in modules:
            try:
                __import__(name)
            except BaseException:  # noqa: BLE001 - the delivery imports it again and says why
                pass
        qid = _read_queue_id(rfd)
        if qid:
            _deliver_in_child(qid, cfg, log)
    except BaseException as e:  # noqa: BLE001 - the child must always exit here
        log.error(f"delivery process crashed: {e!r}; the message stays queued")
        status = EX_SOFTWARE
    finally:
        os._exit(status)


def _read_queue_id(fd: int) -> str:
    """The queue id the parent writes once the message is committed, or "" for nothing to
    deliver (end of file: the submission failed, was dropped, or the parent died)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 256)
        if not chunk:
            return ""
        data += chunk
    return data[:-1].decode("ascii", "replace")


def _hand_over(wfd: int, qid: str, log: Log) -> None:
    """Give the committed message's id to the waiting delivery child."""
    try:
        os.write(wfd, f"{qid}\n".encode())
    except OSError as e:
        log.warning(f"{qid}: cannot start delivery ({e.strerror}); it stays queued")
    finally:
        os.close(wfd)


def _detach(log: Log) -> None:
    """Leave the caller's session and let go of its terminal and pipes, so that cron and
    mail clients are not kept waiting for the delivery (and stdin is the parent's alone)."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    log.verbose = False


def _deliver_in_child(qid: str, cfg: Config, log: Log) -> None:
    if _deliver_now(qid, cfg, log) == EX_TEMPFAIL:
        from dma import hostsetup, queue
        from dma.spool import Spool

        if not hostsetup.runner_installed():
            queue.retry_until_done(Spool(cfg.spooldir), qid, cfg, log)


if __name__ == "__main__":
    sys.exit(main())
