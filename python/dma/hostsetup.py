"""``dma setup``: make dma this host's mail transfer agent, and ``--uninstall`` to undo it.

Every step is a small action object: ``check()`` says what it would change (None when it is
already in place), ``apply()`` changes it, ``describe()`` names the thing in place.  The whole
plan is checked before anything is changed, so an error that can be foreseen (a script that
cannot be found, a file where a directory belongs) stops the run before it starts.  Running
it twice changes nothing the second time, and ``--dry-run`` prints the plan only.

What it does (paths under ``--root DIR`` when given, like DESTDIR):

1. the spool (SPOOLDIR 0755 root:root; ``tmp/ queue/ journal/ hold/`` 0700 root:root; the
   drop directory ``incoming/`` 01733 root:mail, where any local user may create files but
   not list or read them);
2. the mail spool (MAILSPOOL, 2775 root:mail, created only when missing);
3. ``/etc/dma/dma.conf`` with every directive commented out at its default, when missing;
4. links ``/usr/sbin/sendmail``, ``/usr/bin/mailq``, ``/usr/bin/newaliases`` (and
   ``/usr/lib/sendmail`` when there is one) to dma's console scripts, whatever was there kept
   as ``PATH.pre-dma``;
5. the queue runner: systemd units (``dma-queue.service``, ``.timer``, ``dma-pickup.path``)
   when systemd runs, otherwise ``/etc/cron.d/dma``.

``--uninstall`` removes 4 and 5 (restoring the backups) and keeps the spool, the mailboxes
and dma.conf: they hold mail and the administrator's settings.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import click

from dma import config as config_mod
from dma.errors import EX_CANTCREAT, EX_CONFIG, EX_NOPERM, EX_OSERR, ConfigError, DmaError

MARKER = "# Installed by dma setup; dma setup --uninstall removes it."
BACKUP_SUFFIX = ".pre-dma"
LINKS: tuple[tuple[str, str], ...] = (
    ("/usr/sbin/sendmail", "sendmail"),
    ("/usr/bin/mailq", "mailq"),
    ("/usr/bin/newaliases", "newaliases"),
)
OPTIONAL_LINKS: tuple[tuple[str, str], ...] = (("/usr/lib/sendmail", "sendmail"),)
"""Linked only when something is already there."""
UNIT_DIR = "/etc/systemd/system"
SERVICE = "dma-queue.service"
TIMER = "dma-queue.timer"
PICKUP = "dma-pickup.path"
CRON_FILE = "/etc/cron.d/dma"
SYSTEMD_RUNNING = "/run/systemd/system"
SPOOL_SUBDIRS = ("tmp", "queue", "journal", "hold")
DROP_DIR = "incoming"


class SetupError(DmaError):
    """A step of ``dma setup`` failed: ``setup: WHAT failed: REASON``."""

    def __init__(self, what: str, reason: str, exit_code: int = EX_CANTCREAT) -> None:
        super().__init__(f"setup: {what} failed: {reason}")
        self.exit_code = exit_code


class NotRootError(DmaError):
    exit_code = EX_NOPERM


def _os_error(what: str, e: OSError) -> SetupError:
    code = EX_NOPERM if e.errno in (errno.EPERM, errno.EACCES, errno.EROFS) else EX_CANTCREAT
    reason = e.strerror or str(e)
    if e.filename is not None:
        reason = f"{e.filename}: {reason}"
    return SetupError(what, reason, code)


# --- the system being set up ---------------------------------------------------------------


@dataclass
class Host:
    """The system being set up: the real one (``root == ""``) or an image under ``root``."""

    root: str = ""
    dry_run: bool = False
    manage_owners: bool = True
    """Set owners (off when an unprivileged user prepares an image under --root)."""
    systemd_running: bool = False
    """systemd runs on the real machine, so systemctl can be called (never under --root)."""
    warnings: list[str] = field(default_factory=list)

    def path(self, system_path: str) -> str:
        """Where a system path is on this host."""
        if not self.root:
            return system_path
        return os.path.join(self.root, system_path.lstrip("/"))

    def system_path(self, path: str) -> str:
        """The inverse of :meth:`path` where it applies (a path inside the image)."""
        if self.root and (path == self.root or path.startswith(self.root + "/")):
            return "/" + path[len(self.root):].lstrip("/")
        return path

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def can_run_systemctl(self) -> bool:
        return not self.root and self.systemd_running


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _owner(uid: int, gid: int) -> str:
    return f"{_user(uid)}:{_group(gid)}"


def _lexists(path: str) -> bool:
    return os.path.lexists(path)


def _read(path: str, limit: int = 1 << 20) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def is_dma_script(path: str) -> bool:
    """Whether ``path`` is (or leads to) one of dma's console scripts."""
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        return False
    head = _read(path, 4096)
    return head is not None and b"dma.cli" in head


def find_script(name: str) -> str | None:
    """dma's console script ``name``: next to the running ``dma``, next to the interpreter,
    or on PATH.  A symbolic link (say ``/usr/sbin/sendmail`` from an earlier setup) is
    resolved, so a link never points at itself."""
    dirs = [os.path.dirname(os.path.abspath(sys.argv[0])), os.path.dirname(sys.executable)]
    candidates = [os.path.join(d, name) for d in dirs if d]
    found = shutil.which(name)
    if found:
        candidates.append(found)
    for candidate in candidates:
        candidate = os.path.abspath(candidate)
        if is_dma_script(candidate):
            return os.path.realpath(candidate) if os.path.islink(candidate) else candidate
    return None


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


# --- actions -----------------------------------------------------------------------------


class Action:
    """One step.  ``check()`` is called once while planning; ``apply()`` only when it
    returned a change, and may return a line to print instead of ``done: CHANGE``."""

    settled_word = "ok"

    def counts(self) -> bool:
        """Whether applying it is a change made (not only a line printed)."""
        return True

    def describe(self) -> str:
        raise NotImplementedError

    def check(self) -> str | None:
        raise NotImplementedError

    def apply(self) -> str | None:
        raise NotImplementedError


class Directory(Action):
    """A directory with an exact mode and owner (fixed when wrong; contents never touched).
    ``create_only``: an existing one is left as it is."""

    def __init__(self, host: Host, path: str, mode: int, uid: int, gid: int,
                 create_only: bool = False) -> None:
        self.host, self.path, self.mode, self.uid, self.gid = host, path, mode, uid, gid
        self.create_only = create_only

    def _spec(self) -> str:
        return f"{_owner(self.uid, self.gid)} {self.mode:04o}"

    def describe(self) -> str:
        if self.create_only:
            return f"directory {self.path} exists (mode and owner left alone)"
        return f"directory {self.path} ({self._spec()})"

    def check(self) -> str | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"create directory {self.path} ({self._spec()})"
        except OSError as e:
            raise _os_error(f"directory {self.path}", e) from None
        if not stat.S_ISDIR(st.st_mode):
            raise SetupError(f"directory {self.path}", "it exists and is not a directory")
        if self.create_only:
            mode = stat.S_IMODE(st.st_mode)
            if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                self.host.warn(f"{self.path} is world-writable without the sticky bit"
                               f" (mode {mode:04o}): any user can delete others' mailboxes")
            return None
        changes = []
        mode = stat.S_IMODE(st.st_mode)
        if mode != self.mode:
            changes.append(f"mode {mode:04o} -> {self.mode:04o}")
        if self.host.manage_owners and (st.st_uid, st.st_gid) != (self.uid, self.gid):
            changes.append(f"owner {_owner(st.st_uid, st.st_gid)} -> "
                           f"{_owner(self.uid, self.gid)}")
        return f"fix directory {self.path}: {', '.join(changes)}" if changes else None

    def apply(self) -> str | None:
        try:
            if not os.path.isdir(self.path):
                os.makedirs(os.path.dirname(self.path), 0o755, exist_ok=True)
                os.mkdir(self.path, 0o700)
            if self.host.manage_owners:
                os.chown(self.path, self.uid, self.gid)
            os.chmod(self.path, self.mode)  # after chown, which may clear set-id bits
        except OSError as e:
            raise _os_error(f"directory {self.path}", e) from None
        return None


class Keep(Action):
    """Nothing to do, said out loud (what --uninstall leaves in place, and why)."""

    settled_word = "kept"

    def __init__(self, text: str) -> None:
        self.text = text

    def describe(self) -> str:
        return self.text

    def check(self) -> str | None:
        return None

    def apply(self) -> str | None:  # pragma: no cover - never pending
        return None


def _tmp_name(path: str) -> str:
    """The temporary name next to ``path`` that a new version is prepared under."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.dma-setup")


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` (which must not exist) with ``data`` and exactly ``mode``; fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


class ConfigFile(Action):
    """dma.conf, written only when there is none."""

    def __init__(self, host: Host, path: str) -> None:
        self.host, self.path = host, path

    def describe(self) -> str:
        return f"{self.path} exists (never overwritten)"

    def check(self) -> str | None:
        if _lexists(self.path):
            return None
        return f"write {self.path} (every directive commented out at its default)"

    def apply(self) -> str | None:
        try:
            os.makedirs(os.path.dirname(self.path), 0o755, exist_ok=True)
            tmp = _tmp_name(self.path)
            if _lexists(tmp):
                os.unlink(tmp)
            _write_file(tmp, default_config_text().encode(), 0o644)
            try:
                os.link(tmp, self.path)  # never replaces a file that appeared meanwhile
            finally:
                os.unlink(tmp)
        except FileExistsError:
            return f"ok: {self.describe()}"
        except OSError as e:
            raise _os_error(f"writing {self.path}", e) from None
        return None


class Placed(Action):
    """Something dma puts at ``path`` (a link or a file).  Whatever else was there is kept
    as ``path.pre-dma`` (once: an existing backup is never overwritten); ``uninstall``
    removes dma's thing and puts the backup back."""

    kind = "file"

    def __init__(self, host: Host, path: str, uninstall: bool = False,
                 restore: bool = True) -> None:
        self.host, self.path, self.uninstall, self.restore = host, path, uninstall, restore
        self.backup = path + BACKUP_SUFFIX

    # what the subclasses define
    def is_current(self) -> bool:
        """``path`` already holds exactly what would be put there."""
        raise NotImplementedError

    def is_ours(self) -> bool:
        """``path`` holds something dma put there (maybe an older version)."""
        raise NotImplementedError

    def make(self, tmp: str) -> None:
        """Create the new thing at ``tmp``."""
        raise NotImplementedError

    def target_text(self) -> str:
        return self.path

    # install / uninstall
    def describe(self) -> str:
        if self.uninstall:
            if _lexists(self.path):
                return f"{self.path} is not dma's: left alone"
            return f"{self.path} is not there"
        return f"{self.target_text()}"

    def _what(self) -> str:
        return f"{self.kind} {self.path}"

    def check(self) -> str | None:
        try:
            return self._check_uninstall() if self.uninstall else self._check_install()
        except OSError as e:
            raise _os_error(self._what(), e) from None

    def _check_install(self) -> str | None:
        verb = "link" if self.kind == "link" else "write"
        if not _lexists(self.path):
            return f"{verb} {self.target_text()}"
        if os.path.isdir(self.path) and not os.path.islink(self.path):
            raise SetupError(self._what(), f"{self.path} is a directory")
        if self.is_current():
            return None
        if self.is_ours():
            return f"update {self.target_text()}"
        if not _lexists(self.backup):
            return f"{verb} {self.target_text()} (moving what is there to {self.backup})"
        if os.path.islink(self.path):
            return f"{verb} {self.target_text()} (replacing the link there; {self.backup}" \
                   " is kept as it is)"
        raise SetupError(self._what(), f"{self.path} is not dma's and the backup {self.backup}"
                         " already exists; move one of them away", EX_CANTCREAT)

    def _check_uninstall(self) -> str | None:
        ours = _lexists(self.path) and self.is_ours()
        backup = self.restore and _lexists(self.backup)
        if ours and backup:
            return f"restore {self.path} from {self.backup}"
        if ours:
            return f"remove {self.path}"
        if backup and not _lexists(self.path):
            return f"restore {self.path} from {self.backup}"
        if backup:
            self.host.warn(f"{self.path} is not dma's: left alone, and so is {self.backup}")
        return None

    def apply(self) -> str | None:
        try:
            if self.uninstall:
                if self.restore and _lexists(self.backup):
                    os.replace(self.backup, self.path)
                else:
                    os.unlink(self.path)
                return None
            os.makedirs(os.path.dirname(self.path), 0o755, exist_ok=True)
            tmp = _tmp_name(self.path)
            if _lexists(tmp):
                os.unlink(tmp)
            if self.is_current():  # an earlier action made it so
                return f"{self.settled_word}: {self.describe()}"
            self.make(tmp)
            try:
                if _lexists(self.path) and not self.is_ours() and not _lexists(self.backup):
                    self._backup()
                os.replace(tmp, self.path)  # atomic: the path is never missing
            finally:
                if _lexists(tmp):
                    os.unlink(tmp)
        except OSError as e:
            raise _os_error(self._what(), e) from None
        return None

    def _backup(self) -> None:
        try:
            # A hard link keeps the old thing in place until os.replace swaps in ours.
            os.link(self.path, self.backup, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:
            os.rename(self.path, self.backup)


class Link(Placed):
    """A symbolic link to one of dma's console scripts."""

    kind = "link"

    def __init__(self, host: Host, path: str, target: str | None, name: str,
                 uninstall: bool = False, via: Sequence[str] = ()) -> None:
        super().__init__(host, path, uninstall)
        self.target, self.name, self.via = target, name, tuple(via)

    def _points_via(self) -> bool:
        """A link to another of the links dma manages (Debian's /usr/lib/sendmail ->
        ../sbin/sendmail): right as it is, and not dma's to remove."""
        if not self.via or not os.path.islink(self.path):
            return False
        dest = os.readlink(self.path)
        if os.path.isabs(dest):
            dest = self.host.path(dest)
        else:
            dest = os.path.normpath(os.path.join(os.path.dirname(self.path), dest))
        return dest in self.via

    def target_text(self) -> str:
        return f"{self.path} -> {self.target}"

    def describe(self) -> str:
        if self._points_via():
            return f"link {self.path} -> {os.readlink(self.path)} (leads to dma's)"
        if not self.uninstall:
            return f"link {self.target_text()}"
        return super().describe()

    def is_current(self) -> bool:
        if self._points_via():
            return True
        return (self.target is not None and os.path.islink(self.path)
                and _same_file(self.path, self.target))

    def is_ours(self) -> bool:
        if not os.path.islink(self.path) or self._points_via():
            return False
        if os.path.exists(self.path):
            return is_dma_script(os.path.realpath(self.path))
        # A dangling link to a script of the same name: a dma installation that has since
        # been removed (a deleted virtual environment).  Worthless either way.
        return os.path.basename(os.readlink(self.path)) == self.name

    def make(self, tmp: str) -> None:
        assert self.target is not None
        os.symlink(self.target, tmp)


class ManagedFile(Placed):
    """A file dma writes (systemd unit, cron entry), recognised by :data:`MARKER`."""

    def __init__(self, host: Host, path: str, content: str, mode: int = 0o644,
                 uninstall: bool = False, restore: bool = True) -> None:
        super().__init__(host, path, uninstall, restore)
        self.content, self.mode = content.encode(), mode

    def describe(self) -> str:
        if not self.uninstall:
            return f"{self.path} (up to date)"
        return super().describe()

    def is_current(self) -> bool:
        if os.path.islink(self.path) or _read(self.path) != self.content:
            return False
        return stat.S_IMODE(os.stat(self.path).st_mode) == self.mode

    def is_ours(self) -> bool:
        if os.path.islink(self.path):
            return False
        data = _read(self.path)
        return data is not None and MARKER.encode() in data

    def make(self, tmp: str) -> None:
        _write_file(tmp, self.content, self.mode)


class Systemctl(Action):
    """A systemctl call.  Pending when ``needed()`` says so at planning time; under --root
    (or where systemd does not run) it is printed, not run."""

    def __init__(self, host: Host, args: Sequence[str], needed: Callable[[], bool],
                 settled: str) -> None:
        self.host, self.args, self.needed, self.settled = host, list(args), needed, settled

    def _cmd(self) -> str:
        return shlex.join(["systemctl", *self.args])

    def describe(self) -> str:
        return self.settled

    def counts(self) -> bool:
        return self.host.can_run_systemctl()

    def _why_not(self) -> str:
        return "under --root" if self.host.root else "systemd is not running"

    def check(self) -> str | None:
        if not self.needed():
            return None
        if not self.host.can_run_systemctl():
            return f"run {self._cmd()} (not run: {self._why_not()})"
        return f"run {self._cmd()}"

    def apply(self) -> str | None:
        if not self.host.can_run_systemctl():
            return f"skipped: {self._cmd()} ({self._why_not()}; run it on the system itself)"
        try:
            proc = subprocess.run(["systemctl", *self.args], capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SetupError(self._cmd(), str(e), EX_OSERR) from None
        if proc.returncode != 0:
            reason = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            raise SetupError(self._cmd(), reason[-1] if reason else
                             f"exit status {proc.returncode}", EX_OSERR)
        return None


def _systemctl_ok(*args: str) -> bool:
    try:
        return subprocess.run(["systemctl", *args], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# --- what gets written -------------------------------------------------------------------


@dataclass(frozen=True)
class Directive:
    key: str
    value: str
    """The default when ``is_default``, otherwise an example (or "" for a boolean)."""
    is_default: bool
    help: str


def _duration(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _directives() -> tuple[Directive, ...]:
    d = config_mod.Config()

    def default(key: str, value: object, text: str) -> Directive:
        shown = _duration(value) if isinstance(value, float) else str(value)
        return Directive(key, shown, True, text)

    def example(key: str, value: str, text: str) -> Directive:
        return Directive(key, value, False, text)

    return (
        example("SMARTHOST", "mail.example.org",
                "Send all remote mail through this host instead of to the recipients'\n"
                "MX hosts. Unset by default: dma delivers directly."),
        default("PORT", d.port, "Port of SMARTHOST (465: SECURETRANSFER; 587: with STARTTLS)."),
        default("ALIASES", d.aliases, "The aliases file (see newaliases)."),
        default("SPOOLDIR", d.spooldir, "The mail queue."),
        example("AUTHPATH", "/etc/dma/auth.conf",
                "Smarthost credentials, lines \"user|smarthost:password\"; keep it\n"
                "readable by root only. Unset by default: no AUTH."),
        example("CERTFILE", "/etc/dma/client.pem",
                "Client certificate and its key (PEM) to present. Unset by default."),
        example("SECURETRANSFER", "",
                "Use TLS towards SMARTHOST: implicit TLS, or STARTTLS with STARTTLS.\n"
                "Off by default."),
        example("STARTTLS", "", "With SECURETRANSFER: start TLS with STARTTLS. Off by default."),
        example("OPPORTUNISTIC_TLS", "",
                "With STARTTLS: go on in clear text when the server offers no\n"
                "STARTTLS. Off by default."),
        example("VERIFYCERT", "",
                "Verify server certificates, also for MX delivery (the smarthost's\n"
                "certificate is verified anyway unless TLS_NOVERIFY). Off by default."),
        example("FINGERPRINT", "0" * 64,
                "Accept only the server certificate with this SHA-256 fingerprint\n"
                "(64 hex digits). Unset by default."),
        example("INSECURE", "", "Allow AUTH without TLS. Off by default."),
        example("DEFER", "", "Only queue at submission; queue runs deliver. Off by default."),
        example("FULLBOUNCE", "",
                "Bounces carry the whole message instead of its headers. Off by default."),
        example("MAILNAME", "/etc/mailname",
                "This host's mail name, or the absolute path of a file whose first line\n"
                "is the name. Default: the host name."),
        example("MASQUERADE", "example.org",
                "Rewrite senders: \"user@host\", \"user@\" or \"host\". Unset by default."),
        example("NULLCLIENT", "",
                "Send all mail, local mail too, to SMARTHOST (which it needs).\n"
                "Off by default."),
        default("MAILSPOOL", d.mailspool, "Where local mailboxes are."),
        default("MAILBOXFORMAT", d.mailbox_format, "Local mailboxes: mbox or maildir."),
        example("RESOLVER", "127.0.0.1:53",
                "DNS server to ask instead of /etc/resolv.conf's (address[:port],\n"
                "[IPv6]:port). Unset by default."),
        example("CAFILE", "/etc/ssl/certs/ca-certificates.crt",
                "CA certificates (PEM) to verify servers with instead of the system's.\n"
                "Unset by default."),
        example("TLS_NOVERIFY", "",
                "Do not verify the smarthost's certificate. Off by default."),
        default("MX_TLS", d.mx_tls,
                "TLS for direct MX delivery: none, may (when offered), encrypt\n"
                "(required, unverified) or verify (required and verified)."),
        default("CONNECT_TIMEOUT", d.connect_timeout,
                "SMTP time limits (durations: 90, 90s, 5m, 3h, 5d, 1w)."),
        default("GREETING_TIMEOUT", d.greeting_timeout, ""),
        default("MAIL_TIMEOUT", d.mail_timeout, ""),
        default("RCPT_TIMEOUT", d.rcpt_timeout, ""),
        default("DATA_TIMEOUT", d.data_timeout, ""),
        default("DATABLOCK_TIMEOUT", d.datablock_timeout, ""),
        default("DOT_TIMEOUT", d.dot_timeout, ""),
        default("MAX_PARALLEL", d.max_parallel, "Most deliveries a queue run makes at once."),
        default("RETRY_MIN", d.retry_min,
                "First retry after a temporary failure; the interval doubles up to\n"
                "RETRY_MAX."),
        default("RETRY_MAX", d.retry_max, ""),
        default("LIFETIME", d.lifetime, "Undeliverable mail is bounced after this long."),
        example("DELAY_WARNING", "4h",
                "Tell the sender when a message is still queued after this long.\n"
                "Unset by default: no delay notices."),
        example("LOGFILE", "/var/log/dma.log",
                "Log file used when there is no syslog. Default: SPOOLDIR/dma.log."),
    )


DIRECTIVE_DOCS: tuple[Directive, ...] = _directives()


def default_config_text() -> str:
    """A dma.conf that lists every directive, all commented out: it means the defaults."""
    lines = [
        "# dma.conf: the configuration of dma, this host's mail transfer agent.",
        "# Written by \"dma setup\"; it is yours now (dma setup never overwrites it).",
        "#",
        "# Every directive is commented out: each shows its default, or an example when",
        "# it is unset or off by default.  Remove the \"#\" to use one.  Directives are",
        "# case-sensitive; a directive without a value (SECURETRANSFER ...) turns it on.",
        "# Everything from a \"#\" to the end of the line is a comment.",
    ]
    for d in DIRECTIVE_DOCS:
        if d.help:
            lines.append("")
            lines.extend(f"# {line}" for line in d.help.split("\n"))
        lines.append(f"#{d.key} {d.value}".rstrip())
    return "\n".join(lines) + "\n"


def _systemd_quote(word: str) -> str:
    if word and not any(c in word for c in " \t\"'\\;$%"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_units(dma: str, spooldir: str, conf: str | None) -> dict[str, str]:
    """File name -> contents of the three units."""
    env = f"Environment={_systemd_quote('DMA_CONF=' + conf)}\n" if conf else ""
    service = (
        f"{MARKER}\n"
        "[Unit]\n"
        "Description=dma mail queue run (due retries and dropped messages)\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"{env}"
        f"ExecStart={_systemd_quote(dma)} queue run\n"
        "Nice=10\n"
        "TimeoutStartSec=30min\n"
    )
    timer = (
        f"{MARKER}\n"
        "[Unit]\n"
        "Description=Run the dma mail queue every minute\n"
        "\n"
        "[Timer]\n"
        "OnBootSec=1min\n"
        "OnUnitActiveSec=1min\n"
        "Persistent=true\n"
        f"Unit={SERVICE}\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )
    pickup = (
        f"{MARKER}\n"
        "[Unit]\n"
        "Description=Deliver mail dropped into the dma spool by unprivileged users\n"
        "\n"
        "[Path]\n"
        f"PathChanged={os.path.join(spooldir, DROP_DIR)}\n"
        f"Unit={SERVICE}\n"
        "\n"
        "[Install]\n"
        "WantedBy=paths.target\n"
    )
    return {SERVICE: service, TIMER: timer, PICKUP: pickup}


def cron_entry(dma: str, conf: str | None) -> str:
    cmd = f"{shlex.quote(dma)} queue run"
    return (
        f"{MARKER}\n"
        "# Runs the dma mail queue: due retries and messages dropped by unprivileged users.\n"
        "SHELL=/bin/sh\n"
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
        + (f"DMA_CONF={conf}\n" if conf else "")
        + f"* * * * * root {cmd} >/dev/null 2>&1\n"
        f"@reboot root {cmd}\n"
    )


# --- planning ----------------------------------------------------------------------------


@dataclass
class Plan:
    host: Host
    actions: list[Action]


def _mail_gid(host: Host) -> int:
    try:
        return grp.getgrnam("mail").gr_gid
    except KeyError:
        host.warn("there is no group 'mail': the drop directory and the mail spool get"
                  " group root (gid 0)")
        return 0


def _require(name: str) -> str:
    path = find_script(name)
    if path is None:
        where = os.path.dirname(os.path.abspath(sys.argv[0]))
        raise SetupError(f"finding dma's {name!r} script",
                         f"not in {where}, next to {sys.executable} or on PATH;"
                         " is dma installed (pip install dma)?", EX_CONFIG)
    return path


def _via(host: Host, name: str) -> list[str]:
    return [host.path(p) for p, n in LINKS if n == name]


def plan_install(host: Host, cfg: config_mod.Config, conf_path: str, conf_for_system: str | None,
                 init: str) -> Plan:
    for name, value in (("SPOOLDIR", cfg.spooldir), ("MAILSPOOL", cfg.mailspool)):
        if not os.path.isabs(value):
            raise SetupError("reading the configuration",
                             f"{name} must be an absolute path, got {value!r}", EX_CONFIG)
    scripts = {name: _require(name) for name in ("dma", "sendmail", "mailq", "newaliases")}
    mail_gid = _mail_gid(host)
    spool = host.path(cfg.spooldir)
    actions: list[Action] = [Directory(host, spool, 0o755, 0, 0)]
    actions += [Directory(host, os.path.join(spool, sub), 0o700, 0, 0) for sub in SPOOL_SUBDIRS]
    actions.append(Directory(host, os.path.join(spool, DROP_DIR), 0o1733, 0, mail_gid))
    mailspool = host.path(cfg.mailspool)
    actions.append(Directory(host, mailspool, 0o2775, 0, mail_gid,
                             create_only=os.path.isdir(mailspool)))
    actions.append(ConfigFile(host, conf_path))
    for system_path, name in LINKS:
        actions.append(Link(host, host.path(system_path), scripts[name], name))
    for system_path, name in OPTIONAL_LINKS:
        if _lexists(host.path(system_path)):
            actions.append(Link(host, host.path(system_path), scripts[name], name,
                                via=_via(host, name)))

    if init == "systemd":
        units = [ManagedFile(host, host.path(os.path.join(UNIT_DIR, name)), text)
                 for name, text in systemd_units(scripts["dma"], cfg.spooldir,
                                                 conf_for_system).items()]
        actions += units
        stale_cron = ManagedFile(host, host.path(CRON_FILE), "", uninstall=True, restore=False)
        if stale_cron.is_ours():
            actions.append(stale_cron)
        changed = [u.check() is not None for u in units]

        def units_changed() -> bool:
            return any(changed)

        def not_running() -> bool:
            if not host.can_run_systemctl():
                return any(changed)
            return any(changed) or not all(
                _systemctl_ok(verb, "--quiet", unit)
                for unit in (TIMER, PICKUP) for verb in ("is-enabled", "is-active"))

        actions.append(Systemctl(host, ["daemon-reload"], units_changed,
                                 "systemd knows the current units"))
        actions.append(Systemctl(host, ["enable", "--now", TIMER, PICKUP], not_running,
                                 f"{TIMER} and {PICKUP} enabled and running"
                                 if host.can_run_systemctl() else "units unchanged"))
    else:
        actions.append(ManagedFile(host, host.path(CRON_FILE),
                                   cron_entry(scripts["dma"], conf_for_system)))
    return Plan(host, actions)


def plan_uninstall(host: Host, cfg: config_mod.Config, conf_path: str) -> Plan:
    actions: list[Action] = []
    units = [ManagedFile(host, host.path(os.path.join(UNIT_DIR, name)), "", uninstall=True)
             for name in (SERVICE, TIMER, PICKUP)]
    ours = [u.is_ours() for u in units]

    def any_units() -> bool:
        return any(ours)

    actions.append(Systemctl(host, ["disable", "--now", TIMER, PICKUP], any_units,
                             "no dma units to disable"))
    actions += units
    actions.append(Systemctl(host, ["daemon-reload"], any_units, "no dma units to forget"))
    actions.append(ManagedFile(host, host.path(CRON_FILE), "", uninstall=True))
    dma_scripts = {name: find_script(name) for name in ("sendmail", "mailq", "newaliases")}
    for system_path, name in LINKS:
        actions.append(Link(host, host.path(system_path), dma_scripts[name], name,
                            uninstall=True))
    for system_path, name in OPTIONAL_LINKS:
        actions.append(Link(host, host.path(system_path), dma_scripts[name], name,
                            uninstall=True, via=_via(host, name)))
    actions.append(Keep(f"{host.path(cfg.spooldir)}: the mail queue; remove it by hand once"
                        " `mailq` says it is empty"))
    actions.append(Keep(f"{host.path(cfg.mailspool)}: the local mailboxes"))
    actions.append(Keep(f"{conf_path}: your configuration"))
    return Plan(host, actions)


def execute(plan: Plan, out: Callable[[str], None]) -> int:
    """Checks every action, then (unless dry run) applies the pending ones in order, one
    line each.  Returns the number of changes."""
    checked = [(a, a.check()) for a in plan.actions]
    changes = 0
    for action, change in checked:
        if change is None:
            out(f"{action.settled_word}: {action.describe()}")
        elif plan.host.dry_run:
            out(f"would: {change}")
            changes += action.counts()
        else:
            line = action.apply()
            if line is None and action.counts():
                changes += 1
            out(line or f"done: {change}")
    return changes


# --- the command -------------------------------------------------------------------------


def _config_path(ctx: click.Context) -> str | None:
    obj = ctx.find_root().obj
    if obj is None or isinstance(obj, str):
        return obj
    cfg = getattr(obj, "config", None)  # admin's shared context, when made already
    path = getattr(cfg, "path", None)
    return path if isinstance(path, str) else None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-n", "--dry-run", is_flag=True, help="List every action; change nothing.")
@click.option("--uninstall", is_flag=True,
              help="Remove the queue runner and the links (restoring what was there); keep"
                   " the spool, the mailboxes and dma.conf.")
@click.option("--root", "root", metavar="DIR",
              type=click.Path(exists=True, file_okay=False, resolve_path=True),
              help="Operate on a system image under DIR (like DESTDIR): every system path is"
                   " prefixed with DIR and systemctl is never run.")
@click.option("--init", type=click.Choice(["auto", "systemd", "cron"]), default="auto",
              show_default=True,
              help="Queue runner: systemd units or a cron entry (auto: systemd when it runs"
                   " on this machine).")
@click.pass_context
def command(ctx: click.Context, dry_run: bool, uninstall: bool, root: str | None,
            init: str) -> None:
    """Make dma this host's mail transfer agent.

    Creates the spool and its drop directory, the mail spool, a commented
    /etc/dma/dma.conf when there is none, links sendmail, mailq and newaliases to dma
    (keeping what was there as *.pre-dma), and installs a systemd timer (or a cron entry)
    that runs the queue.  Running it again changes nothing.
    """
    is_root = os.geteuid() == 0
    if not (is_root or root or dry_run):
        raise NotRootError("setup must run as root (--dry-run shows what it would do)")
    root = (root or "").rstrip("/")
    host = Host(root=root, dry_run=dry_run, manage_owners=is_root or not root,
                systemd_running=os.path.isdir(SYSTEMD_RUNNING))

    named = _config_path(ctx)
    if named is None:
        named, explicit = config_mod.default_path()
    else:
        explicit = True
    conf_for_system: str | None = None
    if explicit:
        conf_path = os.path.abspath(named)
        system_conf = host.system_path(conf_path)
        if system_conf != config_mod.DEFAULT_PATH:
            conf_for_system = system_conf  # the queue runner must read it too
    else:
        conf_path = host.path(config_mod.DEFAULT_PATH)
    try:
        cfg = (config_mod.load(conf_path) if explicit or _lexists(conf_path)
               else config_mod.Config())
    except ConfigError as e:
        raise SetupError("reading the configuration", str(e), EX_CONFIG) from None

    if init == "auto":
        init = "systemd" if host.systemd_running else "cron"
    plan = (plan_uninstall(host, cfg, conf_path) if uninstall
            else plan_install(host, cfg, conf_path, conf_for_system, init))

    def out(line: str) -> None:
        click.echo(line)

    try:
        changes = execute(plan, out)
    finally:
        for w in host.warnings:
            click.echo(f"dma: setup: warning: {w}", err=True)
    if dry_run:
        click.echo(f"dry run: {changes} change(s) would be made; nothing was changed"
                   if changes else "dry run: nothing to do")
    elif changes:
        click.echo(f"{changes} change(s) made" + ("; dma is removed" if uninstall else
                                                 "; dma is this host's MTA"))
    else:
        click.echo("nothing to do: " + ("dma is not installed" if uninstall
                                        else "dma is already set up"))


def runner_installed(root: str = "/") -> bool:
    """Whether ``dma setup`` installed a queue runner (systemd timer or cron entry) here:
    without one, a deferred message would wait for a manual ``dma -q``."""
    for path in (os.path.join(UNIT_DIR, TIMER), CRON_FILE):
        data = _read(os.path.join(root, path.lstrip("/")))
        if data is not None and MARKER.encode() in data:
            return True
    return False
